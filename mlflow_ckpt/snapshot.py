"""Write a checkpoint to a local staging folder, the part of a save that blocks training.

A staged snapshot is a folder `<staging_dir>/<run_id>/<snapshot_id>/` with:

- `model/`: a complete MLflow model of this project's flavor, plus
  `model/training_state/` and `model/manifest.json`. This folder is what gets
  uploaded as the LoggedModel's artifacts.
- `snapshot.json`: what the uploader needs to commit it (run, epoch, step,
  metrics), so that a snapshot left behind by a crash or an outage can still
  be uploaded later by `mlflow-ckpt upload` or the next training process.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid

from mlflow_ckpt import manifest, training_state
from mlflow_ckpt.checkpoint import MANIFEST_FILE, TRAINING_STATE_DIR

_logger = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.json"
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

    @property
    def model_dir(self) -> str:
        return os.path.join(self.folder, MODEL_DIR)

    def save(self) -> None:
        # Write then rename, so a process killed mid-write never leaves a
        # truncated snapshot.json that marks a folder as complete.
        path = os.path.join(self.folder, SNAPSHOT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, folder) -> "Snapshot":
        with open(os.path.join(folder, SNAPSHOT_FILE)) as f:
            record = json.load(f)
        record["folder"] = folder
        return cls(**record)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


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
) -> Snapshot:
    """Save `model` and its variables into a new staging folder.

    The snapshot is not complete until `complete_snapshot` has added the
    callback states and the manifest: the uploader ignores folders without
    `snapshot.json`.
    """
    from mlflow_ckpt.flavor import save_model

    # TODO: only `training_state.capture` must block training; writing the model file
    # (0.35 s for 57 MB) could move to a background thread through a clone of the model.
    started = time.monotonic()
    snapshot_id = uuid.uuid4().hex
    folder = os.path.join(staging_dir, run_id, f"epoch-{epoch:05d}-{snapshot_id[:8]}")
    os.makedirs(folder)
    model_dir = os.path.join(folder, MODEL_DIR)

    try:
        state, arrays = training_state.capture(
            model, epoch=epoch, steps_into_epoch=steps_into_epoch
        )
        save_model(model, model_dir, format=format, **(flavor_options or {}))
        training_state.write(os.path.join(model_dir, TRAINING_STATE_DIR), state, arrays)
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
    )


def complete_snapshot(snapshot: Snapshot, callbacks=()) -> Snapshot:
    """Add the callback states, then mark the snapshot ready to upload.

    The manifest is left to `write_snapshot_manifest`, which the upload
    worker calls, so hashing the files does not block training.
    """
    training_state.write_callbacks(os.path.join(snapshot.model_dir, TRAINING_STATE_DIR), callbacks)
    # snapshot.json is written last: its presence marks the folder as complete.
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
        fingerprint=state["fingerprint"],
        extra={
            "epoch": snapshot.epoch,
            "global_step": snapshot.global_step,
            "format": snapshot.format,
            "metrics": snapshot.metrics,
        },
    )
    snapshot.size_bytes = written["total_bytes"]
    snapshot.save()
    return snapshot


def find_staged(staging_dir: str, run_id: str | None = None) -> list[Snapshot]:
    """List the snapshots still waiting in `staging_dir`, oldest epoch first."""
    if not os.path.isdir(staging_dir):
        return []
    run_ids = [run_id] if run_id else sorted(os.listdir(staging_dir))
    snapshots = []
    for run in run_ids:
        run_folder = os.path.join(staging_dir, run)
        if not os.path.isdir(run_folder):
            continue
        for name in sorted(os.listdir(run_folder)):
            folder = os.path.join(run_folder, name)
            if not os.path.exists(os.path.join(folder, SNAPSHOT_FILE)):
                continue
            try:
                snapshots.append(Snapshot.load(folder))
            except (OSError, ValueError, TypeError) as error:
                _logger.warning("Skipping unreadable staged snapshot %s: %s", folder, error)
    return sorted(snapshots, key=lambda s: (s.run_id, s.epoch, s.global_step))
