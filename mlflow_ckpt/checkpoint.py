"""The `Checkpoint` record and the tag names that describe a checkpoint in MLflow."""

import dataclasses
import types
from typing import Mapping

# LoggedModel tags written by the uploader. They are the source of truth for
# ordering, so a checkpoint is never ordered by file name or creation time.
TAG_KIND = "mlflow_ckpt.kind"
KIND_CHECKPOINT = "checkpoint"
TAG_EPOCH = "mlflow_ckpt.epoch"
TAG_STEP = "mlflow_ckpt.global_step"
TAG_STEPS_INTO_EPOCH = "mlflow_ckpt.steps_into_epoch"
TAG_FORMAT = "mlflow_ckpt.format"
TAG_SIZE = "mlflow_ckpt.size_bytes"
TAG_SNAPSHOT_ID = "mlflow_ckpt.snapshot_id"

# Run tags that point at the newest and the best committed checkpoint, for the UI.
RUN_TAG_LATEST = "mlflow_ckpt.latest_model_id"
RUN_TAG_BEST = "mlflow_ckpt.best_model_id"

# Inside a checkpoint's artifact folder.
TRAINING_STATE_DIR = "training_state"
MANIFEST_FILE = "manifest.json"

STATUS_READY = "READY"
STATUS_PENDING = "PENDING"
STATUS_FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A committed or pending checkpoint of one MLflow run.

    Attributes:
        run_id: ID of the MLflow run that produced the checkpoint.
        model_id: ID of the checkpoint's MLflow LoggedModel.
        epoch: Number of completed epochs, 1-based as Keras prints
            "Epoch 5/10". Pass it as `initial_epoch` to continue training.
        global_step: Number of optimizer steps taken when the checkpoint was made.
        metrics: Logs of that epoch (`loss`, `val_loss`, ...), read-only.
        format: Storage format: `"keras"`, `"h5"`, `"savedmodel"` or `"weights"`.
        model_uri: URI that `mlflow.pyfunc.load_model` and `mlflow models serve`
            accept, `models:/<model_id>`.
        size_bytes: Total size of the checkpoint's files, or None if unknown.
        status: `"READY"` once committed, `"PENDING"` while uploading,
            `"FAILED"` if the upload was abandoned.
        local_path: Set when the checkpoint was read from a local folder
            rather than from a tracking server.
        steps_into_epoch: 0 for a checkpoint made at the end of epoch
            `epoch`. Otherwise the checkpoint was made mid-epoch (by
            `save_freq=N` or on SIGTERM), this many steps into epoch
            `epoch + 1`, and resuming continues from that step.
    """

    run_id: str | None
    model_id: str | None
    epoch: int
    global_step: int
    metrics: Mapping[str, float]
    format: str
    model_uri: str
    size_bytes: int | None = None
    status: str = STATUS_READY
    local_path: str | None = None
    steps_into_epoch: int = 0

    def __post_init__(self):
        # Freeze the metrics too, so a Checkpoint can be shared between threads.
        object.__setattr__(self, "metrics", types.MappingProxyType(dict(self.metrics)))

    @property
    def is_committed(self) -> bool:
        return self.status == STATUS_READY

    def to_dict(self) -> dict:
        """Return the record as plain JSON-serializable values."""
        record = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        record["metrics"] = dict(self.metrics)
        return record
