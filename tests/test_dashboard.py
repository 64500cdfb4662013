"""The real optuna-dashboard, served on 127.0.0.1 over a study that had a killed trial and a stopped
one, asked over HTTP what a user's browser asks it: the metric's name, the trials' curves and
parameters, and every artifact it lists, byte for byte."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from conftest import write_mnist
from processes import (SLOW_TRIAL, assert_stopped_cleanly, finish, load, start_tune, storage_of, study_with,
                       wait_for_checkpoint, wait_for_reports)

DASHBOARD = shutil.which("optuna-dashboard") or os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
pytestmark = pytest.mark.skipif(not os.path.exists(DASHBOARD), reason="pip install -r requirements-test.txt")


class Dashboard:
    """optuna-dashboard on a free port of 127.0.0.1, as `optuna-dashboard STORAGE --artifact-dir DIR` runs it."""

    def __init__(self, out):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = open(os.path.join(out, "dashboard.log"), "w")  # its requests: read only if it fails
        self.process = subprocess.Popen([DASHBOARD, storage_of(out), "--artifact-dir", os.path.join(out, "artifacts"),
                                         "--host", "127.0.0.1", "--port", str(self.port), "--quiet"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/api/meta")
                return
            except OSError as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise AssertionError(f"optuna-dashboard did not answer ({error}): "
                                         f"{open(self.log.name).read()[-2000:]}") from None
                time.sleep(0.2)

    def get(self, path):
        # Straight to it: no proxy, even one another test set up for urllib (which keeps its first opener).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=30) as answer:
            assert answer.status == 200
            return answer.read()

    def study(self):
        [study] = json.loads(self.get("/api/studies"))["study_summaries"]
        return study["study_id"], json.loads(self.get(f"/api/studies/{study['study_id']}"))

    def close(self):
        self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()


def test_the_dashboard_shows_the_metric_whole_curves_waiting_parameters_and_every_artifact(tmp_path):
    digits = write_mnist(tmp_path / "digits", n_train=6000)
    out = str(tmp_path / "run")
    flags = ["--n-trials", "3", "--epochs", "3", "--heartbeat", "1", "--pruner", "none"]
    study_with(out, SLOW_TRIAL)
    process = start_tune(digits, out, *flags, final=True)
    wait_for_checkpoint(process, out, epochs_done=1)
    os.killpg(process.pid, signal.SIGKILL)  # trial 0 dies mid-epoch: its retry goes on from epoch 1
    process.wait()
    process = start_tune(digits, out, *flags, final=True)
    wait_for_reports(process, out, at_least=1, number=1)  # the next trial (the retry, or a new one) trains
    os.killpg(process.pid, signal.SIGTERM)  # stopped: queued again as it is
    assert_stopped_cleanly(*finish(process), exit_code=143)

    dashboard = Dashboard(out)
    try:
        _, detail = dashboard.study()
        waiting = [trial for trial in detail["trials"] if trial["state"] == "Waiting"]
        assert waiting and all(trial["fixed_params"] for trial in waiting)  # its parameters, while it waits
        assert {p["name"] for p in waiting[0]["fixed_params"]} == set(SLOW_TRIAL)

        code, _, stderr = finish(start_tune(digits, out, *flags, final=True))  # the same command, to the end
        assert code == 0, stderr
        study_id, detail = dashboard.study()
        assert detail["objective_names"] == ["val_accuracy"]
        states = [trial["state"] for trial in detail["trials"]]
        assert "Waiting" not in states and "Running" not in states and states.count("Fail") == 1
        [retry] = [trial for trial in detail["trials"] if trial["user_attrs"] and any(
            attr["key"] == "retry_of" for attr in trial["user_attrs"])]
        assert [value["step"] for value in retry["intermediate_values"]] == list(range(12))  # from step 0
        names = sorted(artifact["filename"] for artifact in detail["artifacts"])
        assert names == sorted(["trials.csv", "optimization_history.png", "intermediate_values.png",
                                "param_importances.png", "value_histogram.png", "best.json", "best_model.pt",
                                "final_model.png"])
        for artifact in detail["artifacts"]:
            body = dashboard.get(f"/artifacts/{study_id}/{artifact['artifact_id']}")
            with open(os.path.join(out, artifact["filename"]), "rb") as file:
                assert body == file.read(), artifact["filename"]
            assert artifact["mimetype"] == {"png": "image/png", "csv": "text/csv", "json": "application/json",
                                            "pt": "application/octet-stream"}[artifact["filename"].rsplit(".", 1)[1]]
    finally:
        dashboard.close()
    # The same finished command again records nothing twice.
    code, stdout, stderr = finish(start_tune(digits, out, *flags, final=True))
    assert code == 0 and "nothing to train" in stdout, stderr
    assert len(os.listdir(os.path.join(out, "artifacts"))) == len(names) + 1  # and the killed attempt's checkpoint
    assert len(optuna.artifacts.get_all_artifact_meta(load(storage_of(out)))) == len(names)
