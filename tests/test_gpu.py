"""On a CUDA GPU: captured steps repeat themselves bit for bit, resume exactly, agree with eager
steps within float32 rounding, draw fresh dropout masks, free their memory, and an out-of-memory
error during a capture prunes the trial. Skipped without CUDA (benchmarks/gpu_check.sh runs them)."""
import functools
import io
import os
import signal

import optuna
import pytest
import torch
from optuna.trial import TrialState

import cuda_graph
import parallel
import report
import tune
from conftest import write_mnist
from processes import SIX_EPOCHS, SLOW_TRIAL, curves, finish, start_tune, study_with, wait_for_checkpoint
from train_loop import DEFAULT_HPARAMS, load_mnist, seeded_model, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# Dropout on, and 4,999 training images: every epoch ends with a smaller, eager batch.
HPARAMS = dict(DEFAULT_HPARAMS, dropout=0.3, epochs=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_mnist(write_mnist(tmp_path_factory.mktemp("gpu"), n_train=5999), CUDA)


def trained(data, cuda_graph, resume=None, **changes):
    hparams = dict(HPARAMS, **changes)
    model = seeded_model(hparams, 0)
    validations = list(train(model, data, hparams, resume=resume, cuda_graph=cuda_graph))
    return validations, model.state_dict()


def same_weights(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


def to_bytes(checkpoint):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("batch_size", [32, 256])
def test_a_captured_run_is_bit_identical_to_its_rerun_and_near_the_eager_run(data, batch_size):
    (captured, weights), (again, weights_again) = (trained(data, True, batch_size=batch_size) for _ in range(2))
    assert [v.accuracy for v in captured] == [v.accuracy for v in again] and same_weights(weights, weights_again)
    eager, eager_weights = trained(data, False, batch_size=batch_size)
    assert abs(captured[-1].accuracy - eager[-1].accuracy) <= 0.002  # 0.2 points
    for name, tensor in eager_weights.items():  # float32 against float64 rates: rounding, grown over a run
        assert torch.allclose(tensor, weights[name], rtol=1e-3, atol=1e-4), name


def test_the_generator_is_where_eager_steps_leave_it_and_each_replay_draws_new_masks(data):
    torch.cuda.manual_seed(0)
    trained(data, True, epochs=1)
    after_captured = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(0)
    trained(data, False, epochs=1)
    assert torch.equal(after_captured, torch.cuda.get_rng_state())
    # Two replays of one batch through a dropout layer give two masks.
    layer, outputs = torch.nn.Dropout(0.5).to(CUDA), []
    x, y = torch.ones(64, 64, device=CUDA, requires_grad=True), torch.zeros(1, device=CUDA)
    optimizer = torch.optim.SGD([x], lr=0.0, fused=True)

    def step(inputs, _):
        optimizer.zero_grad(set_to_none=True)
        out = layer(inputs)
        out.sum().backward()
        optimizer.step()
        outputs.append(out)

    captured = cuda_graph.CapturedStep(step, optimizer, CUDA)
    for _ in range(cuda_graph.WARMUP_STEPS + 2):
        captured(x.detach(), y)
    first = outputs[-1].clone()  # the graph's output tensor, written by the last replay
    captured(x.detach(), y)
    assert not torch.equal(first, outputs[-1])


def test_a_captured_run_resumed_from_any_epochs_checkpoint_ends_as_the_whole_run(data):
    hparams = dict(HPARAMS, epochs=3)
    model = seeded_model(hparams, 0)
    saved, steps = [], []
    for val in train(model, data, hparams, cuda_graph=True):
        if val.epoch_end:
            saved.append(to_bytes(val.checkpoint()))
        steps.append((val.step, val.accuracy, val.train_loss))
    for at, checkpoint in zip((4, 8), saved):  # after epoch 1 and 2: its warm-ups replace replays
        resumed = seeded_model(hparams, 0)
        again = [(v.step, v.accuracy, v.train_loss) for v in train(
            resumed, data, hparams, resume=torch.load(io.BytesIO(checkpoint), map_location=CUDA, weights_only=True),
            cuda_graph=True)]
        assert again == steps[at:] and same_weights(model.state_dict(), resumed.state_dict())


def test_grad_shows_the_latest_step_after_an_eager_last_batch(data):
    model = seeded_model(HPARAMS, 0)
    *_, val = train(model, data, dict(HPARAMS, epochs=1), cuda_graph=True)  # its last batch is eager
    grads = [param.grad.clone() for param in model.parameters()]
    assert all(grad.abs().sum() > 0 for grad in grads)


def test_kill_9_of_tune_py_on_the_gpu_then_the_same_command_ends_with_the_uninterrupted_curves(tmp_path):
    digits = write_mnist(tmp_path / "digits", n_train=60000)  # epochs long enough to kill inside one
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    flags = [*SIX_EPOCHS, "--device", "cuda", "--cuda-graph", "--tensorboard"]
    study_with(str(killed), dict(SLOW_TRIAL, batch_size=16))
    process = start_tune(digits, str(killed), *flags, killed / "tb")
    wait_for_checkpoint(process, str(killed), epochs_done=2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    code, stdout, stderr = finish(start_tune(digits, str(killed), *flags, killed / "tb"))
    assert code == 0 and "resumed from trial 0 after epoch" in stdout, stderr
    study_with(str(whole), dict(SLOW_TRIAL, batch_size=16))
    code, _, stderr = finish(start_tune(digits, str(whole), *flags, whole / "tb"))
    assert code == 0, stderr
    retry = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{killed}/study.db").trials[-1]
    [uninterrupted] = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{whole}/study.db").trials
    assert retry.state == TrialState.COMPLETE and retry.value == uninterrupted.value
    assert curves(killed / "tb")["train_loss"] == curves(whole / "tb")["train_loss"]


def test_gpu_memory_after_100_trials_is_no_higher_than_after_5(data, tmp_path):
    args = tune.parse_args(["--out", str(tmp_path / "run"), "--epochs", "1", "--cuda-graph", "--n-trials", "200"])
    store = optuna.artifacts.FileSystemArtifactStore(args.artifacts)
    study = optuna.create_study(direction="maximize")
    for _ in range(100):  # one configuration throughout, so that any growth is a leak
        study.enqueue_trial({"hidden_size": 256, "layer_size": 3, "dropout": 0.2, "batch_size": 32,
                             "learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5})
    objective = functools.partial(tune.objective, args=args, data=data, store=store, stops=parallel.Stops(),
                                  curves=report.TrialCurves(None))
    memory = {}
    for trials in (5, 100):
        study.optimize(objective, n_trials=trials - len(study.trials))
        torch.cuda.synchronize()
        memory[trials] = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    print(f"GPU memory (allocated, reserved bytes) after 5 trials {memory[5]}, after 100 {memory[100]}")
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert memory[100][0] <= memory[5][0] and memory[100][1] <= memory[5][1]


def test_running_out_of_memory_in_the_capture_is_the_plain_error_and_the_gpu_works_on(data):
    x = torch.ones(8, 8, device=CUDA, requires_grad=True)
    optimizer = torch.optim.SGD([x], lr=0.1, fused=True)
    free = torch.cuda.mem_get_info()[0]

    def step(inputs, _):
        optimizer.zero_grad(set_to_none=True)
        if captured.calls > cuda_graph.WARMUP_STEPS:  # the capture asks for more than the GPU has
            torch.empty(free * 2, dtype=torch.uint8, device=CUDA)
        (inputs * x).sum().backward()
        optimizer.step()

    captured = cuda_graph.CapturedStep(step, optimizer, CUDA)
    for _ in range(cuda_graph.WARMUP_STEPS):
        captured(torch.ones(8, 8, device=CUDA), torch.zeros(1, device=CUDA))
    with pytest.raises(torch.OutOfMemoryError):
        captured(torch.ones(8, 8, device=CUDA), torch.zeros(1, device=CUDA))
    assert (torch.ones(4, device=CUDA) * 2).sum().item() == 8  # the stream is not left capturing


def test_a_trial_that_runs_out_of_gpu_memory_is_pruned_and_the_study_goes_on(data, tmp_path):
    args = tune.parse_args(["--out", str(tmp_path / "run"), "--epochs", "1", "--cuda-graph", "--n-trials", "10"])
    objective = functools.partial(tune.objective, args=args, data=data, stops=parallel.Stops(),
                                  store=optuna.artifacts.FileSystemArtifactStore(args.artifacts),
                                  curves=report.TrialCurves(None))
    study = optuna.create_study(direction="maximize")
    base = {"layer_size": 1, "dropout": 0.1, "batch_size": 128, "learning_rate": 0.05, "momentum": 0.9,
            "nesterov": True, "weight_decay": 1e-5}
    study.enqueue_trial({**base, "hidden_size": 512})
    study.enqueue_trial({**base, "hidden_size": 32})
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2 * 2 ** 20) / total)
    try:
        study.optimize(objective, n_trials=2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    too_big, small = study.trials
    assert too_big.state == TrialState.PRUNED and "out of memory" in too_big.user_attrs["pruned_reason"]
    assert small.state == TrialState.COMPLETE


@pytest.mark.parametrize("cuda_graph_on", [False, True])
def test_a_checkpoint_saved_on_the_cpu_resumes_on_the_gpu(data, cuda_graph_on, capsys):
    cpu_data = {name: tensor.cpu() for name, tensor in data.items()}
    first_epoch_end = next(val for val in train(seeded_model(HPARAMS, 0), cpu_data, HPARAMS) if val.epoch_end)
    resume = torch.load(io.BytesIO(to_bytes({**first_epoch_end.checkpoint(), "trial": 0})), map_location=CUDA,
                        weights_only=True)
    *_, val = train(seeded_model(HPARAMS, 0), data, HPARAMS, resume=resume, cuda_graph=cuda_graph_on)
    assert val.accuracy > 0.9
    assert "saved on cpu, this run is on cuda" in capsys.readouterr().err
