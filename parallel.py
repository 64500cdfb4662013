"""The machinery beside tune.py: crash-safe storage, an exact budget, stops, worker processes.

tune.py holds the Optuna idea (search space, objective, study.optimize). This file keeps a study
whole when a process dies, when several processes or machines share it, and when it is asked to
stop (Ctrl-C, or SIGTERM from a cluster's scheduler):

    storage = parallel.connect("sqlite:///runs/x/study.db", heartbeat=10)   # for optuna.create_study
    parallel.check_resume(study, settings)      # a resumed study must be run as it was run before
    with parallel.Stops() as stops:             # Ctrl-C and SIGTERM: stops.requested, stops.queue_again(trial)
        workers = parallel.Workers(1)           # early: it imports torch while this process loads data
        workers.start(run_trials, args)         # it calls run_trials(args, worker=1, stops=its own Stops)
        budget = parallel.Budget(30, stops)     # trials_left(study); a study.optimize callback
        study.optimize(objective, callbacks=[budget], catch=[parallel.PastBudget])

Terms: a *heartbeat* is a timestamp a running trial writes every few seconds; a trial silent for
GRACE of them belongs to a dead process, so it is marked FAIL and queued again (a WAITING trial
with the same parameters, reports and user attributes, among them its last checkpoint: see
checkpoints.py). The *budget* counts finished (COMPLETE or PRUNED), RUNNING and WAITING trials.
Imports neither tune.py nor torch.
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
import weakref

import optuna
import sqlalchemy
from optuna.trial import TrialState

# Heartbeats, their retry callback and fail_stale_trials have been marked experimental since
# Optuna 2.8/2.9; the warning says nothing new on every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# A retry goes on from its last checkpoint and reports again the steps its dead attempt reported
# after it: the same values (the resume is exact), which Optuna, having them, ignores and warns of.
warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")

# ---------------------------------------------------------------------------- settings
HEARTBEAT = 10        # seconds between a running trial's heartbeats (tune.py --heartbeat)
GRACE = 3             # heartbeats a trial may miss before it is failed and retried
MAX_RETRY = 2         # how often a dead process's trial is given again
SQLITE_WAIT = 60      # seconds a SQLite write waits for another process's lock
# ------------------------------------------------------------------------------------


ENGINES = weakref.WeakSet()  # the databases this process opened


class StorageError(Exception):
    """A storage URL that cannot be opened; the message says why and what to pass instead."""


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
                heartbeat_stale_trial_callback=retry_stale_trial)
            if storage.engine.dialect.name == "sqlite":
                lock_sqlite_writes_up_front(storage.engine)
            ENGINES.add(storage.engine)  # closed by exit_at_once()
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


def retry_stale_trial(study, trial):
    """Called for a dead process's trial, just failed: Optuna's RetryHeartbeatStaleTrialCallback
    queues it again, with its reports (the retry's curve runs from step 0) and its user attributes,
    to which `retry_of` is added: the number of the trial that first ran this configuration."""
    trial.user_attrs["retry_of"] = trial.user_attrs.get("retry_of", trial.number)  # a copy: only the retry has it
    trial.system_attrs["fixed_params"] = trial.params  # what a dashboard shows while it waits
    optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY, inherit_intermediate_values=True)(study, trial)


class CountingRetriesOnce(optuna.pruners.BasePruner):
    """`pruner`, shown the study without its FAIL trials. A retry carries the failed attempt's records
    of the rungs it passed (successive halving's `completed_rung_*`), which the FAIL attempt keeps too:
    seen together, one configuration would be two competitors at every rung it had passed."""

    def __init__(self, pruner):
        self.pruner = pruner

    def prune(self, study, trial):
        return self.pruner.prune(WithoutFailedTrials(study), trial)


class WithoutFailedTrials:
    """A study, but for its FAIL trials."""

    def __init__(self, study):
        self.study = study

    def __getattr__(self, name):
        return getattr(self.study, name)

    def get_trials(self, deepcopy=True, states=None):
        return [t for t in self.study.get_trials(deepcopy=deepcopy, states=states) if t.state != TrialState.FAIL]


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


# ------------------------------------------------------------------ the budget: --n-trials in all
class PastBudget(Exception):
    """Another worker took the study's last trial a moment before this one: it is not trained."""


def claim(trial, n_trials):
    """Mark the trial with this process's name, or raise PastBudget (the trial then FAILs, untrained,
    with the reason) when the trials before it already fill the budget. Trial numbers are handed out
    atomically by the storage, so the answer is the same on every worker: the budget is exact. Below
    number n_trials a trial cannot be past it, and the storage is not asked (a read per trial)."""
    trials = trial.study.get_trials(deepcopy=False) if trial.number >= n_trials else []
    if sum(t.number < trial.number and t.state != TrialState.FAIL for t in trials) >= n_trials:
        trial.set_user_attr("fail_reason", "not trained: another worker took the last trial of the budget")
        raise PastBudget()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")


class Budget:
    """The study's total trials, across runs, workers and machines (Optuna's own n_trials means "this
    many more"). `trials_left(study)`: whether this process has trials to run, having waited for
    those running elsewhere; as a study.optimize callback, it stops the study when none are left.

    Optuna's MaxTrialsCallback stops at a count, at once. This one also waits while other
    processes' trials run: should one's process die, its heartbeat stops, its trial is failed and
    queued again, and this process runs the retry, so a study ends whole."""

    def __init__(self, n_trials, stops):
        self.n_trials, self.stops, self.first = n_trials, stops, True

    def __call__(self, study, trial):
        if not self.trials_left(study):
            study.stop()

    def trials_left(self, study):
        said_waiting, first, self.first = False, self.first, False
        while not self.stops.requested:
            trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
            if len(trials) < self.n_trials or any(t.state == TrialState.WAITING for t in trials):
                return True
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if not running:
                if first:
                    print(f"study {study.study_name!r} already holds its {self.n_trials} trials: nothing to train "
                          "(raise --n-trials)")
                return False
            optuna.storages.fail_stale_trials(study)  # one silent too long (a dead process's): failed, queued again
            if not said_waiting:
                print(f"waiting for {running} running trial(s) of other workers; a dead worker's trial is "
                      f"failed and retried after {GRACE} missed heartbeats", flush=True)
                said_waiting = True
            time.sleep(1)
        return False


# ------------------------------------------------------------------ stops: Ctrl-C and SIGTERM
class Stopped(BaseException):
    """Leaves study.optimize once a stopped trial is queued again. Not an Exception: Optuna marks a
    trial FAIL when its objective raises an Exception or a KeyboardInterrupt, and lets anything else
    through with the trial as it is."""


class Stops:
    """Ctrl-C (SIGINT) and SIGTERM for this process, inside `with Stops() as stops:`.

    SIGTERM is how Slurm, Kubernetes, spot machines and `kill PID` ask a job to end, with SIGKILL
    some 30 s later. Inside `with stops.trials_running():` the first signal is a request
    (`stops.requested`): the running trial stops at its next validation, saves its place and is put
    back in the queue as it is (`raise stops.queue_again(trial)`); workers get SIGTERM too. Any other
    signal, and any at all outside that block, ends the process at once, its workers with it. The
    exit code is 128 + the signal (130 for Ctrl-C, 143 for SIGTERM). A handler that raised (Python's
    KeyboardInterrupt) could land inside a database write and leave a trial half-told; this one only
    sets `signal`, read at each validation. It writes with os.write: print() here could re-enter
    a print() it interrupted."""

    def __init__(self):
        self.signal, self.running, self.previous = None, False, {}

    def __enter__(self):
        # SIGINT too, unless it is ignored (nohup, a background job, a worker process)
        signals = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
        self.previous = {signum: signal.signal(signum, self.on_signal) for signum in signals}
        return self

    def __exit__(self, *error):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self):
        return self.signal is not None

    @contextlib.contextmanager
    def trials_running(self):
        self.running = True
        try:
            yield
        finally:
            self.running = False

    def on_signal(self, signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.running and self.signal is None:
            self.signal = signum
            os.write(2, f"\n{name}: the running trial stops at its next validation and is queued again "
                        f"({name} again to stop at once)\n".encode())
            signal_workers(signal.SIGTERM)
            return
        os.write(2, b"\nstopped at once: a trial left running is retried once its heartbeat is stale\n"
                 if self.signal else f"\n{name}: stopped\n".encode())
        signal_workers(signal.SIGKILL)
        os._exit(128 + signum)

    def queue_again(self, trial):
        """Put a running trial back in the queue as it is (WAITING): number, parameters, reports, the
        pruner's bookkeeping and its checkpoint. The next run, or another worker, picks it up at once
        and goes on where it stopped: a stop is not a crash, and uses none of the trial's MAX_RETRY.
        Returns the Stopped to raise."""
        storage = trial.storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(trial.study.study_name), trial.number)
        storage.set_trial_system_attr(trial_id, "fixed_params", trial.params)  # what a dashboard shows as it waits
        storage.set_trial_state_values(trial_id, state=TrialState.WAITING)
        return Stopped(f"trial {trial.number} queued again")


def signal_workers(signum):
    for worker in multiprocessing.active_children():  # this process's workers that are still running
        with contextlib.suppress(ProcessLookupError):  # it ended a moment ago
            os.kill(worker.pid, signum)


# ------------------------------------------------------------------ worker processes
class Workers:
    """`count` worker processes, started now (spawned: no CUDA or lock state copied) so that they
    import torch while this process loads the data and opens the study; each waits for `start`."""

    def __init__(self, count):
        spawn = multiprocessing.get_context("spawn")
        self.processes, self.pipes = [], []
        # The terminal sends Ctrl-C to every process of the job. Workers inherit an ignored SIGINT from
        # these lines, so none dies mid-start-up, and stop when this process tells them (SIGTERM).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for worker in range(1, count + 1):
                pipe, worker_end = spawn.Pipe()
                # daemon: should this process end before `start` (a bad flag), its workers end too
                process = spawn.Process(target=worker_main, args=(worker, worker_end), daemon=True)
                process.start()
                worker_end.close()
                self.processes.append(process)
                self.pipes.append(pipe)
        finally:
            signal.signal(signal.SIGINT, previous)

    def start(self, target, *args):
        """Each worker i calls target(*args, worker=i, stops=its own Stops) with its own connections and
        data: what goes through the pipe is plain values, nothing shared that a death could break."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # it died already: join() tells
                pipe.send((target, args))

    def join(self):
        """Wait for every worker to end; tell on stderr the exit codes of those that failed."""
        for process in self.processes:
            process.join()
        crashed = [process.exitcode for process in self.processes if process.exitcode]
        if crashed:  # a dead worker's trial is retried by another process (heartbeats), or by the next run
            print(f"warning: workers exited with {crashed}: see the errors above", file=sys.stderr)


def worker_main(worker, pipe):
    parent = os.getppid()
    try:
        target, args = pipe.recv()
    except (EOFError, OSError):  # the parent ended (a bad flag, a signal, kill -9) before giving orders
        return
    threading.Thread(target=stop_when_orphaned, args=(parent,), daemon=True).start()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with exit_at_once(), Stops() as stops, stops.trials_running():  # SIGTERM only: Ctrl-C comes via the parent
        target(*args, worker=worker, stops=stops)


def stop_when_orphaned(parent):
    """A worker whose parent is gone, even by kill -9 (which no handler sees), stops as on SIGTERM:
    its trial at its next validation, queued again. Checked every second (os.getppid() changes at once)."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def exit_at_once():
    """Around a process's main work: when it ends (or calls sys.exit), flush what was printed, close the
    databases (SQLite then folds its log back into the database file) and end the process there,
    without the interpreter's teardown, which frees torch's thousands of objects one by one: a second
    or more after the last line. An error other than SystemExit goes on as usual, with its traceback."""
    try:
        yield
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits with 1
        print(code, file=sys.stderr)
        code = 1
    for engine in list(ENGINES):
        engine.dispose()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
