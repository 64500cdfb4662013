"""Checkpoints inside a trial, kept in an Optuna artifact store: a killed or stopped trial goes on where it was.

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

Used by tune.py; imports nothing from it. `python checkpoints.py STORE_DIR` lists a store's files.
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

from train_loop import checkpoint_problem


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
