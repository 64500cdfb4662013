"""Checkpoints as Optuna artifacts (a killed trial's retry goes on exactly), a flat artifact folder,
and TensorBoard curves read back."""
import io
import os
import signal

import optuna
import pytest
import torch
from optuna.trial import TrialState

import checkpoints
import tune
from train_loop import DEFAULT_HPARAMS, VALIDATIONS_PER_EPOCH, load_mnist, seeded_model, train
from conftest import run_script, write_mnist
from processes import (SIX_EPOCHS, hparams_session, SLOW_TRIAL, assert_no_artifact_record_points_at_a_missing_file, curves, finish,
                       saved_epochs, start_tune, study_with, wait_for_checkpoint)


@pytest.fixture(scope="module")
def bigger_mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("bigger"), n_train=6000)


def test_kill_9_in_epoch_3_then_the_same_command_resumes_at_epoch_3_exactly_as_the_uninterrupted_run(
        bigger_mnist, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    flags = [*SIX_EPOCHS, "--tensorboard"]
    study_with(str(killed), SLOW_TRIAL)
    process = start_tune(bigger_mnist, str(killed), *flags, killed / "tb")
    wait_for_checkpoint(process, str(killed), epochs_done=2)
    os.killpg(process.pid, signal.SIGKILL)  # no goodbye: the trial stays RUNNING until its heartbeat is stale
    process.wait()
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{killed}/study.db")
    assert study.trials[0].state == TrialState.RUNNING and saved_epochs(str(killed), study.trials[0]) == 2
    dead_checkpoint = study.trials[0].user_attrs["checkpoint"]

    code, stdout, stderr = finish(start_tune(bigger_mnist, str(killed), *flags, killed / "tb"))  # the same command
    assert code == 0, stderr
    assert "resumed from trial 0 after epoch 2" in stdout
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{killed}/study.db")
    failed, retry = study.trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from"] == "trial 0 after epoch 2" and retry.user_attrs["retry_of"] == 0
    assert sorted(retry.intermediate_values) == list(range(6 * VALIDATIONS_PER_EPOCH))  # its curve, from step 0

    study_with(str(whole), SLOW_TRIAL)
    code, _, stderr = finish(start_tune(bigger_mnist, str(whole), *flags, whole / "tb"))
    assert code == 0, stderr
    [uninterrupted] = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{whole}/study.db").trials
    assert retry.value == uninterrupted.value
    # Every step's training loss (the mean of a quarter epoch's losses: any change in any weight shows
    # there) and validation accuracy, to the last bit, in the retry's run (named by the trial it retries).
    resumed, straight = curves(killed / "tb"), curves(whole / "tb")
    assert os.listdir(killed / "tb") == ["trial-0000"]  # one run: the trial and its retry
    assert hparams_session(killed / "tb" / "trial-0000")[0]["state"].string_value == "COMPLETE"
    assert sorted(resumed["train_loss"]) == list(range(6 * VALIDATIONS_PER_EPOCH))
    assert resumed["train_loss"] == straight["train_loss"] and resumed["val_accuracy"] == straight["val_accuracy"]
    # No checkpoint is left but the killed attempt's: its FAIL trial names it and can no longer be changed.
    assert checkpoint_files(killed / "artifacts") == [dead_checkpoint] and retry.user_attrs["checkpoint"] is None


def test_after_a_30_trial_study_no_checkpoint_is_left_and_none_is_named(mnist_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "30", "--epochs", "2",
                        "--device", "cpu", "--no-final", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    storage = optuna.storages.RDBStorage(f"sqlite:///{out}/study.db")
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert len(study.get_trials(states=[TrialState.COMPLETE, TrialState.PRUNED])) == 30
    assert all(t.user_attrs.get("checkpoint") is None for t in study.trials)
    assert all("checkpoint" in t.user_attrs for t in study.get_trials(states=[TrialState.COMPLETE]))  # saved, removed
    assert_no_artifact_record_points_at_a_missing_file(study, storage, out / "artifacts")
    assert checkpoint_files(out / "artifacts") == []
    recorded = {meta.artifact_id for meta in optuna.artifacts.get_all_artifact_meta(study)}
    assert set(os.listdir(out / "artifacts")) == recorded  # the rest: the study's files, for the dashboard


def checkpoint_files(folder):
    """Checkpoints are named trial-N-...; the study's recorded artifacts have Optuna's own ids."""
    return sorted(name for name in os.listdir(folder) if name.startswith("trial-"))


def test_tensorboard_writes_one_run_per_trial_with_its_curves_and_hyperparameters(mnist_dir, tmp_path):
    from tensorboard.plugins.hparams import api_pb2
    out, logs = tmp_path / "run", tmp_path / "tb"
    tune.main(["--data-dir", mnist_dir, "--out", str(out), "--n-trials", "6", "--epochs", "2", "--device", "cpu",
               "--no-final", "--tensorboard", str(logs)])
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    assert sorted(os.listdir(logs)) == [f"trial-{t.number:04d}" for t in study.trials]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}  # both kinds are told apart
    for trial in study.trials:
        run = curves(logs, trial.number)
        assert run.get("val_accuracy", {}) == pytest.approx(trial.intermediate_values, abs=1e-6)
        assert sorted(run.get("train_loss", {})) == sorted(run.get("learning_rate", {})) == sorted(trial.intermediate_values)
        assert run["hparam/val_accuracy"] == {trial.last_step: pytest.approx(
            trial.value if trial.value is not None else trial.intermediate_values[trial.last_step])}
        hparams, status = hparams_session(logs / f"trial-{trial.number:04d}")
        assert hparams["state"].string_value == trial.state.name  # pruned trials told apart
        assert status == (api_pb2.STATUS_SUCCESS if trial.state == TrialState.COMPLETE else api_pb2.STATUS_FAILURE)
        assert hparams["hidden_size"].number_value == trial.params["hidden_size"]
        assert hparams["learning_rate"].number_value == pytest.approx(trial.params["learning_rate"])
        if "nesterov" in trial.params:  # a boolean stays one, not 1.0
            assert hparams["nesterov"].WhichOneof("kind") == "bool_value"
            assert hparams["nesterov"].bool_value == trial.params["nesterov"]


def test_checkpoints_py_lists_each_checkpoint_and_where_it_goes_on(mnist_dir, tmp_path):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    hparams = dict(DEFAULT_HPARAMS, hidden_size=32, epochs=2)
    validations = list(train(seeded_model(hparams, 0), load_mnist(mnist_dir, "cpu"), hparams))
    for name, val in (("trial-3-a.pt", validations[3]), ("trial-4-b.pt", validations[5])):  # an epoch's end, mid-epoch
        buffer = io.BytesIO()
        torch.save({**val.checkpoint(), "trial": int(name.split("-")[1])}, buffer)
        buffer.seek(0)
        store.write(name, buffer)
    store.write("notes.txt", io.BytesIO(b"not a checkpoint"))
    result = run_script("checkpoints.py", tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["notes.txt: not a checkpoint",
                                          "trial-3-a.pt: trial 3, goes on after epoch 1",
                                          f"trial-4-b.pt: trial 4, goes on after step 5 (epoch 2, batch "
                                          f"{validations[5].batch})"]
    assert checkpoints.where(torch.load(tmp_path / "trial-3-a.pt", weights_only=True)) == "epoch 1"
    missing = run_script("checkpoints.py", tmp_path / "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "not a folder" in missing.stderr and "Traceback" not in missing.stderr
