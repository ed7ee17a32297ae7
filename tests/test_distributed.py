"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1: the chief logs, both resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import mlflow_ckpt
from conftest import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]

WORKER = str(Path(__file__).with_name("distributed_worker.py"))


def _run_workers(phase, tracking_uri, tmp_path, run_id=None) -> list:
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes, outputs = [], []
    for index in range(2):
        output = tmp_path / f"{phase}-{index}.json"
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            MLFLOW_TRACKING_URI=tracking_uri,
            MLFLOW_CKPT_STAGING_DIR=str(tmp_path / f"staging-{index}"),
        )
        command = [sys.executable, WORKER, phase, str(output)] + ([run_id] if run_id else [])
        log = open(tmp_path / f"{phase}-{index}.log", "wb")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        outputs.append(output)
    for index, process in enumerate(processes):
        code = process.wait(timeout=240)
        assert code == 0, (tmp_path / f"{phase}-{index}.log").read_text()[-3000:]
    return [json.loads(output.read_text()) for output in outputs]


def test_chief_logs_and_every_worker_resumes(server_tracking, tmp_path):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment(f"distributed-{tmp_path.name}")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        trained = _run_workers("train", server_tracking, tmp_path)
        run_id = trained[0]["run_id"]
        runs_after_training = client.search_runs([experiment_id])
        epochs_after_training = [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)]

        resumed = _run_workers("resume", server_tracking, tmp_path, run_id=run_id)
    finally:
        del os.environ["MLFLOW_EXPERIMENT_ID"]

    assert [w["chief"] for w in trained] == [True, False]
    assert trained[1]["run_id"] is None
    assert len(runs_after_training) == 1
    assert epochs_after_training == [1, 2]
    assert [w["initial_epoch"] for w in resumed] == [2, 2]
    assert resumed[0]["checksum"] == resumed[1]["checksum"]
    assert resumed[0]["run_id"] == run_id
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [1, 2, 3, 4]
