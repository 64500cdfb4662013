"""Several workers, a real PostgreSQL server, and real killed processes."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import sqlalchemy
from optuna.trial import TrialState

import tune
from conftest import ROOT

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start_tune(mnist_dir, out, *flags):
    """tune.py as a real child process, in its own process group (so a signal reaches only it)."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tune.py"), "--data-dir", mnist_dir, "--out", out,
                             "--device", "cpu", "--no-final", *flags], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(process, timeout=240):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def load(storage, name="mnist-mlp"):
    return optuna.load_study(study_name=name, storage=storage)


def wait_for_a_trial_mid_training(process, storage, timeout=60):
    """Poll the storage until some trial is RUNNING and has reported at least once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            running = load(storage).get_trials(states=[TrialState.RUNNING])
            if any(trial.intermediate_values for trial in running):
                return
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # no database, no tables or no study yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started training in time")


def assert_exact_budget(study, n_trials):
    states = [trial.state for trial in study.trials]
    assert sum(state in FINISHED for state in states) == n_trials
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


def test_two_workers_share_one_sqlite_study_with_the_exact_budget(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    code, stdout, stderr = finish(start_tune(mnist_dir, out, "--workers", "2", "--n-trials", "6", "--epochs", "2"))
    assert code == 0, stderr
    assert "locked" not in stderr + stdout
    study = load(f"sqlite:///{out}/study.db")
    assert_exact_budget(study, 6)
    assert len(pd.read_csv(os.path.join(out, "trials.csv"))) == len(study.trials)
    # Each worker seeds its sampler differently: no two trials share their parameters.
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)


def test_kill_9_mid_trial_then_rerun_retries_that_trial_and_ends_at_the_budget(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    storage = f"sqlite:///{out}/study.db"
    flags = ["--n-trials", "2", "--epochs", "200", "--pruner", "none", "--heartbeat", "1"]
    process = start_tune(mnist_dir, out, *flags)
    wait_for_a_trial_mid_training(process, storage)
    os.killpg(process.pid, signal.SIGKILL)  # no handler runs: the trial stays RUNNING in the storage
    process.wait()
    killed = load(storage).get_trials(states=[TrialState.RUNNING])
    assert len(killed) == 1
    completed_before = [t.number for t in load(storage).get_trials(states=[TrialState.COMPLETE])]

    code, stdout, stderr = finish(start_tune(mnist_dir, out, *flags))
    assert code == 0, stderr
    study = load(storage)
    assert_exact_budget(study, 2)
    failed = study.get_trials(states=[TrialState.FAIL])
    assert [t.number for t in failed] == [killed[0].number]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == killed[0].params  # the same configuration, tried again
    assert set(completed_before) <= {t.number for t in study.get_trials(states=[TrialState.COMPLETE])}


def test_ctrl_c_fails_the_running_trial_writes_files_exits_130_and_resumes(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    storage = f"sqlite:///{out}/study.db"
    flags = ["--n-trials", "2", "--epochs", "200", "--pruner", "none"]
    process = start_tune(mnist_dir, out, *flags)
    wait_for_a_trial_mid_training(process, storage)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
    code, stdout, stderr = finish(process)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stdout and "failed" in stdout
    assert os.path.exists(os.path.join(out, "trials.csv"))
    assert len(load(storage).get_trials(states=[TrialState.FAIL])) == 1
    code, _, stderr = finish(start_tune(mnist_dir, out, *flags))
    assert code == 0, stderr
    assert_exact_budget(load(storage), 2)


def test_ctrl_c_with_two_workers_stops_both_cleanly(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    process = start_tune(mnist_dir, out, "--workers", "2", "--n-trials", "4", "--epochs", "200", "--pruner", "none")
    wait_for_a_trial_mid_training(process, f"sqlite:///{out}/study.db")
    os.killpg(process.pid, signal.SIGINT)
    code, stdout, stderr = finish(process)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert not load(f"sqlite:///{out}/study.db").get_trials(states=[TrialState.RUNNING])


def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_memory_stays_flat_over_100_trials_in_one_process(mnist_dir, tmp_path):
    args = tune.parse_args(["--data-dir", mnist_dir, "--out", str(tmp_path / "run"), "--epochs", "1",
                            "--device", "cpu", "--n-trials", "5"])
    data = tune.load_mnist(mnist_dir, tune.torch.device("cpu"))
    study = tune.open_study(args)
    tune.run_trials(study, data, args)  # warm up: allocator pools, imports, caches
    before = resident_mb()
    args.n_trials = 105
    tune.run_trials(study, data, args)
    assert len(study.get_trials(states=FINISHED)) == 105
    assert resident_mb() - before < 50


POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES_URL and not os.environ.get("CI"),
                    reason="set TEST_POSTGRES_URL (.ci/run starts a server and does)")
def test_two_machines_on_postgresql_run_one_study_with_the_exact_budget(mnist_dir, tmp_path):
    assert POSTGRES_URL, "CI must provide a PostgreSQL server: .ci/run sets TEST_POSTGRES_URL"
    name = f"pg-{os.getpid()}-{time.time_ns()}"
    flags = ["--storage", POSTGRES_URL, "--study-name", name, "--n-trials", "6", "--epochs", "20", "--pruner", "none"]
    # Two separate `python tune.py` commands, as two machines would run them, each its own --seed.
    machines = [start_tune(mnist_dir, str(tmp_path / f"machine{i}"), *flags, "--seed", str(i)) for i in range(2)]
    for machine in machines:
        code, stdout, stderr = finish(machine)
        assert code == 0, stderr
    study = load(POSTGRES_URL, name)
    assert_exact_budget(study, 6)
    # Both machines really worked on it. (When both ask for the last trial at once, the later one
    # is marked failed untrained, with its reason: the budget stays exact.)
    assert {t.user_attrs["seed"] for t in study.get_trials(states=FINISHED)} == {0, 1}
    for surplus in study.get_trials(states=[TrialState.FAIL]):
        assert "budget" in surplus.user_attrs["fail_reason"] and not surplus.intermediate_values
