import io
import os
import shutil
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch

import train_loop
from conftest import N_TEST, N_TRAIN, ROOT, assert_usage_error, run_script, write_mnist
from mlp import MLP
from train_loop import DEFAULT_HPARAMS, SetupError, evaluate, load_mnist, seeded_model, train

GOOD = dict(DEFAULT_HPARAMS, hidden_size=64, epochs=1)


@pytest.fixture(scope="module")
def data(mnist_dir):
    return load_mnist(mnist_dir, torch.device("cpu"))


def last(validations):
    """Train to the end; the last Validation."""
    *_, final = validations
    return final


def test_load_mnist_splits_train_into_fixed_train_and_validation_normalised_as_mnist(data, mnist_dir):
    n_val = round(N_TRAIN / 6)
    assert len(data["val_x"]) == n_val and len(data["train_x"]) == N_TRAIN - n_val and len(data["test_x"]) == N_TEST
    assert data["train_x"].shape[1] == 784 and data["train_x"].dtype == torch.float32
    # Each test image is its file's bytes, scaled to 0-1 and normalised with MNIST's mean and std.
    raw = train_loop.read_idx(os.path.join(mnist_dir, "MNIST", "raw"), "t10k-images-idx3-ubyte")
    expected = (raw.float().flatten(1) / 255 - 0.1307) / 0.3081
    assert torch.allclose(data["test_x"], expected)
    # No validation image is also a training image, and the split is the same every time.
    train_rows = {tuple(row.tolist()) for row in data["train_x"]}
    assert not any(tuple(row.tolist()) in train_rows for row in data["val_x"])
    again = load_mnist(mnist_dir, torch.device("cpu"))
    assert torch.equal(again["val_x"], data["val_x"]) and torch.equal(again["val_y"], data["val_y"])


def test_train_yields_each_validation_and_learns_far_above_chance(data):
    model = seeded_model(GOOD, 0)
    validations = list(train(model, data, GOOD))
    per_epoch = train_loop.VALIDATIONS_PER_EPOCH
    assert [val.step for val in validations] == list(range(per_epoch))
    assert [val.epoch_end for val in validations] == [False] * (per_epoch - 1) + [True]
    assert validations[-1].accuracy == evaluate(model, data["val_x"], data["val_y"]) > 0.9  # chance is 0.1
    assert validations[-1].train_loss < validations[0].train_loss
    assert validations[-1].learning_rate == 0  # decayed linearly to zero at the end of the run


def test_same_seed_gives_bit_identical_weights_on_cpu(data):
    models, accuracies = [], []
    for _ in range(2):  # as tune.py does it: seed, build, train straight away
        models.append(seeded_model(GOOD, 7))
        accuracies.append(last(train(models[-1], data, GOOD)).accuracy)
    assert accuracies[0] == accuracies[1]
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    other = seeded_model(GOOD, 8)
    last(train(other, data, GOOD))
    assert not torch.equal(other.state_dict()["layers.0.weight"], models[0].state_dict()["layers.0.weight"])


def test_a_run_resumed_from_any_validations_checkpoint_ends_with_the_same_steps_and_weights(data):
    hparams = dict(GOOD, epochs=3, dropout=0.3)  # dropout and shuffles draw random numbers every step
    whole, saved, steps = seeded_model(hparams, 0), [], []
    for val in train(whole, data, hparams):
        buffer = io.BytesIO()  # as checkpoints.py does: serialised at once, loaded later with weights_only
        torch.save(val.checkpoint(), buffer)
        saved.append(buffer.getvalue())
        steps.append((val.step, val.accuracy, val.train_loss))
    for at in (1, 3, 6):  # mid-epoch, an epoch's end, mid-epoch again
        resumed = seeded_model(hparams, 0)  # a fresh process would build it the same way
        again = [(val.step, val.accuracy, val.train_loss) for val in train(
            resumed, data, hparams, resume=torch.load(io.BytesIO(saved[at]), weights_only=True))]
        assert again == steps[at + 1:]
        for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
            assert torch.equal(a, b)


def test_a_loss_that_turns_nan_raises_floating_point_error(data):
    with pytest.raises(FloatingPointError, match="nan/inf"):
        last(train(seeded_model(GOOD, 0), data, dict(GOOD, learning_rate=1e4)))


def test_running_out_of_memory_is_the_plain_error(data):
    class RunsOutAtStep3(MLP):  # as a GPU would answer a too-big batch (tests/test_gpu.py does it for real)
        calls = 0

        def forward(self, x):
            RunsOutAtStep3.calls += 1
            if RunsOutAtStep3.calls == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().forward(x)

    with pytest.raises(torch.OutOfMemoryError):
        last(train(RunsOutAtStep3(784, 64, 10, 2, 0.0), data, GOOD))


