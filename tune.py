"""Tune the MNIST MLP with Optuna: search space, objective, sampler, pruner, study, final test.

    python tune.py                               # full MNIST (downloaded into data/), 30 trials; again: resumes
    python tune.py --data-dir DIR --workers 2    # MNIST files in DIR/MNIST/raw; two processes (--help: all flags)
"""
import os
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C while
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # torch imports (a second or two): no traceback

import contextlib
import functools
import sys

import numpy as np
import optuna
import torch

import checkpoints
import parallel
import report
from train_loop import (VALIDATIONS_PER_EPOCH, Parser, SetupError, evaluate, load_mnist, pick_device,
                        retrain_on_train_and_val, seeded_model, train, whole_number)

# ---------------------------------------------------------------------------- settings
N_TRIALS = 30       # the study's budget: finished (complete + pruned) trials, across all runs
EPOCHS = 3          # every trial trains this long unless pruned
SAMPLER = "tpe"     # TPE models good and bad regions from the trials so far; "random" is the baseline
PRUNER = "halving"  # matched random search with 53% of its training, measured: benchmarks/search.py
# ------------------------------------------------------------------------------------


def suggest_hparams(trial, epochs):
    """The search space. Wide on purpose: it holds bad models too, so the sampler learns where not to go."""
    momentum = trial.suggest_float("momentum", 0.0, 0.99)
    return {
        "in_size": 784, "out_size": 10, "epochs": epochs,
        "hidden_size": trial.suggest_int("hidden_size", 32, 512, log=True),
        "layer_size": trial.suggest_int("layer_size", 1, 5),  # the depth: hidden layers
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1.0, log=True),
        "momentum": momentum,
        # torch.optim.SGD raises for Nesterov without momentum, so only ask when there is momentum.
        "nesterov": momentum > 0 and trial.suggest_categorical("nesterov", [True, False]),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }


