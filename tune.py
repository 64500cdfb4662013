"""Tune the MNIST MLP with Optuna: search space, sampler, pruner, storage, workers, final test.

    python tune.py --data-dir ../shared/data/mnist-sample --n-trials 20 --epochs 3   # real digits, offline
    python tune.py                                  # full MNIST (downloaded into data/), 30 trials
    python tune.py --workers 2                      # two processes share the study on this machine
    python tune.py --storage postgresql://user:password@db-host/optuna   # on every machine that helps

The same command again resumes the study: --n-trials is its total budget, not "N more".
Everything lands in --out (default runs/<study-name>/): study.db, trials.csv, best.json,
best_model.pt and four PNG plots. The test set is used once, after the study, on the winner.
"""
import argparse
import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
import warnings

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState

import report
from train_loop import DEFAULT_HPARAMS, EVALS_PER_EPOCH, SetupError, evaluate, load_mnist, pick_device, seeded_model, train

# Heartbeats, their retry callback and fail_stale_trials are marked experimental, and have been
# since Optuna 2.8/2.9; the warning tells nothing new on every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# ---------------------------------------------------------------------------- settings
N_TRIALS = 30      # the study's budget: finished (complete + pruned) trials
EPOCHS = 3         # every trial trains this long unless pruned; the pruner saves the rest
PRUNER = "hyperband"  # trained half the epochs of no pruning for the same best: benchmarks/pruning.py
HEARTBEAT = 10     # seconds between "still alive" writes; silent for 3x this, a trial is failed and retried
MAX_RETRY = 2      # how often a trial whose worker died is given again
# ------------------------------------------------------------------------------------


def suggest_hparams(trial, epochs):
    """The search space. Wide on purpose: it holds bad models too, so the sampler learns where not to go."""
    momentum = trial.suggest_float("momentum", 0.0, 0.99)
    return {
        **DEFAULT_HPARAMS,
        "hidden_size": trial.suggest_int("hidden_size", 32, 512, log=True),
        "layer_size": trial.suggest_int("layer_size", 1, 5),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1.0, log=True),
        "momentum": momentum,
        # torch.optim.SGD raises for Nesterov without momentum, so only ask when there is momentum.
        "nesterov": momentum > 0 and trial.suggest_categorical("nesterov", [True, False]),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "epochs": epochs,
    }


class BudgetTaken(Exception):
    """Another worker took the study's last trial a moment before this one."""


def counted(trials):
    """Trials that use up the budget: finished, running or queued. Failed ones are given again."""
    return [t for t in trials if t.state != TrialState.FAIL]


def objective(trial, data, args):
    # Trial numbers are handed out atomically by the storage, so "is this trial beyond the budget,
    # counting the ones before it?" has one answer on every worker: the budget is exact.
    if len(counted(t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number)) >= args.n_trials:
        trial.set_user_attr("fail_reason", "not trained: another worker took the last trial of the budget")
        raise BudgetTaken()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    hparams = suggest_hparams(trial, args.epochs)
    trial.set_user_attr("seed", args.seed)
    trial.set_user_attr("epochs", args.epochs)
    return train(seeded_model(hparams, args.seed), data, hparams, trial)


def connect(url, heartbeat):
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url,
                # SQLite: wait up to a minute for another process's write instead of "database is locked".
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True},
                heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # Two processes creating a new database's tables at once: one loses, waits, tries again.
            if attempt == 2:
                raise
            time.sleep(1)


