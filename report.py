"""What a study leaves for people to look at: trials.csv, a summary, PNG plots, TensorBoard runs, and
the artifacts optuna-dashboard shows.

    python report.py runs/mnist-mlp                  # redraw from runs/mnist-mlp/study.db
    python report.py runs/mnist-mlp --storage postgresql://user:password@host/optuna

tune.py calls the same functions after each study; run this file by hand to look at a study that
is still running elsewhere (on other workers or machines) without touching it: it only reads.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import warnings

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
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


def cannot_write(folder):
    """Make the folder if need be; None when files can be written there, else why not."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        return error.strerror or str(error)
    return None if os.access(folder, os.W_OK) else "not writable"


def with_output_folders(parser, args):
    """tune.py's --out, --artifacts and --storage, their defaults filled in; exit 2 if a folder cannot be written."""
    args.out = args.out or os.path.join("runs", args.study_name)
    args.artifacts = args.artifacts or os.path.join(args.out, "artifacts")
    for flag, folder in (("--out", args.out), ("--artifacts", args.artifacts)):
        if problem := cannot_write(folder):
            parser.error(f"{flag} {folder}: cannot write there ({problem}); pass another folder")
    args.storage = args.storage or sqlite_storage(args.out)
    return args


def sqlite_storage(out):
    """The storage a study uses unless --storage says otherwise: SQLite, in its output folder."""
    return f"sqlite:///{os.path.join(out, 'study.db')}"


def final_run(study, args, data):
    """What best.json records of the run that made it: study, trial, settings, data. A best.json that
    says the same of the run at hand holds its test accuracy already."""
    best = study.best_trial
    return {"study": study.study_name, "trial_number": best.number, "params": best.params, "sampler": args.sampler,
            "pruner": args.pruner, "epochs": args.epochs, "seed": best.user_attrs["seed"],
            "data_dir": os.path.abspath(args.data_dir),
            **{f"{split}_images": len(data[f"{split}_x"]) for split in ("train", "val", "test")}}


def save_final(out, model, hparams, result, data):
    """best_model.pt (for predict.py: weights on the CPU and the hparams), best.json with the versions
    that made it, each written whole or not at all; and final_model.png, the model at work."""
    import torch  # here: only the final test needs it, and it takes seconds to import
    result = {**result, "torch": torch.__version__, "optuna": optuna.__version__}
    state = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "hparams": hparams}
    replace_atomically(os.path.join(out, "best_model.pt"), lambda tmp: torch.save(state, tmp))
    replace_atomically(os.path.join(out, "best.json"), lambda tmp: write_text(tmp, json.dumps(result, indent=2)))
    with torch.inference_mode():
        guesses = model.eval()(data["test_x"]).argmax(dim=1).cpu()
    figure = final_model_picture(data["test_x"].cpu(), data["test_y"].cpu(), guesses, result)
    replace_atomically(os.path.join(out, "final_model.png"), lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    pyplot().close(figure)


def final_model_picture(images, labels, guesses, result):
    """The test digits the final model gets wrong, each with its guess, beside its confusion matrix."""
    plt = pyplot()
    figure = plt.figure(figsize=(12, 6))
    wrong = (guesses != labels).nonzero().flatten().tolist()
    shown = wrong[:40]  # drawn: 5 rows of 8
    for place, index in enumerate(shown):
        ax = figure.add_subplot(5, 16, place // 8 * 16 + place % 8 + 1)
        ax.imshow(images[index].view(28, 28), cmap="gray_r")
        ax.set_title(f"{labels[index].item()} as {guesses[index].item()}", fontsize=8, color="tab:red")
        ax.axis("off")
    confusion = [[int(((labels == true) & (guesses == guess)).sum()) for guess in range(10)] for true in range(10)]
    ax = figure.add_subplot(1, 2, 2)
    ax.imshow([[value ** 0.5 for value in row] for row in confusion], cmap="Blues")
    for true, row in enumerate(confusion):
        for guess, value in enumerate(row):
            ax.text(guess, true, value, ha="center", va="center", fontsize=7, color="white" if true == guess else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="guessed", ylabel="true digit",
           title=f"trial {result['trial_number']} retrained: test accuracy {result['test_accuracy']:.4f}")
    figure.suptitle(f"{len(shown)} of {len(wrong)} test digits it gets wrong (true as guessed)")
    return figure


def publish(study, out, artifacts):
    """Draw the plots; then record the study's files (trials.csv, plots, best.json, best_model.pt,
    final_model.png) as Optuna artifacts of the study, which optuna-dashboard lists and shows. A file
    is recorded once: again only when its bytes changed (Optuna cannot delete a record, so every
    record's file stays). Finished trials cannot be given artifacts (Optuna: UpdateFinishedTrialError),
    so the final model is the study's, named by its trial in best.json."""
    plots = save_plots(study, out)
    store = optuna.artifacts.FileSystemArtifactStore(artifacts)
    recorded, newly = {}, []  # file name -> the bytes of its latest record; the names recorded now
    for meta in optuna.artifacts.get_all_artifact_meta(study):
        try:
            with store.open_reader(meta.artifact_id) as reader:
                recorded[meta.filename] = reader.read()
        except ArtifactNotFound:  # another machine's, in its own --artifacts folder: share one (README)
            pass
    for name in ["trials.csv", *PLOTS, "best.json", "best_model.pt", "final_model.png"]:
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path, "rb") as file:
                if file.read() != recorded.get(name):
                    optuna.artifacts.upload_artifact(study_or_trial=study, file_path=path, artifact_store=store,
                                                     mimetype="application/octet-stream" if name.endswith(".pt") else None)
                    newly.append(name)
    print(f"drew {len(plots)} plots; {len(newly)} files newly recorded as "
          f"the study's artifacts (optuna-dashboard --artifact-dir {artifacts})", flush=True)


def tensorboard_folder(folder):
    """An argparse type for --tensorboard: the folder, once we know the optional package is there."""
    if importlib.util.find_spec("tensorboard") is None:
        raise argparse.ArgumentTypeError("it needs the tensorboard package: pip install tensorboard")
    return folder


def write_text(path, text):
    with open(path, "w") as file:
        file.write(text)


def holds(json_path, fields):
    """True when the JSON file exists and has each of these fields with these values."""
    if not os.path.exists(json_path):
        return False
    with open(json_path) as file:
        saved = json.load(file)
    return all(saved.get(name) == value for name, value in fields.items())


def write_trials_csv(df, out):
    """trials.csv from study.trials_dataframe(): a row per trial (number, state, value, params_*, user_attrs_*)."""
    if "duration" in df:
        # Seconds read better than "0 days 00:00:03"; a WAITING trial has none.
        df["duration"] = df["duration"].map(lambda duration: duration.total_seconds(), na_action="ignore")
    path = os.path.join(out, "trials.csv")
    replace_atomically(path, lambda tmp: df.to_csv(tmp, index=False))
    return path


def print_progress(study, trial):
    """A study.optimize callback: a line of progress for each finished trial."""
    print(progress_line(study, trial), flush=True)


def progress_line(study, trial):
    """One line for a finished trial: state, value, seconds, the best so far, and why it stopped."""
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    best = max((t.value for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])), default=None)
    why = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("pruned_reason") or ""
    if "resumed_from" in trial.user_attrs:
        why = f"resumed from {trial.user_attrs['resumed_from']} {why}"
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
    if counts[TrialState.WAITING]:
        lines.append("stopped: the running trial is queued again with its place saved; run the same command "
                     "to resume")
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        lines.append(f"best: trial {best.number}, val_accuracy {best.value:.4f}")
        lines += [f"    {name} = {value:.4g}" if isinstance(value, float) else f"    {name} = {value}"
                  for name, value in best.params.items()]
    return lines


