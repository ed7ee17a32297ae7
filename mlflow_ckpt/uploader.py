"""The background worker that commits staged checkpoints and epoch metrics to MLflow.

The training thread hands over two kinds of task, in order:

- epoch metrics, logged to the run with `step` = epoch;
- staged snapshots, each committed as: find or create the LoggedModel
  (PENDING), upload the files, verify them, link the epoch's metrics,
  finalize READY, update the run's pointers and index, apply retention,
  delete the staging folder.

A failing task is retried with exponential back-off and blocks the tasks
behind it, so metrics and checkpoints reach MLflow in training order. A retry
never creates a second LoggedModel: each snapshot carries a unique id tag and
the worker looks for it before creating one. Snapshots wait on disk, so a
process that dies leaves them for `upload_staged` to commit later.
"""

import collections
import dataclasses
import logging
import os
import sys
import threading
import time

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_ckpt import policies, run_index, store
from mlflow_ckpt.checkpoint import (
    KIND_CHECKPOINT,
    RUN_TAG_BEST,
    RUN_TAG_LATEST,
    STATUS_READY,
    TAG_EPOCH,
    TAG_FORMAT,
    TAG_KIND,
    TAG_SIZE,
    TAG_SNAPSHOT_ID,
    TAG_STEP,
)
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.snapshot import Snapshot

_logger = logging.getLogger(__name__)

MODEL_TYPE = "mlflow-ckpt-checkpoint"


@dataclasses.dataclass
class _MetricsTask:
    run_id: str
    metrics: dict
    step: int
    timestamp_ms: int


@dataclasses.dataclass
class _SnapshotTask:
    snapshot: Snapshot


@dataclasses.dataclass
class FlushResult:
    """What `Uploader.flush` left behind: snapshots not committed, and the last errors."""

    unsent: list
    errors: list

    @property
    def ok(self) -> bool:
        return not self.unsent


