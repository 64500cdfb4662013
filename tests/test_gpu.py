"""On a CUDA GPU: captured steps give eager's results, resume exactly, free their memory, and an
out-of-memory trial is pruned. Skipped without CUDA (benchmarks/gpu_check.sh runs them on a GPU)."""
import functools
import io
import os
import signal

import optuna
import pytest
import torch
from optuna.trial import TrialState

import tune
from conftest import write_mnist
from processes import SIX_EPOCHS, SLOW_TRIAL, finish, start_tune, study_with, wait_for_checkpoint
from train_loop import DEFAULT_HPARAMS, load_mnist, seeded_model, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# Dropout on, and 4,999 training images: every epoch ends with a smaller, eager batch.
HPARAMS = dict(DEFAULT_HPARAMS, learning_rate=0.05, dropout=0.3, epochs=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_mnist(write_mnist(tmp_path_factory.mktemp("gpu"), n_train=5999), CUDA)


def trained(data, cuda_graph, **changes):
    model = seeded_model(dict(HPARAMS, **changes), 0)
    value = train(model, data, dict(HPARAMS, **changes), cuda_graph=cuda_graph)
    return value, model.state_dict()


@pytest.mark.parametrize("batch_size", [32, 256])
def test_captured_steps_end_with_the_weights_of_eager_steps(data, batch_size):
    eager_value, eager_weights = trained(data, cuda_graph=False, batch_size=batch_size)
    value, weights = trained(data, cuda_graph=True, batch_size=batch_size)
    assert value == eager_value
    for name, tensor in eager_weights.items():
        assert torch.equal(tensor, weights[name]), f"{name}: max difference {(tensor - weights[name]).abs().max()}"


def test_a_rerun_on_the_same_gpu_gives_the_same_value_and_weights(data):
    (value, weights), (again, weights_again) = trained(data, True), trained(data, True)
    assert value == again and all(torch.equal(weights[name], weights_again[name]) for name in weights)


def test_a_captured_run_resumed_from_its_epoch_1_checkpoint_ends_as_the_whole_run(data):
    saved = []
    model = seeded_model(HPARAMS, 0)
    value = train(model, data, HPARAMS, save=lambda state: saved.append(to_bytes(state)), cuda_graph=True)
    resumed = seeded_model(HPARAMS, 0)
    saved_after_epoch_1 = torch.load(io.BytesIO(saved[0]), weights_only=True)
    assert train(resumed, data, HPARAMS, resume=saved_after_epoch_1, cuda_graph=True) == value
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def to_bytes(checkpoint):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def test_kill_9_of_tune_py_on_the_gpu_then_the_same_command_ends_with_the_uninterrupted_value(tmp_path):
    digits = write_mnist(tmp_path / "digits", n_train=60000)  # epochs long enough to kill inside one
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    flags = [*SIX_EPOCHS, "--device", "cuda", "--cuda-graph"]
    study_with(killed, dict(SLOW_TRIAL, batch_size=16))
    process = start_tune(digits, killed, *flags)
    wait_for_checkpoint(process, killed, epochs_done=2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    code, stdout, stderr = finish(start_tune(digits, killed, *flags))
    assert code == 0 and "resumed from trial 0 after epoch" in stdout, stderr
    retry = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{killed}/study.db").trials[-1]
    study_with(whole, dict(SLOW_TRIAL, batch_size=16))
    code, _, stderr = finish(start_tune(digits, whole, *flags))
    assert code == 0, stderr
    [uninterrupted] = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{whole}/study.db").trials
    assert retry.state == TrialState.COMPLETE and retry.value == uninterrupted.value
    resumed_model = torch.load(checkpoint_file(killed, retry), weights_only=True)["state_dict"]
    for name, tensor in torch.load(checkpoint_file(whole, uninterrupted), weights_only=True)["state_dict"].items():
        assert torch.equal(tensor, resumed_model[name]), name


def test_gpu_memory_after_100_trials_is_no_higher_than_after_5(data, tmp_path):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study(direction="maximize")
    for _ in range(100):  # one configuration throughout, so that any growth is a leak
        study.enqueue_trial({"hidden_size": 256, "layer_size": 3, "dropout": 0.2, "batch_size": 32,
                             "learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5})
    objective = functools.partial(tune.objective, data=data, epochs=1, seed=0, store=store, cuda_graph=True)
    memory = {}
    for trials in (5, 100):
        study.optimize(objective, n_trials=trials - len(study.trials))
        torch.cuda.synchronize()
        memory[trials] = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    print(f"GPU memory (allocated, reserved bytes) after 5 trials {memory[5]}, after 100 {memory[100]}")
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert memory[100][0] <= memory[5][0] and memory[100][1] <= memory[5][1]


def test_a_trial_that_runs_out_of_gpu_memory_is_pruned_and_the_study_goes_on(data):
    def objective(trial):
        hparams = dict(HPARAMS, hidden_size=trial.suggest_categorical("hidden_size", [8192, 32]), epochs=1)
        return train(seeded_model(hparams, 0), data, hparams, trial, cuda_graph=True)

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"hidden_size": 8192})  # over 1 GB of weights: more than the cap below
    study.enqueue_trial({"hidden_size": 32})
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 256 * 2 ** 20) / total)
    try:
        study.optimize(objective, n_trials=2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    too_big, small = study.trials
    assert too_big.state == TrialState.PRUNED and "out of memory" in too_big.user_attrs["pruned_reason"]
    assert small.state == TrialState.COMPLETE and small.value > 0.5


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_checkpoint_saved_on_the_cpu_resumes_on_the_gpu(data, cuda_graph, capsys):
    cpu_data = {name: tensor.cpu() for name, tensor in data.items()}
    saved = []
    train(seeded_model(HPARAMS, 0), cpu_data, HPARAMS, save=lambda state: saved.append(to_bytes(state)))
    resume = torch.load(io.BytesIO(saved[0]), map_location=CUDA, weights_only=True)  # as checkpoints.Keeper loads it
    assert train(seeded_model(HPARAMS, 0), data, HPARAMS, resume=resume, cuda_graph=cuda_graph) > 0.9
    assert "saved on cpu, this run is on cuda" in capsys.readouterr().err
