"""MNIST as tensors on the device, and a hand-written SGD train/validate loop that Optuna can prune.

    python train_loop.py --data-dir DIR                 # train DEFAULT_HPARAMS once on DIR/MNIST/raw
    python train_loop.py --learning-rate 0.05 --epochs 5           # any hyperparameter is a flag

What tune.py (and your own project) takes from here:
    data = load_mnist(data_dir, device)   # train / val / test tensors, loaded ONCE, already on the device
    model = seeded_model(hparams, seed)   # the MLP, its weights drawn from a seed
    train(model, data, hparams, trial)    # -> validation accuracy of the final weights; reports to the trial
    evaluate(model, x, y)                 # -> accuracy, one inference_mode pass

Honest by construction: the validation set is a fixed part of MNIST's training set, train() never
sees the test set, and only `python train_loop.py` (once, at the very end) or tune.py's final
retrain touch it. Fast by construction: no DataLoader, no per-image transforms; minibatches are
slices of a tensor that already lives on the GPU (or CPU).
"""
import argparse
import gzip
import math
import os
import struct
import sys

import optuna
import torch
import torch.nn.functional as F

from checkpoints import checkpoint, restore
from cuda_graph import CapturedStep
from mlp import MLP

# ---------------------------------------------------------------------------- settings
DEFAULT_HPARAMS = {
    "in_size": 784, "hidden_size": 128, "out_size": 10, "layer_size": 5, "dropout": 0.2,  # model
    "batch_size": 32, "learning_rate": 1e-3, "momentum": 0.9, "nesterov": True,            # SGD
    "weight_decay": 1e-5, "epochs": 2,
}
MODEL_KEYS = ("in_size", "hidden_size", "out_size", "layer_size", "dropout")  # MLP's arguments, in order
VAL_FRACTION = 1 / 6  # 10,000 of MNIST's 60,000 training images; the same fraction of a smaller set
SPLIT_SEED = 0        # fixed, so every trial and every study is scored on the very same images
EVALS_PER_EPOCH = 4   # validation passes (= trial.report calls) per epoch: more, and pruning acts sooner
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of MNIST's training set, the usual normalisation
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# ------------------------------------------------------------------------------------


class SetupError(Exception):
    """Something the user can fix (files, flags, devices); the message says how."""


class Stopped(BaseException):
    """train() stopped because `stop()` said so, after saving its place. Not an Exception (like
    KeyboardInterrupt): Optuna marks a trial FAIL on any Exception; a stopped one is queued again."""


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


def train(model, data, hparams, trial=None, evals_per_epoch=EVALS_PER_EPOCH, verbose=False,
          resume=None, save=None, log=None, stop=None, cuda_graph=False):
    """Train with SGD; validate `evals_per_epoch` times an epoch; return the final validation accuracy.

    The value is that of the final weights, the model you would keep: the same number Optuna stores
    for a pruned trial (its last report), and the same kind of model the final test scores. The best
    of the reads is kept on the trial too, but picking by it would favour noisy configurations.
    Given an Optuna trial it reports each validation accuracy and stops when the pruner says so.
    A loss that turns nan/inf ends the run at the next validation, and running out of GPU memory
    ends it at once: the trial is pruned (the study goes on) with the reason in its user attributes;
    without a trial, FloatingPointError or torch.OutOfMemoryError.

    With `cuda_graph=True`, on a CUDA device, each training step is replayed as a captured CUDA graph
    (cuda_graph.py): meant to give the same results several times faster for small models; opt-in
    until benchmarks/gpu_check.sh has measured it on a GPU. CPU and MPS always run eagerly.
    Optional: `save(checkpoint)` is called at the end of every epoch with everything needed to go
    on (see checkpoints.checkpoint); `resume=checkpoint` goes on from there exactly, random states too,
    so a resumed run ends with the very weights of an uninterrupted one (on the same machine).
    `log(report, train_loss, val_accuracy, learning_rate)` is called at every validation.
    `stop()` is asked after every report: when it says True (SIGTERM, Ctrl-C), the run saves its
    place, this very step of the epoch, and raises Stopped; resumed, it goes on from the next step.
    """
    train_x, train_y, val_x, val_y = data["train_x"], data["train_y"], data["val_x"], data["val_y"]
    device, batch_size, captured = train_x.device, hparams["batch_size"], None
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    report_steps = {math.ceil(steps_per_epoch * k / evals_per_epoch) - 1 for k in range(1, evals_per_epoch + 1)}
    first_epoch, first_step, report, best_val_accuracy, val_accuracy, train_loss = 0, 0, 0, 0.0, 0.0, math.nan
    try:
        model.to(device).train()
        optimizer, schedule = sgd_with_schedule(model, hparams, hparams["epochs"] * steps_per_epoch)
        if resume is not None:
            first_epoch, first_step, report, best_val_accuracy, val_accuracy, train_loss = restore(
                resume, model, optimizer, schedule)

        def here(epochs_done, step, order=None):  # a checkpoint of this moment, for save()
            return checkpoint(model, optimizer, schedule, hparams, order, epochs_done=epochs_done, step=step,
                              report=report, best_val_accuracy=best_val_accuracy, val_accuracy=val_accuracy,
                              train_loss=train_loss)

        loss_sum, loss_steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        if cuda_graph and device.type == "cuda":
            captured = CapturedStep(lambda x, y: sgd_step(model, optimizer, x, y, loss_sum), optimizer)
        for epoch in range(first_epoch, hparams["epochs"]):
            # One shuffled copy per epoch, so that every minibatch below is a contiguous slice. A run
            # resumed inside an epoch goes on in the order that epoch had.
            order = resume["order"].to(device) if first_step else torch.randperm(len(train_x), device=device)
            epoch_x, epoch_y = train_x[order], train_y[order]
            for step in range(first_step, steps_per_epoch):
                batch = slice(step * batch_size, (step + 1) * batch_size)
                if captured is not None and step < len(train_x) // batch_size:  # whole batches: replayed
                    captured(epoch_x[batch], epoch_y[batch])
                else:
                    optimizer.zero_grad(set_to_none=True)
                    sgd_step(model, optimizer, epoch_x[batch], epoch_y[batch], loss_sum)
                schedule.step()
                loss_steps += 1
                if step not in report_steps:
                    continue
                # Checked here, not every step: reading a GPU value makes the CPU wait for the GPU. Once
                # nan/inf, the weights stay so, and the mean loss since the last report shows it.
                train_loss = loss_sum.item() / loss_steps  # mean since the last report
                loss_sum.zero_()
                loss_steps = 0
                if not math.isfinite(train_loss):
                    reason = f"loss became nan/inf in epoch {epoch + 1} (learning rate too high?)"
                    if trial is None:
                        raise FloatingPointError(reason)
                    prune(trial, reason)
                val_accuracy = evaluate(model, val_x, val_y)
                best_val_accuracy = max(best_val_accuracy, val_accuracy)
                if verbose:
                    print(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch}: "
                          f"train_loss {train_loss:.4f}  val_accuracy {val_accuracy:.4f}")
                if log is not None:
                    log(report, train_loss, val_accuracy, schedule.get_last_lr()[0])
                if trial is not None:
                    trial.report(val_accuracy, report)
                report += 1
                if trial is not None and trial.should_prune():
                    keep_on_trial(trial, train_loss, best_val_accuracy)
                    raise optuna.TrialPruned(f"val_accuracy {val_accuracy:.4f} at report {report}")
                if stop is not None and stop():  # at a report, so nothing is summed half-way
                    if save is not None:
                        save(here(epoch, step + 1, order) if step + 1 < steps_per_epoch else here(epoch + 1, 0))
                    raise Stopped(f"stopped after report {report - 1}")
            first_step = 0
            if save is not None:  # the last step of an epoch is a report: nothing is summed half-way
                save(here(epoch + 1, 0))
    except torch.OutOfMemoryError as error:  # optuna issues #1224, #4934: one trial too big for the GPU
        if trial is None:
            raise
        prune(trial, f"out of memory on {device}: {str(error).splitlines()[0][:120]}")
    finally:
        if captured is not None:
            captured.close()  # the graph's memory goes back now, not at some later garbage collection
    if trial is not None:
        keep_on_trial(trial, train_loss, best_val_accuracy)
    return val_accuracy


