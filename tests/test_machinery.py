"""parallel.py on its own, with a toy objective (no MNIST, no tune.py): budget, Ctrl-C, storage errors."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

import parallel
from conftest import ROOT


def reporting_objective(trial):
    """A garden-like objective that reports five steps, as a training loop does."""
    x = trial.suggest_float("x", 0.0, 250.0)
    for step in range(5):
        trial.report(x * (500 - 2 * x) * (step + 1) / 5, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return x * (500 - 2 * x)


def sqlite_study(tmp_path, name="toy"):
    storage = parallel.connect(f"sqlite:///{tmp_path}/study.db", heartbeat=1)
    return optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)


def test_optimize_fills_the_budget_exactly_and_a_rerun_adds_nothing(tmp_path):
    study = sqlite_study(tmp_path)
    assert parallel.optimize(study, reporting_objective, n_trials=5)
    assert parallel.optimize(sqlite_study(tmp_path), reporting_objective, n_trials=5)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5


class Stopped(BaseException):
    """As train_loop.Stopped: not an Exception, so Optuna leaves the stopped trial as it is."""


def test_ctrl_c_stops_the_trial_at_its_next_report_and_queues_it_as_it_is(tmp_path):
    study = sqlite_study(tmp_path)

    def stopped_at_step_2(trial):  # the protocol tune.py's objective and train() follow
        x = trial.suggest_float("x", 0.0, 250.0)
        for step in range(5):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-trial
            trial.report(x, step)
            if parallel.stop_requested():
                parallel.queue_again(trial)
                raise Stopped()
        return x

    # Ctrl-C's default meaning, even when pytest runs with SIGINT ignored (a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with parallel.handle_stops():
            finished = parallel.optimize(study, stopped_at_step_2, n_trials=3)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished is False and parallel.stop_signal == signal.SIGINT
    [queued] = study.trials  # not FAIL and a copy: the trial itself, back in the queue
    assert queued.state == TrialState.WAITING and sorted(queued.intermediate_values) == [0, 1, 2]
    # The resume runs the same trial first (no retry used), then new ones, to exactly the budget.
    assert parallel.optimize(study, reporting_objective, n_trials=3)
    assert study.trials[0].params == queued.params and "retry_history" not in study.trials[0].system_attrs
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_a_dead_trial_past_its_retries_is_replaced_so_the_study_still_ends_at_its_budget(tmp_path):
    storage = parallel.connect(f"sqlite:///{tmp_path}/study.db", heartbeat=1)
    study = optuna.create_study(storage=storage, direction="maximize")
    dead = study.ask()  # RUNNING, as a killed process leaves it, and already retried as often as allowed
    storage.set_trial_system_attr(dead._trial_id, "retry_history", list(range(parallel.MAX_RETRY)))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(parallel.GRACE + 1)  # its heartbeat (every second) is stale
    assert parallel.run_trials(study, reporting_objective, n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_bad_storage_url_is_one_line_without_the_password():
    with pytest.raises(parallel.StorageError) as error:
        parallel.connect("postgresql://user:secret@127.0.0.1:9/none", heartbeat=10)
    assert "secret" not in str(error.value) and "***" in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_parallel_imports_neither_tune_nor_torch():
    code = "import sys, parallel; assert not {'tune', 'torch'} & set(sys.modules), sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ["garden.py", "train_loop.py", "tune.py", "report.py", "predict.py", "checkpoints.py",
                                    "benchmarks/search.py", "benchmarks/soak.py", "benchmarks/workers.py",
                                    "benchmarks/train_speed.py", "benchmarks/profile_step.py"])
def test_every_script_answers_help(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
