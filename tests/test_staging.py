"""Incomplete staging folders of killed processes are deleted, and every other folder is kept."""

import json
import os
import signal
import socket
import subprocess
import sys

import mlflow
import pytest

import mlflow_ckpt
from helpers import tiny_data, tiny_model
from mlflow_ckpt import snapshot

RUN_ID = "a" * 32

# A child that starts writing a snapshot folder the way write_snapshot does,
# then waits to be killed before it gets to snapshot.json.
WRITER = """
import os, sys, time
from mlflow_ckpt import snapshot
folder = sys.argv[1]
os.makedirs(os.path.join(folder, "model.writing"))
snapshot._write_owner(folder)
with open(os.path.join(folder, "model.writing", "model.keras"), "wb") as f:
    f.write(b"x" * 4096)
print("ready", flush=True)
time.sleep(600)
"""


def _killed_writer_folder(staging, name, run_id=RUN_ID) -> str:
    folder = os.path.join(staging, run_id, name)
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, folder], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    return folder


def _folder_with_owner(staging, name, **owner) -> str:
    folder = os.path.join(staging, RUN_ID, name)
    os.makedirs(folder)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": None}
    record.update(owner)
    with open(os.path.join(folder, snapshot.OWNER_FILE), "w") as f:
        json.dump(record, f)
    return folder


def test_killed_writer_folder_removed(tmp_path):
    staging = str(tmp_path / "staging")
    folder = _killed_writer_folder(staging, "epoch-00003-killed")

    removed = snapshot.remove_abandoned(staging, RUN_ID)

    assert removed == [folder]
    assert not os.path.exists(folder)


def test_live_and_foreign_folders_kept(tmp_path):
    staging = str(tmp_path / "staging")
    live = _folder_with_owner(staging, "epoch-00001-live")
    other_host = _folder_with_owner(staging, "epoch-00002-remote", host="another-host", pid=2**22 + 1)
    no_owner = os.path.join(staging, RUN_ID, "epoch-00003-old")
    os.makedirs(no_owner)
    complete = _killed_writer_folder(staging, "epoch-00004-complete")
    with open(os.path.join(complete, snapshot.SNAPSHOT_FILE), "w") as f:
        f.write("{}")
    journal = os.path.join(staging, RUN_ID, "metrics-epoch-00004-0123abcd.json")
    with open(journal, "w") as f:
        f.write("{}")

    removed = snapshot.remove_abandoned(staging, RUN_ID)

    assert removed == []
    for folder in (live, other_host, no_owner, complete):
        assert os.path.isdir(folder), folder
    assert os.path.isfile(journal)


def test_reused_process_id_folder_removed(tmp_path):
    staging = str(tmp_path / "staging")
    # This process's id, but a start time that this process does not have.
    own_start = snapshot._process_start_ticks(os.getpid())
    if own_start is None:
        pytest.skip("process start times are read from /proc, which this system lacks")
    folder = _folder_with_owner(staging, "epoch-00005-reused", started=own_start - 1)

    assert snapshot.remove_abandoned(staging, RUN_ID) == [folder]


def test_owner_written_with_snapshot(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    staged = snapshot.write_snapshot(
        model, staging_dir=str(tmp_path), run_id=RUN_ID, experiment_id="0",
        epoch=1, steps_into_epoch=0, metrics={}, format="keras",
    )
    with open(os.path.join(staged.folder, snapshot.OWNER_FILE)) as f:
        owner = json.load(f)

    assert owner["pid"] == os.getpid()
    assert owner["host"] == socket.gethostname()
    # The owner file stays out of the uploaded model folder.
    assert not os.path.exists(os.path.join(staged.model_dir, snapshot.OWNER_FILE))


def test_resume_removes_killed_writer_folder(local_tracking, tmp_path):
    staging = str(tmp_path / "staging")
    with mlflow.start_run() as run:
        model = tiny_model()
        model.fit(*tiny_data(), epochs=1, verbose=0,
                  callbacks=[mlflow_ckpt.MlflowCheckpoint(staging_dir=staging)])
    folder = _killed_writer_folder(staging, "epoch-00002-killed", run_id=run.info.run_id)

    state = mlflow_ckpt.resume(run.info.run_id, staging_dir=staging)

    assert state.initial_epoch == 1
    assert not os.path.exists(folder)


def test_folder_size_skips_file_renamed_during_walk(tmp_path, monkeypatch):
    # The flush progress line measures folders that the writer thread is still renaming files in.
    (tmp_path / "model.keras").write_bytes(b"x" * 1000)
    real_walk = os.walk

    def walk_with_vanished_file(folder):
        for root, dirs, names in real_walk(folder):
            yield root, dirs, names + ["snapshot.json.tmp"]

    monkeypatch.setattr(snapshot.os, "walk", walk_with_vanished_file)
    assert snapshot.folder_size(str(tmp_path)) == 1000


def test_snapshot_folder_survives_removed_parent(tmp_path, monkeypatch):
    # The uploader removes an empty run folder while the training thread
    # creates the next snapshot folder in it; fit then raised FileNotFoundError.
    folder = tmp_path / "staging" / "run" / "epoch-00002-abcdef12"
    real_mkdir = os.mkdir
    removed = []

    def mkdir_racing_discard(path, mode=0o777, **kwargs):
        if os.fspath(path) == str(folder) and not removed:
            os.rmdir(folder.parent)
            removed.append(True)
        return real_mkdir(path, mode, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir_racing_discard)
    snapshot.make_snapshot_folder(str(folder))
    assert removed and folder.is_dir()
