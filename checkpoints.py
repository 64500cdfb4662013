"""Checkpoints inside a trial, kept as Optuna artifacts: a killed trial's retry goes on from its last epoch.

    store = optuna.artifacts.FileSystemArtifactStore("runs/mnist-mlp/artifacts")
    keeper = checkpoints.Keeper(trial, store, device)           # in the objective
    train(model, data, hparams, trial, resume=keeper.resume(), save=keeper.save)
    checkpoints.remove_finished(study, store)                    # after each trial: a flat disk

How a retry finds its parent's checkpoint: every save uploads a new artifact (a file in the store,
listed on the trial: optuna-dashboard --artifact-dir shows it), records its id in the trial's user
attribute "checkpoint", then removes the previous one. When a process dies, Optuna's
RetryHeartbeatStaleTrialCallback queues its trial again with the same parameters and user
attributes (parallel.py does the same on Ctrl-C), so the retry starts with the id of the dead
trial's last checkpoint, and train() goes on from there: model, optimizer, learning-rate schedule
and random states, so it ends exactly as the uninterrupted trial would have (same machine).

Used by tune.py; imports nothing from it. `python checkpoints.py STORE_DIR` lists a store's files.
"""
import argparse
import contextlib
import io
import os
import tempfile

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState


class Keeper:
    """One trial's checkpoints: the one it inherits (if it retries a killed trial), then its own."""

    def __init__(self, trial, store, device):
        self.trial, self.store, self.device = trial, store, device
        self.artifact_id = trial.user_attrs.get("checkpoint")  # inherited from a killed trial, or None

    def resume(self):
        """The inherited checkpoint as a dict for train(resume=...), or None for a fresh trial."""
        if self.artifact_id is None:
            return None
        try:
            with self.store.open_reader(self.artifact_id) as reader:
                saved = torch.load(io.BytesIO(reader.read()), map_location=self.device, weights_only=True)
        except ArtifactNotFound:  # removed by hand, or another --artifacts folder: start afresh
            self.artifact_id = None
            return None
        self.trial.set_user_attr("resumed_from", f"trial {saved['trial']} after epoch {saved['epochs_done']}")
        return saved

    def save(self, checkpoint):
        """Upload the checkpoint as a new artifact of this trial, point the trial at it, drop the old one."""
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"trial-{self.trial.number}-epoch-{checkpoint['epochs_done']}.pt")
            torch.save({**checkpoint, "trial": self.trial.number}, path)
            artifact_id = optuna.artifacts.upload_artifact(artifact_store=self.store, file_path=path,
                                                           study_or_trial=self.trial)
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
