"""Do the tests fail when what they guard breaks? Each mutation below is a one-line break of the code
(a feature removed, a number changed); this script applies each to a fresh copy of the repository,
runs the tests that guard it, and reports which breaks the tests let through.

    python tests/mutations.py                # all of them: about 30 minutes on 2 cores
    python tests/mutations.py --only worker  # those whose name contains "worker"
    python tests/mutations.py --list

A break "survives" when its tests still pass: then a test is missing, or checks too little. The
report lists every break; the exit code is 1 if any survived. Not part of CI's run (it takes long);
run it after changing tests or the code they guard, and add a line here for each new guarantee.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, the line's text as it is, as broken, the tests that must catch it)
MUTATIONS = {
    "best model file deleted after the final retrain": (
        "report.py", 'replace_atomically(os.path.join(out, "best_model.pt"),',
        'replace_atomically(os.path.join(out, ".gone.pt"),', ["tests/test_stops.py", "-k", "every_file_named"]),
    "worker crashes at start-up": (
        "parallel.py", "        target(*args, worker=worker, stops=stops)", "        raise RuntimeError('broken worker')",
        ["tests/test_parallel.py", "-k", "two_workers_share"]),
    "final retrain of the worst trial": (
        "tune.py", "    best = study.best_trial",
        "    best = min(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]), key=lambda t: t.value)",
        ["tests/test_tune.py", "-k", "best_json", "tests/test_results.py", "-k", "best_json"]),
    "best.json reused whatever the study, trial and data": (
        "report.py", "    return all(saved.get(name) == value for name, value in fields.items())", "    return True",
        ["tests/test_tune.py", "-k", "best_json"]),
    "a stopped trial marked FAIL instead of queued again": (
        "parallel.py", "        storage.set_trial_state_values(trial_id, state=TrialState.WAITING)",
        "        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)",
        ["tests/test_parallel.py", "-k", "ctrl_c_with_two_workers"]),
    "pixels not normalised": (
        "train_loop.py", '        data[f"{name}_x"], data[f"{name}_y"] = (pixels / 255 - MNIST_MEAN) / MNIST_STD, labels[index].to(device)',
        '        data[f"{name}_x"], data[f"{name}_y"] = pixels / 255, labels[index].to(device)',
        ["tests/test_train_loop.py", "-k", "normalised"]),
    "a second signal does not stop at once": (
        "parallel.py", "        os._exit(128 + signum)", "        return",
        ["tests/test_parallel.py", "-k", "second_signal and signals1"]),
    "Nesterov asked without momentum": (
        "tune.py", '        "nesterov": momentum > 0 and trial.suggest_categorical("nesterov", [True, False]),',
        '        "nesterov": trial.suggest_categorical("nesterov", [True, False]),',
        ["tests/test_tune.py", "-k", "never_builds"]),
    "plots drawn blank": (
        "report.py", "            figure = plot(study).figure", "            figure = pyplot().figure()",
        ["tests/test_results.py", "-k", "plots_draw"]),
    "a study's settings not checked on resume": (
        "parallel.py", "        if settings.get(name) != value:", "        if False:",
        ["tests/test_tune.py", "-k", "keeps_its_settings"]),
    "--timeout ignored": (
        "tune.py", "                           timeout=args.timeout, catch=[parallel.PastBudget],",
        "                           timeout=None, catch=[parallel.PastBudget],", ["tests/test_tune.py", "-k", "timeout"]),
    "the pruner's first rung moved": (
        "tune.py", "        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)",
        "        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)",
        ["tests/test_tune.py", "-k", "default_pruner"]),
    "no reason kept for a nan trial": (
        "tune.py", '            trial.set_user_attr("pruned_reason", str(error).splitlines()[0][:200])', "            pass",
        ["tests/test_tune.py", "-k", "nan"]),
    "resumed_from not kept": (
        "checkpoints.py", """        self.trial.set_user_attr("resumed_from", f"trial {saved['trial']} after {where(saved)}")""",
        "        pass", ["tests/test_checkpoints.py", "-k", "kill_9"]),
    "checkpoint listing off by one epoch": (
        "checkpoints.py", """        return f"epoch {saved['epoch']}\"""", """        return f"epoch {saved['epoch'] + 1}\"""",
        ["tests/test_checkpoints.py", "-k", "lists"]),
    "EXIF rotation ignored": (
        "predict.py", "            image = ImageOps.exif_transpose(image)", "            pass",
        ["tests/test_predict.py", "-k", "exif"]),
    "CPU random state not restored": (
        "checkpoints.py", '    torch.set_rng_state(random_state["cpu"])', "    pass",
        ["tests/test_train_loop.py", "-k", "resumed"]),
    "one trial past the budget trained": (
        "parallel.py", "    if sum(t.number < trial.number and t.state != TrialState.FAIL for t in trials) >= n_trials:",
        "    if sum(t.number < trial.number and t.state != TrialState.FAIL for t in trials) > n_trials:",
        ["tests/test_machinery.py", "-k", "past_the_budget"]),
    "the budget never stops the study": (
        "parallel.py", "            study.stop()", "            pass", ["tests/test_machinery.py", "-k", "budget_is"]),
    "dropout left on in validation": (
        "train_loop.py", "    model.eval()  # dropout off", "    pass", ["tests/test_train_loop.py", "-k", "evaluate"]),
    "validation on the test set": (
        "train_loop.py", '            yield Validation(step, epoch + 1, batch, evaluate(model, data["val_x"], data["val_y"]), train_loss,',
        '            yield Validation(step, epoch + 1, batch, evaluate(model, data["test_x"], data["test_y"]), train_loss,',
        ["tests/test_results.py", "-k", "exactly_once"]),
    "TensorBoard says COMPLETE for every trial": (
        "report.py", '        writer.file_writer.add_summary(summary_v2.hparams_pb({**trial.params, "state": trial.state.name}))',
        '        writer.file_writer.add_summary(summary_v2.hparams_pb({**trial.params, "state": "COMPLETE"}))',
        ["tests/test_checkpoints.py", "-k", "tensorboard"]),
    "a stop removes the trial's checkpoint": (
        "checkpoints.py", "        if error_type is None or issubclass(error_type, Exception):", "        if True:",
        ["tests/test_stops.py", "-k", "sigterm_mid"]),
    "a stop saves no checkpoint of its step": (
        "tune.py", "                if val.epoch_end or stops.requested:  # a crash's retry goes on from the last epoch's end",
        "                if val.epoch_end:", ["tests/test_stops.py", "-k", "sigterm_mid"]),
    "a retry without its dead attempt's reports": (
        "parallel.py", "    optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY, inherit_intermediate_values=True)(study, trial)",
        "    optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)(study, trial)",
        ["tests/test_checkpoints.py", "-k", "kill_9"]),
    "the pruner counts a retried trial twice": (
        "parallel.py", "        return [t for t in self.study.get_trials(deepcopy=deepcopy, states=states) if t.state != TrialState.FAIL]",
        "        return self.study.get_trials(deepcopy=deepcopy, states=states)",
        ["tests/test_machinery.py", "-k", "counts_a_retried"]),
    "workers not told when their parent dies": (
        "parallel.py", "    threading.Thread(target=stop_when_orphaned, args=(parent,), daemon=True).start()", "    pass",
        ["tests/test_stops.py", "-k", "parent_of_two and kill"]),
    "the sampler not seeded": (
        "tune.py", "    study.sampler = sampler(seed=int(seed))", "    study.sampler = sampler()",
        ["tests/test_tune.py", "-k", "identical_values"]),
    "a resumed study repeats its configurations": (
        "tune.py", "    seed = np.random.SeedSequence([args.seed, worker, len(study.get_trials(deepcopy=False))]).generate_state(1)[0]",
        "    seed = np.random.SeedSequence([args.seed, worker, 0]).generate_state(1)[0]",
        ["tests/test_tune.py", "-k", "draws_new"]),
    "a finished trial's checkpoint left behind": (
        "checkpoints.py", "            self.save(None)", "            pass", ["tests/test_checkpoints.py", "-k", "no_checkpoint_is_left"]),
}


