"""Which sampler and pruner find the best model for the least training? Side by side, in one run.

    python benchmarks/search.py --data-dir DIR          # DIR/MNIST/raw holds MNIST-format files

Each configuration runs tune.py's own study (its search space, objective and seeded training:
30 trials x 3 epochs by default) once per seed, in memory, on the same data, and prints:

  best val    the best trial's value: validation accuracy of its final weights
  epochs      epochs actually trained (a pruned trial counts up to its last report), as a share
              of the baseline's: random search without pruning, which trains every trial to the end
  by TPE      trials whose parameters TPE chose itself, not its random start-up trials

Why "by TPE" is worth printing: Optuna shows the sampler only the trials of the trial's own
Hyperband bracket (`optuna.pruners._filter_study`), so TPE's random start-up repeats in every
bracket. Targets for tune.py's default: mean best val above the baseline's, at no more than 60% of
its epochs, on at least 5 seeds; TPE proposes at least half of a 30-trial study.
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import optuna
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tune  # noqa: E402
import parallel  # noqa: E402
import report  # noqa: E402
from train_loop import VALIDATIONS_PER_EPOCH, load_mnist  # noqa: E402


def configurations(epochs):
    """name -> (sampler(seed), pruner()): what is compared. tpe(5): 5 random start-up trials, not 10.
    halving(F): successive halving, first rung at step 2, the best 1/F go on at each rung."""
    reports = epochs * VALIDATIONS_PER_EPOCH
    tpe = lambda seed: optuna.samplers.TPESampler(seed=seed)  # noqa: E731
    tpe5 = lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)  # noqa: E731
    hyperband = lambda: optuna.pruners.HyperbandPruner(min_resource=2, max_resource=reports, reduction_factor=4)  # noqa: E731
    return {
        "tpe+hyperband": (tpe, hyperband),
        "tpe(5)+hyperband": (tpe5, hyperband),
        "tpe+halving(4)": (tpe, lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=4)),
        "tpe+median": (tpe, lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)),
        "tpe+none": (tpe, optuna.pruners.NopPruner),
        # tune.py's own: TPE with successive halving from step 2 on, a third going on (halving(3))
        "default": (tpe, lambda: tune.make_pruner(tune.PRUNER)),
        "random+none": (lambda seed: optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner),
    }


def count_random_startup_trials(sampler):
    """TPE hands its start-up trials to an inner RandomSampler: count the trials that reach it."""
    if not isinstance(sampler, optuna.samplers.TPESampler):
        return None
    trials_seen = set()
    random_sample = sampler._random_sampler.sample_independent  # a private attribute: measurement only

    def sample_and_count(study, trial, name, distribution):
        trials_seen.add(trial.number)
        return random_sample(study, trial, name, distribution)

    sampler._random_sampler.sample_independent = sample_and_count
    return trials_seen


def run_study(make_sampler, make_pruner, data, args, seed):
    sampler = make_sampler(seed)
    random_trials = count_random_startup_trials(sampler)
    # A fixed name: Hyperband puts a trial in its bracket by hashing the study name and trial number.
    study = optuna.create_study(study_name=f"search-{seed}", direction="maximize", sampler=sampler,
                                pruner=make_pruner())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:  # checkpoints each epoch, as tune.py does
        store = optuna.artifacts.FileSystemArtifactStore(folder)
        run = tune.parse_args(["--out", folder, "--epochs", str(args.epochs), "--n-trials", str(args.n_trials),
                               "--seed", str(seed)])
        study.optimize(functools.partial(tune.objective, args=run, data=data, store=store, stops=parallel.Stops(),
                                         curves=report.TrialCurves(None)), n_trials=args.n_trials)
    seconds = time.perf_counter() - start
    epochs = sum(len(trial.intermediate_values) for trial in study.trials) / VALIDATIONS_PER_EPOCH
    by_tpe = args.n_trials - len(random_trials) if random_trials is not None else 0
    return {"best": study.best_value, "epochs": epochs, "seconds": seconds, "by_tpe": by_tpe}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST/raw inside")
    parser.add_argument("--n-trials", type=int, default=tune.N_TRIALS, help=f"(default: {tune.N_TRIALS})")
    parser.add_argument("--epochs", type=int, default=tune.EPOCHS, help=f"(default: {tune.EPOCHS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: 0 1 2 3 4)")
    parser.add_argument("--configs", nargs="+", help="names to run (default: all; random+none always)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    every = configurations(args.epochs)
    names = [name for name in every if not args.configs or name in args.configs or name == "random+none"]
    data = load_mnist(args.data_dir, torch.device("cpu"), download=False)
    print(f"{args.n_trials} trials x {args.epochs} epochs, seeds {args.seeds}, {len(data['train_x'])} training "
          f"images, torch {torch.__version__}, optuna {optuna.__version__}, {torch.get_num_threads()} threads; "
          f"default: {tune.SAMPLER} + {tune.PRUNER}")
    results = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            results[name].append(run_study(*every[name], data, args, seed))
            row = results[name][-1]
            print(f"  seed {seed} {name:>17}: best {row['best']:.4f}  epochs {row['epochs']:5.1f}  "
                  f"{row['seconds']:5.1f} s  by TPE {row['by_tpe']}", flush=True)
    baseline = results["random+none"]
    base_best = statistics.mean(row["best"] for row in baseline)
    base_epochs = statistics.mean(row["epochs"] for row in baseline)
    print(f"\n{'configuration':>17} {'mean best':>10} {'worst best':>11} {'vs baseline':>12} {'epochs':>7} "
          f"{'seconds':>8} {'by TPE':>7}")
    for name, rows in results.items():
        mean_best = statistics.mean(row["best"] for row in rows)
        print(f"{name:>17} {mean_best:>10.4f} {min(row['best'] for row in rows):>11.4f} "
              f"{100 * (mean_best - base_best):>+10.2f}pt "
              f"{statistics.mean(row['epochs'] for row in rows) / base_epochs:>7.0%} "
              f"{statistics.mean(row['seconds'] for row in rows):>8.1f} "
              f"{statistics.mean(row['by_tpe'] for row in rows):>4.0f}/{args.n_trials}")


if __name__ == "__main__":
    main()