class TrialCurves:
    """TensorBoard runs, one per trial (tune.py --tensorboard DIR): training loss, validation accuracy
    and learning rate at every step; when the trial ends, its hyperparameters, final state and value for
    TensorBoard's HParams view. A trial stopped and resumed later goes on in its run; so does the retry
    of a killed trial (its run is named by the trial it retries). With folder None it writes nothing."""

    def __init__(self, folder):
        self.folder, self.writers = folder, {}

    def writer(self, trial, step=None):
        """The trial's writer, opened at its first step in this process. From there on the run's
        older events are hidden (TensorBoard's purge_step): a resumed run's steps appear once."""
        number = run_number(trial)
        if number not in self.writers:
            from torch.utils.tensorboard import SummaryWriter  # optional, so loaded here: tune.py checks for it
            self.writers[number] = SummaryWriter(os.path.join(self.folder, f"trial-{number:04d}"), purge_step=step)
        return self.writers[number]

    def add(self, trial, val):
        if self.folder is not None:
            writer = self.writer(trial, val.step)
            writer.add_scalar("train_loss", val.train_loss, val.step)
            writer.add_scalar("val_accuracy", val.accuracy, val.step)
            writer.add_scalar("learning_rate", val.learning_rate, val.step)

    def end(self, study, trial):
        """A study.optimize callback: the finished trial's HParams session,
        with its hyperparameters as they are typed (TensorBoard's own hparams_pb: booleans stay
        booleans) and its true final state; status SUCCESS for a COMPLETE trial, FAILURE otherwise."""
        if self.folder is None or not trial.params:  # not trained: past the budget
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
        writer = self.writer(trial)
        value = trial.value if trial.value is not None else trial.intermediate_values.get(trial.last_step, math.nan)
        writer.file_writer.add_summary(summary_v2.hparams_pb({**trial.params, "state": trial.state.name}))
        writer.add_scalar("hparam/val_accuracy", value, trial.last_step or 0)
        end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS if trial.state == TrialState.COMPLETE else api_pb2.STATUS_FAILURE))
        writer.file_writer.add_summary(Summary(value=[Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))]))
        writer.close()
        del self.writers[run_number(trial)]

    def __enter__(self):
        return self

    def __exit__(self, *error):
        for writer in self.writers.values():  # trials that stopped: their runs go on at the resume
            writer.close()


def run_number(trial):
    """The TensorBoard run a trial writes to: a retry goes on in its first attempt's run."""
    return trial.user_attrs.get("retry_of", trial.number)


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
    # Parameters in name order: with few trials importances tie, and ties came in an order that
    # Python's string hashing changes from run to run, so each redraw was another picture.
    trials = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    return optuna_plots().plot_param_importances(study, params=sorted(optuna.search_space.intersection_search_space(trials)))


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
    storage = args.storage or sqlite_storage(args.out)
    if not args.storage and not os.path.exists(os.path.join(args.out, "study.db")):
        parser.exit(2, f"report.py: error: no study.db in {args.out}; pass the folder tune.py wrote, or --storage\n")
    try:
        study = optuna.load_study(study_name=args.study_name, storage=storage)
    except Exception as error:  # unknown study name, unreachable server, malformed URL
        parser.exit(2, f"report.py: error: cannot load study {args.study_name!r}: {str(error).splitlines()[0]}\n")
    print("\n".join(summary(study)))
    print(f"wrote {write_trials_csv(study.trials_dataframe(), args.out)} and {', '.join(save_plots(study, args.out)) or 'no plots'}")


if __name__ == "__main__":
    main()
