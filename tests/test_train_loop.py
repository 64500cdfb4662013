import io
import os

import optuna
import pytest
import torch

import train_loop

from conftest import N_TEST, N_TRAIN, assert_usage_error, run_script, write_mnist
from mlp import MLP
from train_loop import DEFAULT_HPARAMS, SetupError, evaluate, load_mnist, seeded_model, train

GOOD = dict(DEFAULT_HPARAMS, learning_rate=0.05, hidden_size=64, layer_size=2, epochs=1)


@pytest.fixture(scope="module")
def data(mnist_dir):
    return load_mnist(mnist_dir, torch.device("cpu"))


def test_load_mnist_splits_train_into_fixed_train_and_validation(data, mnist_dir):
    n_val = round(N_TRAIN / 6)
    assert len(data["val_x"]) == n_val and len(data["train_x"]) == N_TRAIN - n_val and len(data["test_x"]) == N_TEST
    assert data["train_x"].shape[1] == 784 and data["train_x"].dtype == torch.float32
    assert abs(data["train_x"].mean().item()) < 3  # normalised, not raw 0..255 bytes
    # No validation image is also a training image, and the split is the same every time.
    train_rows = {tuple(row.tolist()) for row in data["train_x"]}
    assert not any(tuple(row.tolist()) in train_rows for row in data["val_x"])
    again = load_mnist(mnist_dir, torch.device("cpu"))
    assert torch.equal(again["val_x"], data["val_x"]) and torch.equal(again["val_y"], data["val_y"])


def test_train_learns_far_above_chance(data):
    val_accuracy = train(seeded_model(GOOD, 0), data, GOOD)
    assert val_accuracy > 0.9  # chance is 0.1


def test_same_seed_gives_bit_identical_weights_on_cpu(data):
    models, accuracies = [], []
    for _ in range(2):  # as tune.py does it: seed, build, train straight away
        models.append(seeded_model(GOOD, 7))
        accuracies.append(train(models[-1], data, GOOD))
    assert accuracies[0] == accuracies[1]
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    other = seeded_model(GOOD, 8)
    train(other, data, GOOD)
    assert not torch.equal(other.state_dict()["layers.0.weight"], models[0].state_dict()["layers.0.weight"])


def test_a_run_resumed_from_any_epochs_checkpoint_ends_with_the_same_value_and_weights(data):
    hparams = dict(GOOD, epochs=3, dropout=0.3)  # dropout and shuffles draw random numbers every step
    saved, logged = [], []

    def save(checkpoint):  # as checkpoints.py does: serialised at once, loaded later with weights_only
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        saved.append(buffer.getvalue())

    whole = seeded_model(hparams, 0)
    value = train(whole, data, hparams, save=save, log=lambda *reads: logged.append(reads))
    assert [torch.load(io.BytesIO(b), weights_only=True)["epochs_done"] for b in saved] == [1, 2, 3]
    assert len(logged) == 3 * train_loop.EVALS_PER_EPOCH and logged[-1][2] == value
    for epoch_checkpoint in saved[:2]:
        resumed = seeded_model(hparams, 0)  # a fresh process would build it the same way
        assert train(resumed, data, hparams, resume=torch.load(io.BytesIO(epoch_checkpoint), weights_only=True)) == value
        for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
            assert torch.equal(a, b)


