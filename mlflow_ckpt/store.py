"""The checkpoint store: find, download, verify, load and delete a run's checkpoints.

Checkpoints are MLflow LoggedModels whose `source_run_id` is the run and whose
tags carry the epoch and global step. Ordering always uses those tags, never
file names or creation times, and only READY models count as committed.
"""

import logging
import os

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from mlflow_ckpt import manifest
from mlflow_ckpt._http_limits import short_http_limits
from mlflow_ckpt.checkpoint import (
    KIND_CHECKPOINT,
    MANIFEST_FILE,
    STATUS_READY,
    TAG_EPOCH,
    TAG_FORMAT,
    TAG_KIND,
    TAG_SIZE,
    TAG_STEP,
    TAG_STEPS_INTO_EPOCH,
    TRAINING_STATE_DIR,
    Checkpoint,
)
from mlflow_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
    InvalidCheckpointError,
)
from mlflow_ckpt.policies import rank_by_metric, resolve_mode

_logger = logging.getLogger(__name__)

_SEARCH_PAGE_SIZE = 100

# Set on a checkpoint's LoggedModel before its files are deleted. A marked
# checkpoint is no longer listed, and the next retention pass finishes a
# deletion that a crash interrupted.
TAG_DELETING = "mlflow_ckpt.deleting"


def _client(tracking_uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _status_name(status) -> str:
    return getattr(status, "name", None) or str(status)


def _is_not_found(error: MlflowException) -> bool:
    return error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def get_run(run_id: str, client: MlflowClient | None = None):
    """Return the MLflow run, or raise `CheckpointNotFoundError` naming `run_id`."""
    client = client or _client()
    if not run_id or not isinstance(run_id, str):
        raise CheckpointNotFoundError(f"Invalid run id {run_id!r}: expected a non-empty string.")
    try:
        # Every read starts here, so a dead server is reported within seconds
        # instead of after MLflow's default retries (about 4 minutes), unless
        # the user chose their own retry count.
        if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ:
            return client.get_run(run_id)
        with short_http_limits(max_retries=2, timeout=30):
            return client.get_run(run_id)
    except MlflowException as error:
        if _is_not_found(error) or "not found" in str(error).lower():
            raise CheckpointNotFoundError(
                f"Run {run_id!r} not found at tracking URI {mlflow.get_tracking_uri()!r}. "
                "Check the run id in the MLflow UI or with `mlflow runs list "
                "--experiment-id <ID>`, and that MLFLOW_TRACKING_URI points at the server "
                "that stores it."
            ) from error
        if _is_unreachable(error):
            reason = unreachable_reason(str(error)) or "no answer"
            raise CheckpointError(
                f"Tracking server {mlflow.get_tracking_uri()!r} is unreachable ({reason}) "
                f"while looking up run {run_id!r}. Start the server, or point "
                "MLFLOW_TRACKING_URI at one that is running."
            ) from error
        raise


def _is_unreachable(error: MlflowException) -> bool:
    text = str(error)
    return any(
        marker in text
        for marker in ("Max retries exceeded", "Connection refused", "Failed to establish a new connection")
    )


# Phrases in MLflow's error message when the HTTP connection itself failed.
# Matched in this order against the lowercased message, so the first that
# matches names the cause.
_UNREACHABLE_MARKERS = {
    "connection refused": "connection refused",
    "name or service not known": "unknown host name",
    "failed to establish a new connection": "connection failed",
    "timed out": "timed out",
    "max retries exceeded": "no answer",
}


def unreachable_reason(message: str) -> str | None:
    """Return why an HTTP request in `message` could not reach the server, or None."""
    lowered = message.lower()
    for marker, reason in _UNREACHABLE_MARKERS.items():
        if marker in lowered:
            return reason
    return None


def _first_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__


def checkpoint_from_logged_model(logged_model) -> Checkpoint | None:
    """Build a `Checkpoint` from a LoggedModel, or return None if it is not a checkpoint."""
    tags = logged_model.tags or {}
    if tags.get(TAG_KIND) != KIND_CHECKPOINT or TAG_EPOCH not in tags:
        return None
    epoch = int(tags[TAG_EPOCH])
    metrics = {}
    for metric in logged_model.metrics or []:
        # Several values of one key can be linked; the one logged at this epoch wins.
        if metric.key not in metrics or metric.step == epoch:
            metrics[metric.key] = metric.value
    size = tags.get(TAG_SIZE)
    return Checkpoint(
        run_id=logged_model.source_run_id,
        model_id=logged_model.model_id,
        epoch=epoch,
        global_step=int(tags.get(TAG_STEP, 0)),
        metrics=metrics,
        format=tags.get(TAG_FORMAT, "keras"),
        model_uri=f"models:/{logged_model.model_id}",
        size_bytes=int(size) if size is not None else None,
        status=_status_name(logged_model.status),
        steps_into_epoch=int(tags.get(TAG_STEPS_INTO_EPOCH, 0)),
    )


def search_checkpoint_models(run, client: MlflowClient, experiment_id: str | None = None) -> list:
    """Return every LoggedModel of `run` that is a checkpoint, in any status.

    Args:
        run: An MLflow `Run`, or a run id together with `experiment_id`,
            which saves a `get_run` request.
        client: The client to search with.
        experiment_id: The experiment of `run` when `run` is an id.
    """
    if experiment_id is None:
        experiment_id, run_id = run.info.experiment_id, run.info.run_id
    else:
        run_id = run
    models = []
    page_token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            max_results=_SEARCH_PAGE_SIZE,
            page_token=page_token,
        )
        models.extend(m for m in page if (m.tags or {}).get(TAG_KIND) == KIND_CHECKPOINT)
        page_token = page.token
        if not page_token:
            return models


