"""Does pruning pay? The same seeded study with each pruner, side by side, in one run.

    python benchmarks/pruning.py --data-dir ../shared/data/mnist-sample

For each pruner it runs tune.py's real study (30 trials of 5 epochs by default) in a fresh
temporary folder and prints the epochs actually trained, the training seconds, and the best
validation accuracy. The target: the default pruner trains at most half the epochs of
--pruner none, and its best validation accuracy is within 0.5 points of it.
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tune  # noqa: E402
from train_loop import EVALS_PER_EPOCH  # noqa: E402


def run_study(pruner, args, folder):
    argv = ["--data-dir", args.data_dir, "--n-trials", str(args.n_trials), "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--pruner", pruner, "--out", os.path.join(folder, f"{pruner}-{args.seed}"),
            "--no-final"]
    with contextlib.redirect_stdout(io.StringIO()):  # one line per trial is too much here
        tune.main(argv)
    study = tune.open_study(tune.parse_args(argv))
    # A trial trains one report's worth of data between reports; a pruned trial stops at its last.
    epochs = sum(len(trial.intermediate_values) for trial in study.trials) / EVALS_PER_EPOCH
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials)
    pruned = sum(trial.state.name == "PRUNED" for trial in study.trials)
    return epochs, seconds, pruned, study.best_value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist-sample", help="(default: ../shared/data/mnist-sample)")
    parser.add_argument("--n-trials", type=int, default=30, help="(default: 30)")
    parser.add_argument("--epochs", type=int, default=5, help="(default: 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one study per seed and pruner; judge the mean (default: 0 1 2)")
    parser.add_argument("--pruners", nargs="+", default=["median", "hyperband", "none"], help="(default: all three)")
    args = parser.parse_args()
    print(f"{args.n_trials} trials x {args.epochs} epochs, data {args.data_dir}, default pruner: {tune.PRUNER}")
    print(f"{'seed':>4} {'pruner':>10} {'pruned':>7} {'epochs':>7} {'seconds':>8} {'best val':>9} "
          f"{'epochs vs none':>15} {'best - none':>12}")
    versus_none = {pruner: [] for pruner in args.pruners}  # (epochs ratio, best difference) per seed
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            args.seed = seed
            results = {pruner: run_study(pruner, args, folder) for pruner in args.pruners}
            none = results.get("none")
            for pruner, (epochs, seconds, pruned, best) in results.items():
                versus = ""
                if none:
                    versus_none[pruner].append((epochs / none[0], best - none[3]))
                    versus = f"{epochs / none[0]:>14.0%} {100 * (best - none[3]):>+11.2f}pt"
                print(f"{seed:>4} {pruner:>10} {pruned:>7} {epochs:>7.1f} {seconds:>8.1f} {best:>9.4f} {versus}")
    for pruner, pairs in versus_none.items():
        if pairs and pruner != "none":
            print(f"mean over {len(pairs)} seeds: {pruner} trained {statistics.mean(r for r, _ in pairs):.0%} of the "
                  f"epochs of none; best val {100 * statistics.mean(d for _, d in pairs):+.2f}pt, "
                  f"worst {100 * min(d for _, d in pairs):+.2f}pt")


if __name__ == "__main__":
    main()
