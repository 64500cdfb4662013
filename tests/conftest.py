"""Shared test helpers: a tiny synthetic MNIST in MNIST's own IDX layout, and a way to run the scripts.

Real MNIST cannot be downloaded in CI, and the tests must not depend on files outside the repo, so
each session writes 600 training and 200 test "digits" of its own: every class is a bright bar at
its own place plus noise, learnable in one epoch, yet read through the same load_mnist() as MNIST.
"""
import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
N_TRAIN, N_TEST = 600, 200  # validation takes 1/6 of the training set: 500 train, 100 val


def write_idx(path, array):
    """MNIST's IDX format: a magic number saying uint8 and the number of dimensions, the sizes, the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def synthetic_digits(n, rng):
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label: 5 + 2 * label, 4:24] = 255  # class k: a bar at row 2 + 2k
    return images, labels


def write_mnist(root, seed=0, n_train=N_TRAIN):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", N_TEST)):
        images, labels = synthetic_digits(n, rng)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return str(root)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"))


def fingerprint(folder):
    """Every file under a folder (artifacts/ included) -> the sha256 of its bytes: "nothing changed"."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_script(script, *args, cwd, timeout=300):
    """Run `python SCRIPT ARGS` the way a user would, with every network request refused at once."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(result, *words):
    """Bad input: exit code 2, one line on stderr that names the problem, and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
