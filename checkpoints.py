"""Checkpoints inside a trial: what one holds, and how they are kept in an Optuna artifact store, so
that a killed or stopped trial goes on where it was.

    store = optuna.artifacts.FileSystemArtifactStore("runs/mnist-mlp/artifacts")
    with checkpoints.Keeper(trial, store) as keeper:              # in the objective (tune.py)
        for val in train(model, data, hparams, resume=keeper.resume()):
            if val.epoch_end:
                keeper.save(val.checkpoint())                     # checkpoint(), below, made by train()

How a retry finds its checkpoint: every save writes a new file to the store, records its name in the
trial's user attribute "checkpoint", then removes the previous one. When a process dies, Optuna's
RetryHeartbeatStaleTrialCallback queues its trial again with the same parameters and user
attributes, so the retry starts with the name of the dead trial's last checkpoint (from the end of
an epoch); a trial stopped by SIGTERM or Ctrl-C is put back in the queue as it is (parallel.py), with
a checkpoint of the very validation it stopped at. train() goes on from there: model, optimizer,
learning-rate schedule, the epoch's shuffle and random states, so it ends exactly as the
uninterrupted trial would have (same machine). A checkpoint that cannot be read is a warning and a
fresh start of its trial. No trial names a file that is gone: a trial that ends removes its last
checkpoint and clears its attribute; the one a killed attempt names stays (its FAIL trial can no
longer be changed), and is the only kind left behind.

Imports neither train_loop.py nor tune.py. `python checkpoints.py STORE_DIR` lists a store's checkpoints.
"""
import argparse
import contextlib
import io
import os
import sys
import uuid

import torch
from optuna.artifacts.exceptions import ArtifactNotFound

# ---------------------------------------------------------------------------- what a checkpoint holds
CHECKPOINT_FORMAT = 3  # checkpoints of another format (2: counters named otherwise) start their trial afresh
CHECKPOINT_KEYS = ("state_dict", "hparams", "optimizer", "schedule", "random_state", "epoch", "batch", "order", "step")


def checkpoint(model, optimizer, schedule, hparams, epoch, batch, order, step):
    """All that train() needs to go on, as one dict for torch.save: go on in `epoch` (from 0) after
    `batch` of its batches (0: at its start; else that epoch's shuffle is `order`), the next validation
    being `step`. It loads with predict.py --model too: "state_dict" and "hparams" describe the model."""
    device = next(model.parameters()).device
    random_state = {"cpu": torch.get_rng_state()}  # shuffles and dropout on the CPU
    if device.type == "cuda":  # shuffles and dropout on a GPU draw from that GPU's generator
        random_state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        random_state["mps"] = torch.mps.get_rng_state()
    return {"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "hparams": hparams,
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "random_state": random_state,
            "epoch": epoch, "batch": batch, "order": order, "step": step}


def checkpoint_problem(saved):
    """Why `saved` (whatever torch.load read) is not a checkpoint train() can go on from, or None."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format", "none") if isinstance(saved, dict) else type(saved).__name__
        return f"format {found}, this version reads format {CHECKPOINT_FORMAT}"
    missing = [key for key in CHECKPOINT_KEYS if key not in saved]
    return f"missing {', '.join(missing)}" if missing else None


def restore(saved, model, optimizer, schedule):
    """Load a `checkpoint` into the model, optimizer, schedule and random generators; return where
    to go on: (epoch, batch, step, order)."""
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
    return saved["epoch"], saved["batch"], saved["step"], saved["order"]


def where(saved):
    """Where a checkpoint goes on from, in words: 'epoch 2', or 'step 9 (epoch 3, batch 105)'."""
    if saved["batch"] == 0:
        return f"epoch {saved['epoch']}"
    return f"step {saved['step'] - 1} (epoch {saved['epoch'] + 1}, batch {saved['batch']})"


# ---------------------------------------------------------------------------- where it is kept
class Keeper:
    """One trial's checkpoints: the one it inherits (it retries a killed trial, or goes on after a
    stop), then its own. Used as `with Keeper(trial, store) as keeper:` around the trial's training."""

    def __init__(self, trial, store):
        self.trial, self.store = trial, store
        self.artifact_id = trial.user_attrs.get("checkpoint")  # inherited, or None

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        """The trial ended (returned, pruned, failed): nothing is left to go on from, so its checkpoint
        goes. Left by a BaseException (parallel.Stopped, a Ctrl-C), it stays: the trial goes on later."""
        if error_type is None or issubclass(error_type, Exception):
            self.save(None)

    def resume(self):
        """The inherited checkpoint as a dict for train(resume=...), or None for a fresh trial. One
        that cannot be read (cut short, not a torch file, another format, keys missing, removed by
        hand) means a warning line and a fresh start, never a crash."""
        if self.artifact_id is None:
            if "retry_of" in self.trial.user_attrs:  # a retry of a trial killed before its first checkpoint
                self.trial.set_user_attr("resumed_from", "started afresh: no checkpoint")
            return None
        try:
            with self.store.open_reader(self.artifact_id) as reader:
                saved = torch.load(io.BytesIO(reader.read()), map_location="cpu", weights_only=True)
            problem = checkpoint_problem(saved)
        except Exception as error:  # whatever a damaged file makes torch.load (or the store) raise
            problem = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        if problem:
            print(f"warning: trial {self.trial.number}: its checkpoint {self.artifact_id} cannot be used ({problem}); "
                  "the trial starts afresh", file=sys.stderr, flush=True)
            self.trial.set_user_attr("resumed_from", f"started afresh: its checkpoint cannot be used ({problem})")
            return None
        self.trial.set_user_attr("resumed_from", f"trial {saved['trial']} after {where(saved)}")
        return saved

    def save(self, checkpoint):
        """Write the checkpoint as a new file of the store, point the trial at it, drop the old one
        (`save(None)`: drop it, point at nothing). Until the trial points at the new file, a retry
        uses the old one: a save cut short is never "the latest". Checkpoints are files of the store,
        not artifacts recorded on the trial (upload_artifact): Optuna cannot delete such a record."""
        artifact_id = None
        if checkpoint is not None:
            artifact_id = f"trial-{self.trial.number}-{uuid.uuid4().hex}.pt"
            buffer = io.BytesIO()
            torch.save({**checkpoint, "trial": self.trial.number}, buffer)
            buffer.seek(0)
            self.store.write(artifact_id, buffer)
        if artifact_id != self.artifact_id:
            self.trial.set_user_attr("checkpoint", artifact_id)  # from here on, a retry starts from this one
        # A killed attempt's file stays: its FAIL trial names it, and can no longer be changed.
        if self.artifact_id is not None and self.artifact_id.startswith(f"trial-{self.trial.number}-"):
            with contextlib.suppress(ArtifactNotFound):  # removed by hand
                self.store.remove(self.artifact_id)
        self.artifact_id = artifact_id


def main():
    parser = argparse.ArgumentParser(description="List the checkpoints in an artifact store (tune.py --artifacts).")
    parser.add_argument("store", help="the folder, e.g. runs/mnist-mlp/artifacts")
    folder = parser.parse_args().store
    if not os.path.isdir(folder):
        parser.exit(2, f"checkpoints.py: error: {folder} is not a folder; pass tune.py's --artifacts folder\n")
    for name in sorted(os.listdir(folder)):
        try:
            saved = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            print(f"{name}: trial {saved['trial']}, goes on after {where(saved)}")
        except Exception:  # another kind of artifact (a final model, a plot) or a damaged file
            print(f"{name}: not a checkpoint")


if __name__ == "__main__":
    main()