class Uploader:
    """Commit snapshots and metrics to MLflow on a background thread.

    Args:
        tracking_uri: Tracking server to write to; the current one by default.
        max_pending: Most snapshots waiting at once. `submit_snapshot` blocks
            the caller (back-pressure) rather than letting staged copies fill
            the disk.
        retention: Retention rules from `mlflow_ckpt.policies`, applied to the
            run after each commit.
        monitor: Metric that decides the best checkpoint, or None.
        mode: `"min"` or `"max"` for `monitor`.
        retry_initial: First wait in seconds after a failure; doubles up to `retry_max`.
        retry_max: Longest wait in seconds between two attempts.
        on_commit: Called as `on_commit(epoch, model_uri)` from the worker
            thread after each commit.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        max_pending: int = 4,
        retention=(),
        monitor: str | None = None,
        mode: str = "min",
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
        on_commit=None,
    ):
        self._tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.max_pending = max_pending
        self.retention = list(retention)
        self.monitor = monitor
        self.mode = mode
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.on_commit = on_commit

        self._tasks = collections.deque()
        self._condition = threading.Condition()
        self._pending_snapshots = 0
        self._busy = False
        self._stopping = False
        self._errors = []
        self._committed = []
        self._thread = threading.Thread(target=self._work, name="mlflow-ckpt-uploader", daemon=True)
        self._thread.start()

    # Training-thread side.

    def submit_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        task = _MetricsTask(run_id, dict(metrics), int(step), int(time.time() * 1000))
        with self._condition:
            self._tasks.append(task)
            self._condition.notify_all()

    def submit_snapshot(self, snapshot: Snapshot) -> None:
        with self._condition:
            if self._pending_snapshots >= self.max_pending:
                _logger.warning(
                    "%d checkpoints of run %s are waiting to upload; training waits for one "
                    "to finish before staging epoch %d.",
                    self._pending_snapshots,
                    snapshot.run_id,
                    snapshot.epoch,
                )
            while self._pending_snapshots >= self.max_pending:
                self._condition.wait(timeout=1.0)
            self._pending_snapshots += 1
            self._tasks.append(_SnapshotTask(snapshot))
            self._condition.notify_all()

    @property
    def committed(self) -> list:
        """Checkpoints committed by this uploader, in commit order."""
        with self._condition:
            return list(self._committed)

    def pending_count(self) -> int:
        with self._condition:
            return self._pending_snapshots

    def flush(self, timeout: float | None = None, show_progress: bool = True) -> FlushResult:
        """Wait until every submitted task is done, or until `timeout` seconds pass.

        Prints one progress line to stderr while checkpoints are still uploading.

        Returns:
            A `FlushResult` with the snapshots that are still not committed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_line = None
        with self._condition:
            while self._tasks or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                if show_progress and self._pending_snapshots:
                    line = f"mlflow-ckpt: waiting for {self._pending_snapshots} checkpoint upload(s)"
                    if line != last_line:
                        print(line, file=sys.stderr, flush=True)
                        last_line = line
                self._condition.wait(timeout=1.0 if remaining is None else min(1.0, remaining))
            unsent = [task.snapshot for task in self._tasks if isinstance(task, _SnapshotTask)]
            if self._busy and self._current_snapshot is not None:
                unsent.insert(0, self._current_snapshot)
            return FlushResult(unsent=unsent, errors=list(self._errors[-5:]))

    def close(self, timeout: float | None = None, show_progress: bool = True) -> FlushResult:
        """Flush, then stop the worker thread. Unsent snapshots stay on disk."""
        result = self.flush(timeout=timeout, show_progress=show_progress)
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=5)
        return result

    # Worker side.

    _current_snapshot = None

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._tasks and not self._stopping:
                    self._condition.wait()
                if not self._tasks:
                    return
                task = self._tasks[0]
                self._busy = True
                self._current_snapshot = task.snapshot if isinstance(task, _SnapshotTask) else None
            done = self._run_with_retries(task)
            with self._condition:
                self._busy = False
                self._current_snapshot = None
                if done:
                    self._tasks.popleft()
                    if isinstance(task, _SnapshotTask):
                        self._pending_snapshots -= 1
                self._condition.notify_all()
                if not done:
                    return

    def _run_with_retries(self, task) -> bool:
        delay = self.retry_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                if isinstance(task, _MetricsTask):
                    self._log_metrics(task)
                else:
                    self.commit(task.snapshot)
                return True
            except Exception as error:  # noqa: BLE001 - any failure is retried, then reported
                self._record_error(task, error, attempt)
            with self._condition:
                if self._stopping:
                    return False
                self._condition.wait(timeout=delay)
                if self._stopping:
                    return False
            delay = min(delay * 2, self.retry_max)

    def _record_error(self, task, error, attempt) -> None:
        if isinstance(task, _SnapshotTask):
            what = f"checkpoint of run {task.snapshot.run_id} at epoch {task.snapshot.epoch}"
        else:
            what = f"metrics of run {task.run_id} at epoch {task.step}"
        message = f"Uploading {what} failed (attempt {attempt}): {error}"
        with self._condition:
            self._errors.append(message)
        # The first failure is a warning; the retries that follow are logged at debug level
        # so an outage of many minutes does not flood the training log.
        if attempt == 1:
            _logger.warning("%s. Training continues; retrying in the background.", message)
        else:
            _logger.debug(message)

    def _log_metrics(self, task: _MetricsTask) -> None:
        metrics = [
            Metric(key, float(value), task.timestamp_ms, task.step)
            for key, value in task.metrics.items()
        ]
        if metrics:
            self._client.log_batch(task.run_id, metrics=metrics, synchronous=True)

    # Committing one snapshot.

    def _find_existing(self, snapshot: Snapshot):
        page = self._client.search_logged_models(
            experiment_ids=[snapshot.experiment_id],
            filter_string=(
                f"source_run_id = '{snapshot.run_id}' AND "
                f"tags.`{TAG_SNAPSHOT_ID}` = '{snapshot.snapshot_id}'"
            ),
            max_results=10,
        )
        return list(page)[0] if len(page) else None

    def commit(self, snapshot: Snapshot) -> None:
        """Upload one staged snapshot and mark it READY. Safe to call again after a failure."""
        started = time.monotonic()
        client = self._client
        logged_model = self._find_existing(snapshot)
        if logged_model is not None and store._status_name(logged_model.status) == STATUS_READY:
            _logger.info(
                "Checkpoint of run %s at epoch %d was already committed as %s",
                snapshot.run_id,
                snapshot.epoch,
                logged_model.model_id,
            )
        else:
            if logged_model is None:
                logged_model = client.create_logged_model(
                    experiment_id=snapshot.experiment_id,
                    name=f"checkpoint-epoch-{snapshot.epoch:04d}",
                    source_run_id=snapshot.run_id,
                    tags={
                        TAG_KIND: KIND_CHECKPOINT,
                        TAG_EPOCH: str(snapshot.epoch),
                        TAG_STEP: str(snapshot.global_step),
                        TAG_FORMAT: snapshot.format,
                        TAG_SIZE: str(snapshot.size_bytes),
                        TAG_SNAPSHOT_ID: snapshot.snapshot_id,
                    },
                    model_type=MODEL_TYPE,
                )
            client.log_model_artifacts(logged_model.model_id, snapshot.model_dir)
            self._verify_upload(logged_model, snapshot)
            metrics = [
                Metric(
                    key,
                    float(value),
                    int(snapshot.created * 1000),
                    snapshot.epoch,
                    model_id=logged_model.model_id,
                )
                for key, value in snapshot.metrics.items()
            ]
            if metrics:
                client.log_batch(snapshot.run_id, metrics=metrics, synchronous=True)
            client.finalize_logged_model(logged_model.model_id, STATUS_READY)
            _logger.info(
                "Committed checkpoint %s of run %s at epoch %d (%d bytes, %.1f s)",
                logged_model.model_id,
                snapshot.run_id,
                snapshot.epoch,
                snapshot.size_bytes,
                time.monotonic() - started,
            )

        with self._condition:
            self._committed.append((snapshot.epoch, logged_model.model_id))
        snapshot.discard()
        self._after_commit(snapshot.run_id)
        if self.on_commit is not None:
            self.on_commit(snapshot.epoch, f"models:/{logged_model.model_id}")

    def _verify_upload(self, logged_model, snapshot: Snapshot) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        from mlflow_ckpt import manifest

        expected = manifest.read_manifest(snapshot.model_dir)["files"]
        repository = get_artifact_repository(logged_model.artifact_location)
        found = {}
        folders = [None]
        while folders:
            folder = folders.pop()
            for entry in repository.list_artifacts(folder):
                if entry.is_dir:
                    folders.append(entry.path)
                else:
                    found[entry.path] = entry.file_size
        problems = []
        for relative, record in expected.items():
            size = found.get(relative)
            if size is None:
                problems.append(f"{relative} missing")
            elif size != record["size"]:
                problems.append(f"{relative} has {size} bytes, expected {record['size']}")
        if problems:
            raise CheckpointError(
                f"Upload of {logged_model.model_id} is incomplete: " + "; ".join(problems)
            )

    def _after_commit(self, run_id: str) -> None:
        # Pointers, index and retention are derived from the store, so a
        # failure here is repaired by the next commit; it never fails the commit.
        try:
            checkpoints = store.list_checkpoints(run_id, tracking_uri=self._tracking_uri)
            if self.retention:
                for checkpoint in policies.checkpoints_to_delete(
                    checkpoints, self.retention, self.monitor, self.mode
                ):
                    store.delete_checkpoint(checkpoint, self._client)
                checkpoints = store.list_checkpoints(run_id, tracking_uri=self._tracking_uri)
            if not checkpoints:
                return
            self._client.set_tag(run_id, RUN_TAG_LATEST, checkpoints[-1].model_id)
            if self.monitor:
                best = policies.rank_by_metric(
                    checkpoints, self.monitor, policies.resolve_mode(self.monitor, self.mode)
                )
                if best:
                    self._client.set_tag(run_id, RUN_TAG_BEST, best[0].model_id)
            run_index.write_index(self._client, run_id, checkpoints, monitor=self.monitor)
        except (MlflowException, OSError) as error:
            _logger.warning("Updating the checkpoint index of run %s failed: %s", run_id, error)


