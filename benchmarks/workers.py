"""Finished trials per minute with --workers 2 against --workers 1, side by side, in one run.

    python benchmarks/workers.py --data-dir DIR

Runs `python tune.py` as a user would (default search space and pruner, the default SQLite
storage), once per worker count, and measures from the study itself: the seconds from the
command's start to its first finished trial (start-up included: imports, data, spawning workers),
and the throughput: finished trials over the time from the first trial's start to the last one's
end. It also counts "database is locked" errors, which must be zero.
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile

import optuna

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    first = min(t.datetime_complete for t in finished) - started
    locked = (result.stdout + result.stderr).count("database is locked")
    return len(finished), first.total_seconds(), 60 * len(finished) / span.total_seconds(), locked


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--n-trials", type=int, default=40, help="(default: 40)")
    parser.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.n_trials} trials x {args.epochs} epochs of the default search space")
    print(f"{'workers':>7} {'finished':>9} {'first trial':>12} {'trials/min':>11} {'speed-up':>9} {'lock errors':>12}")
    with tempfile.TemporaryDirectory() as folder:
        one = None
        for workers in (1, 2):
            finished, first, rate, locked = trials_per_minute(workers, args, folder)
            one = one or rate
            print(f"{workers:>7} {finished:>9} {first:>10.1f} s {rate:>11.1f} {rate / one:>8.2f}x {locked:>12}")


if __name__ == "__main__":
    main()