def open_study(args, worker=0):
    url = args.storage
    try:
        storage = connect(url, args.heartbeat)
    except ImportError:  # Optuna's wording: "Failed to import DB access module"
        raise SetupError("--storage: this database's Python driver is missing; for PostgreSQL: "
                         "pip install -r requirements-postgres.txt") from None
    except Exception as error:
        safe_url = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)  # never print a password
        raise SetupError(f"--storage {safe_url}: {str(error).splitlines()[0]}; expected sqlite:///path/study.db "
                         "or postgresql://user:password@host/database") from None
    # Each worker seeds its sampler differently, or they would all propose the same first trials.
    seed = args.seed + worker
    sampler = optuna.samplers.TPESampler(seed=seed) if args.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(storage=storage, study_name=args.study_name, direction="maximize",
                                sampler=sampler, pruner=make_pruner(args.pruner, args.epochs), load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SetupError(f"study {args.study_name!r} in this storage minimises; "
                         "tune.py maximises accuracy: pass another --study-name")
    return study


def make_pruner(name, epochs):
    """Resources are reports: EVALS_PER_EPOCH of them per epoch."""
    if name == "hyperband":  # successive halving from half an epoch on: a quarter goes on at each rung
        return optuna.pruners.HyperbandPruner(min_resource=EVALS_PER_EPOCH // 2, reduction_factor=4,
                                              max_resource=epochs * EVALS_PER_EPOCH)
    if name == "median":  # stop a trial below the median of earlier trials at the same report
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=EVALS_PER_EPOCH // 2)
    return optuna.pruners.NopPruner()


def print_progress(study, trial):
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    best = max((t.value for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])), default=None)
    why = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("pruned_reason") or ""
    print(f"trial {trial.number:3d} {trial.state.name:8s} val_accuracy {value}  {seconds:5.1f} s  "
          f"best {best if best is None else format(best, '.4f')}  {why}".rstrip(), flush=True)


def run_trials(study, data, args):
    """Run trials until the study holds its budget, then wait for those still running elsewhere:
    if one of their workers dies, its heartbeat stops, and this worker runs the retry."""
    deadline = time.monotonic() + (args.timeout or float("inf"))
    said_waiting = False
    while time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)  # a trial silent for too long: failed, then queued again
        trials = counted(study.get_trials(deepcopy=False))
        if len(trials) >= args.n_trials and not any(t.state == TrialState.WAITING for t in trials):
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if not running:
                return
            if not said_waiting:
                print(f"waiting for {running} running trial(s) of other workers; a dead worker's trial is "
                      f"failed and retried after {3 * args.heartbeat} s without heartbeat", flush=True)
                said_waiting = True
            time.sleep(1)
            continue
        study.optimize(lambda trial: objective(trial, data, args), n_trials=1, catch=(BudgetTaken,),
                       callbacks=[print_progress])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the finished trial's GPU memory back, so nvidia-smi shows it free


