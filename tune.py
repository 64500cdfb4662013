"""Tune the MNIST MLP with Optuna: search space, objective, sampler, pruner, study, final test.

    python tune.py                                  # full MNIST (downloaded into data/), 30 trials
    python tune.py --data-dir DIR --n-trials 20     # MNIST files you already have, in DIR/MNIST/raw
    python tune.py --workers 2 --tensorboard runs/tb   # two processes; curves: tensorboard --logdir runs/tb
    python tune.py --storage postgresql://user:password@db-host/optuna --seed 1   # one per machine

The same command resumes the study, a killed or stopped trial from where it was. Writes runs/STUDY-NAME/:
study.db, trials.csv, best.json, best_model.pt, plots, artifacts/. Beside it: train_loop.py (data, the
loop), checkpoints.py, parallel.py (stops, budget, workers), report.py (CSV, plots, TensorBoard).
"""
import os
import signal

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C while
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # torch imports (a second or two): no traceback

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import parallel  # noqa: E402
import report  # noqa: E402
from train_loop import (VALIDATIONS_PER_EPOCH, Parser, SetupError, evaluate, load_mnist, pick_device,  # noqa: E402
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
    """A trial's whole life: suggest, build, train with a report and a pruning check at each
    validation, keep its place, and return the validation accuracy of its final weights."""
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


def make_sampler(name, seed):
    return optuna.samplers.TPESampler(seed=seed) if name == "tpe" else optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name, epochs):
    """A pruner's resource is the step: a validation. A rung is a step where a trial is compared with
    all those that reached it before."""
    first = VALIDATIONS_PER_EPOCH // 2  # step 2: three quarters of the first epoch
    if name == "halving":  # judged at steps 2 and 6 (0.75 and 1.75 epochs): the best third goes on at each
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "hyperband":  # the same, in brackets that start judging at different rungs
        return optuna.pruners.HyperbandPruner(min_resource=first, reduction_factor=4,
                                              max_resource=epochs * VALIDATIONS_PER_EPOCH)
    if name == "median":  # stop a trial below the median of earlier trials at the same step
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


def open_study(args, data, worker=0):
    """The study in its storage (new, or the one to resume), with this process's seeded sampler."""
    storage = parallel.connect(args.storage, args.heartbeat)  # heartbeats: a dead process's trial is retried
    study = optuna.create_study(storage=storage, study_name=args.study_name, direction="maximize",
                                pruner=parallel.CountingRetriesOnce(make_pruner(args.pruner, args.epochs)),
                                load_if_exists=True)
    parallel.check_resume(study, {"epochs": args.epochs, "pruner": args.pruner, "validations per epoch":
                                  VALIDATIONS_PER_EPOCH, "training images": len(data["train_x"]),
                                  "validation images": len(data["val_x"])})
    # Seeded by --seed, the worker and the trials so far: a resumed study goes on instead of repeating itself.
    seed = np.random.SeedSequence([args.seed, worker, len(study.get_trials(deepcopy=False))]).generate_state(1)[0]
    study.sampler = make_sampler(args.sampler, int(seed))
    return study


def run_trials(args, worker, stops, data=None):
    """One process's part of the study (the parent's, or worker i's): its device, threads and data,
    then trials until the budget is spent or a stop is asked for."""
    device = pick_device(args.device, worker)  # with several GPUs, a GPU each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    data = {name: tensor.to(device) for name, tensor in (data or load_mnist(args.data_dir, "cpu")).items()}
    study = open_study(args, data, worker)
    store = optuna.artifacts.FileSystemArtifactStore(args.artifacts)  # checkpoints
    budget = parallel.Budget(args.n_trials, stops)  # --n-trials is the study's total, not "this many more"
    if not budget.trials_left(study):  # waits for trials that other processes run
        if worker == 0 and not stops.requested:
            print(f"study {study.study_name!r} already holds its {args.n_trials} trials: nothing to train "
                  "(raise --n-trials)")
        return
    with report.TrialCurves(args.tensorboard) as curves:
        try:
            study.optimize(functools.partial(objective, args=args, data=data, store=store, stops=stops, curves=curves),
                           timeout=args.timeout, catch=[parallel.PastBudget],
                           callbacks=[functools.partial(after_trial, curves=curves), budget])
        except parallel.Stopped:  # the running trial was queued again with its place saved
            pass


def after_trial(study, trial, curves):
    """Optuna calls this after each trial: a line of progress; the trial's TensorBoard run ends."""
    print(report.progress_line(study, trial), flush=True)
    curves.end(trial)


