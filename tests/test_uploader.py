"""The background uploader: back-pressure, progress, failures, fast-failing calls, idempotent commits."""

import errno
import os
import threading
import time

import mlflow
import pytest
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException

import mlflow_ckpt
from conftest import free_port
from fault_tools import tiny_model
from mlflow_ckpt import policies
from mlflow_ckpt import snapshot as snapshots
from mlflow_ckpt._http_limits import short_http_limits
from mlflow_ckpt.uploader import Uploader


@pytest.fixture
def staging(tmp_path, monkeypatch):
    folder = tmp_path / "staging"
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(folder))
    return folder


@pytest.fixture
def dead_url():
    """A URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def _stage(model, staging, run_id="0" * 32, experiment_id="0", epoch=1):
    staged = snapshots.write_snapshot(
        model, staging_dir=str(staging), run_id=run_id, experiment_id=experiment_id,
        epoch=epoch, steps_into_epoch=0, metrics={"loss": 1.0 / epoch}, format="keras",
    )
    return snapshots.complete_snapshot(staged)


def test_short_limits_fail_fast(dead_url):
    client = mlflow.MlflowClient(tracking_uri=dead_url)
    started = time.monotonic()
    with short_http_limits(max_retries=0, timeout=5):
        with pytest.raises(MlflowException):
            client.get_experiment("0")
    assert time.monotonic() - started < 5


def test_short_limits_stay_on_their_thread():
    seen = []
    with short_http_limits(max_retries=0):
        other = threading.Thread(target=lambda: seen.append(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()))
        other.start()
        other.join()
        here = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    assert here == 0
    assert seen == [MLFLOW_HTTP_REQUEST_MAX_RETRIES.default]


def test_outage_does_not_block_submit(dead_url, staging):
    model = tiny_model()
    uploader = Uploader(tracking_uri=dead_url, max_pending=1, staging_dir=str(staging))
    uploader.submit_snapshot(_stage(model, staging, epoch=1))
    deadline = time.monotonic() + 30
    while not uploader.errors and time.monotonic() < deadline:
        time.sleep(0.1)
    second = threading.Thread(target=uploader.submit_snapshot, args=(_stage(model, staging, epoch=2),))
    second.start()
    second.join(timeout=5)
    blocked = second.is_alive()
    uploader.close(timeout=0, show_progress=False)
    second.join(timeout=10)

    assert uploader.errors
    assert not blocked
    assert len(snapshots.find_staged(str(staging))) == 2


def test_flush_prints_progress_and_keeps_unsent(dead_url, staging, capfd):
    uploader = Uploader(tracking_uri=dead_url, staging_dir=str(staging))
    staged = _stage(tiny_model(), staging)
    uploader.submit_snapshot(staged)
    result = uploader.close(timeout=2)
    stderr = capfd.readouterr().err

    assert "mlflow-ckpt: waiting for 1 checkpoint upload(s)" in stderr
    assert [s.folder for s in result.unsent] == [staged.folder]
    assert snapshots.find_staged(str(staging)) != []


def test_flush_ends_after_outage_timeout(dead_url, staging):
    uploader = Uploader(tracking_uri=dead_url, staging_dir=str(staging), outage_timeout=2)
    uploader.submit_metrics("0" * 32, {"loss": 1.0}, step=1)
    started = time.monotonic()
    result = uploader.close(timeout=None, show_progress=False)

    assert time.monotonic() - started < 15
    assert result.unsent_metrics == 1


def test_permanent_error_abandons_task(local_tracking, staging):
    with mlflow.start_run() as run:
        pass
    uploader = Uploader(staging_dir=str(staging), retry_initial=0.05, max_attempts=2)
    uploader.submit_metrics("f" * 32, {"loss": 1.0}, step=1)
    uploader.submit_metrics(run.info.run_id, {"loss": 2.0}, step=1)
    result = uploader.close(timeout=30, show_progress=False)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")

    assert result.unsent_metrics == 0
    assert any("f" * 32 in message for message in uploader.errors)
    assert [(m.step, m.value) for m in history] == [(1, 2.0)]


def test_commit_completes_pending_model(local_tracking, staging):
    with mlflow.start_run() as run:
        pass
    run_id = run.info.run_id
    staged = _stage(tiny_model(), staging, run_id=run_id, experiment_id=run.info.experiment_id)
    uploader = Uploader(staging_dir=str(staging))
    # A first attempt created the LoggedModel, then the process died.
    snapshots.write_snapshot_manifest(staged)
    uploader._find_or_create(staged)
    latest_while_pending = mlflow_ckpt.latest_checkpoint(run_id)

    uploader.commit(staged)
    uploader.close(timeout=0, show_progress=False)
    everything = mlflow_ckpt.list_checkpoints(run_id, include_pending=True)

    assert latest_while_pending is None
    assert [(c.epoch, c.status) for c in everything] == [(1, "READY")]
    assert mlflow_ckpt.load_checkpoint(everything[0]).built


def test_resent_snapshot_searches_for_duplicates(local_tracking, staging, monkeypatch):
    with mlflow.start_run() as run:
        pass
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    fresh = _stage(tiny_model(), staging, run_id=run_id, experiment_id=experiment_id, epoch=1)
    # Loaded from disk, as after a crash: another process may have sent it already.
    from_disk = snapshots.Snapshot.load(
        _stage(tiny_model(), staging, run_id=run_id, experiment_id=experiment_id, epoch=2).folder
    )
    searched = []
    find_existing = Uploader._find_existing
    monkeypatch.setattr(
        Uploader, "_find_existing", lambda self, s: searched.append(s.epoch) or find_existing(self, s)
    )
    uploader = Uploader(staging_dir=str(staging))
    uploader.commit(fresh)
    uploader.commit(from_disk)
    uploader.close(timeout=0, show_progress=False)

    assert searched == [2, 2]
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [1, 2]


def _count_checkpoint_searches(monkeypatch):
    from mlflow_ckpt import store

    searched = []
    search = store.search_checkpoint_models
    monkeypatch.setattr(
        store, "search_checkpoint_models", lambda *a, **k: searched.append(1) or search(*a, **k)
    )
    return searched


def test_commits_keep_run_checkpoints_in_memory(local_tracking, staging, monkeypatch):
    with mlflow.start_run() as run:
        pass
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    searched = _count_checkpoint_searches(monkeypatch)
    model = tiny_model()
    uploader = Uploader(staging_dir=str(staging), retention=[policies.KeepLast(2)])
    for epoch in range(1, 5):
        uploader.commit(_stage(model, staging, run_id=run_id, experiment_id=experiment_id, epoch=epoch))
    uploader.close(timeout=0, show_progress=False)

    # One search at the first commit, and the later ones use the worker's record.
    assert len(searched) == 1
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [3, 4]
    tags = mlflow.get_run(run_id).data.tags
    assert tags["mlflow_ckpt.latest_model_id"] == mlflow_ckpt.latest_checkpoint(run_id).model_id


def test_commits_resync_run_checkpoints(local_tracking, staging, monkeypatch):
    from mlflow_ckpt import store, uploader as uploader_module

    monkeypatch.setattr(uploader_module, "RESYNC_EVERY", 2)
    with mlflow.start_run() as run:
        pass
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    model = tiny_model()
    uploader = Uploader(staging_dir=str(staging))
    uploader.commit(_stage(model, staging, run_id=run_id, experiment_id=experiment_id, epoch=1))
    uploader.commit(_stage(model, staging, run_id=run_id, experiment_id=experiment_id, epoch=2))
    # Another process deletes the newest checkpoint, as `mlflow-ckpt prune` could.
    store.delete_checkpoint(mlflow_ckpt.latest_checkpoint(run_id))
    uploader.commit(_stage(model, staging, run_id=run_id, experiment_id=experiment_id, epoch=3))
    stale_index = _run_index(run_id)
    uploader.commit(_stage(model, staging, run_id=run_id, experiment_id=experiment_id, epoch=4))
    uploader.close(timeout=0, show_progress=False)

    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [1, 3, 4]
    # Until the resync the record still listed epoch 2, and after it the index is right.
    assert "- epoch 2:" in stale_index
    index = _run_index(run_id)
    assert "- epoch 2:" not in index
    assert "- epoch 4:" in index


def _run_index(run_id):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints.md")
    with open(path) as f:
        return f.read()


def _stored_model_file(model_id):
    from mlflow.utils.file_utils import local_file_uri_to_path

    location = mlflow.MlflowClient().get_logged_model(model_id).artifact_location
    return os.path.join(local_file_uri_to_path(location), "data", "model.keras")


def test_local_store_links_staged_files(local_tracking, staging):
    with mlflow.start_run() as run:
        pass
    staged = _stage(tiny_model(), staging, run_id=run.info.run_id, experiment_id=run.info.experiment_id)
    staged_inode = os.stat(os.path.join(staged.model_dir, "data", "model.keras")).st_ino

    model_id = Uploader(staging_dir=str(staging)).commit(staged)
    stored = _stored_model_file(model_id)

    assert os.stat(stored).st_ino == staged_inode
    # The staging folder is gone, so the store contains the only name of the data.
    assert os.stat(stored).st_nlink == 1
    assert not os.path.exists(staged.folder)
    assert mlflow_ckpt.load_checkpoint(mlflow_ckpt.latest_checkpoint(run.info.run_id)).built


def test_unlinkable_staging_folder_is_copied(local_tracking, staging, monkeypatch):
    with mlflow.start_run() as run:
        pass
    staged = _stage(tiny_model(), staging, run_id=run.info.run_id, experiment_id=run.info.experiment_id)
    staged_inode = os.stat(os.path.join(staged.model_dir, "data", "model.keras")).st_ino

    def cross_device_link(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", source)

    monkeypatch.setattr(os, "link", cross_device_link)
    model_id = Uploader(staging_dir=str(staging)).commit(staged)

    assert os.stat(_stored_model_file(model_id)).st_ino != staged_inode
    assert mlflow_ckpt.load_checkpoint(mlflow_ckpt.latest_checkpoint(run.info.run_id)).built


def test_metrics_journal_survives_removed_parent(tmp_path, monkeypatch):
    # The uploader thread may remove the empty run folder right after the
    # training thread created it for a metrics journal.
    from mlflow_ckpt import uploader as uploader_module

    real_makedirs = os.makedirs
    removed = []

    def makedirs_racing_discard(path, *args, **kwargs):
        real_makedirs(path, *args, **kwargs)
        if not removed:
            os.rmdir(path)
            removed.append(path)

    monkeypatch.setattr(os, "makedirs", makedirs_racing_discard)
    task = uploader_module._MetricsTask("run1", {"loss": 0.5}, 3, 0)
    path = uploader_module._write_metrics_journal(str(tmp_path), task)
    assert removed and os.path.isfile(path)
    assert [t.step for t in uploader_module.find_staged_metrics(str(tmp_path))] == [3]
