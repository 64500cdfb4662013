"""MNIST as tensors on the device, and a hand-written SGD loop that yields at every validation.

    python train_loop.py --data-dir DIR                    # DEFAULT_HPARAMS, 2 epochs: about 94% on 10,000 digits
    python train_loop.py --learning-rate 0.1 --epochs 5    # any hyperparameter is a flag

Copy this file and mlp.py into your project; what you use from it:
    data = load_mnist(data_dir, device)         # train / val / test tensors, loaded ONCE, on the device
    model = seeded_model(hparams, seed)         # the MLP, its weights drawn from a seed
    for val in train(model, data, hparams):     # VALIDATIONS_PER_EPOCH times an epoch: val.step,
        print(val.step, val.accuracy)           # val.accuracy, val.train_loss, val.checkpoint(), ...
    evaluate(model, x, y)                       # accuracy, one inference_mode pass

train() decides nothing: what happens at a validation (report it to Optuna, prune, save a checkpoint,
stop) is the caller's, written in the caller's own loop (tune.py's objective). Honest by construction:
the validation set is a fixed part of MNIST's training set and train() never sees the test set; only
main() here, once at the very end, and tune.py's final retrain touch it. Fast by construction: no
DataLoader, no per-image transforms; minibatches are slices of a tensor already on the GPU (or CPU).
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
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# ------------------------------------------------------------------------------------

# What train() yields at a validation. step: its number in the run (0, 1, ...; Optuna's `step`);
# epoch, batch: where it is (batch of batches in epoch, from 1); checkpoint(): all it takes to go on from here.
Validation = collections.namedtuple("Validation", "step epoch batch accuracy train_loss learning_rate epoch_end "
                                                  "checkpoint")


class SetupError(Exception):
    """Something the user can fix (files, flags, devices); the message says how."""


def pick_device(name="auto", worker=0):
    """'auto' takes CUDA (worker i of several processes: GPU i, round robin), then Apple's MPS, then
    the CPU; a named device must exist."""
    if name == "auto":
        name = (f"cuda:{worker % torch.cuda.device_count()}" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SetupError(f"--device {name}: unknown device; use auto, cuda, cuda:N, mps or cpu") from None
    found = {"cpu": True, "cuda": (device.index or 0) < torch.cuda.device_count(),
             "mps": torch.backends.mps.is_available()}.get(device.type, False)
    if not found:
        raise SetupError(f"--device {name}: no such device on this machine; use --device auto or cpu")
    return device


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
        # Once for the whole run: move the bytes (4x smaller than floats), then scale, normalise,
        # flatten on the device. Trials only slice these tensors.
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
    """Accuracy of `model` on (x, y) in one batch: the whole split fits in memory and one big
    matrix product is far cheaper than many small ones."""
    was_training = model.training
    model.eval()  # dropout off
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return accuracy


def train(model, data, hparams, resume=None, cuda_graph=False):
    """Train with SGD (the learning rate decaying linearly to zero), yielding a Validation at each of
    VALIDATIONS_PER_EPOCH validations an epoch. A loss that turned nan/inf raises FloatingPointError
    there; a GPU too small raises torch.OutOfMemoryError. `resume`: a `val.checkpoint()` taken at
    a validation (checkpoints.py); the run goes on from the next batch, random states and the epoch's
    shuffle included, and ends with the weights an uninterrupted run ends with (same machine).
    `cuda_graph`: on CUDA, each step replayed as a captured CUDA graph (cuda_graph.py)."""
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
    sgd_step = eager_step(model, optimizer, loss_sum)
    if cuda_graph and device.type == "cuda":
        from cuda_graph import CapturedStep  # only for a captured run on CUDA
        sgd_step = CapturedStep(sgd_step, optimizer)
    for epoch in range(first_epoch, hparams["epochs"]):
        # One shuffled copy per epoch, so that every minibatch below is a contiguous slice. A run
        # resumed inside an epoch goes on in the order that epoch had.
        order = order.to(device) if first_batch else torch.randperm(len(train_x), device=device)
        epoch_x, epoch_y = train_x[order], train_y[order]
        for batch in range(first_batch + 1, batches + 1):
            rows = slice((batch - 1) * batch_size, batch * batch_size)
            sgd_step(epoch_x[rows], epoch_y[rows])
            schedule.step()
            losses += 1
            if batch not in validate_after:
                continue
            # Read here, not every batch: reading a GPU value makes the CPU wait for the GPU. Once
            # nan/inf, the weights stay so, and the mean loss since the last validation shows it.
            train_loss = loss_sum.item() / losses
            loss_sum.zero_()
            losses = 0
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
    # The learning rate decays linearly to zero over the run: short runs then end on small, careful
    # steps. On the real-digit sample this lifted the best of 20-trial studies by about a point.
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_batches)
    return optimizer, schedule


def eager_step(model, optimizer, loss_sum):
    """sgd_step(x, y): forward, backward, update, the loss added to `loss_sum` on the device (no
    host read, so the same function also runs as a captured CUDA graph)."""
    def sgd_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss_sum.add_(loss.detach())
    return sgd_step


def retrain_on_train_and_val(data, hparams, seed, cuda_graph=False):
    """The model to keep once tuning is over: the chosen hparams trained on train + validation
    together (nothing is left to choose, so nothing to validate). Only the test set is left to score it."""
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
    parser = Parser(description="Train the MLP once on MNIST, validating 4 times an epoch; then score "
                                "the test set once. The defaults reach about 94%% on 10,000 real digits.")
    parser.add_argument("--data-dir", default="data", help="MNIST root; MNIST/raw is read or downloaded (default: data)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto)")
    parser.add_argument("--seed", type=whole_number(0), default=0,
                        help="seed for weights, shuffles and dropout (default: 0)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                        help="on CUDA, replay each training step as a captured CUDA graph (default: off)")
    helps = {"layer_size": "hidden layers, the depth", "learning_rate": "the seed post's 1e-3 trains 5 layers "
             "to chance in 2 epochs; so 0.05 and 2 layers", "dropout": "in [0, 1)"}
    for key, default in DEFAULT_HPARAMS.items():
        flag, more = "--" + key.replace("_", "-"), f"{helps[key]}; " if key in helps else ""
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"({more}default: {default})")
        else:  # whole numbers of at least 1 (sizes, batch size, epochs), or floats
            parser.add_argument(flag, type=whole_number(1) if isinstance(default, int) else float, default=default,
                                help=f"({more}default: {default})")
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
        device = pick_device(args.device)
        data = load_mnist(args.data_dir, device)
    except SetupError as error:
        print(f"train_loop.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"device {device}; train {len(data['train_x'])}, val {len(data['val_x'])}, test {len(data['test_x'])} images")
    model = seeded_model(hparams, args.seed)
    try:
        for val in train(model, data, hparams, cuda_graph=args.cuda_graph):
            print(f"step {val.step:3d} (epoch {val.epoch}, batch {val.batch}): "
                  f"train_loss {val.train_loss:.4f}  val_accuracy {val.accuracy:.4f}")
    except FloatingPointError as error:
        sys.exit(f"train_loop.py: {error}")  # exit code 1, one line
    # The test set, once, at the very end: the number you may quote.
    print(f"final model: val_accuracy {val.accuracy:.4f}, "
          f"test_accuracy {evaluate(model, data['test_x'], data['test_y']):.4f}")


if __name__ == "__main__":
    main()
