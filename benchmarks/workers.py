"""Finished trials per minute with --workers 2 against --workers 1, side by side, in one run.

    python benchmarks/workers.py --data-dir DIR
    python benchmarks/workers.py --data-dir DIR --train-images 60000   # a smaller set, at MNIST's size

Runs `python tune.py` as a user would (default search space and pruner, the default SQLite
storage), once per worker count, and measures from the study itself: the seconds from the
command's start to its first finished trial (start-up included: imports, data, spawning workers),
and the throughput: finished trials, and reports (trial.report calls: quarter epochs trained), over
the time from the first trial's start to the last one's end. Two runs of a study train different
amounts (their pruner cuts different trials), which the reports column shows. It also counts
"database is locked" errors, which must be zero. Beside it, the ceiling: the same training (one
fixed configuration, no Optuna, no database) threaded as tune.py threads it, in one process with
every CPU's thread, then in two at once with half each: how much more two processes train at best.

Optuna's own work per trial and per report (the database, the sampler) does not grow with the data:
on a small set, whose epochs take a fraction of a second, it is a large share of each trial.
--train-images repeats DIR's training images up to that count in a temporary copy (test images as
they are), so that a smaller set (such as 10,000 digits) is measured at full MNIST's size: training
time depends on how many images there are, not on which (accuracies on such a copy mean little).
"""
import argparse
import datetime
import multiprocessing
import os
import struct
import subprocess
import sys
import tempfile
import time

import optuna
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_loop import DEFAULT_HPARAMS, MNIST_FILES, SetupError, load_mnist, read_idx, seeded_model, train  # noqa: E402


def repeat_training_images(data_dir, n_train, folder):
    """A copy of DATA_DIR/MNIST/raw (its files plain or .gz) in `folder`, uncompressed, whose training
    set goes round its images until it holds n_train."""
    source, target = os.path.join(data_dir, "MNIST", "raw"), os.path.join(folder, "MNIST", "raw")
    os.makedirs(target)
    for name in MNIST_FILES:
        array = read_idx(source, name)
        if name.startswith("train"):
            array = array.repeat(n_train // len(array) + 1, *[1] * (array.dim() - 1))[:n_train]
        with open(os.path.join(target, name), "wb") as file:  # IDX: zeros, type 8 (bytes), dimensions, sizes
            file.write(struct.pack(f">HBB{array.dim()}I", 0, 8, array.dim(), *array.shape) + array.numpy().tobytes())
    return folder


def trials_per_minute(workers, args, folder):
    out = os.path.join(folder, f"workers{workers}")
    command = [sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", args.data_dir, "--workers", str(workers),
               "--n-trials", str(args.n_trials), "--epochs", str(args.epochs), "--out", out, "--no-final"]
    started = datetime.datetime.now()  # Optuna stores naive local times too
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"tune.py failed:\n{result.stderr}")
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    finished = [t for t in study.trials if t.state.is_finished()]
    span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    minutes = span.total_seconds() / 60
    first = min(t.datetime_complete for t in finished) - started
    reports = sum(len(t.intermediate_values) for t in finished)
    locked = (result.stdout + result.stderr).count("database is locked")
    return len(finished), reports, first.total_seconds(), len(finished) / minutes, reports / minutes, locked


def train_for(seconds, data_dir, threads, start, results):
    """Train one fixed configuration again and again for `seconds`; put the epochs per second."""
    torch.set_num_threads(threads)
    data = load_mnist(data_dir, torch.device("cpu"), download=False)
    hparams = {**DEFAULT_HPARAMS, "epochs": 1, "batch_size": 64}
    start.wait()
    began, epochs = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        for _ in train(seeded_model(hparams, 0), data, hparams):
            pass
        epochs += 1
    results.put(epochs / (time.perf_counter() - began))


def side_by_side(processes, data_dir, seconds=20):
    """Epochs per second of `processes` trainings at once, summed."""
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Event(), spawn.Queue()
    threads = max(1, (os.cpu_count() or 1) // processes)  # as tune.py shares the CPUs among its workers
    workers = [spawn.Process(target=train_for, args=(seconds, data_dir, threads, start, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(15)  # every process has imported torch and loaded the data: they start together
    start.set()
    total = sum(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--n-trials", type=int, default=40, help="(default: 40)")
    parser.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    parser.add_argument("--train-images", type=int,
                        help="repeat the training images up to this many, e.g. 60000 (default: as they are)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        try:
            if args.train_images:
                args.data_dir = repeat_training_images(args.data_dir, args.train_images, os.path.join(folder, "data"))
            data = load_mnist(args.data_dir, torch.device("cpu"), download=False)
        except (OSError, ValueError, struct.error, SetupError) as error:
            sys.exit(f"workers.py: {error}; --data-dir needs MNIST/raw with the four IDX files (plain or .gz)")
        print(f"{os.cpu_count()} CPUs; {args.n_trials} trials x {args.epochs} epochs of the default search space; "
              f"{len(data['train_x'])} train + {len(data['val_x'])} validation images"
              f"{' (repeated)' if args.train_images else ''}")
        print(f"{'workers':>7} {'finished':>9} {'reports':>8} {'first trial':>12} {'trials/min':>11} "
              f"{'reports/min':>12} {'speed-up':>9} {'lock errors':>12}")
        one = None
        for workers in (1, 2):
            finished, reports, first, rate, report_rate, locked = trials_per_minute(workers, args, folder)
            one = one or rate
            print(f"{workers:>7} {finished:>9} {reports:>8} {first:>10.1f} s {rate:>11.1f} {report_rate:>12.0f} "
                  f"{rate / one:>8.2f}x {locked:>12}")
        alone = side_by_side(1, args.data_dir)
        together = side_by_side(2, args.data_dir)
    print(f"ceiling, no Optuna: one process trains {alone:.2f} epochs/s, two at once {together:.2f} epochs/s "
          f"together: {together / alone:.2f}x")


if __name__ == "__main__":
    main()
