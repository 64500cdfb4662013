"""Every kind of bad input: exit code 2, one line that says what to do, no traceback, nothing changed."""
import os
import subprocess

import optuna
import pytest

import report
import tune
from conftest import assert_usage_error, fingerprint, run_script, write_mnist


def run_tune_in_process(capsys, *argv):
    """tune.main() as the command line would run it; an exception here fails the test like a traceback would."""
    with pytest.raises(SystemExit) as exit_:
        tune.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_.value.code, captured.out, captured.err)


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory):
    """A real finished study: what a user already has and must not lose to a typo."""
    out = tmp_path_factory.mktemp("existing") / "run"
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "2", "--epochs", "1",
                        "--device", "cpu", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("flags, words", [
    (["--n-trials", "0"], ["--n-trials"]),
    (["--n-trials", "-3"], ["--n-trials"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--workers", "0"], ["--workers"]),
    (["--sampler", "grid"], ["--sampler"]),
    (["--pruner", "magic"], ["--pruner"]),
    (["--device", "tpu"], ["tpu"]),
    (["--device", "cuda"], ["cuda"]),
    (["--storage", "not-a-url"], ["--storage"]),
    (["--storage", "postgresql://nobody:secret@127.0.0.1:9/none"], ["--storage", "***"]),
    (["--data-dir", "EMPTY"], ["cannot load MNIST", "train-images-idx3-ubyte"]),
    (["--data-dir", "TRUNCATED"], ["cannot load MNIST"]),
])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(flags, words, finished_run, mnist_dir, tmp_path,
                                                            capsys, monkeypatch):
    if flags == ["--device", "cuda"] and tune.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "TRUNCATED" in flags:
        root = write_mnist(tmp_path / "truncated")
        labels = os.path.join(root, "MNIST", "raw", "t10k-labels-idx1-ubyte")
        open(labels, "r+b").truncate(20)
        flags = ["--data-dir", root]
    flags = [str(tmp_path / "empty") if flag == "EMPTY" else flag for flag in flags]
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # downloads fail at once, as offline
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    before = fingerprint(finished_run)
    result = run_tune_in_process(capsys, "--data-dir", mnist_dir, "--out", finished_run, *flags)
    assert_usage_error(result, *words)
    assert "secret" not in result.stderr  # a password in a URL is never echoed
    assert fingerprint(finished_run) == before


def test_out_that_cannot_be_written(mnist_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_tune_in_process(capsys, "--data-dir", mnist_dir, "--out", tmp_path / "a-file" / "run")
    assert_usage_error(result, "--out")
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_tensorboard_without_its_package_says_how_to_install_it(mnist_dir, tmp_path, capsys, monkeypatch):
    real_find_spec = report.importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real_find_spec(name, *args))
    result = run_tune_in_process(capsys, "--data-dir", mnist_dir, "--out", tmp_path / "run", "--tensorboard",
                                 tmp_path / "tb")
    assert_usage_error(result, "--tensorboard", "pip install tensorboard")
    assert not (tmp_path / "tb").exists()


def test_existing_study_with_the_other_direction_is_refused_untouched(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    storage = f"sqlite:///{out}/study.db"
    theirs = optuna.create_study(storage=storage, study_name="mnist-mlp", direction="minimize")
    theirs.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    result = run_tune_in_process(capsys, "--data-dir", mnist_dir, "--out", out, "--n-trials", "3")
    assert_usage_error(result, "minimises", "--study-name")
    again = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert again.direction == optuna.study.StudyDirection.MINIMIZE and len(again.trials) == 2


def test_a_real_process_offline_without_mnist_prints_one_line_no_traceback(tmp_path):
    result = run_script("tune.py", "--data-dir", tmp_path / "no-mnist-here", "--out", tmp_path / "run", cwd=tmp_path)
    assert_usage_error(result, "cannot load MNIST", "t10k-images-idx3-ubyte")