def list_checkpoints(
    run_id: str, include_pending: bool = False, tracking_uri: str | None = None
) -> list[Checkpoint]:
    """List the checkpoints of an MLflow run, ordered by epoch and global step.

    Args:
        run_id: ID of the run that logged the checkpoints.
        include_pending: Also list checkpoints that are still uploading or
            whose upload failed. They are never returned as latest or best.
        tracking_uri: Tracking server to ask; defaults to the current one.

    Returns:
        A list of `Checkpoint`, oldest first. Empty if the run has none.

    Raises:
        CheckpointNotFoundError: if the run does not exist.
    """
    client = _client(tracking_uri)
    run = get_run(run_id, client)
    return checkpoints_from_models(search_checkpoint_models(run, client), include_pending)


def checkpoints_from_models(logged_models, include_pending: bool = False) -> list[Checkpoint]:
    """Return the checkpoints among `logged_models` as `list_checkpoints` orders them."""
    checkpoints = []
    for logged_model in logged_models:
        checkpoint = checkpoint_from_logged_model(logged_model)
        if checkpoint is None or (logged_model.tags or {}).get(TAG_DELETING):
            continue
        if include_pending or checkpoint.status == STATUS_READY:
            checkpoints.append((checkpoint, logged_model.creation_timestamp or 0))
    # Two checkpoints share an epoch and step when a run is resumed from an earlier
    # epoch and trains past it again. The newer one is the run's current state.
    checkpoints.sort(key=lambda pair: (pair[0].epoch, pair[0].global_step, pair[1]))
    return [checkpoint for checkpoint, _ in checkpoints]


def latest_checkpoint(run_id: str, tracking_uri: str | None = None) -> Checkpoint | None:
    """Return the committed checkpoint with the highest epoch and step, or None.

    Example:

    ```python
    checkpoint = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    model = mlflow_ckpt.load_checkpoint(checkpoint)
    ```
    """
    checkpoints = list_checkpoints(run_id, tracking_uri=tracking_uri)
    return checkpoints[-1] if checkpoints else None


