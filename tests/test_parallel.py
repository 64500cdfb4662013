"""Several workers, a real PostgreSQL server, and real killed processes."""
import os
import signal
import time

import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

import parallel
import tune
from conftest import write_mnist
from processes import (FINISHED, SLOW_TRIAL, assert_exact_budget, assert_stopped_cleanly, finish, load, load_or_none,
                       start_tune, storage_of, study_with, wait_for_a_trial_mid_training, wait_for_checkpoint)
from train_loop import load_mnist


def test_two_workers_share_one_sqlite_study_with_the_exact_budget(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    code, stdout, stderr = finish(start_tune(mnist_dir, out, "--workers", "2", "--n-trials", "6", "--epochs", "2"))
    assert code == 0 and "warning" not in stderr, stderr
    assert "locked" not in stderr + stdout
    study = load(storage_of(out))
    assert_exact_budget(study, 6)
    assert len(pd.read_csv(os.path.join(out, "trials.csv"))) == len(study.trials)
    # Both processes trained: the parent and its worker each ran finished trials.
    assert len({t.user_attrs["worker"] for t in study.trials if t.state in FINISHED}) == 2
    # Each worker seeds its sampler differently: no two trials share their parameters.
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == len(study.trials)


def test_kill_9_mid_trial_then_rerun_retries_that_trial_and_ends_at_the_budget(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    storage = storage_of(out)
    flags = ["--n-trials", "2", "--epochs", "60", "--pruner", "none", "--heartbeat", "1"]
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
    # The rerun continued the sampler's stream: apart from the retry, no configuration came twice.
    others = [tuple(sorted(t.params.items())) for t in study.trials if t.number != retries[0].number]
    assert len(others) == len(set(others))


def test_ctrl_c_queues_the_running_trial_as_it_is_writes_files_exits_130_and_resumes_at_once(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    storage = storage_of(out)
    flags = ["--n-trials", "2", "--epochs", "60", "--pruner", "none"]
    process = start_tune(mnist_dir, out, *flags)
    wait_for_a_trial_mid_training(process, storage)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground group
    code, stdout, stderr = finish(process)
    assert_stopped_cleanly(code, stdout, stderr)
    assert "run the same command to resume" in stdout and "0 failed, 0 running, 1 waiting" in stdout
    assert os.path.exists(os.path.join(out, "trials.csv"))
    [queued] = load(storage).get_trials(states=[TrialState.WAITING])  # it runs again on resume
    code, stdout, stderr = finish(start_tune(mnist_dir, out, *flags))
    assert code == 0 and "waiting for" not in stdout, stderr
    resumed = load(storage).trials[queued.number]
    assert resumed.state == TrialState.COMPLETE and resumed.params == queued.params
    assert resumed.user_attrs["resumed_from"].startswith(f"trial {queued.number} after ")


def test_ctrl_c_at_many_moments_never_prints_a_traceback_and_the_rerun_ends_at_the_budget(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    # Three slow trials (batch 16; about 10 s each on 2 cores), so that every Ctrl-C lands before the
    # study is done, although each run goes on from the step the one before stopped at.
    study_with(out, dict(SLOW_TRIAL, batch_size=16), copies=3)
    flags = ["--n-trials", "3", "--epochs", "150", "--pruner", "none", "--heartbeat", "1"]
    # From the first import to well inside a trial (start-up takes about 1.5 s on 2 cores).
    for delay in [0.2, 0.6, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5]:
        process = start_tune(mnist_dir, out, *flags)
        time.sleep(delay)
        assert process.poll() is None, process.communicate()
        os.killpg(process.pid, signal.SIGINT)
        assert_stopped_cleanly(*finish(process))
    code, stdout, stderr = finish(start_tune(mnist_dir, out, *flags), timeout=400)
    assert code == 0, stderr
    assert_exact_budget(load(storage_of(out)), 3)


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
                                     (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_stops_at_once_and_the_trial_is_retried_from_its_last_epoch(tmp_path, signals):
    digits = write_mnist(tmp_path / "digits", n_train=12000)  # validations half a second apart or more
    out = str(tmp_path / "run")
    study_with(out, dict(SLOW_TRIAL, hidden_size=512, layer_size=5, batch_size=16))
    flags = ["--n-trials", "1", "--epochs", "3", "--pruner", "none", "--heartbeat", "1"]
    process = start_tune(digits, out, *flags)
    wait_for_checkpoint(process, out, epochs_done=1)
    os.killpg(process.pid, signals[0])
    # Once the first is handled (two signals before Python's handler runs would count as one),
    # the second, long before the trial's next validation.
    for line in process.stderr:
        if "stops at its next validation" in line:
            break
    else:
        raise AssertionError(f"the first signal was not handled: {finish(process)}")
    os.killpg(process.pid, signals[1])
    code, stdout, stderr = finish(process)
    assert_stopped_cleanly(code, stdout, stderr, exit_code=128 + signals[1])
    assert "stopped at once" in stderr
    [left] = load(storage_of(out)).trials
    assert left.state == TrialState.RUNNING  # as after kill -9: retried once its heartbeat is stale
    code, stdout, stderr = finish(start_tune(digits, out, *flags))
    assert code == 0, stderr
    failed, retry = load(storage_of(out)).trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from"] == "trial 0 after epoch 1"


def test_ctrl_c_during_the_final_retrain_exits_130_and_the_rerun_retrains(tmp_path):
    digits = write_mnist(tmp_path / "digits", n_train=6000)  # a retrain of several seconds: Ctrl-C lands inside it
    out = str(tmp_path / "run")
    study_with(out, dict(SLOW_TRIAL, batch_size=16))
    flags = ["--n-trials", "1", "--epochs", "2", "--pruner", "none"]
    process = start_tune(digits, out, *flags, final=True)
    for line in process.stdout:
        if line.startswith("retraining"):
            break
    time.sleep(0.5)
    assert process.poll() is None, "the retrain ended before the Ctrl-C"
    os.killpg(process.pid, signal.SIGINT)
    assert_stopped_cleanly(*finish(process))
    assert not os.path.exists(os.path.join(out, "best.json"))
    code, stdout, stderr = finish(start_tune(digits, out, *flags, final=True))
    assert code == 0 and "retraining" in stdout and "test_accuracy" in stdout, stderr


@pytest.mark.parametrize("delay", [1.0, None])
def test_ctrl_c_with_two_workers_stops_both_cleanly(mnist_dir, tmp_path, delay):
    out = str(tmp_path / "run")
    process = start_tune(mnist_dir, out, "--workers", "2", "--n-trials", "4", "--epochs", "200", "--pruner", "none")
    if delay is None:  # mid-trial: both are training
        deadline = time.monotonic() + 120
        while len(running_with_reports(out)) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
    else:  # start-up: the parent is still importing, or starting its workers
        time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    assert_stopped_cleanly(*finish(process))
    if delay is None:  # each trial is queued again as it is, to go on where it stopped
        assert [t.state for t in load(storage_of(out)).trials] == [TrialState.WAITING] * 2
    elif os.path.exists(f"{out}/study.db"):
        assert all(t.state == TrialState.WAITING for t in load(storage_of(out)).trials)


def running_with_reports(out):
    return [t for t in load_or_none(out) if t.state == TrialState.RUNNING and t.intermediate_values]


def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_memory_stays_flat_over_100_trials_in_one_process(mnist_dir, tmp_path):
    data = load_mnist(mnist_dir, torch.device("cpu"))
    argv = ["--data-dir", mnist_dir, "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"]
    tune.run_trials(tune.parse_args([*argv, "--n-trials", "5"]), 0, parallel.Stops(), data)  # warm up
    before = resident_mb()
    tune.run_trials(tune.parse_args([*argv, "--n-trials", "105"]), 0, parallel.Stops(), data)
    assert len(load(f"sqlite:///{tmp_path}/run/study.db").get_trials(states=FINISHED)) == 105
    assert resident_mb() - before < 50


POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL")


REQUIRE_POSTGRES = os.environ.get("MNIST_OPTUNA_REQUIRE_POSTGRES") == "1"  # set by .ci/run, which starts a server


@pytest.mark.skipif(not POSTGRES_URL and not REQUIRE_POSTGRES,
                    reason="set TEST_POSTGRES_URL=postgresql://... to a database this test may write to")
def test_two_machines_on_postgresql_run_one_study_with_the_exact_budget(mnist_dir, tmp_path):
    assert POSTGRES_URL, "MNIST_OPTUNA_REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set"
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
