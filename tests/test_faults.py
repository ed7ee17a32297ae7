"""Checkpoints survive corrupt files, server outages and lost server responses."""

import logging
import os
import time

import mlflow
import pytest
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

import mlflow_ckpt
from fault_tools import ErrorProxy, ServerSwitch, fit, metric_steps, tiny_model
from conftest import MlflowServer
from mlflow_ckpt.checkpoint import RUN_TAG_LATEST, TAG_SNAPSHOT_ID
from mlflow_ckpt.errors import InvalidCheckpointError
from mlflow_ckpt.snapshot import find_staged
from mlflow_ckpt.uploader import find_staged_metrics

FINALIZE_PATH = r"/api/2\.0/mlflow/logged-models/m-[0-9a-f]+$"
LOG_BATCH_PATH = r"/api/2\.0/mlflow/runs/log-batch$"


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    folder = tmp_path / "staging"
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def restartable_server(tmp_path_factory):
    """An `mlflow server` of this module's own, which tests stop and start again."""
    root = tmp_path_factory.mktemp("restartable-server")
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def restartable_tracking(restartable_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(restartable_server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", restartable_server.url)
    yield restartable_server
    if restartable_server.process is None:
        restartable_server.start()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _corrupt_largest_file(checkpoint) -> str:
    """Flip bytes in the middle of the checkpoint's largest file, in the artifact store."""
    local = mlflow_ckpt.store.download(checkpoint)
    manifest = mlflow_ckpt.manifest.read_manifest(local)
    relative = max(manifest["files"], key=lambda name: manifest["files"][name]["size"])
    path = os.path.join(local, relative)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(16)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    logged_model = mlflow.MlflowClient().get_logged_model(checkpoint.model_id)
    folder = os.path.dirname(relative)
    get_artifact_repository(logged_model.artifact_location).log_artifact(path, folder or None)
    return relative


def test_corrupt_file_fails_load_and_falls_back(tracking):
    with mlflow.start_run() as run:
        fit(tiny_model(), epochs=2, callbacks=[mlflow_ckpt.MlflowCheckpoint()])
    run_id = run.info.run_id
    latest = mlflow_ckpt.latest_checkpoint(run_id)
    corrupted = _corrupt_largest_file(latest)

    with pytest.raises(InvalidCheckpointError) as load_error:
        mlflow_ckpt.load_checkpoint(latest)
    assert corrupted in str(load_error.value)
    assert "fallback=True" in str(load_error.value)

    with pytest.raises(InvalidCheckpointError):
        mlflow_ckpt.resume(run_id)

    with pytest.warns(UserWarning, match=corrupted):
        state = mlflow_ckpt.resume(run_id, fallback=True)
    assert state.checkpoint.epoch == 1
    assert state.initial_epoch == 1


def test_corrupt_local_folder_names_file_and_fix(local_tracking, tmp_path):
    with mlflow.start_run() as run:
        fit(tiny_model(), epochs=1, callbacks=[mlflow_ckpt.MlflowCheckpoint()])
    folder = mlflow_ckpt.store.download(
        mlflow_ckpt.latest_checkpoint(run.info.run_id), dst_path=str(tmp_path / "copy")
    )
    with open(os.path.join(folder, "MLmodel"), "a") as f:
        f.write("# edited\n")

    with pytest.raises(InvalidCheckpointError) as error:
        mlflow_ckpt.load_checkpoint(folder)
    # A folder has no other epochs to fall back to: the fix is another copy.
    assert "MLmodel" in str(error.value)
    assert "intact copy" in str(error.value)
    assert "fallback" not in str(error.value)


@pytest.mark.server
@pytest.mark.slow
def test_server_restart_all_checkpoints_ready(restartable_tracking):
    server = restartable_tracking
    with mlflow.start_run() as run:
        fit(
            tiny_model(),
            epochs=8,
            callbacks=[
                ServerSwitch(server, stop_after=3, start_after=6),
                mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, max_pending=8),
            ],
        )
    run_id = run.info.run_id
    everything = mlflow_ckpt.list_checkpoints(run_id, include_pending=True)

    assert [c.epoch for c in everything] == list(range(1, 9))
    assert {c.status for c in everything} == {"READY"}
    assert metric_steps(mlflow.MlflowClient(), run_id, "loss") == list(range(1, 9))


@pytest.mark.server
@pytest.mark.slow
def test_run_ends_in_outage_then_upload_staged(restartable_tracking, staging, caplog):
    server = restartable_tracking
    caplog.set_level(logging.ERROR, logger="mlflow_ckpt")
    with mlflow.start_run() as run:
        fit(
            tiny_model(),
            epochs=4,
            callbacks=[
                ServerSwitch(server, stop_after=2),
                mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2, flush_timeout=3),
            ],
        )
        server.start()
    run_id = run.info.run_id
    report = "\n".join(r.getMessage() for r in caplog.records)

    assert str(staging / run_id) in report
    assert "upload_staged" in report
    assert f"mlflow-ckpt upload --staging-dir {staging} --run-id {run_id}" in report
    assert [s.epoch for s in find_staged(str(staging), run_id)] == [2, 4]
    assert [t.step for t in find_staged_metrics(str(staging), run_id)] == [3]

    committed = mlflow_ckpt.upload_staged(staging_dir=str(staging), run_id=run_id)

    assert [epoch for epoch, _ in committed] == [2, 4]
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id, include_pending=True)] == [2, 4]
    assert metric_steps(mlflow.MlflowClient(), run_id, "loss") == [1, 2, 3, 4]
    assert find_staged(str(staging), run_id) == []
    assert find_staged_metrics(str(staging), run_id) == []