def sgd_with_schedule(model, hparams, total_steps):
    # fused: one kernel updates every parameter, instead of a handful of tiny ops per tensor.
    optimizer = torch.optim.SGD(model.parameters(), lr=hparams["learning_rate"], momentum=hparams["momentum"],
                                nesterov=hparams["nesterov"], weight_decay=hparams["weight_decay"], fused=True)
    # The learning rate decays linearly to zero over the run: short runs then end on small, careful
    # steps. On the real-digit sample this lifted the best of 20-trial studies by about a point.
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_steps)
    return optimizer, schedule


def sgd_step(model, optimizer, x, y, loss_sum):
    """Forward, backward, update; the loss is added to `loss_sum` on the device (no host read, so
    the same function runs eagerly and as a CUDA graph). Gradients must be None or zero before."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    loss_sum += loss.detach()


def prune(trial, reason):
    """End a trial that cannot go on: pruned (the study goes on), with the reason kept on it."""
    trial.set_user_attr("pruned_reason", reason)
    raise optuna.TrialPruned(reason)


def retrain_on_train_and_val(data, hparams, seed, cuda_graph=False):
    """The model to keep once tuning is over: the chosen hparams trained on train + validation
    together (nothing is left to choose, so nothing to validate). Only the test set is left to score it."""
    train_and_val = {**data, "train_x": torch.cat([data["train_x"], data["val_x"]]),
                     "train_y": torch.cat([data["train_y"], data["val_y"]])}
    model = seeded_model(hparams, seed)
    train(model, train_and_val, hparams, evals_per_epoch=1, cuda_graph=cuda_graph)  # its validation reads: seen data
    return model


def keep_on_trial(trial, train_loss, best_val_accuracy):
    """Beside the value, so trials.csv shows over- and under-fitting. Written once a trial, not at
    every report: each write is a database transaction, and a report on small data comes often."""
    trial.set_user_attr("train_loss", train_loss)  # the mean of the last report's steps
    trial.set_user_attr("best_val_accuracy", best_val_accuracy)


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
    parser = Parser(description="Train the MLP once on MNIST and print its test accuracy at the end.")
    parser.add_argument("--data-dir", default="data", help="MNIST root; MNIST/raw is read or downloaded (default: data)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto)")
    parser.add_argument("--seed", type=whole_number(0), default=0,
                        help="seed for weights, shuffles and dropout (default: 0)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                        help="on CUDA, replay each training step as a captured CUDA graph (default: off)")
    for key, default in DEFAULT_HPARAMS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"(default: {default})")
        else:  # whole numbers of at least 1 (sizes, batch size, epochs), or floats
            parser.add_argument(flag, type=whole_number(1) if isinstance(default, int) else float, default=default,
                                help=f"(default: {default})")
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
    val_accuracy = train(model, data, hparams, verbose=True, cuda_graph=args.cuda_graph)
    # The test set, once, at the very end: the number you may quote.
    test_accuracy = evaluate(model, data["test_x"], data["test_y"])
    print(f"final model: val_accuracy {val_accuracy:.4f}, test_accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    main()