def best_checkpoint(
    run_id: str, monitor: str, mode: str = "min", tracking_uri: str | None = None
) -> Checkpoint | None:
    """Return the committed checkpoint with the best value of `monitor`, or None.

    Args:
        run_id: ID of the run.
        monitor: Metric name as Keras logs it, e.g. `"val_loss"`.
        mode: `"min"`, `"max"`, or `"auto"` (decided from the metric name).
            On a tie the newer checkpoint wins.
    """
    if mode not in ("min", "max", "auto"):
        raise ValueError(f"mode must be 'min', 'max' or 'auto'. Received: mode={mode!r}")
    ranked = rank_by_metric(
        list_checkpoints(run_id, tracking_uri=tracking_uri), monitor, resolve_mode(monitor, mode)
    )
    return ranked[0] if ranked else None


def get_checkpoint(run_id: str, epoch: int, tracking_uri: str | None = None) -> Checkpoint:
    """Return the committed checkpoint of `run_id` at `epoch`.

    If the run has several checkpoints in that epoch (step-based saves), the
    one with the highest global step is returned.

    Raises:
        CheckpointNotFoundError: naming the run, the epoch and the epochs that exist.
    """
    checkpoints = list_checkpoints(run_id, tracking_uri=tracking_uri)
    matching = [c for c in checkpoints if c.epoch == int(epoch)]
    if not matching:
        available = sorted({c.epoch for c in checkpoints})
        raise CheckpointNotFoundError(
            f"Run {run_id!r} has no committed checkpoint at epoch {epoch}. "
            f"Committed epochs: {available or 'none'}. Pass one of those, or omit the "
            "epoch to use the latest."
        )
    return matching[-1]


def is_local_checkpoint_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(
        os.path.join(path, MANIFEST_FILE)
    )


def checkpoint_from_local_dir(path) -> Checkpoint:
    """Describe a checkpoint folder on local disk (downloaded or copied)."""
    content = manifest.read_manifest(path)
    return Checkpoint(
        run_id=None,
        model_id=None,
        epoch=int(content.get("epoch", 0)),
        global_step=int(content.get("global_step", 0)),
        metrics=content.get("metrics", {}),
        format=content.get("format", "keras"),
        model_uri=os.path.abspath(path),
        size_bytes=sum(entry["size"] for entry in content["files"].values()),
        local_path=os.path.abspath(path),
        steps_into_epoch=int(content.get("steps_into_epoch", 0)),
    )


def resolve(ref, epoch: int | None = None, tracking_uri: str | None = None) -> Checkpoint:
    """Turn a run id, `Checkpoint`, `models:/` URI or local folder into a `Checkpoint`.

    Args:
        ref: A run id (with `epoch`, or the latest committed one), a
            `Checkpoint`, a `models:/<model_id>` URI, or a local folder that
            contains a checkpoint.
        epoch: With a run id, the epoch to pick.

    Raises:
        CheckpointNotFoundError: if nothing matches, with what to pass instead.
    """
    if isinstance(ref, Checkpoint):
        return ref
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref:
        raise CheckpointNotFoundError(
            f"Invalid checkpoint reference {ref!r}: pass a run id, a Checkpoint, "
            "a 'models:/<model_id>' URI or a local checkpoint folder."
        )
    if is_local_checkpoint_dir(ref):
        return checkpoint_from_local_dir(ref)
    if ref.startswith("models:/"):
        return _resolve_model_uri(ref, tracking_uri)
    if os.path.sep in ref or ref.startswith("."):
        if not os.path.exists(ref):
            raise CheckpointNotFoundError(
                f"Checkpoint folder {ref!r} does not exist. Pass an existing folder, a run "
                "id or a 'models:/<model_id>' URI."
            )
        raise CheckpointNotFoundError(
            f"{ref!r} is not a checkpoint folder: it has no {MANIFEST_FILE}. Pass the folder "
            "that contains MLmodel and manifest.json."
        )
    if epoch is not None:
        return get_checkpoint(ref, epoch, tracking_uri=tracking_uri)
    checkpoint = latest_checkpoint(ref, tracking_uri=tracking_uri)
    if checkpoint is None:
        raise CheckpointNotFoundError(
            f"Run {ref!r} has no committed checkpoint yet. Train it with an MlflowCheckpoint "
            f"callback, or check `mlflow-ckpt list {ref}` for pending uploads."
        )
    return checkpoint