def test_the_three_pruning_lines_stop_a_bad_trial_in_a_real_study(data):
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    study.enqueue_trial({"learning_rate": 0.05})   # learns
    study.enqueue_trial({"learning_rate": 1e-6})   # barely moves: below the median at its first report
    hparams = dict(GOOD, epochs=2)

    def objective(trial):  # the README's loop of your own
        model = seeded_model(hparams, 0)
        for val in train(model, data, dict(hparams, learning_rate=trial.suggest_float("learning_rate", 1e-6, 1, log=True))):
            trial.report(val.accuracy, val.step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return val.accuracy

    study.optimize(objective, n_trials=2)
    good, bad = study.trials
    assert good.state == optuna.trial.TrialState.COMPLETE and len(good.intermediate_values) == 8
    assert good.value == good.intermediate_values[7]
    assert bad.state == optuna.trial.TrialState.PRUNED and sorted(bad.intermediate_values) == [0]


def test_evaluate_is_accuracy(data):
    model = seeded_model(GOOD, 0)  # untrained: an accuracy near chance, not a trivial 1.0
    accuracy = evaluate(model, data["val_x"], data["val_y"])
    assert model.training  # evaluate() puts the model back into training mode
    with torch.no_grad():
        model.eval()
        by_hand = (model(data["val_x"]).argmax(1) == data["val_y"]).sum().item() / len(data["val_y"])
    assert accuracy == pytest.approx(by_hand) and accuracy < 0.5


def test_train_loop_script_with_its_defaults_learns_then_scores_the_test_set_once(mnist_dir, tmp_path):
    result = run_script("train_loop.py", "--data-dir", mnist_dir, "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("step ") for line in lines) == 2 * train_loop.VALIDATIONS_PER_EPOCH
    assert lines[-1].startswith("final model: val_accuracy") and result.stdout.count("test_accuracy") == 1
    assert float(lines[-1].split("val_accuracy ")[1].split(",")[0]) > 0.9


def test_train_loop_and_mlp_copied_alone_run_and_import(mnist_dir, tmp_path):
    for name in ("train_loop.py", "mlp.py", "garden.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    env = dict(os.environ, PYTHONPATH="")  # only what was copied

    def run(*argv):
        return subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    result = run("train_loop.py", "--data-dir", mnist_dir, "--epochs", "1")
    assert result.returncode == 0 and "test_accuracy" in result.stdout, result.stderr
    code = ("import sys, torch; from train_loop import load_mnist, seeded_model, train; "
            f"data = load_mnist({mnist_dir!r}, torch.device('cpu')); import train_loop; "
            "*_, val = train(seeded_model(train_loop.DEFAULT_HPARAMS, 0), data, dict(train_loop.DEFAULT_HPARAMS, epochs=1)); "
            "print(val.accuracy, sorted(m for m in ('checkpoints', 'cuda_graph', 'optuna') if m in sys.modules))")
    result = run("-c", code)
    assert result.returncode == 0 and result.stdout.strip().endswith("[]"), result.stderr  # nothing optional loaded
    assert run("mlp.py").returncode == 0 and "parameters" in run("mlp.py").stdout
    assert "gap:" in run("garden.py", "--n-trials", "5").stdout


def test_missing_files_offline_name_the_folder_and_the_four_files(tmp_path):
    result = run_script("train_loop.py", "--data-dir", tmp_path / "empty", cwd=tmp_path)
    assert_usage_error(result, "MNIST/raw", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_files_are_refused_with_advice(tmp_path, damage):
    root = write_mnist(tmp_path / "broken")
    path = os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte")
    content = open(path, "rb").read()
    open(path, "wb").write(content[:len(content) // 2] if damage == "truncate" else os.urandom(len(content)))
    with pytest.raises(SetupError, match="cannot load MNIST"):
        load_mnist(root, torch.device("cpu"), download=False)
    assert_usage_error(run_script("train_loop.py", "--data-dir", root, cwd=tmp_path), "cannot load MNIST")
    assert open(path, "rb").read() != content  # we refused; we did not "repair" the user's file either


def test_gzipped_files_load_as_the_plain_ones(mnist_dir, tmp_path):
    import gzip
    raw = tmp_path / "MNIST" / "raw"
    os.makedirs(raw)
    for name in train_loop.MNIST_FILES:
        with open(os.path.join(mnist_dir, "MNIST", "raw", name), "rb") as plain, gzip.open(raw / f"{name}.gz", "wb") as packed:
            packed.write(plain.read())
    zipped, plain = load_mnist(str(tmp_path), torch.device("cpu")), load_mnist(mnist_dir, torch.device("cpu"))
    assert all(torch.equal(zipped[key], plain[key]) for key in plain)
    assert np.isclose(plain["train_x"].mean().item(), zipped["train_x"].mean().item())


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--dropout", "1.5"], ["--momentum", "0"],
                                   ["--batch-size", "x"], ["--device", "cuda:7"]])
def test_bad_flags_exit_2_with_one_line(flags, mnist_dir, capsys):
    if flags[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit) as exit_:
        train_loop.main(["--data-dir", mnist_dir, *flags])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1, stderr
