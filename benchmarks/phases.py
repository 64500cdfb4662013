"""Where the seed post's study spends its time, phase by phase, for this checkout and another revision.

    python benchmarks/phases.py --data-dir DIR                        # this checkout against main's 63c5989
    python benchmarks/phases.py --data-dir DIR --against HEAD~3 --repeats 7

Runs `python tune.py --data-dir DIR --n-trials 16 --epochs 3 --seed 0 --no-final` as a user would,
once per revision in turn (the other revision checked out in a temporary git worktree, run with
this same Python), --repeats times, and splits each run's wall time, from the study's own timestamps
and the moments its output lines arrive, into:

  start-up       the command's start to the first trial's start: imports, data, storage, sampler
  trials         the trials themselves, summed: training and Optuna's work inside a trial
  between        the gaps between trials: the sampler, callbacks, the database
  end            the last trial's end to the last line printed: summary, trials.csv, plots, artifacts
  exit           the last line printed to the process's end: interpreter teardown
  wall           all of it

Medians over the repeats, side by side, and the ratio of this checkout's wall to the other's; then,
for each, how many trials it finished and which files it wrote, to compare. The machine may be
shared and noisy: runs alternate between the revisions so that both see the same noise.

Last, the floor: what no version of this study can take less than on this machine, Optuna or not.
A Python that only imports torch (with and without torch._dynamo, which torch.optim imports when
its first optimizer is made) and optuna; and this checkout's own trials trained again by train()
alone, each as far as it went, without Optuna, database or plots, as they are and with dropout 0
(the least any cheaper dropout mask could cost).
"""
import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import optuna

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from report import sqlite_storage  # noqa: E402

N_TRIALS, EPOCHS = 16, 3
FLAGS = ["--n-trials", str(N_TRIALS), "--epochs", str(EPOCHS), "--seed", "0", "--no-final"]
PHASES = ("start-up", "trials", "between", "end", "exit", "wall")


def one_run(tree, data_dir, out):
    """Run tune.py of the tree at `tree`; return its phases in seconds, its trials and files."""
    started, started_clock = datetime.datetime.now(), time.monotonic()  # Optuna stores naive local times
    process = subprocess.Popen([sys.executable, os.path.join(tree, "tune.py"), "--data-dir", data_dir, "--out", out,
                                *FLAGS], cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    last_line = started_clock
    for _ in process.stdout:
        last_line = time.monotonic()
    process.wait()
    ended = time.monotonic()
    if process.returncode:
        sys.exit(f"phases.py: tune.py in {tree} exited with {process.returncode}")
    trials = optuna.load_study(study_name="mnist-mlp", storage=sqlite_storage(out)).trials
    since_start = lambda moment: (moment - started).total_seconds()  # noqa: E731
    phases = {"start-up": since_start(trials[0].datetime_start),
              "trials": sum(t.duration.total_seconds() for t in trials),
              "between": sum((b.datetime_start - a.datetime_complete).total_seconds() for a, b in zip(trials, trials[1:])),
              "end": last_line - started_clock - since_start(trials[-1].datetime_complete),
              "exit": ended - last_line, "wall": ended - started_clock}
    files = sorted(name for name in os.listdir(out) if not name.startswith("study.db") and name != "artifacts")
    return phases, trials, files


def seconds_to_import(modules, repeats):
    """Median wall of a Python that imports `modules` and exits."""
    walls = []
    for _ in range(repeats):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
        walls.append(time.monotonic() - start)
    return statistics.median(walls)


def seconds_to_train(trials, data, dropout=None):
    """`trials` trained again by this checkout's train() alone, each to its last report, as tune.py
    trains them (seed 0, all cores); `dropout` replaces each trial's own when given."""
    import torch  # here, not at the top: only the floor needs torch in this process
    from train_loop import seeded_model, train
    from tune import suggest_hparams
    torch.set_num_threads(os.cpu_count())
    seconds = 0.0
    for trial in trials:
        hparams = suggest_hparams(optuna.trial.FixedTrial(trial.params), EPOCHS)
        hparams["dropout"] = hparams["dropout"] if dropout is None else dropout
        model = seeded_model(hparams, 0)
        start = time.perf_counter()
        for val in train(model, data, hparams):
            if val.step == max(trial.intermediate_values):
                break
        seconds += time.perf_counter() - start
    return seconds


def print_floor(trials, data_dir, repeats, other_wall, against):
    """The floor (the docstring at the top says what it is), against the other revision's wall."""
    import torch
    from train_loop import load_mnist
    data = load_mnist(data_dir, torch.device("cpu"))
    seconds_to_train(trials[:1], data)  # its first optimizer imports torch._dynamo: counted with the imports
    with_dynamo = seconds_to_import("torch, torch._dynamo, optuna", repeats)
    without_dynamo = seconds_to_import("torch, optuna", repeats)
    training = statistics.median(seconds_to_train(trials, data) for _ in range(repeats))
    no_dropout = statistics.median(seconds_to_train(trials, data, dropout=0.0) for _ in range(repeats))
    print(f"\nthe floor: this checkout's {len(trials)} trials, no Optuna, no database, no plots (median of {repeats})")
    for name, seconds in [("python importing torch, torch._dynamo, optuna", with_dynamo),
                          ("python importing torch, optuna", without_dynamo),
                          ("the trials trained by train() alone", training), ("the same with dropout 0", no_dropout)]:
        print(f"  {name:<48}{seconds:>6.2f} s")
    for what, total in [("as they are", with_dynamo + training), ("dropout 0", with_dynamo + no_dropout),
                        ("dropout 0, no torch._dynamo", without_dynamo + no_dropout)]:
        print(f"  imports + training, {what + ':':<28}{total:>6.2f} s = {total / other_wall:.0%} of {against}'s wall")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--against", default="63c5989", help="the git revision to compare with (default: 63c5989)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each revision; medians are shown (default: 5)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        other = os.path.join(folder, "other")
        subprocess.run(["git", "worktree", "add", "--detach", other, args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"this checkout": ROOT, args.against: other}
            runs = {name: [] for name in trees}
            for repeat in range(args.repeats):
                for name, tree in trees.items():
                    out = os.path.join(folder, f"run-{len(runs[name])}-{name.replace(' ', '-')}")
                    runs[name].append(one_run(tree, os.path.abspath(args.data_dir), out))
                    shutil.rmtree(out)
                    print(f"  {name:<14} run {repeat + 1}: wall {runs[name][-1][0]['wall']:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", other], cwd=ROOT, capture_output=True)
    print(f"\n{N_TRIALS} trials x {EPOCHS} epochs, --seed 0 --no-final, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} runs each")
    print(f"{'phase':<10}" + "".join(f"{name:>16}" for name in trees))
    medians = {name: {phase: statistics.median(run[0][phase] for run in runs[name]) for phase in PHASES}
               for name in trees}
    for phase in PHASES:
        print(f"{phase:<10}" + "".join(f"{medians[name][phase]:>14.2f} s" for name in trees))
    mine, theirs = medians["this checkout"]["wall"], medians[args.against]["wall"]
    print(f"this checkout's wall is {mine / theirs:.0%} of {args.against}'s")
    for name in trees:
        states, files = [t.state.name for t in runs[name][0][1]], runs[name][0][2]
        print(f"{name}: {states.count('COMPLETE')} complete + {states.count('PRUNED')} pruned of {len(states)} "
              f"trials; files {', '.join(files)}")
    print_floor(runs["this checkout"][0][1], os.path.abspath(args.data_dir), args.repeats, theirs, args.against)


if __name__ == "__main__":
    main()
