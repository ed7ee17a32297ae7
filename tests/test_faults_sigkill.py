"""Training processes killed with SIGKILL while checkpoints upload leave a usable run behind."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlflow_ckpt

KILLS = int(os.environ.get("KILLS", 20))


def _read_status(path: Path) -> list:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # the last line of a killed child can be cut short
    return records


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def forker(tmp_path):
    """The process that forks a training child per request (see kill_target.py)."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("kill_target.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "forker.log", "wb"),
        text=True,
    )
    yield process
    process.stdin.close()
    process.wait(timeout=30)


@pytest.mark.server
@pytest.mark.slow
def test_sigkill_during_uploads_leaves_loadable_latest(server_tracking, forker, tmp_path):
    rng = random.Random(1234)
    run_id = None
    pending_seen = 0
    pending_ids = set()
    for kill in range(KILLS):
        latest_before = mlflow_ckpt.latest_checkpoint(run_id) if run_id else None
        status_path = tmp_path / f"status-{kill}.jsonl"
        request = {
            "tracking_uri": server_tracking,
            "run_id": run_id,
            "staging_dir": str(tmp_path / f"staging-{kill}"),
            "status_path": str(status_path),
            "log_path": str(tmp_path / f"child-{kill}.log"),
            "seed": kill,
        }
        forker.stdin.write(json.dumps(request) + "\n")
        forker.stdin.flush()
        pid = int(forker.stdout.readline())
        started = time.monotonic()

        # Kill at a random moment after this child's first commit, while it
        # keeps staging and uploading one checkpoint per epoch.
        _wait_for(
            lambda: any("committed" in r for r in _read_status(status_path)),
            timeout=60,
            what=f"the first commit of child {kill} (log: {request['log_path']})",
        )
        print(f"kill {kill}: first commit after {time.monotonic() - started:.1f} s")
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _is_alive(pid), timeout=10, what=f"child {pid} to exit")

        records = _read_status(status_path)
        run_id = next(r["run_id"] for r in records if "run_id" in r)
        first_epoch = next(r["first_epoch"] for r in records if "first_epoch" in r)
        expected_start = latest_before.epoch if latest_before else 0
        assert first_epoch == expected_start, f"kill {kill}: resumed at the wrong epoch"

        latest = mlflow_ckpt.latest_checkpoint(run_id)
        assert latest is not None, f"kill {kill}: no committed checkpoint"
        model = mlflow_ckpt.load_checkpoint(latest, dst_path=str(tmp_path / f"download-{kill}"))
        assert model.built, f"kill {kill}: latest checkpoint did not load"
        pending = {
            c.model_id
            for c in mlflow_ckpt.list_checkpoints(run_id, include_pending=True)
            if c.status == "PENDING"
        }
        pending_seen += bool(pending - pending_ids)
        pending_ids |= pending
        print(f"kill {kill}: checked after {time.monotonic() - started:.1f} s")

    # Evidence that kills landed during uploads, not only between them.
    assert pending_seen >= 3, f"only {pending_seen} of {KILLS} kills left a PENDING checkpoint"
