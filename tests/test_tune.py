import json
import os
import shutil
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import tune
from conftest import ROOT, assert_usage_error, fingerprint, run_script, write_mnist
from train_loop import seeded_model, sgd_with_schedule

TINY = ["--n-trials", "4", "--epochs", "1", "--device", "cpu", "--no-final"]


def tiny_tune(mnist_dir, out, *extra):
    return run_script("tune.py", "--data-dir", mnist_dir, "--out", out, *TINY, *extra, cwd=os.path.dirname(out))


def load(out):
    return optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")


def test_tiny_study_end_to_end_writes_trials_csv_then_resumes_without_training(mnist_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    first = tiny_tune(mnist_dir, out)
    assert first.returncode == 0, first.stderr
    assert sum(line.startswith("trial ") for line in first.stdout.splitlines()) == 4
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    study = load(out)
    assert trials["number"].tolist() == [t.number for t in study.trials]
    assert trials["state"].tolist() == [t.state.name for t in study.trials]
    assert trials["value_val_accuracy"].tolist() == pytest.approx([t.value for t in study.trials])
    assert trials["params_learning_rate"].tolist() == pytest.approx([t.params["learning_rate"] for t in study.trials])
    assert (trials["user_attrs_seed"] == 0).all() and (trials["duration"] > 0).all()  # seconds
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"} and trials["value_val_accuracy"].max() > 0.5
    assert f"best: trial {study.best_trial.number}, val_accuracy {study.best_value:.4f}" in first.stdout
    # One meaning of a value: the validation accuracy of the final weights, i.e. the last report.
    for trial in study.trials:
        assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
    # The same command again (in this process, to save a start-up) trains nothing and says so.
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY])
    assert "nothing to train" in capsys.readouterr().out
    assert pd.read_csv(os.path.join(out, "trials.csv"))["value_val_accuracy"].tolist() == trials["value_val_accuracy"].tolist()
    # A bigger budget means "up to 6 in all", not "6 more".
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY, "--n-trials", "6"])
    assert len(pd.read_csv(os.path.join(out, "trials.csv"))) == 6


def test_same_command_in_a_fresh_folder_gives_identical_values(mnist_dir, tmp_path):
    values = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        tune.main(["--data-dir", mnist_dir, "--out", out, *TINY, "--seed", "3"])
        values.append(pd.read_csv(os.path.join(out, "trials.csv"))[["value_val_accuracy", "params_learning_rate"]])
    pd.testing.assert_frame_equal(values[0], values[1])


def test_search_space_never_builds_an_sgd_that_raises():
    # Nesterov with zero momentum is the one combination torch.optim.SGD refuses.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"momentum": 0.0})
    for _ in range(200):
        trial = study.ask()
        hparams = tune.suggest_hparams(trial, epochs=1)
        sgd_with_schedule(seeded_model(hparams, 0), hparams, total_batches=10)  # raises if torch refuses it
        study.tell(trial, 0.0)
    assert study.trials[0].params["momentum"] == 0.0 and "nesterov" not in study.trials[0].params


def configurations(out):
    return [tuple(sorted(trial.params.items())) for trial in load(out).trials]


def test_a_resumed_study_draws_new_configurations(mnist_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY])
    tune.main(["--data-dir", mnist_dir, "--out", out, *TINY, "--n-trials", "8"])
    assert len(configurations(out)) == 8 and len(set(configurations(out))) == 8
    # ...while a fresh run with the same --seed is the same run.
    tune.main(["--data-dir", mnist_dir, "--out", str(tmp_path / "again"), *TINY])
    assert configurations(str(tmp_path / "again")) == configurations(out)[:4]


@pytest.mark.parametrize("change, words", [(["--epochs", "2"], ["epochs 1", "2"]),
                                           (["--pruner", "median"], ["pruner halving", "median"]),
                                           (["--data-dir", "MORE"], ["training images 500", "1000"])])
def test_a_study_keeps_its_settings_a_resume_with_others_is_refused_untouched(mnist_dir, tmp_path, change, words):
    out = tmp_path / "run"
    assert tiny_tune(mnist_dir, str(out)).returncode == 0
    before = fingerprint(out)
    if "MORE" in change:
        change = ["--data-dir", write_mnist(tmp_path / "more", n_train=1200)]
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, *TINY, "--n-trials", "6", *change, cwd=tmp_path)
    assert_usage_error(result, *words, "--study-name")
    assert fingerprint(out) == before


