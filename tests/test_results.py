import json
import os

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image

import report
import train_loop
import tune
from conftest import N_TEST, run_script
from mlp import MLP
from train_loop import MODEL_KEYS, evaluate, load_mnist


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("results") / "run")
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "6", "--epochs", "1",
                        "--device", "cpu", "--pruner", "none", cwd=os.path.dirname(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_progress_line_per_trial_and_test_accuracy_beside_validation(finished_run):
    _, result = finished_run
    assert sum(line.startswith("trial ") and " s  best " in line for line in result.stdout.splitlines()) == 6
    assert "val_accuracy" in result.stdout and "test_accuracy" in result.stdout


def test_best_json_is_the_best_trial_and_the_saved_model_reproduces_its_test_accuracy(finished_run, mnist_dir):
    out, result = finished_run
    best = json.load(open(os.path.join(out, "best.json")))
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    assert best["trial_number"] == study.best_trial.number and best["val_accuracy"] == study.best_value
    assert best["params"] == study.best_trial.params and best["epochs"] == 1 and best["seed"] == 0
    saved = torch.load(os.path.join(out, "best_model.pt"), weights_only=True)
    assert {key: saved["hparams"][key] for key in best["params"]} == best["params"]
    model = MLP(*(saved["hparams"][key] for key in MODEL_KEYS))
    model.load_state_dict(saved["state_dict"])
    data = load_mnist(mnist_dir, torch.device("cpu"))
    assert evaluate(model, data["test_x"], data["test_y"]) == best["test_accuracy"]
    assert f"trial {best['trial_number']}: val_accuracy {best['val_accuracy']:.4f}, test_accuracy " \
           f"{best['test_accuracy']:.4f}" in result.stdout


def png_pixels(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 500)
        return np.asarray(image.convert("RGB"))


def test_the_plots_draw_every_trial(finished_run):
    out, _ = finished_run
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{out}/study.db")
    curves = report.intermediate_values(study)
    assert len(curves.get_lines()) == len(study.trials) == 6  # a curve per trial
    assert all(len(line.get_xdata()) == 4 for line in curves.get_lines())  # 4 steps: 1 epoch, unpruned
    history = report.optimization_history(study)
    assert sum(len(collection.get_offsets()) for collection in history.collections) >= 6  # a point per trial
    assert len(report.value_histogram(study).patches) == 20
    for ax in (curves, history):
        report.pyplot().close(ax.figure)
    for name in report.PLOTS:  # and the files drawn by tune.py are pictures, not blank canvases
        pixels = png_pixels(os.path.join(out, name))
        coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 60  # blue, orange...: not grey, white or black
        assert coloured.mean() > 0.002, name


def test_test_set_is_scored_exactly_once_and_only_after_the_study(mnist_dir, tmp_path, monkeypatch):
    sizes_seen = []

    def spy(real):
        def evaluate_and_record(model, x, y):
            sizes_seen.append(len(x))
            return real(model, x, y)
        return evaluate_and_record

    monkeypatch.setattr(train_loop, "evaluate", spy(train_loop.evaluate))  # validation inside train()
    monkeypatch.setattr(tune, "evaluate", spy(tune.evaluate))              # the final score
    tune.main(["--data-dir", mnist_dir, "--out", str(tmp_path / "run"), "--n-trials", "3", "--epochs", "1",
               "--device", "cpu"])
    assert sizes_seen.count(N_TEST) == 1
    assert sizes_seen[-1] == N_TEST  # last of all: after every trial and after the retrain
    assert len(sizes_seen) > 3


def test_too_few_trials_for_a_plot_is_a_warning_not_a_crash(mnist_dir, tmp_path):
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", tmp_path / "run", "--n-trials", "1",
                        "--epochs", "1", "--device", "cpu", "--no-final", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: param_importances.png not drawn" in result.stderr
    assert os.path.exists(tmp_path / "run" / "optimization_history.png")


def test_report_script_redraws_from_the_storage(finished_run, tmp_path):
    out, _ = finished_run
    os.remove(os.path.join(out, "trials.csv"))
    result = run_script("report.py", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(out, "trials.csv")) and "best: trial" in result.stdout
    missing = run_script("report.py", tmp_path / "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_a_big_studys_learning_curves_keep_a_short_legend():
    study = optuna.create_study(direction="maximize")
    for number in range(30):
        trial = study.ask()
        for step in range(4 if number % 2 else 1):  # odd trials complete, even ones are pruned at once
            trial.report(number / 30 + step, step)
        study.tell(trial, number / 30 + 3 if number % 2 else None,
                   state=TrialState.COMPLETE if number % 2 else TrialState.PRUNED)
    ax = report.intermediate_values(study)
    assert len(ax.get_lines()) == 30  # every trial is still drawn...
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["complete", "pruned"]  # ...not listed
    report.pyplot().close(ax.figure)
