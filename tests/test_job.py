"""The packaged training job, run the way users run it: `mlflow run . --env-manager local`."""

import os
import re
import subprocess
import sys

import mlflow
import pytest

import mlflow_ckpt
from conftest import REPO_ROOT
from mlflow_ckpt.job.data import load_digits_dataset


def run_project(tracking_uri, tmp_path, *arguments, entry_point="main"):
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["MLFLOW_CKPT_STAGING_DIR"] = str(tmp_path / "staging")
    command = [
        sys.executable, "-m", "mlflow", "run", str(REPO_ROOT),
        "--env-manager", "local", "-e", entry_point, *arguments,
    ]
    completed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout + completed.stderr


def table_accuracy(output, row_name):
    match = re.search(rf"^{re.escape(row_name)}\s+([0-9.]+)\s+([0-9.]+)$", output, re.MULTILINE)
    assert match, f"row {row_name!r} not in output:\n{output[-2000:]}"
    return float(match.group(1)), float(match.group(2))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("job")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    output = run_project(uri, tmp_path, "-P", "epochs=10", "-P", "every_n_epochs=5")
    run_id = re.search(r"^Run ([0-9a-f]{32})$", output, re.MULTILINE).group(1)
    return uri, tmp_path, run_id, output


@pytest.fixture
def job_tracking(finished_run):
    uri = finished_run[0]
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_job_commits_two_checkpoints(finished_run, job_tracking):
    run_id = finished_run[2]
    checkpoints = mlflow_ckpt.list_checkpoints(run_id, include_pending=True)

    assert [c.epoch for c in checkpoints] == [5, 10]
    assert all(c.status == "READY" for c in checkpoints)
    for checkpoint in checkpoints:
        assert {"val_loss", "val_sparse_categorical_accuracy"} <= set(checkpoint.metrics)


def test_job_restored_loss_matches_trained(finished_run, job_tracking):
    run_id = finished_run[2]
    data = load_digits_dataset()
    trained_loss = mlflow.MlflowClient().get_run(run_id).data.metrics["test_loss"]

    restored = mlflow_ckpt.load_checkpoint(run_id)
    loss, _ = restored.evaluate(data.x_test, data.y_test, verbose=0)
    assert abs(loss - trained_loss) <= 1e-6


def test_job_accuracy_table(finished_run):
    output = finished_run[3]

    _, untrained = table_accuracy(output, "untrained model")
    trained_loss, trained = table_accuracy(output, "trained model")
    restored_loss, _ = table_accuracy(output, "restored from epoch 10")
    assert trained >= 0.90
    assert 0.0 <= untrained <= 0.25
    assert abs(restored_loss - trained_loss) <= 1e-6


def test_job_logs_parameters(finished_run, job_tracking):
    params = mlflow.MlflowClient().get_run(finished_run[2]).data.params

    assert params["epochs"] == "10"
    assert params["every_n_epochs"] == "5"
    assert params["dataset"] == "digits"


def test_resume_entry_point_continues_run(finished_run, job_tracking):
    uri, tmp_path, run_id, _ = finished_run
    output = run_project(
        uri, tmp_path, "-P", f"run_id={run_id}", "-P", "epoch=5", "-P", "epochs=10",
        entry_point="resume",
    )

    assert f"Run {run_id}" in output
    # Epochs 6 to 10 were trained again with identical results, so the
    # history keeps one value per epoch, and the new epoch-10 checkpoint
    # is linked to the existing one.
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    latest = mlflow_ckpt.latest_checkpoint(run_id)
    assert latest.epoch == 10
    assert latest.metrics["val_loss"] == next(m.value for m in history if m.step == 10)
