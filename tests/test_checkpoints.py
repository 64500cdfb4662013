"""Checkpoints as Optuna artifacts (a killed trial's retry goes on exactly), a flat artifact folder,
and TensorBoard curves read back."""
import os
import signal
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

import tune
from conftest import run_script, write_mnist
from test_parallel import finish, start_tune

# Slow enough (about a second an epoch on 2 cores) that a kill lands inside the epoch it aims at.
SLOW_TRIAL = {"momentum": 0.9, "nesterov": True, "hidden_size": 256, "layer_size": 3, "dropout": 0.2,
              "batch_size": 32, "learning_rate": 0.01, "weight_decay": 1e-5}
SIX_EPOCHS = ["--n-trials", "1", "--epochs", "6", "--pruner", "none", "--heartbeat", "1"]


@pytest.fixture(scope="module")
def bigger_mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("bigger"), n_train=6000)


def study_with(out, params):
    """A study that holds one queued trial with these parameters: tune.py trains it first."""
    os.makedirs(out, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{out}/study.db", study_name="mnist-mlp", direction="maximize")
    study.enqueue_trial(params)
    return study


def checkpoint_file(out, trial):
    return os.path.join(out, "artifacts", trial.user_attrs["checkpoint"])


def saved_epochs(out, trial):
    return torch.load(checkpoint_file(out, trial), weights_only=True)["epochs_done"]


def wait_for_checkpoint(process, out, epochs_done, timeout=120):
    """Poll until trial 0 points at its checkpoint after `epochs_done` epochs (what a retry would take)."""
    storage = f"sqlite:///{out}/study.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            trial = optuna.load_study(study_name="mnist-mlp", storage=storage).trials[0]
            if "checkpoint" in trial.user_attrs and saved_epochs(out, trial) == epochs_done:
                return
        except (KeyError, IndexError, FileNotFoundError):  # no study yet, or replaced by the next epoch's
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint after epoch {epochs_done} in time")


def test_kill_9_in_epoch_3_then_the_same_command_resumes_at_epoch_3_with_the_same_value_and_weights(
        bigger_mnist, tmp_path):
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    study_with(killed, SLOW_TRIAL)
    process = start_tune(bigger_mnist, killed, *SIX_EPOCHS)
    wait_for_checkpoint(process, killed, epochs_done=2)
    os.killpg(process.pid, signal.SIGKILL)  # no goodbye: the trial stays RUNNING until its heartbeat is stale
    process.wait()
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{killed}/study.db")
    assert study.trials[0].state == TrialState.RUNNING and saved_epochs(killed, study.trials[0]) == 2

    code, stdout, stderr = finish(start_tune(bigger_mnist, killed, *SIX_EPOCHS))  # the same command
    assert code == 0, stderr
    assert "resumed from trial 0 after epoch 2" in stdout
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{killed}/study.db")
    failed, retry = study.trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from"] == "trial 0 after epoch 2"
    assert min(retry.intermediate_values) == 2 * tune.EVALS_PER_EPOCH  # it trained epochs 3 to 6 only

    study_with(whole, SLOW_TRIAL)
    code, _, stderr = finish(start_tune(bigger_mnist, whole, *SIX_EPOCHS))
    assert code == 0, stderr
    [uninterrupted] = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{whole}/study.db").trials
    assert retry.value == uninterrupted.value
    resumed_model = torch.load(checkpoint_file(killed, retry), weights_only=True)
    whole_model = torch.load(checkpoint_file(whole, uninterrupted), weights_only=True)
    assert resumed_model["epochs_done"] == whole_model["epochs_done"] == 6
    for name, tensor in whole_model["state_dict"].items():
        assert torch.equal(tensor, resumed_model["state_dict"][name]), name
    # The dead trial's checkpoint went once the retry had its own: only the final model is left.
    assert os.listdir(os.path.join(killed, "artifacts")) == [retry.user_attrs["checkpoint"]]


def test_after_a_30_trial_study_the_artifacts_hold_the_best_trials_model_only(mnist_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "30", "--epochs", "2",
                        "--device", "cpu", "--no-final", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    storage = optuna.storages.RDBStorage(f"sqlite:///{out}/study.db")
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert len(study.get_trials(states=[TrialState.COMPLETE, TrialState.PRUNED])) == 30
    assert all("checkpoint" in t.user_attrs for t in study.get_trials(states=[TrialState.COMPLETE]))
    assert_no_artifact_record_points_at_a_missing_file(study, storage, out / "artifacts")
    best = study.best_trial
    assert os.listdir(out / "artifacts") == [best.user_attrs["checkpoint"]]
    # It is the best trial's final model, and predict.py reads it as it reads best_model.pt.
    assert torch.load(out / "artifacts" / best.user_attrs["checkpoint"], weights_only=True)["epochs_done"] == 2
    result = run_script("predict.py", "--model", out / "artifacts" / best.user_attrs["checkpoint"],
                        "--test", "3", "--data-dir", mnist_dir, cwd=tmp_path)
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) >= 3, result.stderr


def assert_no_artifact_record_points_at_a_missing_file(study, storage, folder):
    """What optuna-dashboard --artifact-dir lists (Optuna's artifact records) must exist, and so must
    the checkpoint every unfinished trial will resume from."""
    for trial in study.trials:
        for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=storage):
            assert os.path.exists(os.path.join(folder, meta.artifact_id)), (trial.number, meta)
        if trial.state in (TrialState.RUNNING, TrialState.WAITING):
            assert os.path.exists(os.path.join(folder, trial.user_attrs["checkpoint"])), trial.number


def test_tensorboard_writes_one_run_per_trial_with_its_curves_and_hyperparameters(mnist_dir, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator  # requirements.txt has it
    from tensorboard.plugins.hparams import plugin_data_pb2
    out, logs = tmp_path / "run", tmp_path / "tb"
    tune.main(["--data-dir", mnist_dir, "--out", str(out), "--n-trials", "6", "--epochs", "2", "--device", "cpu",
               "--no-final", "--tensorboard", str(logs)])
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    assert sorted(os.listdir(logs)) == [f"trial-{t.number:04d}" for t in study.trials]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}  # both kinds are told apart
    for trial in study.trials:
        run = logs / f"trial-{trial.number:04d}"
        assert len([name for name in os.listdir(run) if "tfevents" in name]) == 1  # its own event file
        events = event_accumulator.EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        curve = {event.step: event.value for event in events.Scalars("val_accuracy")}
        assert curve == pytest.approx(trial.intermediate_values, abs=1e-6)
        assert len(events.Scalars("train_loss")) == len(events.Scalars("learning_rate")) == len(curve)
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["state"].string_value == trial.state.name  # pruned trials told apart
        assert start.hparams["hidden_size"].number_value == trial.params["hidden_size"]
        assert start.hparams["learning_rate"].number_value == pytest.approx(trial.params["learning_rate"])
