"""Write a checkpoint to a local staging folder, the part of a save that blocks training.

A staged snapshot is a folder `<staging_dir>/<run_id>/<snapshot_id>/` with:

- `model/`: a complete MLflow model of this project's flavor, plus
  `model/training_state/` and `model/manifest.json`. This folder is what gets
  uploaded as the LoggedModel's artifacts.
- `snapshot.json`: what the uploader needs to commit it (run, epoch, step,
  metrics), so that a snapshot left behind by a crash or an outage can still
  be uploaded later by `mlflow-ckpt upload` or the next training process.
  It is written last, so a folder without it is incomplete.
- `owner.json`: the host, process id and process start time of the writer,
  so that `remove_abandoned` can delete incomplete folders of dead processes.
"""

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import uuid

from mlflow_ckpt import manifest, training_state
from mlflow_ckpt.checkpoint import MANIFEST_FILE, TRAINING_STATE_DIR

_logger = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.json"
OWNER_FILE = "owner.json"
MODEL_DIR = "model"


def default_staging_dir() -> str:
    """Return `$MLFLOW_CKPT_STAGING_DIR`, or `~/.cache/mlflow-ckpt/staging`."""
    configured = os.environ.get("MLFLOW_CKPT_STAGING_DIR")
    if configured:
        return configured
    return os.path.join(os.path.expanduser("~"), ".cache", "mlflow-ckpt", "staging")


@dataclasses.dataclass
class Snapshot:
    """A checkpoint written to local disk and waiting to be committed to MLflow."""

    snapshot_id: str
    run_id: str
    experiment_id: str
    epoch: int
    global_step: int
    metrics: dict
    format: str
    folder: str
    size_bytes: int
    created: float
    monitor: str | None = None
    mode: str | None = None
    steps_into_epoch: int = 0
    # Timestamp (ms) under which `metrics` were already logged to the run, if
    # they were. Linking them to the checkpoint with the same timestamp adds
    # no second value to the run's history, because MLflow's SQL store skips
    # a metric identical in key, value, step and timestamp.
    metrics_timestamp_ms: int | None = None
    # SHA-256 of files hashed as they were written, by path relative to model/;
    # the manifest takes them instead of reading those files again.
    file_digests: dict = dataclasses.field(default_factory=dict)
    # Captured state and variables not yet written by a BackgroundWriter; never saved.
    pending: tuple | None = dataclasses.field(default=None, repr=False, compare=False)
    # True until a request to create this snapshot's LoggedModel is sent. It is
    # never saved, so a snapshot loaded from disk is False: another process may
    # have sent it.
    unsent: bool = dataclasses.field(default=False, repr=False, compare=False)

    @property
    def model_dir(self) -> str:
        return os.path.join(self.folder, MODEL_DIR)

    def save(self) -> None:
        # Write then rename, so a process killed mid-write never leaves a
        # truncated snapshot.json that marks a folder as complete.
        path = os.path.join(self.folder, SNAPSHOT_FILE)
        record = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("pending", "unsent")
        }
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, folder) -> "Snapshot":
        with open(os.path.join(folder, SNAPSHOT_FILE)) as f:
            record = json.load(f)
        record["folder"] = folder
        return cls(**record)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        # Remove the run's folder too once its last snapshot is gone.
        try:
            os.rmdir(os.path.dirname(self.folder))
        except OSError:
            pass


