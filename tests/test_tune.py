import json
import os

import optuna
import pandas as pd
import pytest

import tune
from conftest import assert_usage_error, fingerprint, run_script

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
                   "params_batch_size", "user_attrs_best_val_accuracy", "user_attrs_train_loss",
                   "user_attrs_seed"]:
        assert column in trials.columns
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    assert trials["value"].max() > 0.5
    # One meaning of a value: the validation accuracy of the final weights, i.e. the last report.
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    for trial in study.trials:
        assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
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


def configurations(out):
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    return [tuple(sorted(trial.params.items())) for trial in study.trials]


def test_a_resumed_study_draws_new_configurations(mnist_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY])
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY, "--n-trials", "8"])
    assert len(configurations(out)) == 8 and len(set(configurations(out))) == 8
    # ...while a fresh run with the same --seed is the same run.
    tune.main(["--data-dir", mnist_dir, "--out", str(tmp_path / "again"), *TINY])
    assert configurations(str(tmp_path / "again")) == configurations(out)[:4]


def test_a_study_keeps_its_settings_a_resume_with_others_is_refused_untouched(mnist_dir, tmp_path):
    out = tmp_path / "run"
    assert tiny_tune(mnist_dir, str(out)).returncode == 0
    before = fingerprint(out)
    result = tiny_tune(mnist_dir, str(out), "--epochs", "2", "--n-trials", "6")
    assert_usage_error(result, "epochs 1", "2", "--study-name")
    assert fingerprint(out) == before


def test_best_json_is_reused_only_for_the_same_study_trial_and_data(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data-dir", mnist_dir, "--out", str(out), "--n-trials", "2", "--epochs", "1", "--device", "cpu"]
    tune.main(argv)
    best = json.loads((out / "best.json").read_text())
    for key in ["study", "trial_number", "epochs", "seed", "data_dir", "train_images", "val_images", "test_images",
                "params", "val_accuracy", "test_accuracy", "sampler", "pruner", "torch", "optuna"]:
        assert key in best
    capsys.readouterr()
    tune.main(argv)
    assert "nothing to retrain" in capsys.readouterr().out
    (out / "best.json").write_text(json.dumps(dict(best, study="another-study", test_accuracy=0.0)))
    tune.main(argv)
    assert "retraining" in capsys.readouterr().out
    assert json.loads((out / "best.json").read_text())["test_accuracy"] == best["test_accuracy"]


def test_a_diverging_retrain_says_so_in_one_line_and_keeps_the_study(mnist_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def diverge(data, hparams, seed, cuda_graph):  # what train() raises when the loss turns nan without a trial
        raise FloatingPointError("loss became nan/inf in epoch 1 (learning rate too high?)")

    monkeypatch.setattr(tune, "retrain_on_train_and_val", diverge)
    with pytest.raises(SystemExit) as exit_:
        tune.main(["--data-dir", mnist_dir, "--out", str(out), "--n-trials", "2", "--epochs", "1", "--device", "cpu"])
    message = exit_.value.code  # sys.exit(message): Python prints it on stderr and exits with status 1
    assert isinstance(message, str) and "\n" not in message and "diverged" in message
    assert len(pd.read_csv(out / "trials.csv")) == 2 and not (out / "best.json").exists()
    assert len(optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db").trials) == 2
