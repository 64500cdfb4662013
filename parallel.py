"""The machinery beside tune.py: crash-safe storage, an exact budget, worker processes, stops.

tune.py holds the Optuna idea (search space, objective, study). This file keeps a study whole
when a process dies, when several processes or machines share it, and when it is asked to stop
(Ctrl-C, or SIGTERM from a cluster's scheduler):

    storage = parallel.connect("sqlite:///runs/x/study.db", heartbeat=10)   # for optuna.create_study
    parallel.check_resume(study, settings)       # a resumed study must be run as it was run before
    with parallel.handle_stops():
        parallel.start_workers(2)                # optional, early: they import while this process loads data
        finished = parallel.optimize(study, objective, n_trials=30, workers=2, start_worker=setup)

It imports nothing from tune.py: tune.py hands it a study, an objective, and `start_worker(i)`,
which sets up worker process i and returns that process's (study, objective). The objective
passes `stop_requested` to training, and puts a trial that stopped back in the queue (`queue_again`).

Terms: a *heartbeat* is a timestamp a running trial writes every few seconds; a trial silent for
GRACE of them belongs to a dead process, so it is marked FAIL and queued again (a WAITING trial
with the same parameters and user attributes, among them its last checkpoint: see checkpoints.py).
The *budget* counts finished (COMPLETE or PRUNED), RUNNING and WAITING trials.
"""
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings

import optuna
import sqlalchemy
from optuna.trial import TrialState

# Heartbeats, their retry callback and fail_stale_trials have been marked experimental since
# Optuna 2.8/2.9; the warning says nothing new on every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# ---------------------------------------------------------------------------- settings
HEARTBEAT = 10        # seconds between a running trial's heartbeats (tune.py --heartbeat)
GRACE = 3             # heartbeats a trial may miss before it is failed and retried
MAX_RETRY = 2         # how often a dead process's trial is given again
SQLITE_WAIT = 60      # seconds a SQLite write waits for another process's lock
# ------------------------------------------------------------------------------------


class StorageError(Exception):
    """A storage URL that cannot be opened; the message says why and what to pass instead."""


class BudgetTaken(Exception):
    """Another worker took the study's last trial a moment before this one."""


class StudyMismatch(Exception):
    """The study in the storage was run otherwise than this run would run it; the message says how."""


def connect(url, heartbeat):
    """An Optuna RDB storage whose running trials send heartbeats every `heartbeat` seconds."""
    safe_url = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)  # never print a password
    for attempt in range(3):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT}} if url.startswith("sqlite")
                else {"pool_pre_ping": True},
                heartbeat_interval=heartbeat, grace_period=GRACE * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
            if storage.engine.dialect.name == "sqlite":
                lock_sqlite_writes_up_front(storage.engine)
            return storage
        except ImportError:  # Optuna's "Failed to import DB access module"
            raise StorageError(f"--storage {safe_url}: this database's Python driver is missing; for PostgreSQL: "
                               "pip install -r requirements-postgres.txt") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
            # Two processes creating a new database's tables at once: one loses, waits, tries again.
            if attempt == 2:
                raise StorageError(f"--storage {safe_url}: {str(error).splitlines()[0]}") from None
            time.sleep(1)
        except Exception as error:
            raise StorageError(f"--storage {safe_url}: {str(error).splitlines()[0]}; expected sqlite:///path/study.db "
                               "or postgresql://user:password@host/database") from None


def check_resume(study, settings):
    """A study resumed must be the one this run would make: it maximises, and it was run with these
    settings (stored in the study when it was new). Raises StudyMismatch otherwise."""
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise StudyMismatch(f"study {study.study_name!r} in this storage minimises; this run maximises: "
                            "pass another --study-name")
    kept = study.user_attrs.get("settings")
    if kept is None:  # a new study
        study.set_user_attr("settings", settings)
        return
    for name, value in kept.items():
        if settings.get(name) != value:
            raise StudyMismatch(f"study {study.study_name!r} was run with {name} {value}, this run has "
                                f"{settings.get(name)}: resume it as it was run, or pass another --study-name or --out")