def objective(trial, args, data, store, stops, curves):
    """A trial's life: suggest, build, train, report and prune at each validation, keep its place, return."""
    parallel.claim(trial, args.n_trials)  # PastBudget if another worker took the last trial a moment before
    trial.set_user_attr("seed", args.seed)  # weights, shuffles and dropout: what the final retrain repeats
    hparams = suggest_hparams(trial, args.epochs)
    model = seeded_model(hparams, args.seed)
    with checkpoints.Keeper(trial, store) as keeper:  # a retried or stopped trial goes on from its checkpoint
        try:
            for val in train(model, data, hparams, resume=keeper.resume(), cuda_graph=args.cuda_graph):
                curves.add(trial, val)  # TensorBoard, with --tensorboard
                trial.report(val.accuracy, val.step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val_accuracy {val.accuracy:.4f} at step {val.step}")
                if val.epoch_end or stops.requested:  # a crash's retry goes on from the last epoch's end
                    keeper.save(val.checkpoint())
                if stops.requested:  # SIGTERM or Ctrl-C: queued again, to go on from this very validation
                    raise stops.queue_again(trial)
        except (FloatingPointError, torch.OutOfMemoryError) as error:  # a rate too high; a model too big for the GPU
            trial.set_user_attr("pruned_reason", str(error).splitlines()[0][:200])
            raise optuna.TrialPruned(str(error)) from None
    return evaluate(model, data["val_x"], data["val_y"])  # the final weights' accuracy: its last step's value


def make_pruner(name):
    """Its resource is the step (a validation); at a rung, a trial is compared with all that reached it."""
    first = VALIDATIONS_PER_EPOCH // 2  # step 2: three quarters of the first epoch
    if name == "halving":  # judged at steps 2 and 6 (0.75 and 1.75 epochs): the best third goes on at each
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "median":  # stop a trial below the median of earlier trials at the same step
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


def open_study(args, data, worker=0):
    """The study (new, or the one to resume) and a sampler seeded by --seed, worker and trials so far."""
    storage = parallel.connect(args.storage, args.heartbeat)  # heartbeats: a dead process's trial is retried
    study = optuna.create_study(storage=storage, study_name=args.study_name, direction="maximize",
                                pruner=parallel.CountingRetriesOnce(make_pruner(args.pruner)), load_if_exists=True)
    study.set_metric_names(["val_accuracy"])  # the dashboard's and trials.csv's name for the value
    parallel.check_resume(study, {"epochs": args.epochs, "pruner": args.pruner, "validations per epoch":
                                  VALIDATIONS_PER_EPOCH, "training images": len(data["train_x"]),
                                  "validation images": len(data["val_x"])})
    seed = np.random.SeedSequence([args.seed, worker, len(study.get_trials(deepcopy=False))]).generate_state(1)[0]
    sampler = optuna.samplers.TPESampler if args.sampler == "tpe" else optuna.samplers.RandomSampler
    study.sampler = sampler(seed=int(seed))
    return study


def run_trials(args, worker, stops, data=None):
    """One process's part of the study (the parent's, or worker i's): trials until the study holds
    --n-trials in all, its total over every run, worker and machine (Optuna's n_trials: "this many more")."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    data = data or load_mnist(args.data_dir, pick_device(args.device, worker))  # several GPUs: one each
    study, store = open_study(args, data, worker), optuna.artifacts.FileSystemArtifactStore(args.artifacts)
    budget = parallel.Budget(args.n_trials, stops)  # waits for trials running elsewhere, then stops the study
    with report.TrialCurves(args.tensorboard) as curves, contextlib.suppress(parallel.Stopped):  # a stop: queued
        if budget.trials_left(study):
            study.optimize(functools.partial(objective, args=args, data=data, store=store, stops=stops, curves=curves),
                           timeout=args.timeout, catch=[parallel.PastBudget],
                           callbacks=[report.print_progress, curves.end, budget])  # after each trial


def final_test(study, args, data):
    """Retrain the winner on train + validation, then measure it ONCE on the test set."""
    best = study.best_trial
    run = report.final_run(study, args, data)  # what best.json says of the study, trial and data it was made of
    if report.holds(os.path.join(args.out, "best.json"), run):
        return print(f"best.json already holds trial {best.number}'s test accuracy; nothing to retrain")
    print(f"retraining trial {best.number} on train + validation...", flush=True)
    hparams = suggest_hparams(optuna.trial.FixedTrial(best.params), args.epochs)
    try:
        model = retrain_on_train_and_val(data, hparams, run["seed"], args.cuda_graph)
    except FloatingPointError as error:  # exit 1, the message on stderr; the study and trials.csv stay
        sys.exit(f"tune.py: the retrain of trial {best.number} diverged ({error}); best.json is not written")
    test_accuracy = evaluate(model, data["test_x"], data["test_y"])
    report.save_final(args.out, model, hparams, {**run, "val_accuracy": best.value, "test_accuracy": test_accuracy},
                      data)  # best_model.pt, best.json, and final_model.png: the model at work
    print(f"trial {best.number}: val_accuracy {best.value:.4f}, test_accuracy {test_accuracy:.4f} (test set, once)")


def parse_args(argv=None):
    parser = Parser(description="Tune the MNIST MLP with Optuna.")
    add = parser.add_argument
    add("--n-trials", type=whole_number(1), default=N_TRIALS, help=f"the study's total trials (default: {N_TRIALS})")
    add("--timeout", type=whole_number(1), help="seconds after which no new trial starts (default: none)")
    add("--epochs", type=whole_number(1), default=EPOCHS, help=f"epochs per trial (default: {EPOCHS})")
    add("--sampler", choices=["tpe", "random"], default=SAMPLER, help=f"(default: {SAMPLER})")
    add("--pruner", choices=["halving", "median", "none"], default=PRUNER, help=f"(default: {PRUNER})")
    add("--storage", help="RDB URL (default: sqlite:///OUT/study.db); postgresql://... for many machines")
    add("--study-name", default="mnist-mlp", help="(default: mnist-mlp)")
    add("--seed", type=whole_number(0), default=0, help="seeds the sampler and every trial's training (default: 0)")
    add("--data-dir", default="data", help="MNIST root, MNIST/raw inside (default: data)")
    add("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto: CUDA, MPS, CPU)")
    add("--out", help="output folder (default: runs/STUDY-NAME)")
    add("--artifacts", help="checkpoint folder; one all machines share, with --storage (default: OUT/artifacts)")
    add("--tensorboard", metavar="DIR", type=report.tensorboard_folder, help="curves, a run per trial (default: off)")
    add("--cuda-graph", action="store_true", help="on CUDA, each training step replayed as a captured graph")
    add("--workers", type=whole_number(1), default=1, help="processes on this machine (default: 1)")
    add("--heartbeat", metavar="SECONDS", type=whole_number(1), default=parallel.HEARTBEAT, help="(default: %(default)s)")
    add("--no-final", action="store_true", help="skip the final retrain and test-set score")
    return report.with_output_folders(parser, parser.parse_args(argv))  # --out, --artifacts, --storage filled in


def main(argv=None):
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # after_trial prints one line per trial instead
    with parallel.Stops() as stops:
        workers = parallel.Workers(args.workers - 1)  # started now: they import torch while this loads MNIST
        try:
            data = load_mnist(args.data_dir, pick_device(args.device))  # once; each worker loads its own
            study = open_study(args, data)
        except (SetupError, parallel.StorageError, parallel.StudyMismatch) as error:
            print(f"tune.py: error: {error}", file=sys.stderr)
            sys.exit(2)
        with stops.trials_running():
            workers.start(run_trials, args)
            run_trials(args, 0, stops, data)
            workers.join()  # each ends after its trials, or at a stop; a crash is told on stderr
        print(*report.summary(study), sep="\n")  # with "run the same command to go on" if trials wait
        print(f"wrote {report.write_trials_csv(study.trials_dataframe(), args.out)}")  # a row per trial
        if stops.requested:  # Ctrl-C: exit code 130, SIGTERM: 143
            sys.exit(128 + stops.signal)
        if not args.no_final and study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
            final_test(study, args, data)
        report.publish(study, args.out, args.artifacts)  # plots; the study's files as the dashboard's artifacts


if __name__ == "__main__":
    with parallel.exit_at_once():  # once all is written and flushed: no second of tearing torch down
        main()