@pytest.mark.server
@pytest.mark.slow
def test_outage_at_end_of_own_run(restartable_tracking, staging, caplog):
    server = restartable_tracking
    caplog.set_level(logging.ERROR, logger="mlflow_ckpt")
    callback = mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2, flush_timeout=3)
    started = time.monotonic()
    # No run is active, so the callback starts one and must end it while the server is down.
    fit(tiny_model(), epochs=4, callbacks=[ServerSwitch(server, stop_after=2), callback])
    elapsed = time.monotonic() - started
    run_id = callback._run.info.run_id
    report = "\n".join(r.getMessage() for r in caplog.records)
    server.start()

    assert mlflow.active_run() is None
    assert "set_terminated" in report
    assert run_id in report
    # A hang guard, not a speed target: MLflow's default retries take minutes.
    assert elapsed < 90
    assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
    assert [epoch for epoch, _ in mlflow_ckpt.upload_staged(run_id=run_id)] == [2, 4]


@pytest.fixture
def proxy(mlflow_server, monkeypatch, tmp_path):
    """An error-injecting proxy in front of the shared server, set as the tracking URI."""
    proxy = ErrorProxy(mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(proxy.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    yield proxy
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    proxy.close()


@pytest.mark.server
def test_lost_finalize_answer_no_duplicate(proxy, mlflow_server):
    direct = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    latest_when_failed = []
    proxy.on_failure = lambda method, path: latest_when_failed.append(
        direct.get_run(run_id).data.tags.get(RUN_TAG_LATEST)
    )
    # The server finalizes epoch 2's checkpoint, but the client receives a 503.
    proxy.fail_once("PATCH", FINALIZE_PATH, skip=1)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        fit(tiny_model(), epochs=3, callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1)])
    everything = mlflow_ckpt.list_checkpoints(run_id, include_pending=True)
    snapshot_ids = [
        direct.get_logged_model(c.model_id).tags[TAG_SNAPSHOT_ID] for c in everything
    ]
    failed = [entry for entry in proxy.requests if entry[2] == 503]

    assert len(failed) == 1
    assert [c.epoch for c in everything] == [1, 2, 3]
    assert len(set(snapshot_ids)) == 3
    assert {c.status for c in everything} == {"READY"}
    assert latest_when_failed == [everything[0].model_id]
    assert direct.get_run(run_id).data.tags[RUN_TAG_LATEST] == everything[2].model_id


@pytest.mark.server
def test_lost_log_batch_answer_no_duplicate_metrics(proxy, mlflow_server):
    # Epoch 1's metrics reach the server, but the client receives a 503 and resends them.
    proxy.fail_once("POST", LOG_BATCH_PATH)
    with mlflow.start_run() as run:
        fit(tiny_model(), epochs=3, callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=3)])
    direct = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    failed = [entry for entry in proxy.requests if entry[2] == 503]

    assert len(failed) == 1
    assert metric_steps(direct, run.info.run_id, "loss") == [1, 2, 3]
    assert metric_steps(direct, run.info.run_id, "val_loss") == [1, 2, 3]
