"""benchmarks/gpu_check.sh on a machine without a GPU, or without its packages: it parses, says in one
line what is missing, and its table comes even when a part fails or runs past the deadline."""
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def run(*argv, python=sys.executable, timeout=120):
    return subprocess.run(["bash", SCRIPT, *map(str, argv)], cwd=ROOT, env=dict(os.environ, PYTHON=str(python)),
                          capture_output=True, text=True, timeout=timeout)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line(mnist_dir):
    result = run(mnist_dir)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"]


def test_without_its_packages_it_names_them_and_how_to_install(mnist_dir, tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True)
    result = run(mnist_dir, python=tmp_path / "bare" / "bin" / "python")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "lacks torch optuna SQLAlchemy alembic Mako colorlog pandas matplotlib pytest" in result.stderr
    assert "pip install -r requirements-test.txt" in result.stderr


def test_the_table_comes_when_a_part_fails_or_runs_past_the_deadline(mnist_dir):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--data-dir", mnist_dir, "--only", "speed",
                             "studies", "workers", "--deadline", "25"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert time.monotonic() - start < 40 and result.returncode == 1
    table = result.stdout.split("\n\n")[-1].splitlines()[1:]
    assert table[0].startswith("speed") and ("FAILED" in table[0] or "cut short" in table[0]) or torch.cuda.is_available()
    assert any("cut short" in line or "not run: the deadline came first" in line for line in table), result.stdout
    assert table[-1].startswith("workers")  # every part has its row


def test_every_step_of_a_captured_run_reads_its_rate_as_one_float32_tensor():
    import cuda_graph
    from train_loop import DEFAULT_HPARAMS, seeded_model, sgd_with_schedule
    optimizer, schedule = sgd_with_schedule(seeded_model(DEFAULT_HPARAMS, 0), DEFAULT_HPARAMS, total_batches=10)
    schedule.step()
    captured = cuda_graph.CapturedStep(None, optimizer, torch.device("cpu"))  # a CPU tensor stands in for the GPU's
    with captured.rate_from_tensor():
        [group] = optimizer.param_groups
        assert group["lr"] is captured.lr and captured.lr.dtype == torch.float32
        assert captured.lr.item() == torch.tensor(schedule.get_last_lr()[0], dtype=torch.float32).item()
    assert optimizer.param_groups[0]["lr"] == schedule.get_last_lr()[0] == pytest.approx(0.045)  # a number again


def test_the_60000_image_copy_reads_a_gzipped_folder(mnist_dir, tmp_path):
    import gzip
    import shutil

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from train_loop import MNIST_FILES, load_mnist
    from workers import repeat_training_images
    raw = tmp_path / "gz" / "MNIST" / "raw"
    os.makedirs(raw)
    for name in MNIST_FILES:  # MNIST as downloaded: .gz files
        with open(os.path.join(mnist_dir, "MNIST", "raw", name), "rb") as plain, gzip.open(raw / f"{name}.gz", "wb") as packed:
            shutil.copyfileobj(plain, packed)
    copy = repeat_training_images(str(tmp_path / "gz"), 1500, str(tmp_path / "copy"))
    data, original = load_mnist(copy, "cpu", download=False), load_mnist(mnist_dir, "cpu", download=False)
    assert len(data["train_x"]) + len(data["val_x"]) == 1500 and torch.equal(data["test_x"], original["test_x"])
