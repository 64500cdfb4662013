"""Helpers for the tests that run tune.py as real processes: start it, signal it, wait for what it
writes, and read the study and files it leaves."""
import os
import signal
import subprocess
import sys
import time

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState

from conftest import ROOT

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Slow enough (about a second an epoch on 2 cores) that a kill lands inside the epoch it aims at.
SLOW_TRIAL = {"momentum": 0.9, "nesterov": True, "hidden_size": 256, "layer_size": 3, "dropout": 0.2,
              "batch_size": 32, "learning_rate": 0.01, "weight_decay": 1e-5}
SIX_EPOCHS = ["--n-trials", "1", "--epochs", "6", "--pruner", "none", "--heartbeat", "1"]


def start_tune(mnist_dir, out, *flags, final=False):
    """tune.py as a real child process, in its own process group (so a signal reaches only it), with
    Ctrl-C's default meaning even when pytest itself runs with SIGINT ignored (a background job)."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", mnist_dir, "--out", out,
                             "--device", "cpu", *([] if final else ["--no-final"]), *flags], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(process, timeout=240):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # timed out: leave no process behind to slow the next tests
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, stdout, stderr


def load(storage, name="mnist-mlp"):
    """The study, read through connections closed after each query: tests poll a study hundreds of
    times, and each open connection would hold a SQLite file handle until the process ends."""
    if storage.startswith("sqlite"):
        storage = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    return optuna.load_study(study_name=name, storage=storage)


def wait_for_a_trial_mid_training(process, storage, timeout=60):
    """Poll the storage until some trial is RUNNING and has reported at least once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            running = load(storage).get_trials(states=[TrialState.RUNNING])
            if any(trial.intermediate_values for trial in running):
                return
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # no database, no tables or no study yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started training in time")


def assert_exact_budget(study, n_trials):
    states = [trial.state for trial in study.trials]
    assert sum(state in FINISHED for state in states) == n_trials
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


def assert_stopped_cleanly(code, stdout, stderr, exit_code=130):
    assert code == exit_code, stderr
    assert "Traceback" not in stdout + stderr and "Error" not in stderr, stderr


def study_with(out, params, copies=1):
    """A study that holds `copies` queued trials with these parameters: tune.py trains them first."""
    os.makedirs(out, exist_ok=True)
    study = optuna.create_study(storage=storage_of(out), study_name="mnist-mlp", direction="maximize")
    for _ in range(copies):
        study.enqueue_trial(params)
    return study


def checkpoint_file(out, trial):
    return os.path.join(out, "artifacts", trial.user_attrs["checkpoint"])


def saved_epochs(out, trial):
    """Whole epochs a trial's checkpoint holds (a retry of a killed trial goes on after them)."""
    saved = torch.load(checkpoint_file(out, trial), weights_only=True)
    return saved["epoch"] if saved["batch"] == 0 else None


def wait_for_checkpoint(process, out, epochs_done, timeout=120):
    """Poll until trial 0 points at its checkpoint after `epochs_done` epochs (what a retry would take)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            trial = load_or_none(out)[0]
            if trial.user_attrs.get("checkpoint") and saved_epochs(out, trial) == epochs_done:
                return
        except (IndexError, FileNotFoundError):  # no trial yet, or its checkpoint replaced by the next epoch's
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint after epoch {epochs_done} in time")


def assert_no_artifact_record_points_at_a_missing_file(study, storage, folder):
    """What optuna-dashboard --artifact-dir lists (Optuna's artifact records) must exist, and so must
    the checkpoint every unfinished trial will resume from."""
    for trial in study.trials:
        for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=storage):
            assert os.path.exists(os.path.join(folder, meta.artifact_id)), (trial.number, meta)
        if trial.user_attrs.get("checkpoint"):  # what a retry or a resume would read
            assert os.path.exists(os.path.join(folder, trial.user_attrs["checkpoint"])), trial.number


def curves(logs, number=0):
    """A TensorBoard run's scalars, step -> value, as TensorBoard shows them (a resumed run's steps once)."""
    from tensorboard.backend.event_processing import event_accumulator  # requirements.txt has it
    events = event_accumulator.EventAccumulator(str(logs / f"trial-{number:04d}"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def storage_of(out):
    return f"sqlite:///{out}/study.db"


def wait_for_reports(process, out, at_least, timeout=120, number=0):
    """Poll until trial `number` runs and has reported at least `at_least` times; return how many it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        trials = load_or_none(out)
        if len(trials) > number and trials[number].state == TrialState.RUNNING and \
                len(trials[number].intermediate_values) >= at_least:
            return len(trials[number].intermediate_values)
        time.sleep(0.02)
    raise AssertionError(f"trial {number} did not report {at_least} times in time")


def processes_in_group(pgid):
    """Pids whose process group is `pgid` (tune.py and its workers run in a group of their own)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(pid))
    return pids


def load_or_none(out):
    try:
        return load(storage_of(out)).trials if os.path.exists(f"{out}/study.db") else []
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # no study yet, or tune.py is making its tables
        return []


def hparams_session(run):
    """What TensorBoard's HParams tab reads of a run: (its hyperparameters and state, its end status)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    events = event_accumulator.EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    return start.hparams, end.status