def final_test(study, args, data):
    """Retrain the winner on train + validation, then measure it ONCE on the test set."""
    best = study.best_trial
    data = {name: tensor.to(pick_device(args.device)) for name, tensor in data.items()}
    run = {"study": study.study_name, "trial_number": best.number, "params": best.params, "sampler": args.sampler,
           "pruner": args.pruner, "epochs": args.epochs, "seed": best.user_attrs["seed"],
           "data_dir": os.path.abspath(args.data_dir),
           **{f"{split}_images": len(data[f"{split}_x"]) for split in ("train", "val", "test")}}
    if report.holds(os.path.join(args.out, "best.json"), run):
        return print(f"best.json already holds trial {best.number}'s test accuracy; nothing to retrain")
    print(f"retraining trial {best.number} on train + validation...", flush=True)
    hparams = suggest_hparams(optuna.trial.FixedTrial(best.params), args.epochs)
    try:
        model = retrain_on_train_and_val(data, hparams, run["seed"], args.cuda_graph)
    except FloatingPointError as error:  # exit 1, the message on stderr; the study and trials.csv stay
        sys.exit(f"tune.py: the retrain of trial {best.number} diverged ({error}); best.json is not written")
    test_accuracy = evaluate(model, data["test_x"], data["test_y"])
    report.save_final(args.out, {"state_dict": model.state_dict(), "hparams": hparams},
                      {**run, "val_accuracy": best.value, "test_accuracy": test_accuracy})
    print(f"trial {best.number}: val_accuracy {best.value:.4f}, test_accuracy {test_accuracy:.4f} (test set, once)")


def parse_args(argv=None):
    parser = Parser(description="Tune the MNIST MLP with Optuna.")
    add = parser.add_argument
    add("--n-trials", type=whole_number(1), default=N_TRIALS, help=f"the study's total trials (default: {N_TRIALS})")
    add("--timeout", type=whole_number(1), help="seconds after which no new trial starts (default: none)")
    add("--epochs", type=whole_number(1), default=EPOCHS, help=f"epochs per trial (default: {EPOCHS})")
    add("--sampler", choices=["tpe", "random"], default=SAMPLER, help=f"(default: {SAMPLER})")
    add("--pruner", choices=["halving", "hyperband", "median", "none"], default=PRUNER, help=f"(default: {PRUNER})")
    add("--storage", help="RDB URL (default: sqlite:///OUT/study.db); postgresql://... for many machines")
    add("--study-name", default="mnist-mlp", help="(default: mnist-mlp)")
    add("--seed", type=whole_number(0), default=0, help="seeds the sampler and every trial's training (default: 0)")
    add("--data-dir", default="data", help="MNIST root, MNIST/raw inside (default: data)")
    add("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto: CUDA, MPS, CPU)")
    add("--out", help="output folder (default: runs/STUDY-NAME)")
    add("--artifacts", help="checkpoint folder; one all machines share, with --storage (default: OUT/artifacts)")
    add("--tensorboard", metavar="DIR", type=report.tensorboard_folder, help="curves, a run per trial (default: off)")
    add("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
        help="on CUDA, each training step replayed as a CUDA graph (default: off)")
    add("--workers", type=whole_number(1), default=1, help="processes on this machine (default: 1)")
    add("--heartbeat", metavar="SECONDS", type=whole_number(1), default=parallel.HEARTBEAT, help="(default: %(default)s)")
    add("--no-final", action="store_true", help="skip the final retrain and test-set score")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("runs", args.study_name)
    args.artifacts = args.artifacts or os.path.join(args.out, "artifacts")
    for flag, folder in (("--out", args.out), ("--artifacts", args.artifacts)):
        if problem := report.cannot_write(folder):
            parser.error(f"{flag} {folder}: cannot write there ({problem}); pass another folder")
    args.storage = args.storage or f"sqlite:///{os.path.join(args.out, 'study.db')}"
    return args


def main(argv=None):
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # after_trial prints one line per trial instead
    with parallel.Stops() as stops:
        workers = parallel.Workers(args.workers - 1)  # started now: they import torch while this loads MNIST
        try:
            pick_device(args.device)  # a wrong --device is told before MNIST loads
            data = load_mnist(args.data_dir, torch.device("cpu"))  # once; each worker loads its own
            study = open_study(args, data)
        except (SetupError, parallel.StorageError, parallel.StudyMismatch) as error:
            print(f"tune.py: error: {error}", file=sys.stderr)
            sys.exit(2)
        with stops.trials_running():
            workers.start(run_trials, args)
            run_trials(args, 0, stops, data)
            crashed = workers.join()  # after a stop too: each queues its trial, then ends
        if crashed:  # its trial was failed and retried here (heartbeat), or will be by the next run
            print(f"warning: worker exit codes {crashed}: see the errors above", file=sys.stderr)
        print(*report.summary(study), f"wrote {report.write_trials_csv(study.trials_dataframe(), args.out)}", sep="\n")
        if stops.requested:
            print("stopped: the running trial is queued again with its place saved; run the same command to resume")
            sys.exit(128 + stops.signal)
        if not args.no_final and study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
            final_test(study, args, data)
        report.save_plots(study, args.out)
    if crashed:
        sys.exit(1)


if __name__ == "__main__":
    main()