def worker_main(args, worker):
    """One of --workers processes: its own data, its own share of the CPU, its own GPU if there are several."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: see run_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS: no affinity
    torch.set_num_threads(max(1, cores // args.workers))
    device = pick_device(args.device)
    if device.type == "cuda" and args.device == "auto":
        device = torch.device("cuda", worker % torch.cuda.device_count())
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    run_trials(open_study(args, worker), load_mnist(args.data_dir, device), args)


def run_workers(study, args):
    processes = [multiprocessing.get_context("spawn").Process(target=worker_main, args=(args, worker))
                 for worker in range(args.workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        # Stopped at once rather than asked: a worker interrupted inside a database write can leave
        # the write half-done. The parent then marks their running trials failed for them.
        for process in processes:
            process.kill()
            process.join()
        workers = {f"{socket.gethostname()}:{process.pid}" for process in processes}
        for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
            if trial.user_attrs.get("worker") in workers:
                study.tell(trial.number, state=TrialState.FAIL)
        raise
    if any(process.exitcode for process in processes):
        raise RuntimeError(f"worker exit codes {[p.exitcode for p in processes]}: see the errors above")


def final_test(study, data, args):
    """Retrain the winner on train + validation, then measure it ONCE on the test set."""
    best = study.best_trial
    best_json = os.path.join(args.out, "best.json")
    if os.path.exists(best_json) and json.load(open(best_json))["trial_number"] == best.number:
        print(f"best.json already holds trial {best.number}'s test accuracy; nothing to retrain")
        return
    hparams = suggest_hparams(optuna.trial.FixedTrial(best.params), best.user_attrs["epochs"])
    seed = best.user_attrs["seed"]
    train_and_val = {"train_x": torch.cat([data["train_x"], data["val_x"]]),
                     "train_y": torch.cat([data["train_y"], data["val_y"]]),
                     "val_x": data["val_x"], "val_y": data["val_y"]}  # seen in training now: not reported
    model = seeded_model(hparams, seed)
    print(f"retraining trial {best.number} on train + validation ({len(train_and_val['train_x'])} images)...")
    train(model, train_and_val, hparams, evals_per_epoch=1)
    test_accuracy = evaluate(model, data["test_x"], data["test_y"])
    result = {"trial_number": best.number, "params": best.params, "val_accuracy": best.value,
              "test_accuracy": test_accuracy, "epochs": hparams["epochs"], "seed": seed,
              "torch": torch.__version__, "optuna": optuna.__version__}
    state = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "hparams": hparams}
    report.replace_atomically(os.path.join(args.out, "best_model.pt"), lambda tmp: torch.save(state, tmp))
    report.replace_atomically(best_json, lambda tmp: json.dump(result, open(tmp, "w"), indent=2))
    print(f"trial {best.number}: val_accuracy {best.value:.4f}, test_accuracy {test_accuracy:.4f} (test set, once)")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    parser = Parser(description="Tune the MNIST MLP with Optuna.")
    add = parser.add_argument
    add("--n-trials", type=positive_int, default=N_TRIALS, help=f"the study's total trials (default: {N_TRIALS})")
    add("--timeout", type=positive_int, help="seconds after which no new trial starts (default: none)")
    add("--epochs", type=positive_int, default=EPOCHS, help=f"epochs per trial (default: {EPOCHS})")
    add("--sampler", choices=["tpe", "random"], default="tpe", help="(default: tpe)")
    add("--pruner", choices=["hyperband", "median", "none"], default=PRUNER, help=f"(default: {PRUNER})")
    add("--storage", help="RDB URL (default: sqlite:///OUT/study.db); postgresql://... for many machines")
    add("--study-name", default="mnist-mlp", help="(default: mnist-mlp)")
    add("--seed", type=int, default=0, help="seeds the sampler and every trial's training (default: 0)")
    add("--data-dir", default="data", help="MNIST root, MNIST/raw inside (default: data)")
    add("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu (default: auto: CUDA, MPS, CPU)")
    add("--out", help="output folder (default: runs/STUDY-NAME)")
    add("--workers", type=positive_int, default=1, help="processes on this machine (default: 1)")
    add("--heartbeat", type=positive_int, default=HEARTBEAT, help=f"seconds between heartbeats (default: {HEARTBEAT})")
    add("--no-final", action="store_true", help="skip the final retrain and test-set score")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("runs", args.study_name)
    try:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError("not writable")
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error.strerror or error}); pass another folder")
    args.storage = args.storage or f"sqlite:///{os.path.join(args.out, 'study.db')}"
    return args


def main(argv=None):
    args = parse_args(argv)
    # One line per trial (print_progress) replaces Optuna's log, whose failed-trial warnings carry
    # a traceback even for Ctrl-C; a failed trial still shows in that line and in the summary.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        data = load_mnist(args.data_dir, pick_device(args.device))  # checks files and device up front
        study = open_study(args)
    except SetupError as error:
        print(f"tune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    before = len(counted(study.get_trials(deepcopy=False)))
    if before >= args.n_trials:
        print(f"study {args.study_name!r} already holds its {args.n_trials} trials: nothing to train "
              "(raise --n-trials for more)")
    interrupted = False
    try:
        if args.workers == 1:
            run_trials(study, data, args)
        else:
            run_workers(study, args)
    except KeyboardInterrupt:
        interrupted = True
    print("\n".join(report.summary(study)))
    print(f"wrote {report.write_trials_csv(study, args.out)}")
    if interrupted:
        print("interrupted: the running trial is marked failed; run the same command to resume")
        sys.exit(130)
    if not args.no_final and study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
        final_test(study, data, args)
    report.save_plots(study, args.out)


if __name__ == "__main__":
    main()
