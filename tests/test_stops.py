"""Stops and restarts as a cluster makes them, with real processes: SIGTERM, a killed parent, damaged
checkpoints, Ctrl-C after Ctrl-C, and a study whose artifact records still match the files."""
import io
import os
import signal
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

import checkpoints
from conftest import write_mnist
from processes import (SLOW_TRIAL, curves, hparams_session, assert_no_artifact_record_points_at_a_missing_file, assert_stopped_cleanly,
                       checkpoint_file, finish, load, load_or_none, processes_in_group, start_tune, storage_of,
                       study_with, wait_for_checkpoint, wait_for_reports)
from train_loop import DEFAULT_HPARAMS, VALIDATIONS_PER_EPOCH, load_mnist, seeded_model, train

EIGHT_EPOCHS = ["--n-trials", "1", "--epochs", "8", "--pruner", "none", "--heartbeat", "1"]


@pytest.fixture(scope="module")
def bigger_mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("bigger"), n_train=6000)


def uninterrupted_value(mnist_dir, out, *flags):
    study_with(out, SLOW_TRIAL)
    code, _, stderr = finish(start_tune(mnist_dir, out, *flags))
    assert code == 0, stderr
    return load(storage_of(out)).trials[0].value


def test_sigterm_mid_trial_exits_143_queues_it_and_the_same_command_goes_on_from_that_report(
        bigger_mnist, tmp_path):
    out = str(tmp_path / "stopped")
    study_with(out, SLOW_TRIAL)
    logs = tmp_path / "tb"
    process = start_tune(bigger_mnist, out, *EIGHT_EPOCHS, "--tensorboard", logs)
    wait_for_reports(process, out, at_least=9)  # inside epoch 3: the next validation is mid-epoch
    os.killpg(process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    code, stdout, stderr = finish(process)
    assert time.monotonic() - signalled < 30  # inside Slurm's and Kubernetes' default 30 s
    assert_stopped_cleanly(code, stdout, stderr, exit_code=143)
    assert "SIGTERM: the running trial stops at its next validation" in stderr and os.path.exists(f"{out}/trials.csv")
    [stopped] = load(storage_of(out)).trials
    assert stopped.state == TrialState.WAITING  # not RUNNING: nothing to wait for
    last_report = max(stopped.intermediate_values)

    code, stdout, stderr = finish(start_tune(bigger_mnist, out, *EIGHT_EPOCHS, "--tensorboard", logs))  # the same
    assert code == 0 and "waiting for" not in stdout, stderr
    [resumed] = load(storage_of(out)).trials
    assert resumed.state == TrialState.COMPLETE and sorted(resumed.intermediate_values) == list(range(32))
    # TensorBoard: one run, every step once, ending as the trial did (COMPLETE, not stopped).
    assert os.listdir(logs) == ["trial-0000"]
    assert curves(logs)["val_accuracy"] == pytest.approx(resumed.intermediate_values)
    assert hparams_session(logs / "trial-0000")[0]["state"].string_value == "COMPLETE"
    # It went on from the report it stopped at; a report inside an epoch, unless the stop came late.
    epoch, quarter = divmod(last_report + 1, VALIDATIONS_PER_EPOCH)
    assert resumed.user_attrs["resumed_from"].startswith(
        f"trial 0 after step {last_report} (epoch {epoch + 1}, batch" if quarter else f"trial 0 after epoch {epoch}")
    assert resumed.value == uninterrupted_value(bigger_mnist, str(tmp_path / "whole"), *EIGHT_EPOCHS)


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_when_the_parent_of_two_workers_ends_no_process_of_its_group_is_left(mnist_dir, tmp_path, how):
    out = str(tmp_path / "run")
    process = start_tune(mnist_dir, out, "--workers", "2", "--n-trials", "4", "--epochs", "200",
                         "--pruner", "none", "--heartbeat", "1")
    deadline = time.monotonic() + 120
    while sum(t.state == TrialState.RUNNING for t in load_or_none(out)) < 2:  # both are training
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, 0)  # the group exists
    if how == "SIGTERM":
        process.send_signal(signal.SIGTERM)  # to the parent alone, as `kill PID` does
        code, stdout, stderr = finish(process)
        assert_stopped_cleanly(code, stdout, stderr, exit_code=143)
        time.sleep(1)
        assert processes_in_group(process.pid) == []
        assert [t.state for t in load(storage_of(out)).trials] == [TrialState.WAITING] * 2
    else:
        process.kill()  # the parent only: no handler runs, the workers are not told
        process.wait()
        deadline = time.monotonic() + 30
        while processes_in_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_in_group(process.pid) == []  # the worker noticed and stopped on its own
        states = sorted(t.state.name for t in load(storage_of(out)).trials)
        assert states == ["RUNNING", "WAITING"]  # the parent's trial waits for its heartbeat; the worker's is queued


