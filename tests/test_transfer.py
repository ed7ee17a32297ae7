"""Byte-level progress of checkpoint uploads and downloads through a real `mlflow server`."""

import hashlib
import logging
import os

import mlflow
import numpy as np
import pytest
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

import mlflow_ckpt
from fault_tools import tiny_model
from mlflow_ckpt import snapshot as snapshots
from mlflow_ckpt import transfer
from mlflow_ckpt import uploader as uploader_module
from mlflow_ckpt.uploader import Uploader

# Above transfer.STREAM_MIN_BYTES, so the chunked path is taken.
LARGE_BYTES = 20 << 20


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _folder_with_large_file(tmp_path):
    folder = tmp_path / "upload"
    (folder / "data").mkdir(parents=True)
    large = folder / "data" / "large.bin"
    large.write_bytes(np.random.default_rng(0).bytes(LARGE_BYTES))
    (folder / "small.json").write_text('{"a": 1}')
    return folder, large


def test_upload_folder_reports_bytes(server_tracking, tmp_path):
    folder, large = _folder_with_large_file(tmp_path)
    with mlflow.start_run() as run:
        pass
    repository = get_artifact_repository(run.info.artifact_uri)
    reports = []
    transfer.upload_folder(repository, str(folder), on_bytes=lambda done, total: reports.append((done, total)))
    (tmp_path / "fetched").mkdir()
    fetched = repository.download_artifacts("data/large.bin", str(tmp_path / "fetched"))

    total = LARGE_BYTES + len('{"a": 1}')
    # Many reports inside the large file, not one per file.
    assert len(reports) > 10
    assert all(t == total for _, t in reports)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)
    assert reports[-1] == (total, total)
    assert _sha256(fetched) == _sha256(large)
    assert sorted(transfer.artifact_sizes(repository)) == ["data/large.bin", "small.json"]


def test_large_file_download_reports_bytes(server_tracking, tmp_path):
    folder, large = _folder_with_large_file(tmp_path)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder))
    repository = get_artifact_repository(run.info.artifact_uri)
    reports = []
    target = tmp_path / "downloaded" / "data" / "large.bin"
    transfer._get_in_chunks(repository, "data/large.bin", str(target), reports.append)

    # One report per 1 MiB chunk at least.
    assert len(reports) >= LARGE_BYTES // (1 << 20)
    assert reports[-1] == LARGE_BYTES
    assert _sha256(target) == _sha256(large)


def test_commit_logs_upload_progress(server_tracking, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(uploader_module, "PROGRESS_INTERVAL", 0.0)
    monkeypatch.setattr(transfer, "STREAM_MIN_BYTES", 1 << 10)
    with mlflow.start_run() as run:
        pass
    staged = snapshots.write_snapshot(
        tiny_model(), staging_dir=str(tmp_path / "staging"), run_id=run.info.run_id,
        experiment_id=run.info.experiment_id, epoch=1, steps_into_epoch=0,
        metrics={"loss": 1.0}, format="keras",
    )
    snapshots.complete_snapshot(staged)
    uploader = Uploader(staging_dir=str(tmp_path / "staging"))
    with caplog.at_level(logging.INFO, logger="mlflow_ckpt.uploader"):
        uploader.commit(staged)
    uploader.close(timeout=0, show_progress=False)

    sent = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" sent")]
    assert sent
    assert "at epoch 1:" in sent[0]
    checkpoint = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert checkpoint.epoch == 1
    received = []
    assert transfer.verify(checkpoint, on_bytes=lambda done, total: received.append((done, total))) == []
    # The model file came through the chunked download too.
    assert len(received) > len(transfer.list_files(checkpoint))
    assert received[-1][0] == received[-1][1]


def test_printer_quiet_for_short_transfers(capsys):
    printer = transfer.ProgressPrinter("epoch 3", "received", interval=60.0)
    printer(10, 100)
    printer(100, 100)

    assert capsys.readouterr().err == ""


def test_printer_prints_after_interval(capsys):
    printer = transfer.ProgressPrinter("epoch 3", "received", interval=0.0)
    printer(50 << 20, 100 << 20)
    printer(100 << 20, 100 << 20)

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mlflow-ckpt: epoch 3: ")
    assert lines[0].endswith(" received")


@pytest.mark.parametrize("size", [0, transfer.STREAM_MIN_BYTES - 1])
def test_small_files_use_mlflow_calls(server_tracking, size):
    with mlflow.start_run() as run:
        pass
    repository = get_artifact_repository(run.info.artifact_uri)

    assert not transfer._streams(repository, size, None)
    assert transfer._streams(repository, transfer.STREAM_MIN_BYTES, None)
