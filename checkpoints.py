"""Checkpoints inside a trial: what one holds, and how they are kept in an Optuna artifact store, so
that a killed or stopped trial goes on where it was.

    saved = checkpoint(model, optimizer, schedule, hparams, ...)  # train() makes one; restore() loads it
    store = optuna.artifacts.FileSystemArtifactStore("runs/mnist-mlp/artifacts")
    keeper = checkpoints.Keeper(trial, store, device)           # in the objective
    train(model, data, hparams, trial, resume=keeper.resume(), save=keeper.save)
    checkpoints.remove_finished(study, store)                    # after each trial: a flat disk

How a retry finds its checkpoint: every save writes a new file to the store, records its name in the
trial's user attribute "checkpoint", then removes the previous one. When a process dies, Optuna's
RetryHeartbeatStaleTrialCallback queues its trial again with the same parameters and user
attributes, so the retry starts with the name of the dead trial's last checkpoint (from the end of
an epoch); a trial stopped by SIGTERM or Ctrl-C is put back in the queue as it is (parallel.py),
with a checkpoint of the very step it stopped at. train() goes on from there: model, optimizer,
learning-rate schedule, the epoch's shuffle and random states, so it ends exactly as the
uninterrupted trial would have (same machine). A checkpoint that cannot be read is a warning and
a fresh start of its trial.

Used by train_loop.py and tune.py; imports neither. `python checkpoints.py STORE_DIR` lists a store's files.
"""
import argparse
import contextlib
import io
import os
import sys
import uuid

import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

# ---------------------------------------------------------------------------- what a checkpoint holds
CHECKPOINT_FORMAT = 2  # checkpoints of another format (1: no "step" yet) start their trial afresh
CHECKPOINT_KEYS = ("state_dict", "hparams", "optimizer", "schedule", "random_state", "order", "epochs_done", "step",
                   "report", "best_val_accuracy", "val_accuracy", "train_loss")


def checkpoint(model, optimizer, schedule, hparams, order=None, **counters):
    """All that train() needs to go on, as one dict for torch.save. `counters`: epochs_done, step
    (steps done in the next epoch, 0 at an epoch's end, else that epoch's shuffle is `order`),
    report, best_val_accuracy, val_accuracy, train_loss. It loads with predict.py too: "state_dict"
    and "hparams" describe the model."""
    device = next(model.parameters()).device
    random_state = {"cpu": torch.get_rng_state()}  # shuffles and dropout on the CPU
    if device.type == "cuda":  # shuffles and dropout on a GPU draw from that GPU's generator
        random_state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        random_state["mps"] = torch.mps.get_rng_state()
    return {"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "hparams": hparams,
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "random_state": random_state,
            "order": order, **counters}


