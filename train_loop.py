"""MNIST as tensors on the device, and a hand-written SGD loop that yields at every validation.

    python train_loop.py --data-dir DIR                    # DEFAULT_HPARAMS: about 94% on 10,000 real digits
    python train_loop.py --learning-rate 0.1 --epochs 5    # any hyperparameter is a flag

Copy it with mlp.py: `data = load_mnist(data_dir, device)` (tensors, loaded once, on the device), `model =
seeded_model(hparams, seed)`, `for val in train(model, data, hparams):` and, at each validation, what your
loop decides (report to Optuna, prune, save, stop). Honest: validation is a fixed part of MNIST's training
set; only main() here, once at the end, and tune.py's final test touch the test set. Fast: no DataLoader,
no per-image transforms; minibatches are slices of tensors already on the device.
"""
import argparse
import collections
import functools
import gzip
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

from mlp import MLP

# ---------------------------------------------------------------------------- settings
DEFAULT_HPARAMS = {
    "in_size": 784, "hidden_size": 128, "out_size": 10, "layer_size": 2, "dropout": 0.2,  # model; layer_size: depth
    "batch_size": 32, "learning_rate": 0.05, "momentum": 0.9, "nesterov": True,             # SGD
    "weight_decay": 1e-5, "epochs": 2,
}
MODEL_KEYS = ("in_size", "hidden_size", "out_size", "layer_size", "dropout")  # MLP's arguments, in order
VAL_FRACTION = 1 / 6  # 10,000 of MNIST's 60,000 training images; the same fraction of a smaller set
SPLIT_SEED = 0        # fixed, so every trial and every study is scored on the very same images
VALIDATIONS_PER_EPOCH = 4  # each is a step of the trial's curve (trial.report): more, and pruning acts sooner
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of MNIST's training set, the usual normalisation
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# ------------------------------------------------------------------------------------

Validation = collections.namedtuple("Validation", "step epoch batch accuracy train_loss learning_rate epoch_end checkpoint")


class SetupError(Exception):
    """Something the user can fix (files, flags, devices); the message says how."""