def lock_sqlite_writes_up_front(engine):
    """Every transaction takes SQLite's write lock as it begins (BEGIN IMMEDIATE), and so waits for it.

    With SQLite's default (deferred) transactions, the heartbeat thread and the main thread both
    read, then write; each can hold what the other waits for, and SQLite then answers "database is
    locked" at once instead of waiting (optuna issue #4994). Set after Optuna has created its
    tables: that start-up nests two connections, which would then wait for each other. Also WAL
    mode: readers (report.py, a dashboard) never block a write, and a commit costs no fsync (a
    killed process loses nothing; a power cut may lose the last writes, never the database)."""
    def on_connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None  # the driver begins nothing; "begin" below does
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    sqlalchemy.event.listen(engine, "connect", on_connect)
    sqlalchemy.event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()  # connections made before the listeners: closed, so every new one has them


# ------------------------------------------------------------------ stops: Ctrl-C and SIGTERM
stop_signal = None      # the first Ctrl-C (SIGINT) or SIGTERM while trials run: stop at the next report
trials_running = False  # between these moments a signal asks; at any other moment it stops at once
worker_processes = []   # (process, pipe for its orders): this process's workers, told to stop by SIGTERM


def on_stop(signum, frame):
    """The first Ctrl-C or SIGTERM while trials run asks them to stop at a safe point; any other, now.

    SIGTERM is how Slurm, Kubernetes, spot machines and `kill PID` ask a job to end, with SIGKILL
    some 30 s later: the running trial stops at its next report (seconds), saves its place and is
    queued again; the exit code is 128 + the signal (130 for Ctrl-C, 143 for SIGTERM). A handler
    that raised an exception (Python's KeyboardInterrupt) could land inside a database write and
    leave a trial half-told; this one only sets a flag, read right after each report (see
    `optimize_one`). It writes with os.write: print() here could re-enter a print() it interrupted."""
    global stop_signal
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    if trials_running and stop_signal is None:
        stop_signal = signum
        os.write(2, f"\n{name}: the running trial stops at its next report and is queued again "
                    f"({name} again to stop at once)\n".encode())
        signal_workers(signal.SIGTERM)
        return
    os.write(2, b"\nstopped at once: a trial left running is retried once its heartbeat is stale\n"
             if stop_signal else f"\n{name}: stopped\n".encode())
    signal_workers(signal.SIGKILL)
    os._exit(128 + signum)


def signal_workers(signum):
    for worker, _ in worker_processes:
        if worker.exitcode is None:  # still running: an ended worker's pid may belong to another process
            with contextlib.suppress(ProcessLookupError):  # it ended a moment ago
                os.kill(worker.pid, signum)


@contextlib.contextmanager
def handle_stops():
    """SIGTERM, and Ctrl-C unless it is ignored (nohup, a background job), go to on_stop inside this block."""
    signals = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    previous = {signum: signal.signal(signum, on_stop) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested():
    return stop_signal is not None


def queue_again(trial):
    """Put a running trial back in the queue as it is (WAITING): number, parameters, reports, the
    pruner's bookkeeping and its checkpoint. The next run, or another worker, picks it up at once and
    goes on where it stopped: a stop is not a crash, and uses none of the trial's MAX_RETRY."""
    storage = trial.storage
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                   state=TrialState.WAITING)


# ------------------------------------------------------------------ running trials
def optimize_one(study, objective, n_trials, callbacks):
    """One trial with the exact budget. A trial that stops (see `on_stop`) leaves by an exception
    that is not an Exception (tune.py's objective queues it again first), which Optuna lets through
    without marking the trial FAIL."""
    def guarded(trial):
        # Trial numbers are handed out atomically by the storage, so "is this trial past the budget,
        # counting the unfailed trials before it?" has one answer on every worker: the budget is exact.
        # Below trial number n_trials it cannot be, and the storage is not asked (a read per trial).
        trials = trial.study.get_trials(deepcopy=False) if trial.number >= n_trials else []
        if sum(t.number < trial.number and t.state != TrialState.FAIL for t in trials) >= n_trials:
            trial.set_user_attr("fail_reason", "not trained: another worker took the last trial of the budget")
            raise BudgetTaken()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return objective(trial)

    try:  # Optuna marks the trial FAIL when the objective raises an Exception, then raises it again here
        study.optimize(guarded, n_trials=1, catch=(BudgetTaken,), callbacks=callbacks)
    except BaseException as error:  # train_loop.Stopped: the trial stopped at a report, and is queued again
        if isinstance(error, Exception) or not stop_requested():
            raise