def upload_staged(
    staging_dir: str | None = None, run_id: str | None = None, tracking_uri: str | None = None
) -> list:
    """Commit snapshots left in a staging folder by a crash or an outage.

    Returns:
        The `(epoch, model_id)` pairs committed.
    """
    from mlflow_ckpt.snapshot import default_staging_dir, find_staged

    staging_dir = staging_dir or default_staging_dir()
    snapshots = find_staged(staging_dir, run_id)
    uploader = Uploader(tracking_uri=tracking_uri, max_pending=max(1, len(snapshots)))
    try:
        for snapshot in snapshots:
            print(
                f"mlflow-ckpt: uploading epoch {snapshot.epoch} of run {snapshot.run_id} "
                f"({snapshot.size_bytes} bytes) from {snapshot.folder}",
                file=sys.stderr,
            )
            uploader.commit(snapshot)
    finally:
        uploader.close(timeout=0, show_progress=False)
    return uploader.committed


def describe_unsent(snapshots) -> str:
    folders = sorted({os.path.dirname(s.folder) for s in snapshots})
    return (
        f"{len(snapshots)} checkpoint(s) were not uploaded and are kept in "
        + ", ".join(folders)
        + ". Upload them with `mlflow-ckpt upload` once the tracking server is reachable."
    )