def checkpoint_problem(saved):
    """Why `saved` (whatever torch.load read) is not a checkpoint train() can go on from, or None."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format", "none") if isinstance(saved, dict) else type(saved).__name__
        return f"format {found}, this version reads format {CHECKPOINT_FORMAT}"
    missing = [key for key in CHECKPOINT_KEYS if key not in saved]
    return f"missing {', '.join(missing)}" if missing else None


def restore(saved, model, optimizer, schedule):
    """Load a `checkpoint` into the model, optimizer, schedule and random generators; return the counters."""
    model.load_state_dict(saved["state_dict"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    device = next(model.parameters()).device
    random_state = {name: state.cpu() for name, state in saved["random_state"].items()}  # as the setters want them
    torch.set_rng_state(random_state["cpu"])
    saved_on = next((name for name in random_state if name != "cpu"), "cpu")
    if saved_on == device.type == "cuda":
        torch.cuda.set_rng_state(random_state["cuda"], device)
    elif saved_on == device.type == "mps":
        torch.mps.set_rng_state(random_state["mps"])
    elif saved_on != device.type:
        # Another kind of device draws other random numbers: the run goes on, seeded from the saved
        # CPU state (the same seed at every retry), but not bit for bit as it would have gone on there.
        seed = int(torch.randint(2 ** 62, (), generator=torch.Generator().set_state(random_state["cpu"])))
        if device.type == "cuda":
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
        print(f"warning: the checkpoint was saved on {saved_on}, this run is on {device.type}: it goes on from "
              "there, but is exact only on the same kind of device", file=sys.stderr)
    return tuple(saved[key] for key in ("epochs_done", "step", "report", "best_val_accuracy", "val_accuracy",
                                        "train_loss"))


# ---------------------------------------------------------------------------- where it is kept
class Keeper:
    """One trial's checkpoints: the one it inherits (if it retries a killed trial), then its own."""

    def __init__(self, trial, store, device):
        self.trial, self.store, self.device = trial, store, device
        self.artifact_id = trial.user_attrs.get("checkpoint")  # inherited, or None

    def resume(self):
        """The inherited checkpoint as a dict for train(resume=...), or None for a fresh trial. One
        that cannot be read (cut short, not a torch file, another format, keys missing, removed by
        hand) means a warning line and a fresh start, never a crash."""
        if self.artifact_id is None:
            return None
        try:
            with self.store.open_reader(self.artifact_id) as reader:
                saved = torch.load(io.BytesIO(reader.read()), map_location=self.device, weights_only=True)
            problem = checkpoint_problem(saved)
        except Exception as error:  # whatever a damaged file makes torch.load (or the store) raise
            problem = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        if problem:
            print(f"warning: trial {self.trial.number}: its checkpoint {self.artifact_id} cannot be used ({problem}); "
                  "the trial starts afresh", file=sys.stderr, flush=True)
            return None  # (the file goes at this trial's first save, as an outgrown checkpoint does)
        where = (f"epoch {saved['epochs_done']}" if saved["step"] == 0
                 else f"report {saved['report'] - 1} (epoch {saved['epochs_done'] + 1}, batch {saved['step']})")
        self.trial.set_user_attr("resumed_from", f"trial {saved['trial']} after {where}")
        return saved

    def save(self, checkpoint):
        """Write the checkpoint as a new file of the store, point the trial at it, drop the old one.
        Until the trial points at it, a retry uses the old one: a save cut short is never "the latest".
        Checkpoints are files of the store, not artifacts recorded on the trial (upload_artifact):
        Optuna cannot delete such a record, and these files come and go every epoch."""
        artifact_id = f"trial-{self.trial.number}-{uuid.uuid4().hex}.pt"
        buffer = io.BytesIO()
        torch.save({**checkpoint, "trial": self.trial.number}, buffer)
        buffer.seek(0)
        self.store.write(artifact_id, buffer)
        self.trial.set_user_attr("checkpoint", artifact_id)  # from here on, a retry starts from this one
        remove(self.store, self.artifact_id)
        self.artifact_id = artifact_id


def remove(store, artifact_id):
    if artifact_id is not None:
        with contextlib.suppress(ArtifactNotFound):  # already removed (by another worker)
            store.remove(artifact_id)


def remove_finished(study, store):
    """Remove the checkpoints of COMPLETE and PRUNED trials, except the best trial's last one: its
    final model (loadable by predict.py --model). Checkpoints that a RUNNING or WAITING trial holds
    stay; so do those of FAIL trials, which a retry takes over (and removes at its next save)."""
    trials = study.get_trials(deepcopy=False)
    keep = {t.user_attrs.get("checkpoint") for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    if any(t.state == TrialState.COMPLETE for t in trials):
        keep.add(study.best_trial.user_attrs.get("checkpoint"))
    for trial in trials:
        artifact_id = trial.user_attrs.get("checkpoint")
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and artifact_id not in keep:
            remove(store, artifact_id)


def main():
    parser = argparse.ArgumentParser(description="List the checkpoints in an artifact store (tune.py --artifacts).")
    parser.add_argument("store", help="the folder, e.g. runs/mnist-mlp/artifacts")
    folder = parser.parse_args().store
    if not os.path.isdir(folder):
        parser.exit(2, f"checkpoints.py: error: {folder} is not a folder; pass tune.py's --artifacts folder\n")
    for name in sorted(os.listdir(folder)):
        try:
            saved = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            print(f"{name}: trial {saved['trial']} after epoch {saved['epochs_done']}, "
                  f"val_accuracy {saved['val_accuracy']:.4f}")
        except Exception:  # another kind of artifact
            print(f"{name}: not a checkpoint")


if __name__ == "__main__":
    main()