def copy_of_repository(folder):
    """The files git knows or would add (tracked, and untracked but not ignored), as they are now."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for name in names:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))


def run(name, timeout):
    """'caught' if the guarding tests fail with the break in place, 'SURVIVED' if they pass."""
    path, line, broken, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory() as folder:
        copy_of_repository(folder)
        with open(os.path.join(folder, path)) as file:
            text = file.read()
        if text.count(line) != 1:
            return f"NOT APPLIED: the line is in {path} {text.count(line)} times, not once"
        with open(os.path.join(folder, path), "w") as file:
            file.write(text.replace(line, broken))
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                    cwd=folder, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught (the tests did not end)"
        if result.returncode == 5:
            return "NOT RUN: no test selected"
        return "caught" if result.returncode else "SURVIVED"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose name contains this (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutation's tests (default: 600)")
    args = parser.parse_args()
    names = [name for name in MUTATIONS if not args.only or args.only in name]
    if args.list:
        return print("\n".join(names))
    outcomes = {}
    for name in names:
        start = time.monotonic()
        outcomes[name] = run(name, args.timeout)
        print(f"{outcomes[name]:<32} {time.monotonic() - start:5.0f} s  {name}", flush=True)
    survived = [name for name, outcome in outcomes.items() if not outcome.startswith("caught")]
    print(f"\n{len(outcomes) - len(survived)} of {len(outcomes)} breaks caught" +
          (f"; not caught: {', '.join(survived)}" if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