def _resolve_model_uri(uri: str, tracking_uri: str | None) -> Checkpoint:
    client = _client(tracking_uri)
    path = uri[len("models:/"):].strip("/")
    if "/" in path or "@" in path:
        # A registered model version: models:/<name>/<version> or models:/<name>@<alias>.
        name, _, rest = path.replace("@", "/@", 1).partition("/")
        try:
            if rest.startswith("@"):
                version = client.get_model_version_by_alias(name, rest[1:])
            else:
                version = client.get_model_version(name, rest)
        except MlflowException as error:
            raise CheckpointNotFoundError(f"Registered model {uri!r} not found: {_first_line(error).rstrip('.')}.") from error
        model_id = version.model_id
    else:
        model_id = path
    try:
        logged_model = client.get_logged_model(model_id)
    except MlflowException as error:
        raise CheckpointNotFoundError(
            f"Model {uri!r} not found: {_first_line(error).rstrip('.')}. Use a URI from "
            "`mlflow-ckpt list RUN_ID`."
        ) from error
    checkpoint = checkpoint_from_logged_model(logged_model)
    if checkpoint is None:
        raise CheckpointNotFoundError(
            f"Model {uri!r} is not a checkpoint logged by mlflow-ckpt. Load it with "
            "mlflow_ckpt.load_model() instead."
        )
    return checkpoint


def download(checkpoint: Checkpoint, dst_path: str | None = None, verify: bool = True) -> str:
    """Download a checkpoint's files and check them against the manifest.

    Args:
        checkpoint: The checkpoint to fetch. A local one is verified in place.
        dst_path: Folder to download into; a new temporary folder by default.
        verify: Check the SHA-256 of every file (recommended).

    Returns:
        The local folder that contains MLmodel, the model data and the manifest.

    Raises:
        InvalidCheckpointError: naming every file that is missing or corrupt.
    """
    if checkpoint.local_path:
        local = checkpoint.local_path
    else:
        if checkpoint.status != STATUS_READY:
            raise InvalidCheckpointError(
                f"Checkpoint {checkpoint.model_uri} (epoch {checkpoint.epoch}) is "
                f"{checkpoint.status}, not committed. Wait for its upload to finish, or pick "
                "a committed checkpoint from list_checkpoints()."
            )
        from mlflow_ckpt import transfer

        local = transfer.download(
            checkpoint, dst_path, on_bytes=transfer.ProgressPrinter(f"epoch {checkpoint.epoch}", "received")
        )
    if verify:
        manifest.verify(
            local,
            label=f"{checkpoint.model_uri} (epoch {checkpoint.epoch})",
            hint=manifest.LOCAL_FOLDER_HINT if checkpoint.local_path else manifest.STORED_CHECKPOINT_HINT,
        )
    return local


def has_training_state(local_dir: str) -> bool:
    return os.path.isdir(os.path.join(local_dir, TRAINING_STATE_DIR))