def make_snapshot_folder(folder: str, attempts: int = 5) -> None:
    """Create `folder` and its run folder, which another thread may remove.

    `Snapshot.discard` on the uploader thread removes a run folder once it
    is empty. That can happen after `makedirs` created the run folder and
    before it created `folder` in it; then the last `mkdir` finds no parent.
    Once `folder` exists the run folder is not empty and stays.
    """
    for attempt in range(attempts):
        try:
            os.makedirs(folder)
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def write_snapshot(
    model,
    *,
    staging_dir: str,
    run_id: str,
    experiment_id: str,
    epoch: int,
    steps_into_epoch: int,
    metrics: dict,
    format: str,
    monitor: str | None = None,
    mode: str | None = None,
    flavor_options: dict | None = None,
    shadow=None,
    metrics_timestamp_ms: int | None = None,
) -> Snapshot:
    """Save `model` and its variables into a new staging folder.

    With a `shadow` (a `model_writer.ShadowModel`), only the variables are
    copied to host memory here; `write_pending` writes the files later, off
    the training thread. The snapshot is not complete until
    `complete_snapshot` (and `write_pending`, with a shadow) has run: the
    uploader ignores folders without `snapshot.json`.
    """
    from mlflow_ckpt.flavor import save_model

    started = time.monotonic()
    snapshot_id = uuid.uuid4().hex
    folder = os.path.join(staging_dir, run_id, f"epoch-{epoch:05d}-{snapshot_id[:8]}")
    make_snapshot_folder(folder)
    _write_owner(folder)
    model_dir = os.path.join(folder, MODEL_DIR)

    try:
        state, arrays = training_state.capture(
            model, epoch=epoch, steps_into_epoch=steps_into_epoch
        )
        if shadow is not None:
            os.makedirs(os.path.join(model_dir, TRAINING_STATE_DIR))
            pending = (shadow, state, arrays, dict(flavor_options or {}))
        else:
            save_model(model, model_dir, format=format, **(flavor_options or {}))
            training_state.write(
                os.path.join(model_dir, TRAINING_STATE_DIR), state, arrays,
                format=_training_state_format(format, flavor_options),
            )
            pending = None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    _logger.debug(
        "Staged model of run %s at epoch %d in %s (%.2f s)",
        run_id,
        epoch,
        folder,
        time.monotonic() - started,
    )
    return Snapshot(
        snapshot_id=snapshot_id,
        run_id=run_id,
        experiment_id=experiment_id,
        epoch=epoch,
        global_step=state["global_step"],
        metrics={key: float(value) for key, value in metrics.items()},
        format=format,
        folder=folder,
        size_bytes=0,
        created=time.time(),
        monitor=monitor,
        mode=mode,
        steps_into_epoch=int(steps_into_epoch),
        metrics_timestamp_ms=metrics_timestamp_ms,
        pending=pending,
        unsent=True,
    )


def write_pending(snapshot: Snapshot, shadow=None) -> Snapshot:
    """Write the model file and training state captured by `write_snapshot(shadow=...)`.

    Runs on the writer thread. Marks the snapshot complete (`snapshot.json`)
    if `complete_snapshot` has already run.
    """
    if snapshot.pending is None:
        return snapshot
    captured_shadow, state, arrays, flavor_options = snapshot.pending
    shadow = shadow or captured_shadow
    # The flavor writes into an empty folder only, and model/ already contains
    # the loop state (callbacks, random states) that the training thread wrote.
    written = snapshot.model_dir + ".writing"
    shutil.rmtree(written, ignore_errors=True)
    snapshot.file_digests = shadow.write(written, arrays, snapshot.format, flavor_options)
    os.replace(
        os.path.join(snapshot.model_dir, TRAINING_STATE_DIR),
        os.path.join(written, TRAINING_STATE_DIR),
    )
    os.rmdir(snapshot.model_dir)
    os.replace(written, snapshot.model_dir)
    training_state.write(
        os.path.join(snapshot.model_dir, TRAINING_STATE_DIR), state, arrays,
        format=_training_state_format(snapshot.format, flavor_options),
    )
    snapshot.pending = None
    snapshot.save()
    return snapshot


def _training_state_format(format: str, flavor_options: dict | None) -> str | None:
    # None makes training_state/ keep every variable, which it must when the
    # model file has no optimizer state.
    if not (flavor_options or {}).get("include_optimizer", True):
        return None
    return format


def complete_snapshot(snapshot: Snapshot, callbacks=(), random_states: dict | None = None) -> Snapshot:
    """Add the callbacks' state and the random states, then mark the snapshot ready to upload.

    `random_states` (from `training_state.capture_random_states`) defaults to
    the current ones. The manifest is left to `write_snapshot_manifest`, which
    the upload worker calls, so hashing the files does not block training.
    """
    if random_states is None:
        random_states = training_state.capture_random_states()
    training_state.write_loop_state(
        os.path.join(snapshot.model_dir, TRAINING_STATE_DIR), callbacks, random_states
    )
    # snapshot.json is written last: its presence marks the folder as complete.
    # A snapshot whose files are still in memory gets it from write_pending.
    if snapshot.pending is None:
        snapshot.save()
    return snapshot


