"""parallel.py on its own, with a toy objective (no MNIST, no tune.py): budget, Ctrl-C, storage errors."""
import os
import signal
import socket
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


def optimize(study, objective, n_trials, stops):
    """As tune.run_trials runs a study: trials until the study holds n_trials in all."""
    budget = parallel.Budget(n_trials, stops)
    if budget.trials_left(study):
        try:
            study.optimize(objective, callbacks=[budget], catch=[parallel.PastBudget], timeout=60)  # never forever
        except parallel.Stopped:
            pass


def test_the_budget_is_the_studys_total_and_a_rerun_adds_nothing(tmp_path):
    study = sqlite_study(tmp_path)
    optimize(study, reporting_objective, 5, parallel.Stops())
    optimize(sqlite_study(tmp_path), reporting_objective, 5, parallel.Stops())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    optimize(sqlite_study(tmp_path), reporting_objective, 7, parallel.Stops())  # "7 in all", not "7 more"
    assert len(study.trials) == 7


def test_a_trial_past_the_budget_fails_untrained_with_its_reason():
    study = optuna.create_study()
    first, second, third = study.ask(), study.ask(), study.ask()  # three workers asked at once for a budget of 2
    for trial in (first, second):
        parallel.claim(trial, 2)
    with pytest.raises(parallel.PastBudget):
        parallel.claim(third, 2)
    assert third.user_attrs["fail_reason"].startswith("not trained: another worker took the last trial")
    assert first.user_attrs["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    study.tell(third, state=TrialState.FAIL)  # as study.optimize(catch=[parallel.PastBudget]) tells it
    study.tell(second, state=TrialState.FAIL)  # a trial before the next one failed: the budget has room again
    parallel.claim(study.ask(), 2)


def test_ctrl_c_stops_the_trial_at_its_next_report_and_queues_it_as_it_is(tmp_path):
    study = sqlite_study(tmp_path)

    def stopped_at_step_2(trial):  # the protocol tune.py's objective follows
        x = trial.suggest_float("x", 0.0, 250.0)
        for step in range(5):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-trial
            trial.report(x, step)
            if stops.requested:
                raise stops.queue_again(trial)
        return x

    # Ctrl-C's default meaning, even when pytest runs with SIGINT ignored (a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with parallel.Stops() as stops, stops.trials_running():
            optimize(study, stopped_at_step_2, 3, stops)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stops.signal == signal.SIGINT
    [queued] = study.trials  # not FAIL and a copy: the trial itself, back in the queue
    assert queued.state == TrialState.WAITING and sorted(queued.intermediate_values) == [0, 1, 2]
    # The resume runs the same trial first (no retry used), then new ones, to exactly the budget.
    optimize(study, reporting_objective, 3, parallel.Stops())
    assert study.trials[0].params == queued.params and "retry_history" not in study.trials[0].system_attrs
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_a_signal_outside_the_trials_ends_the_process_at_once_with_128_plus_it():
    code = ("import os, signal, time, parallel\n"
            "with parallel.Stops():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and "SIGTERM: stopped" in result.stderr and "Traceback" not in result.stderr


def test_a_dead_trial_past_its_retries_is_replaced_so_the_study_still_ends_at_its_budget(tmp_path):
    storage = parallel.connect(f"sqlite:///{tmp_path}/study.db", heartbeat=1)
    study = optuna.create_study(storage=storage, direction="maximize")
    dead = study.ask()  # RUNNING, as a killed process leaves it, and already retried as often as allowed
    storage.set_trial_system_attr(dead._trial_id, "retry_history", list(range(parallel.MAX_RETRY)))
    storage.record_heartbeat(dead._trial_id)
    start = time.monotonic()
    optimize(study, reporting_objective, 1, parallel.Stops())  # waits for it: silent for 3 heartbeats, it is failed
    assert time.monotonic() - start >= parallel.GRACE
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_the_pruner_counts_a_retried_trial_once():
    def study_with_a_retried_trial(pruner):
        study = optuna.create_study(direction="maximize", pruner=pruner)
        x = optuna.distributions.FloatDistribution(0, 1)
        # The killed attempt (FAIL) and its retry both carry the rung record 0.1 of one configuration.
        for value, state in [(0.1, TrialState.FAIL), (0.1, TrialState.PRUNED), (0.5, TrialState.PRUNED),
                             (0.4, TrialState.PRUNED), (0.3, TrialState.PRUNED)]:
            study.add_trial(optuna.trial.create_trial(state=state, params={"x": value}, distributions={"x": x},
                                                      intermediate_values={2: value},
                                                      system_attrs={"completed_rung_0": value}))
        trial = study.ask({"x": x})
        for step in range(3):
            trial.report(0.45, step)  # at step 2: the 2nd best of 5 configurations, but of 6 records
        return trial.should_prune()

    halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    assert study_with_a_retried_trial(parallel.CountingRetriesOnce(halving))  # 5 compete: only the best goes on
    assert not study_with_a_retried_trial(halving)  # Optuna alone: 6 compete, the best two go on


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
                                    "benchmarks/train_speed.py", "benchmarks/profile_step.py", "benchmarks/phases.py",
                                    "benchmarks/gpu_check.py", "benchmarks/handwriting.py",
                                    "tests/mutations.py"])
def test_every_script_answers_help(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