def load_checkpoint(
    ref,
    epoch: int | None = None,
    model=None,
    custom_objects=None,
    compile: bool = True,
    dst_path: str | None = None,
    tracking_uri: str | None = None,
):
    """Load a checkpoint as a Keras model.

    The model's weights come from the checkpoint. When the model is compiled,
    its optimizer state (slots and step counter) is restored too, so it can
    go on training. For weights-only checkpoints, pass `model`, a model built
    by the same code, and its weights are overwritten.

    Args:
        ref: A run id, a `Checkpoint`, a `models:/<model_id>` URI or a local
            checkpoint folder.
        epoch: With a run id, the epoch to load; default the latest.
        model: A model built by the training code, to load the checkpoint
            into and return. Required for weights-only checkpoints. If it is
            compiled, its optimizer state is restored as well.
        custom_objects: Classes or functions the saved model refers to, by name.
        compile: Compile the model with its saved loss, metrics and optimizer.
        dst_path: Where to download the files; a temporary folder by default.
        tracking_uri: Tracking server to read from; defaults to the current one.

    Returns:
        A `keras.Model`.

    Raises:
        CheckpointNotFoundError: if the run, epoch or URI does not exist.
        InvalidCheckpointError: if a file is missing or corrupt.
        IncompatibleCheckpointError: if `model` does not match the checkpoint.

    Example:

    ```python
    model = mlflow_ckpt.load_checkpoint(run_id)  # latest committed epoch
    model.evaluate(x_test, y_test)
    ```
    """
    from mlflow_ckpt import training_state
    from mlflow_ckpt.flavor import load_model_from_dir

    checkpoint = resolve(ref, epoch=epoch, tracking_uri=tracking_uri)
    local = download(checkpoint, dst_path=dst_path)
    state_dir = os.path.join(local, TRAINING_STATE_DIR)
    has_optimizer = model is not None and getattr(model, "optimizer", None) is not None

    if model is not None and checkpoint.format != "weights":
        if has_optimizer and has_training_state(local):
            state, arrays = training_state.read(state_dir)
            if training_state.needs_model_file(state):
                saved = load_model_from_dir(local, custom_objects=custom_objects, compile=True)
                arrays = training_state.fill_from_model(state, arrays, saved)
            training_state.restore(model, state, arrays)
        else:
            saved = load_model_from_dir(local, custom_objects=custom_objects, compile=False)
            _copy_weights(saved, model, checkpoint)
        return model

    loaded = load_model_from_dir(
        local, custom_objects=custom_objects, compile=compile, model=model
    )
    if has_training_state(local) and (compile or has_optimizer):
        state, arrays = training_state.read(state_dir)
        arrays = training_state.fill_from_model(state, arrays, loaded)
        training_state.restore(loaded, state, arrays)
    return loaded


def _copy_weights(source, target, checkpoint: Checkpoint) -> None:
    """Copy weights between two models of the same architecture, checking every shape first."""
    source_weights = source.get_weights()
    target_shapes = [tuple(w.shape) for w in target.weights]
    source_shapes = [tuple(w.shape) for w in source_weights]
    if source_shapes != target_shapes:
        raise IncompatibleCheckpointError(
            f"The model passed to load_checkpoint does not match checkpoint "
            f"{checkpoint.model_uri} (epoch {checkpoint.epoch}): its weight shapes are "
            f"{target_shapes}, the checkpoint's are {source_shapes}. Build the model with "
            "the code that trained it, or omit model= to get the saved architecture."
        )
    target.set_weights(source_weights)


def _model_folder(logged_model) -> str:
    """Return the folder that contains all of `logged_model`'s files.

    MLflow stores a LoggedModel's files under `.../models/<model_id>/artifacts`.
    Deleting only `artifacts` leaves an empty `<model_id>` folder per deleted
    checkpoint behind, on local and proxied stores alike.
    """
    location = logged_model.artifact_location.rstrip("/")
    parent, _, last = location.rpartition("/")
    if last == "artifacts" and parent.rpartition("/")[2] == logged_model.model_id:
        return parent
    return location


def delete_checkpoint(checkpoint: Checkpoint, client: MlflowClient | None = None) -> None:
    """Delete a checkpoint's files from the artifact store, then its LoggedModel record.

    The files go first: `MlflowClient.delete_logged_model` alone leaves them
    behind. Before that, the checkpoint is tagged as being deleted, so that it
    is never listed (or resumed from) with part of its files gone.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = client or _client()
    logged_model = client.get_logged_model(checkpoint.model_id)
    client.set_logged_model_tags(checkpoint.model_id, {TAG_DELETING: "true"})
    repository = get_artifact_repository(_model_folder(logged_model))
    try:
        repository.delete_artifacts()
    except FileNotFoundError:
        _logger.debug("Files of %s were already gone", checkpoint.model_uri)
    client.delete_logged_model(checkpoint.model_id)
    _logger.info(
        "Deleted checkpoint %s of run %s (epoch %d)",
        checkpoint.model_uri,
        checkpoint.run_id,
        checkpoint.epoch,
    )