def test_a_trial_that_runs_out_of_memory_is_pruned_with_the_reason_and_the_study_goes_on(data):
    class RunsOutAtStep3(MLP):  # as a GPU would answer a too-big batch (tests/test_gpu.py does it for real)
        calls = 0

        def forward(self, x):
            RunsOutAtStep3.calls += 1
            if RunsOutAtStep3.calls == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().forward(x)

    def objective(trial):
        hidden_size = trial.suggest_categorical("hidden_size", [64, 32])
        model = (RunsOutAtStep3 if hidden_size == 64 else MLP)(784, hidden_size, 10, 2, 0.0)
        return train(model, data, dict(GOOD, hidden_size=hidden_size), trial)

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"hidden_size": 64})
    study.enqueue_trial({"hidden_size": 32})
    study.optimize(objective, n_trials=2)
    too_big, fine = study.trials
    assert too_big.state == optuna.trial.TrialState.PRUNED
    assert too_big.user_attrs["pruned_reason"].startswith("out of memory on cpu: CUDA out of memory. Tried")
    assert fine.state == optuna.trial.TrialState.COMPLETE and fine.value > 0.9
    RunsOutAtStep3.calls = 0
    with pytest.raises(torch.OutOfMemoryError):  # without a trial, the error itself
        train(RunsOutAtStep3(784, 64, 10, 2, 0.0), data, GOOD)


def test_pruner_really_prunes_a_bad_trial_in_a_real_study(data):
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    study.enqueue_trial({"learning_rate": 0.05})   # learns
    study.enqueue_trial({"learning_rate": 1e-6})   # barely moves: below the median at its first report
    hparams = dict(GOOD, epochs=2)

    def objective(trial):
        return train(seeded_model(hparams, 0), data, dict(hparams, learning_rate=trial.suggest_float(
            "learning_rate", 1e-6, 1.0, log=True)), trial)

    study.optimize(objective, n_trials=2)
    good, bad = study.trials
    assert good.state == optuna.trial.TrialState.COMPLETE and len(good.intermediate_values) == 8
    assert good.value == good.intermediate_values[7]  # the final weights' accuracy: the last report
    assert good.user_attrs["best_val_accuracy"] == max(good.intermediate_values.values())
    assert 0 < good.user_attrs["train_loss"] < 2.3  # below a guess's log(10): it learned
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert len(bad.intermediate_values) < len(good.intermediate_values)  # stopped early: compute saved


def test_nonfinite_loss_prunes_with_a_reason_and_the_study_goes_on(data):
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"learning_rate": 1e4})  # diverges to inf/nan within a few steps
    study.enqueue_trial({"learning_rate": 0.05})

    def objective(trial):
        hparams = dict(GOOD, learning_rate=trial.suggest_float("learning_rate", 1e-6, 1e4, log=True))
        return train(seeded_model(hparams, 0), data, hparams, trial)

    study.optimize(objective, n_trials=2)
    exploded, fine = study.trials
    assert exploded.state == optuna.trial.TrialState.PRUNED
    assert "nan/inf" in exploded.user_attrs["pruned_reason"]
    assert fine.state == optuna.trial.TrialState.COMPLETE and fine.value > 0.9
    with pytest.raises(FloatingPointError):
        train(seeded_model(GOOD, 0), data, dict(GOOD, learning_rate=1e4))


def test_evaluate_is_accuracy(data):
    model = seeded_model(GOOD, 0)  # untrained: an accuracy near chance, not a trivial 1.0
    accuracy = evaluate(model, data["val_x"], data["val_y"])
    assert model.training  # evaluate() puts the model back into training mode
    with torch.no_grad():
        model.eval()
        by_hand = (model(data["val_x"]).argmax(1) == data["val_y"]).sum().item() / len(data["val_y"])
    assert accuracy == pytest.approx(by_hand) and accuracy < 0.5


def test_train_loop_script_trains_then_scores_the_test_set_once(mnist_dir, tmp_path):
    result = run_script("train_loop.py", "--data-dir", mnist_dir, "--epochs", "1", "--learning-rate", "0.05",
                        "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("val_accuracy") >= 4 and result.stdout.count("train_loss") >= 4
    assert result.stdout.count("test_accuracy") == 1


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


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--dropout", "1.5"], ["--momentum", "0"],
                                   ["--batch-size", "x"], ["--device", "cuda:7"]])
def test_bad_flags_exit_2_with_one_line(flags, mnist_dir, capsys):
    if flags[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit) as exit_:
        train_loop.main(["--data-dir", mnist_dir, *flags])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1, stderr