def test_timeout_starts_no_trial_after_it(mnist_dir, tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "1000", "--epochs", "1",
                        "--device", "cpu", "--no-final", "--timeout", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    study = load(out)
    assert 1 <= len(study.trials) < 1000 and all(t.state.is_finished() for t in study.trials)
    assert (study.trials[-1].datetime_start - study.trials[0].datetime_start).total_seconds() < 2


def test_the_default_pruner_judges_at_steps_2_and_6_and_the_best_third_goes_on():
    study = optuna.create_study(direction="maximize", pruner=tune.make_pruner("halving"))
    decisions = {}
    # Each trial reports `early` at steps 0-5 and `late` at steps 6-11, as a 3-epoch trial does.
    for early, late in [(0.5, 0.5), (0.9, 0.9), (0.8, 0.8), (0.6, 0.6), (0.7, 0.7), (0.95, 0.95), (0.4, 0.4),
                        (0.85, 0.85), (0.99, 0.1)]:
        trial = study.ask()
        for step in range(12):
            trial.report(early if step < 6 else late, step)
            if trial.should_prune():
                decisions[early] = step
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, late)
    # At step 2, a trial goes on only in the best third of all that reached step 2 (the first ones,
    # with no one to compare to, go on); at step 6 again; at no other step is a trial stopped.
    assert decisions == {0.8: 2, 0.6: 2, 0.7: 2, 0.4: 2, 0.85: 2, 0.99: 6}
    assert sorted(t.value for t in study.get_trials(states=[TrialState.COMPLETE])) == [0.5, 0.9, 0.95]


def test_a_trial_whose_loss_turns_nan_is_pruned_with_its_reason_in_trials_csv(mnist_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out}/study.db", study_name="mnist-mlp", direction="maximize")
    study.enqueue_trial({"learning_rate": 1.0, "momentum": 0.99, "nesterov": True, "hidden_size": 512,
                         "layer_size": 5, "dropout": 0.0, "batch_size": 16, "weight_decay": 1e-6})
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, *TINY, "--n-trials", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = pd.read_csv(out / "trials.csv")
    assert trials["state"][0] == "PRUNED" and "nan/inf" in trials["user_attrs_pruned_reason"][0]
    assert "loss became nan/inf" in result.stdout.splitlines()[0]  # its progress line says why
    assert trials["state"][1] in ("COMPLETE", "PRUNED")  # the study went on


def test_best_json_is_the_studys_best_trial_and_is_reused_only_for_the_same_study_trial_and_data(
        mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data-dir", mnist_dir, "--out", str(out), "--n-trials", "4", "--epochs", "1", "--device", "cpu",
            "--pruner", "none"]
    tune.main(argv)
    best, study = json.loads((out / "best.json").read_text()), load(out)
    assert len({t.value for t in study.trials}) > 1  # a worst trial exists that must not be picked
    assert best["trial_number"] == study.best_trial.number and best["params"] == study.best_trial.params
    assert best["val_accuracy"] == study.best_value and 0.5 < best["test_accuracy"] <= 1
    capsys.readouterr()
    tune.main(argv)
    assert "nothing to retrain" in capsys.readouterr().out
    for key, other in (("study", "another-study"), ("trial_number", best["trial_number"] + 1),
                       ("train_images", 1)):
        (out / "best.json").write_text(json.dumps(dict(best, **{key: other}, test_accuracy=0.0)))
        tune.main(argv)
        assert "retraining" in capsys.readouterr().out, key
        assert json.loads((out / "best.json").read_text())["test_accuracy"] == best["test_accuracy"]
    moved = shutil.copytree(mnist_dir, tmp_path / "same-digits-elsewhere")  # other data: another folder
    tune.main([*argv, "--data-dir", str(moved)])
    assert "retraining" in capsys.readouterr().out


def test_a_diverging_retrain_says_so_in_one_line_and_keeps_the_study(mnist_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # The trial itself learns on 1 epoch; the retrain, on train + validation, diverges at this rate.
    study = optuna.create_study(storage=f"sqlite:///{out}/study.db", study_name="mnist-mlp", direction="maximize")
    params = {"learning_rate": 1.0, "momentum": 0.99, "nesterov": True, "hidden_size": 512, "layer_size": 5,
              "dropout": 0.0, "batch_size": 16, "weight_decay": 1e-6}
    study.add_trial(optuna.trial.create_trial(params=params, value=0.9, user_attrs={"seed": 0},
                                              distributions=study_distributions()))
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "1", "--epochs", "1",
                        "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tune.py: the retrain of trial 0 diverged")
    assert len(pd.read_csv(out / "trials.csv")) == 1 and not (out / "best.json").exists()


def study_distributions():
    """The search space's distributions, read off a trial that suggests every parameter."""
    study = optuna.create_study()
    study.enqueue_trial({"momentum": 0.5})  # with momentum, Nesterov is asked too
    trial = study.ask()
    tune.suggest_hparams(trial, epochs=1)
    return trial.distributions


def test_the_readme_quotes_the_objective_and_create_study_as_they_are_in_tune_py():
    readme, code = (open(os.path.join(ROOT, name)).read() for name in ("README.md", "tune.py"))
    for start in ("def objective(", "study = optuna.create_study("):
        block = start + readme.split("```python\n" + start, 1)[1].split("```", 1)[0]
        assert " ".join(block.split()) in " ".join(code.split()), start  # the same words, whatever the indentation