def unfailed_trials(study):
    """The trials the budget counts: COMPLETE, PRUNED, RUNNING and WAITING."""
    return [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]


def run_trials(study, objective, n_trials, timeout=None, callbacks=()):
    """Trials until the study holds n_trials, then wait for those still running elsewhere: if one's
    process dies, its heartbeat stops, and this process runs the retry. False if Ctrl-C stopped it."""
    deadline = time.monotonic() + (timeout or float("inf"))
    said_waiting = False
    while time.monotonic() < deadline and not stop_requested():
        trials = unfailed_trials(study)
        if len(trials) < n_trials or any(t.state == TrialState.WAITING for t in trials):
            optimize_one(study, objective, n_trials, callbacks)  # Optuna fails stale trials before each
            continue
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if not running:
            return True
        optuna.storages.fail_stale_trials(study)  # one silent too long (a dead process's) is failed, queued again
        if sum(t.state == TrialState.RUNNING for t in unfailed_trials(study)) < running:
            continue  # it was, or another ended: run its retry or a new trial (or finish) at once
        if not said_waiting:
            print(f"waiting for {running} running trial(s) of other workers; a dead worker's trial is "
                  f"failed and retried after {GRACE} missed heartbeats", flush=True)
            said_waiting = True
        time.sleep(1)
    return not stop_requested()


def optimize(study, objective, n_trials, timeout=None, callbacks=(), workers=1, start_worker=None):
    """Run the study to n_trials in this process and workers - 1 more; False if a stop ended it first.

    Each extra worker is a fresh process (spawn: no CUDA or lock state copied) that calls
    start_worker(i) for its own study connection and data, then runs trials like this one."""
    global trials_running, stop_signal
    stop_signal = None
    trials = unfailed_trials(study)
    if len(trials) >= n_trials and not any(t.state == TrialState.WAITING for t in trials):
        print(f"study {study.study_name!r} already holds its {n_trials} trials: nothing to train (raise --n-trials)")
    start_workers(workers)  # those not started yet
    for _, orders in worker_processes:
        orders.send((start_worker, n_trials, timeout, callbacks))  # tensors go by shared memory, not copied
    trials_running = True
    try:
        run_trials(study, objective, n_trials, timeout, callbacks)
        for worker, _ in worker_processes:
            worker.join()
    finally:
        trials_running = False
    crashed = [worker.exitcode for worker, _ in worker_processes if worker.exitcode]
    worker_processes.clear()
    if crashed and not stop_requested():  # its trial was failed and retried here (heartbeat), or will be
        print(f"warning: worker exit codes {crashed}: see the errors above", file=sys.stderr)
    if stop_requested():
        print("stopped: the running trial is queued again with its place saved; run the same command to resume")
    return not stop_requested()


def start_workers(count):
    """Start worker processes 1 to count - 1 now, so that they import torch while this process loads
    the data and opens the study; each waits for its orders from `optimize`. Calling it is optional."""
    spawn = multiprocessing.get_context("spawn")
    # The terminal sends Ctrl-C to every process of the job. Workers inherit an ignored SIGINT from
    # these lines, so none dies mid-start-up, and stop when this process tells them (SIGTERM).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while len(worker_processes) < count - 1:
            orders, worker_end = spawn.Pipe()
            # daemon: should this process end before sending orders (a bad flag), its workers end too
            process = spawn.Process(target=worker_main, args=(len(worker_processes) + 1, worker_end), daemon=True)
            process.start()
            worker_end.close()
            worker_processes.append((process, orders))
    finally:
        signal.signal(signal.SIGINT, previous)


def worker_main(worker, orders):
    global trials_running
    parent = os.getppid()
    try:
        start_worker, n_trials, timeout, callbacks = orders.recv()
    except EOFError:  # the parent ended before its study began
        return
    signal.signal(signal.SIGTERM, on_stop)  # the parent's "stop at a safe point", then "now"
    threading.Thread(target=stop_when_orphaned, args=(parent,), daemon=True).start()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study, objective = start_worker(worker)
    trials_running = True
    run_trials(study, objective, n_trials, timeout, callbacks)


def stop_when_orphaned(parent):
    """A worker whose parent is gone, even by kill -9 (which no handler sees), stops as on SIGTERM:
    its trial at its next report, queued again. Checked every second (os.getppid() changes at once)."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
