"""What a study leaves for people to look at: trials.csv, a summary, and four PNG plots.

    python report.py runs/mnist-mlp                  # redraw from runs/mnist-mlp/study.db
    python report.py runs/mnist-mlp --storage postgresql://user:password@host/optuna

tune.py calls the same functions after each study; run this file by hand to look at a study that
is still running elsewhere (on other workers or machines) without touching it: it only reads.
"""
import argparse
import os
import sys
import warnings

import optuna
from optuna.trial import TrialState

# Optuna marks its matplotlib plots experimental: the warning says nothing about our data.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def replace_atomically(path, write):
    """write(tmp_path), which writes and closes that file, then rename it over `path`: a reader
    sees the old file or the new, never half of one."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_text(path, text):
    with open(path, "w") as file:
        file.write(text)


def write_trials_csv(study, out):
    """One row per trial: number, state, value, params_*, user_attrs_* (best/last val accuracy, seed...)."""
    df = study.trials_dataframe()
    if "duration" in df:
        df["duration"] = df["duration"].dt.total_seconds()  # seconds read better than "0 days 00:00:03"
    path = os.path.join(out, "trials.csv")
    replace_atomically(path, lambda tmp: df.to_csv(tmp, index=False))
    return path


def progress_line(study, trial):
    """One line for a finished trial: state, value, seconds, the best so far, and why it stopped."""
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    best = max((t.value for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])), default=None)
    why = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("pruned_reason") or ""
    return (f"trial {trial.number:3d} {trial.state.name:8s} val_accuracy {value}  {seconds:5.1f} s  "
            f"best {'-' if best is None else format(best, '.4f')}  {why}").rstrip()


def summary(study):
    """Counts by state, then the best trial, as lines of text."""
    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    lines = [f"study {study.study_name!r}: {finished} finished ({counts[TrialState.COMPLETE]} complete, "
             f"{counts[TrialState.PRUNED]} pruned), {counts[TrialState.FAIL]} failed, "
             f"{counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} waiting"]
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        lines.append(f"best: trial {best.number}, val_accuracy {best.value:.4f}")
        lines += [f"    {name} = {value:.4g}" if isinstance(value, float) else f"    {name} = {value}"
                  for name, value in best.params.items()]
    return lines


LEGEND_LIMIT = 20  # past this many trials, a legend entry per trial would run off the figure


def pyplot():
    """matplotlib, loaded on first use: processes that only train (tune.py's workers) never pay for it."""
    import matplotlib
    matplotlib.use("Agg")  # draw into files; there may be no display (servers, CI, ssh)
    import matplotlib.pyplot as plt
    return plt


def optuna_plots():
    from optuna.visualization import matplotlib as plots
    return plots


def optimization_history(study):
    return optuna_plots().plot_optimization_history(study)


def param_importances(study):
    return optuna_plots().plot_param_importances(study)


def intermediate_values(study):
    """Optuna's learning curves; for a big study one colour per state instead of one legend entry per trial."""
    ax = optuna_plots().plot_intermediate_values(study)
    if len(ax.get_lines()) > LEGEND_LIMIT:
        states = {trial.number: trial.state for trial in study.get_trials(deepcopy=False)}
        colours = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:orange", TrialState.RUNNING: "tab:gray"}
        shown = set()
        for line in ax.get_lines():  # Optuna labels each line "Trial<number>"
            state = states[int(line.get_label().removeprefix("Trial"))]
            line.set(color=colours[state], alpha=0.5, marker="")
            shown.add(state)
        ax.legend(handles=[pyplot().Line2D([], [], color=colour, label=state.name.lower())
                           for state, colour in colours.items() if state in shown], loc="lower right")
    return ax


def value_histogram(study):
    values = [t.value for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])]
    _, ax = pyplot().subplots()
    ax.hist(values, bins=20)
    ax.set(title="Validation accuracy of completed trials", xlabel="val_accuracy", ylabel="trials")
    return ax


# file name -> (how to draw it, completed trials it needs to say anything)
PLOTS = {
    "optimization_history.png": (optimization_history, 1),
    "intermediate_values.png": (intermediate_values, 1),
    "param_importances.png": (param_importances, 2),
    "value_histogram.png": (value_histogram, 1),
}


def save_plots(study, out):
    """Draw each plot into `out`; one that cannot be drawn yet is a warning, not a crash."""
    n_complete = len(study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]))
    saved = []
    for name, (plot, needed) in PLOTS.items():
        if n_complete < needed:
            print(f"warning: {name} not drawn: it needs {needed} completed trials, the study has {n_complete}",
                  file=sys.stderr)
            continue
        try:
            figure = plot(study).figure
        except (ValueError, RuntimeError) as error:  # e.g. importances when every trial has one value
            print(f"warning: {name} not drawn: {error}", file=sys.stderr)
            continue
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        replace_atomically(os.path.join(out, name), lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
        pyplot().close(figure)
        saved.append(name)
    return saved


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write trials.csv and the plots of an existing study.")
    parser.add_argument("out", help="the study's output folder, e.g. runs/mnist-mlp")
    parser.add_argument("--storage", help="storage URL (default: sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default="mnist-mlp", help="(default: mnist-mlp)")
    args = parser.parse_args(argv)
    storage = args.storage or f"sqlite:///{os.path.join(args.out, 'study.db')}"
    if not args.storage and not os.path.exists(os.path.join(args.out, "study.db")):
        parser.exit(2, f"report.py: error: no study.db in {args.out}; pass the folder tune.py wrote, or --storage\n")
    try:
        study = optuna.load_study(study_name=args.study_name, storage=storage)
    except Exception as error:  # unknown study name, unreachable server, malformed URL
        parser.exit(2, f"report.py: error: cannot load study {args.study_name!r}: {str(error).splitlines()[0]}\n")
    print("\n".join(summary(study)))
    print(f"wrote {write_trials_csv(study, args.out)} and {', '.join(save_plots(study, args.out)) or 'no plots'}")


if __name__ == "__main__":
    main()
