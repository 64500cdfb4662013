"""predict.py on a real run's best_model.pt: a PNG a test draws, MNIST test images, and bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_usage_error, run_script, synthetic_digits


@pytest.fixture(scope="module")
def model_path(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "3", "--epochs", "1",
                        "--device", "cpu", "--pruner", "none", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return str(out / "best_model.pt")


def test_a_png_of_a_dark_digit_on_light_paper_is_classified(model_path, tmp_path):
    images, labels = synthetic_digits(3, np.random.default_rng(42))
    paths = []
    for i, image in enumerate(images):
        # Twice MNIST's size and inverted, as a scan of a pen digit would be: resizing and inverting are tested.
        paper = Image.fromarray((255 - image).astype(np.uint8)).resize((56, 56), Image.Resampling.NEAREST)
        paths.append(str(tmp_path / f"digit{i}.png"))
        paper.save(paths[-1])
    result = run_script("predict.py", *paths, "--model", model_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for path, label, line in zip(paths, labels, lines):
        name, rest = line.split(": ", 1)
        assert name == path and rest.split()[0] == str(label)
        assert 0.1 < float(rest.split("probability ")[1]) <= 1.0


def test_test_images_with_their_labels(model_path, mnist_dir, tmp_path):
    result = run_script("predict.py", "--test", "20", "--data-dir", mnist_dir, "--model", model_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(true ") == 20
    right = int(result.stdout.splitlines()[-1].split(" of ")[0])
    assert right >= 18  # the bars are easy: a model that learned gets nearly all


def test_bad_input_is_one_line_and_exit_2(model_path, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    other = torch.load(model_path, weights_only=True)
    other["hparams"]["hidden_size"] += 1  # the weights no longer fit the model these hparams build
    torch.save(other, tmp_path / "other.pt")
    assert_usage_error(run_script("predict.py", tmp_path / "missing.png", "--model", model_path, cwd=tmp_path),
                       "missing.png", "no such file")
    assert_usage_error(run_script("predict.py", tmp_path / "notes.png", "--model", model_path, cwd=tmp_path),
                       "notes.png", "not an image")
    assert_usage_error(run_script("predict.py", tmp_path / "notes.png", "--model", tmp_path / "other.pt",
                                  cwd=tmp_path), "other.pt")
    assert_usage_error(run_script("predict.py", "--model", model_path, cwd=tmp_path), "--test")
    assert_usage_error(run_script("predict.py", "x.png", "--model", tmp_path / "none.pt", cwd=tmp_path), "none.pt")
    assert os.path.exists(model_path)
