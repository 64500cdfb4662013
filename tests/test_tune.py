import os

import optuna
import pandas as pd
import pytest

import tune
from conftest import run_script

TINY = ["--n-trials", "4", "--epochs", "1", "--device", "cpu", "--no-final"]


def tiny_tune(mnist_dir, out, *extra):
    return run_script("tune.py", "--data-dir", mnist_dir, "--out", out, *TINY, *extra, cwd=os.path.dirname(out))


def test_tiny_study_end_to_end_writes_trials_csv_then_resumes_without_training(mnist_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    first = tiny_tune(mnist_dir, out)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("trial ") >= 4 and "best: trial" in first.stdout
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    assert len(trials) == 4
    for column in ["number", "state", "value", "duration", "params_learning_rate", "params_hidden_size",
                   "params_batch_size", "user_attrs_best_val_accuracy", "user_attrs_last_val_accuracy",
                   "user_attrs_seed"]:
        assert column in trials.columns
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    assert trials["value"].max() > 0.5
    # The same command again (in this process, to save a start-up) trains nothing and says so.
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY])
    assert "nothing to train" in capsys.readouterr().out
    assert pd.read_csv(os.path.join(out, "trials.csv"))["value"].tolist() == trials["value"].tolist()
    # A bigger budget means "up to 6 in all", not "6 more".
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY, "--n-trials", "6"])
    assert len(pd.read_csv(os.path.join(out, "trials.csv"))) == 6


def test_same_command_in_a_fresh_folder_gives_identical_values(mnist_dir, tmp_path):
    values = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        tune.main(["--data-dir", mnist_dir, "--out", out, *TINY, "--seed", "3"])
        values.append(pd.read_csv(os.path.join(out, "trials.csv"))[["value", "params_learning_rate"]])
    pd.testing.assert_frame_equal(values[0], values[1])


def test_search_space_never_builds_an_sgd_that_raises():
    # Nesterov with zero momentum is the one combination torch.optim.SGD refuses.
    hparams = tune.suggest_hparams(optuna.trial.FixedTrial({
        "momentum": 0.0, "hidden_size": 32, "layer_size": 1, "dropout": 0.0, "batch_size": 32,
        "learning_rate": 0.1, "weight_decay": 1e-6}), epochs=1)
    assert hparams["nesterov"] is False
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        trial = study.ask()
        hparams = tune.suggest_hparams(trial, epochs=1)
        assert not (hparams["nesterov"] and hparams["momentum"] == 0)
        study.tell(trial, 0.0)