def test_a_checkpoint_cut_in_half_is_a_warning_and_a_fresh_start(bigger_mnist, tmp_path):
    out = str(tmp_path / "run")
    study_with(out, SLOW_TRIAL)
    flags = ["--n-trials", "1", "--epochs", "6", "--pruner", "none", "--heartbeat", "1"]
    process = start_tune(bigger_mnist, out, *flags)
    wait_for_checkpoint(process, out, epochs_done=2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    path = checkpoint_file(out, load(storage_of(out)).trials[0])
    with open(path, "r+b") as file:  # a full disk, a copy cut short
        file.truncate(os.path.getsize(path) // 2)
    code, stdout, stderr = finish(start_tune(bigger_mnist, out, *flags))
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "warning: trial 1: its checkpoint" in stderr and "cannot be used" in stderr and "starts afresh" in stderr
    failed, retry = load(storage_of(out)).trials
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"].startswith("started afresh:")
    assert sorted(retry.intermediate_values) == list(range(6 * VALIDATIONS_PER_EPOCH))  # every epoch, afresh
    assert os.path.exists(path) and failed.user_attrs["checkpoint"] == os.path.basename(path)  # the FAIL names it


def test_three_ctrl_cs_on_one_trial_then_kill_9_still_resume_it_to_the_uninterrupted_value(bigger_mnist, tmp_path):
    out = str(tmp_path / "run")
    study_with(out, SLOW_TRIAL)
    reports = 0
    for _ in range(3):  # each Ctrl-C queues the same trial again, using none of its crash retries
        process = start_tune(bigger_mnist, out, *EIGHT_EPOCHS)
        wait_for_reports(process, out, at_least=reports + 1)  # it is training again
        os.killpg(process.pid, signal.SIGINT)
        assert_stopped_cleanly(*finish(process))
        [queued] = load(storage_of(out)).trials
        assert queued.state == TrialState.WAITING and len(queued.intermediate_values) > reports
        reports = len(queued.intermediate_values)
    process = start_tune(bigger_mnist, out, *EIGHT_EPOCHS)
    wait_for_checkpoint(process, out, epochs_done=6)
    os.killpg(process.pid, signal.SIGKILL)  # a real crash now: retried from the last epoch's checkpoint
    process.wait()
    code, stdout, stderr = finish(start_tune(bigger_mnist, out, *EIGHT_EPOCHS))
    assert code == 0, stderr
    crashed, retry = load(storage_of(out)).trials
    assert crashed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == crashed.params and retry.user_attrs["resumed_from"].startswith("trial 0 after epoch")
    assert retry.value == uninterrupted_value(bigger_mnist, str(tmp_path / "whole"), *EIGHT_EPOCHS)


def test_after_pruned_stopped_and_resumed_trials_every_file_named_exists_and_every_file_is_named(bigger_mnist, tmp_path):
    out = str(tmp_path / "run")
    flags = ["--n-trials", "12", "--epochs", "3", "--heartbeat", "1"]
    process = start_tune(bigger_mnist, out, *flags, final=True)
    wait_for_reports(process, out, at_least=1)
    os.killpg(process.pid, signal.SIGTERM)
    assert_stopped_cleanly(*finish(process), exit_code=143)
    code, _, stderr = finish(start_tune(bigger_mnist, out, *flags, final=True))
    assert code == 0, stderr
    storage = optuna.storages.RDBStorage(storage_of(out))
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert {TrialState.COMPLETE, TrialState.PRUNED} <= {t.state for t in study.trials}
    assert any("resumed_from" in t.user_attrs for t in study.trials)
    assert_no_artifact_record_points_at_a_missing_file(study, storage, os.path.join(out, "artifacts"))
    for name in ("best_model.pt", "best.json", "trials.csv", "optimization_history.png"):  # what the user keeps
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    named = {t.user_attrs.get("checkpoint") for t in study.trials} | {
        meta.artifact_id for meta in optuna.artifacts.get_all_artifact_meta(study)}
    assert set(os.listdir(os.path.join(out, "artifacts"))) <= named  # nothing left behind that nothing names


# ------------------------------------------------------------------ checkpoints that cannot be used
GOOD = dict(DEFAULT_HPARAMS, hidden_size=64, epochs=2)


class FakeTrial:
    """What Keeper reads and writes of a trial, for the cases below that need no study."""

    def __init__(self, checkpoint):
        self.number, self.user_attrs = 3, {"checkpoint": checkpoint}

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def first_epochs_checkpoint(data):
    first_epoch_end = next(val for val in train(seeded_model(GOOD, 0), data, GOOD) if val.epoch_end)
    return {**first_epoch_end.checkpoint(), "trial": 3}


def write_checkpoint(store, name, checkpoint):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    store.write(name, buffer)


@pytest.fixture(scope="module")
def data(mnist_dir):
    return load_mnist(mnist_dir, torch.device("cpu"))


@pytest.mark.parametrize("damage", ["a missing key", "an older format", "not a torch file"])
def test_a_checkpoint_that_cannot_be_used_means_a_warning_and_a_fresh_start(data, tmp_path, capsys, damage):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    checkpoint = first_epochs_checkpoint(data)
    if damage == "a missing key":
        del checkpoint["schedule"]
    write_checkpoint(store, "saved.pt", {**checkpoint, "format": 1} if damage == "an older format" else checkpoint)
    if damage == "not a torch file":
        store.write("saved.pt", io.BytesIO(b"PK\x03\x04 not a checkpoint"))
    assert checkpoints.Keeper(FakeTrial("saved.pt"), store).resume() is None
    warning = capsys.readouterr().err
    assert warning.startswith("warning: trial 3: its checkpoint saved.pt cannot be used (") and "afresh" in warning


def test_a_checkpoint_from_another_kind_of_device_resumes_with_a_warning(data, tmp_path, capsys):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    checkpoint = first_epochs_checkpoint(data)
    # As if saved on a GPU: that device's random state beside the CPU's (its bytes mean nothing here).
    checkpoint["random_state"] = {**checkpoint["random_state"], "cuda": torch.zeros(16, dtype=torch.uint8)}
    write_checkpoint(store, "gpu.pt", checkpoint)
    resume = checkpoints.Keeper(FakeTrial("gpu.pt"), store).resume()
    *_, val = train(seeded_model(GOOD, 0), data, GOOD, resume=resume)
    assert val.accuracy > 0.9 and val.step == 2 * VALIDATIONS_PER_EPOCH - 1
    assert "saved on cuda, this run is on cpu" in capsys.readouterr().err