def pick_device(name="auto", worker=0):
    """'auto' takes CUDA (worker i of several processes: GPU i, round robin), then Apple's MPS, then the CPU."""
    if name == "auto":
        name = (f"cuda:{worker % torch.cuda.device_count()}" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        return torch.empty(0, device=name).device  # raises if this machine has no such device
    except (RuntimeError, AssertionError):  # AssertionError: "Torch not compiled with CUDA enabled"
        raise SetupError(f"--device {name}: no such device on this machine; use auto, cpu, cuda, cuda:N or mps") from None


def load_mnist(data_dir, device, download=True):
    """MNIST as normalised float tensors on `device`: train, val (a fixed split of train) and test."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    try:
        if download and not all(os.path.exists(os.path.join(raw, name)) or os.path.exists(os.path.join(raw, name + ".gz"))
                                for name in MNIST_FILES):
            import torchvision  # only to download: importing it takes 1.5 s (it loads torch._dynamo)
            for train in (True, False):
                torchvision.datasets.MNIST(data_dir, train=train, download=True)
        train_images, train_labels, test_images, test_labels = (read_idx(raw, name) for name in MNIST_FILES)
        images, labels = torch.cat([train_images, test_images]), torch.cat([train_labels, test_labels]).long()
        if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max() > 9:
            raise ValueError("images and labels do not match")
    except Exception as error:  # offline, truncated, corrupt: all end in the same advice
        reason = str(error).strip().splitlines()[0].rstrip(":") if str(error).strip() else type(error).__name__
        raise SetupError(f"cannot load MNIST from {raw} ({reason}); put the four files "
                         f"{', '.join(MNIST_FILES)} (or their .gz) there, or pass --data-dir") from None
    n_train = len(train_images)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(n_train * VAL_FRACTION)
    parts = {"train": order[n_val:], "val": order[:n_val], "test": torch.arange(n_train, len(images))}
    data = {}
    for name, index in parts.items():
        # Once for the whole run: the bytes (4x smaller than floats) moved, then scaled and normalised there.
        pixels = images[index].to(device).float().flatten(1)
        data[f"{name}_x"], data[f"{name}_y"] = (pixels / 255 - MNIST_MEAN) / MNIST_STD, labels[index].to(device)
    return data


def read_idx(folder, name):
    """One file in MNIST's IDX format (or its .gz) as a uint8 tensor: two zero bytes, a type byte
    (8: unsigned bytes), the number of dimensions, each size as a big-endian int32, then the bytes."""
    path = os.path.join(folder, name)
    with (open(path, "rb") if os.path.exists(path) else gzip.open(path + ".gz")) as file:
        content = file.read()
    zeros, kind, ndim = struct.unpack(">HBB", content[:4])
    shape = struct.unpack(f">{ndim}I", content[4:4 + 4 * ndim])
    if zeros != 0 or kind != 8 or len(content) != 4 + 4 * ndim + math.prod(shape):
        raise ValueError(f"{name} is not a whole IDX file of bytes")
    return torch.frombuffer(bytearray(content[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


def seeded_model(hparams, seed):
    """The MLP that `hparams` describe; the seed also fixes the shuffles and dropout that follow."""
    torch.manual_seed(seed)
    return MLP(*(hparams[key] for key in MODEL_KEYS))


@torch.inference_mode()
def evaluate(model, x, y):
    """Accuracy of `model` on (x, y) in one batch: one big matrix product, far cheaper than many small ones."""
    was_training = model.training
    model.eval()  # dropout off
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return accuracy


def train(model, data, hparams, resume=None, cuda_graph=False):
    """Train with SGD, the learning rate decaying linearly to zero; at each of VALIDATIONS_PER_EPOCH
    validations an epoch, yield a Validation: its step (0, 1, ...: Optuna's `step`), epoch and batch
    (from 1), validation accuracy, mean training loss since the last one, learning rate, whether the
    epoch ends there, and checkpoint(): all it takes to go on from there. `resume=` such a checkpoint
    goes on from the next batch, random states and the epoch's shuffle included, to the weights an
    uninterrupted run ends with (same machine). A loss turned nan/inf raises FloatingPointError; a GPU
    too small, torch.OutOfMemoryError. `cuda_graph`: on CUDA, each step replayed as a CUDA graph."""
    train_x, train_y, batch_size = data["train_x"], data["train_y"], hparams["batch_size"]
    device, batches = train_x.device, math.ceil(len(train_x) / batch_size)  # batches an epoch, the last one smaller
    validate_after = {math.ceil(batches * k / VALIDATIONS_PER_EPOCH) for k in range(1, VALIDATIONS_PER_EPOCH + 1)}
    model.to(device).train()
    optimizer, schedule = sgd_with_schedule(model, hparams, hparams["epochs"] * batches)
    first_epoch, first_batch, step, order = 0, 0, 0, None
    if resume is not None:
        from checkpoints import restore  # here, not at the top: only a resumed run needs checkpoints.py
        first_epoch, first_batch, step, order = restore(resume, model, optimizer, schedule)
    loss_sum, losses = torch.zeros((), device=device), 0  # summed on the device: no sync per batch

    def sgd_step(x, y):  # no host read in here: it also runs as a captured CUDA graph
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss_sum.add_(loss.detach())

    if cuda_graph and device.type == "cuda":
        from cuda_graph import CapturedStep  # only for a captured run on CUDA
        sgd_step = CapturedStep(sgd_step, optimizer, device)
    for epoch in range(first_epoch, hparams["epochs"]):
        # One shuffled copy per epoch: each minibatch is a slice. Resumed inside an epoch: that epoch's order.
        order = order.to(device) if first_batch else torch.randperm(len(train_x), device=device)
        epoch_x, epoch_y = train_x[order], train_y[order]
        for batch in range(first_batch + 1, batches + 1):
            rows = slice((batch - 1) * batch_size, batch * batch_size)
            sgd_step(epoch_x[rows], epoch_y[rows])
            schedule.step()
            losses += 1
            if batch not in validate_after:
                continue
            # Read here, not every batch: reading a GPU value makes the CPU wait. Once nan/inf, it stays so.
            train_loss, losses = loss_sum.item() / losses, 0
            loss_sum.zero_()
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"loss became nan/inf in epoch {epoch + 1} (learning rate too high?)")
            where = (epoch + 1, 0, None) if batch == batches else (epoch, batch, order)  # where a resume goes on
            yield Validation(step, epoch + 1, batch, evaluate(model, data["val_x"], data["val_y"]), train_loss,
                             schedule.get_last_lr()[0], batch == batches,
                             functools.partial(checkpoint_of, model, optimizer, schedule, hparams, *where, step + 1))
            step += 1
        first_batch = 0


def checkpoint_of(model, optimizer, schedule, hparams, *where):
    from checkpoints import checkpoint  # here, not at the top: train_loop.py also runs without checkpoints.py
    return checkpoint(model, optimizer, schedule, hparams, *where)


def sgd_with_schedule(model, hparams, total_batches):
    # fused: one kernel updates every parameter, instead of a handful of tiny ops per tensor.
    optimizer = torch.optim.SGD(model.parameters(), lr=hparams["learning_rate"], momentum=hparams["momentum"],
                                nesterov=hparams["nesterov"], weight_decay=hparams["weight_decay"], fused=True)
    # Decaying linearly to zero, short runs end on small, careful steps: on 10,000 real digits this
    # lifted the best of 20-trial studies by about a point.
    return optimizer, torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1, end_factor=0, total_iters=total_batches)


def retrain_on_train_and_val(data, hparams, seed, cuda_graph=False):
    """The model to keep once tuning is over: trained on train + validation (nothing is left to choose)."""
    train_and_val = {**data, "train_x": torch.cat([data["train_x"], data["val_x"]]),
                     "train_y": torch.cat([data["train_y"], data["val_y"]])}
    model = seeded_model(hparams, seed)
    for _ in train(model, train_and_val, hparams, cuda_graph=cuda_graph):
        pass  # its validations score images it trained on: they tell nothing
    return model


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def whole_number(minimum):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text):
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return int(text)
    return parse


def parse_args(argv=None):
    parser = Parser(description="Train the MLP once on MNIST, validating 4 times an epoch, then score the test set "
                                "once. The defaults reach about 94% on 10,000 real digits in 2 epochs (the seed post's "
                                "learning rate 1e-3 and 5 layers train to chance: so 0.05 and 2 layers).")
    parser.add_argument("--data-dir", default="data", help="MNIST root; MNIST/raw is read or downloaded (default: data)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="weights, shuffles, dropout (default: 0)")
    parser.add_argument("--cuda-graph", action="store_true", help="on CUDA, each step replayed as a captured graph")
    for key, default in DEFAULT_HPARAMS.items():  # layer_size: hidden layers, the depth
        flag, text = "--" + key.replace("_", "-"), f"(default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:  # whole numbers of at least 1 (sizes, batch size, epochs), or floats
            parser.add_argument(flag, type=whole_number(1) if isinstance(default, int) else float, default=default,
                                help=text)
    args = parser.parse_args(argv)
    hparams = {key: getattr(args, key) for key in DEFAULT_HPARAMS}
    if not 0 <= hparams["dropout"] < 1 or min(hparams["learning_rate"], hparams["momentum"], hparams["weight_decay"]) < 0:
        parser.error("dropout must be in [0, 1); learning rate, momentum and weight decay at least 0")
    if hparams["nesterov"] and hparams["momentum"] == 0:
        parser.error("Nesterov needs momentum: pass --momentum above 0 or --no-nesterov")
    return args, hparams


def main(argv=None):
    args, hparams = parse_args(argv)
    try:
        data = load_mnist(args.data_dir, pick_device(args.device))
    except SetupError as error:
        print(f"train_loop.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    model = seeded_model(hparams, args.seed)
    try:
        for val in train(model, data, hparams, cuda_graph=args.cuda_graph):
            print(f"step {val.step:3d} (epoch {val.epoch}, batch {val.batch}): "
                  f"train_loss {val.train_loss:.4f}  val_accuracy {val.accuracy:.4f}")
    except FloatingPointError as error:
        sys.exit(f"train_loop.py: {error}")  # exit code 1, one line
    print(f"final model: val_accuracy {val.accuracy:.4f}, "  # then the test set, once: the number you may quote
          f"test_accuracy {evaluate(model, data['test_x'], data['test_y']):.4f}")


if __name__ == "__main__":
    main()
