"""Where a small study's time goes besides training: the seed post's 16x3 study, end to end.

    python benchmarks/fixed_costs.py --data-dir DIR                  # on the device tune.py picks
    python benchmarks/fixed_costs.py --data-dir DIR --device cpu --repeats 5

Runs `python tune.py --n-trials 16 --epochs 3 --no-final` as a user would and splits its wall time,
from the study's own timestamps, into: start-up (imports, data, database) up to the first trial,
the trials themselves, the gaps between trials (sampler, callbacks, database), and the end (summary,
trials.csv, plots, interpreter exit). Then the imports alone, each in a fresh interpreter. Medians.
"""
import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

import optuna

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(data_dir, device, folder):
    out = os.path.join(folder, f"run{len(os.listdir(folder))}")
    started = datetime.datetime.now()
    subprocess.run([sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", data_dir, "--out", out,
                    "--device", device, "--n-trials", "16", "--epochs", "3", "--no-final"],
                   check=True, capture_output=True)
    ended = datetime.datetime.now()
    trials = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db").trials
    return {"wall": (ended - started).total_seconds(),
            "start-up": (trials[0].datetime_start - started).total_seconds(),
            "trials": sum(t.duration.total_seconds() for t in trials),
            "between trials": sum((b.datetime_start - a.datetime_complete).total_seconds()
                                  for a, b in zip(trials, trials[1:])),
            "end": (ended - trials[-1].datetime_complete).total_seconds()}


def import_seconds(module):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--device", default="auto", help="(default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians are shown (default: 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = [one_run(args.data_dir, args.device, folder) for _ in range(args.repeats)]
    median = {part: statistics.median(run[part] for run in runs) for part in runs[0]}
    print(f"16 trials x 3 epochs, --no-final, device {args.device}, {os.cpu_count()} CPUs, median of {len(runs)}:")
    for part, seconds in median.items():
        print(f"    {part:<15} {seconds:6.2f} s")
    print(f"    {'outside trials':<15} {median['wall'] - median['trials']:6.2f} s")
    print("imports, each in a fresh interpreter (start and exit included):")
    # torch._dynamo: torch.optim imports it when the first optimizer is made, inside the first trial.
    for module in ("torch", "torch._dynamo", "optuna", "torchvision", "matplotlib.pyplot", "tune"):
        print(f"    {module:<17} {statistics.median(import_seconds(module) for _ in range(3)):6.2f} s")


if __name__ == "__main__":
    main()