def write_snapshot_manifest(snapshot: Snapshot) -> Snapshot:
    """Hash the snapshot's files into `manifest.json` once, and record its size.

    Does nothing if the manifest exists, so a retried upload (or one by a
    later process) never hashes twice.
    """
    model_dir = snapshot.model_dir
    if os.path.exists(os.path.join(model_dir, MANIFEST_FILE)) and snapshot.size_bytes:
        return snapshot
    state = training_state.read_state(os.path.join(model_dir, TRAINING_STATE_DIR))
    written = manifest.write_manifest(
        model_dir,
        known_digests=snapshot.file_digests,
        fingerprint=state["fingerprint"],
        extra={
            "epoch": snapshot.epoch,
            "global_step": snapshot.global_step,
            "steps_into_epoch": snapshot.steps_into_epoch,
            "format": snapshot.format,
            "metrics": snapshot.metrics,
        },
    )
    snapshot.size_bytes = written["total_bytes"]
    snapshot.save()
    return snapshot


def find_staged(staging_dir: str, run_id: str | None = None) -> list[Snapshot]:
    """List the snapshots still waiting in `staging_dir`, oldest epoch first."""
    snapshots = []
    for folder in _staged_folders(staging_dir, run_id):
        if not os.path.exists(os.path.join(folder, SNAPSHOT_FILE)):
            continue
        try:
            snapshots.append(Snapshot.load(folder))
        except (OSError, ValueError, TypeError) as error:
            _logger.warning("Skipping unreadable staged snapshot %s: %s", folder, error)
    return sorted(snapshots, key=lambda s: (s.run_id, s.epoch, s.global_step))


def remove_abandoned(staging_dir: str, run_id: str | None = None) -> list[str]:
    """Delete the incomplete snapshot folders whose writing process has died.

    A process killed while it wrote a snapshot leaves a folder without
    `snapshot.json`, which nothing can upload. Only folders written on this
    host by a process that no longer runs are deleted. Folders of a live
    process, of another host, or without `owner.json` are kept.

    Returns:
        The deleted folders.
    """
    removed, removed_bytes = [], 0
    for folder in _staged_folders(staging_dir, run_id):
        # Metric journals are files beside the snapshot folders.
        if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, SNAPSHOT_FILE)):
            continue
        if not _owner_is_dead(folder):
            continue
        removed_bytes += folder_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        _logger.warning(
            "Deleted %d incomplete checkpoint folder(s) (%d bytes) that processes killed while "
            "writing them left in %s: %s",
            len(removed), removed_bytes, staging_dir, ", ".join(removed),
        )
    return removed


def _staged_folders(staging_dir: str, run_id: str | None):
    """Yield every entry of the run folders in `staging_dir`, of one run or of all."""
    if not os.path.isdir(staging_dir):
        return
    run_ids = [run_id] if run_id else sorted(os.listdir(staging_dir))
    for run in run_ids:
        run_folder = os.path.join(staging_dir, run)
        try:
            names = sorted(os.listdir(run_folder))
        except (FileNotFoundError, NotADirectoryError):
            # Not a run folder, or an uploader removed it after its last snapshot.
            continue
        for name in names:
            yield os.path.join(run_folder, name)


def _write_owner(folder: str) -> None:
    pid = os.getpid()
    record = {"host": socket.gethostname(), "pid": pid, "started": _process_start_ticks(pid)}
    with open(os.path.join(folder, OWNER_FILE), "w") as f:
        json.dump(record, f)


def _owner_is_dead(folder: str) -> bool:
    try:
        with open(os.path.join(folder, OWNER_FILE)) as f:
            owner = json.load(f)
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        # The folder is being created, or an older version wrote it without an owner.
        return False
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # The process id may have been reused by a newer process.
    started = _process_start_ticks(pid)
    return started is not None and owner.get("started") is not None and started != owner["started"]


def _process_start_ticks(pid: int) -> int | None:
    """Return the start time of process `pid` in clock ticks since boot, or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the command name, which may contain spaces and brackets.
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def folder_size(folder: str) -> int:
    """Return the total size in bytes of the files under `folder`.

    The writer thread may rename or delete files while this walks the folder, so a file that
    is gone by the time it is measured counts as zero bytes instead of raising.
    """
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:
                pass
    return total
