"""Promote a checkpoint to a version of a registered model, optionally in another format.

A registered model version created from a LoggedModel reads that model's
files in place (MLflow 3.17 does not copy them). Checkpoints are deleted by
retention and `mlflow-ckpt prune`, so `promote` never registers a checkpoint
itself. It first logs a copy as a new LoggedModel of the same run, tagged
with the checkpoint it came from, and registers the copy. Retention never
touches the copy, because it is not tagged as a checkpoint.
"""

import json
import logging
import os
import tempfile

import mlflow
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_ckpt import manifest, store, transfer
from mlflow_ckpt.checkpoint import MANIFEST_FILE, STATUS_READY, TAG_EPOCH, TAG_FORMAT, TAG_KIND
from mlflow_ckpt.errors import CheckpointNotFoundError, InvalidCheckpointError

_logger = logging.getLogger(__name__)

KIND_PROMOTED = "promoted"
# On the promoted LoggedModel and on the model version: where it came from.
TAG_SOURCE_MODEL_ID = "mlflow_ckpt.source_model_id"
TAG_SOURCE_RUN_ID = "mlflow_ckpt.source_run_id"
MODEL_TYPE = "mlflow-ckpt-promoted"

PROMOTE_FORMATS = ("keras", "h5", "savedmodel")


def promote(
    ref,
    name: str,
    epoch: int | None = None,
    format: str | None = None,
    alias: str | None = None,
    custom_objects=None,
    await_registration_for: int = 300,
    on_file=None,
    tracking_uri: str | None = None,
    on_bytes=None,
):
    """Register a checkpoint as a new version of the registered model `name`.

    The checkpoint is downloaded and verified against its manifest, then
    logged again as a new LoggedModel of the same run (in `format` if given,
    else byte for byte), and that model is registered. The version's tags
    record the run, epoch and checkpoint it came from.

    Args:
        ref: A run id (its latest committed checkpoint, or `epoch`), a
            `Checkpoint`, or a `models:/<model_id>` URI of a checkpoint.
        name: Registered model name; created if it does not exist.
        epoch: With a run id, the epoch to promote.
        format: `"keras"`, `"h5"` or `"savedmodel"` to convert the model
            (SavedModel for TF Serving, TFLite and TF.js). Defaults to the
            checkpoint's own format, copied without loading it.
        alias: Registered model alias to point at the new version, e.g. `"champion"`.
        custom_objects: Classes or functions the saved model needs to load,
            when converting and they cannot be imported from the recorded paths.
        await_registration_for: Seconds to wait for the version to become READY.
        on_file: Called with a `transfer.FileProgress` after each downloaded file.
        tracking_uri: Tracking server to use; the current one by default.
        on_bytes: Called as `on_bytes(done_bytes, total_bytes)` while the checkpoint
            downloads, as for `transfer.download`.

    Returns:
        The `mlflow.entities.model_registry.ModelVersion` created.

    Raises:
        CheckpointNotFoundError: if the run, epoch or URI does not resolve to
            a committed checkpoint logged to MLflow.
        InvalidCheckpointError: if a file of the checkpoint is missing or corrupt.
        ValueError: if `name`, `format` or `alias` is invalid.

    Example:

    ```python
    version = mlflow_ckpt.promote(run_id, name="digits-classifier", format="savedmodel")
    model = mlflow.pyfunc.load_model(f"models:/digits-classifier/{version.version}")
    ```
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty registered model name. Received: name={name!r}")
    if format is not None and format not in PROMOTE_FORMATS:
        raise ValueError(
            f"format must be one of {', '.join(map(repr, PROMOTE_FORMATS))}, or None to keep "
            f"the checkpoint's format. Received: format={format!r}"
        )
    if alias is not None and (not isinstance(alias, str) or not alias.strip()):
        raise ValueError(f"alias must be a non-empty string or None. Received: alias={alias!r}")

    client = MlflowClient(tracking_uri=tracking_uri)
    checkpoint = store.resolve(ref, epoch=epoch, tracking_uri=tracking_uri)
    _require_logged_and_committed(checkpoint)
    target_format = format or checkpoint.format

    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-promote-") as scratch:
        local = transfer.download(
            checkpoint, scratch, on_file=on_file, client=client, on_bytes=on_bytes
        )
        manifest.verify(local, label=f"{checkpoint.model_uri} (epoch {checkpoint.epoch})")
        if target_format == checkpoint.format:
            model_id = _log_copy(checkpoint, local, name, client)
        else:
            model_id = _log_converted(checkpoint, local, name, target_format, custom_objects)

    version = mlflow.register_model(
        f"models:/{model_id}",
        name,
        await_registration_for=await_registration_for,
        tags=_lineage_tags(checkpoint, target_format),
    )
    client.update_model_version(
        name,
        version.version,
        description=(
            f"Checkpoint of run {checkpoint.run_id} at epoch {checkpoint.epoch} "
            f"({checkpoint.model_uri}), format {target_format}, promoted by mlflow-ckpt."
        ),
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    _logger.info(
        "Registered %s version %s from checkpoint %s of run %s (epoch %d, format %s)",
        name, version.version, checkpoint.model_uri, checkpoint.run_id, checkpoint.epoch,
        target_format,
    )
    return client.get_model_version(name, version.version)


def promoted_versions(checkpoint, tracking_uri: str | None = None) -> list:
    """Return the registered model versions promoted from `checkpoint`, oldest first."""
    if checkpoint.run_id is None or checkpoint.model_id is None:
        return []
    client = MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(f"run_id = '{checkpoint.run_id}'")
    found = [v for v in versions if (v.tags or {}).get(TAG_SOURCE_MODEL_ID) == checkpoint.model_id]
    return sorted(found, key=lambda v: (v.creation_timestamp, v.name, int(v.version)))


def _require_logged_and_committed(checkpoint) -> None:
    if checkpoint.local_path or checkpoint.run_id is None:
        raise CheckpointNotFoundError(
            f"{checkpoint.model_uri} is a local folder. Promote a checkpoint logged to MLflow: "
            "pass its run id or its models:/<model_id> URI."
        )
    if checkpoint.status != STATUS_READY:
        raise InvalidCheckpointError(
            f"Checkpoint {checkpoint.model_uri} (epoch {checkpoint.epoch}) is "
            f"{checkpoint.status}, not committed, so it cannot be promoted. Pick a READY "
            "checkpoint from `mlflow-ckpt list`."
        )


def _lineage_tags(checkpoint, target_format: str) -> dict:
    return {
        TAG_SOURCE_RUN_ID: checkpoint.run_id,
        TAG_SOURCE_MODEL_ID: checkpoint.model_id,
        TAG_EPOCH: str(checkpoint.epoch),
        TAG_FORMAT: target_format,
    }


def _log_copy(checkpoint, local: str, name: str, client: MlflowClient) -> str:
    """Log the checkpoint's files unchanged, except for the ids in MLmodel, as a new LoggedModel."""
    experiment_id = client.get_run(checkpoint.run_id).info.experiment_id
    tags = {TAG_KIND: KIND_PROMOTED, **_lineage_tags(checkpoint, checkpoint.format)}
    logged_model = client.create_logged_model(
        experiment_id=experiment_id,
        name=name,
        source_run_id=checkpoint.run_id,
        tags=tags,
        model_type=MODEL_TYPE,
    )
    try:
        _point_mlmodel_at(local, logged_model, checkpoint)
        client.log_model_artifacts(logged_model.model_id, local)
        client.finalize_logged_model(logged_model.model_id, STATUS_READY)
    except (MlflowException, OSError):
        client.finalize_logged_model(logged_model.model_id, "FAILED")
        raise
    _link_to_run(client, checkpoint, logged_model.model_id)
    return logged_model.model_id


def _point_mlmodel_at(local: str, logged_model, checkpoint) -> None:
    """Make the copied MLmodel name the new LoggedModel, and update its manifest entry."""
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    mlmodel_path = os.path.join(local, MLMODEL_FILE_NAME)
    mlmodel = Model.load(mlmodel_path)
    mlmodel.model_id = logged_model.model_id
    mlmodel.model_uuid = logged_model.model_id
    mlmodel.artifact_path = logged_model.artifact_location
    mlmodel.save(mlmodel_path)

    manifest_path = os.path.join(local, MANIFEST_FILE)
    with open(manifest_path) as f:
        content = json.load(f)
    content["files"][MLMODEL_FILE_NAME] = {
        "sha256": manifest.sha256_of(mlmodel_path),
        "size": os.path.getsize(mlmodel_path),
    }
    content["source_model_id"] = checkpoint.model_id
    with open(manifest_path, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True)


def _log_converted(checkpoint, local: str, name: str, target_format: str, custom_objects) -> str:
    """Load the checkpoint's Keras model and log it again in `target_format`."""
    from mlflow.models import Model

    from mlflow_ckpt.flavor import load_model_from_dir, log_model, read_flavor_conf
    from mlflow_ckpt.flavor.formats import read_architecture

    conf = read_flavor_conf(local)
    if conf["format"] == "weights":
        model = read_architecture(local, conf, custom_objects=custom_objects)
    else:
        model = load_model_from_dir(local, custom_objects=custom_objects, compile=True)

    saved = Model.load(local)
    code_dir = os.path.join(local, conf["code"]) if conf.get("code") else None
    code_paths = (
        [os.path.join(code_dir, entry) for entry in sorted(os.listdir(code_dir))]
        if code_dir and os.path.isdir(code_dir)
        else None
    )
    info = log_model(
        model,
        name=name,
        format=target_format,
        code_paths=code_paths,
        signature=saved.signature,
        input_example=saved.load_input_example(local),
        pip_requirements=_read_requirements(local),
        run_id=checkpoint.run_id,
        step=checkpoint.epoch,
        tags={TAG_KIND: KIND_PROMOTED, **_lineage_tags(checkpoint, target_format)},
        model_type=MODEL_TYPE,
    )
    return info.model_id


def _read_requirements(local: str) -> list | None:
    path = os.path.join(local, "requirements.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [line.strip() for line in f]
    # Options such as `-c constraints.txt` name files relative to the old model folder.
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def _link_to_run(client: MlflowClient, checkpoint, model_id: str) -> None:
    # The run page of the MLflow UI lists a run's models from its outputs.
    client.log_outputs(checkpoint.run_id, [LoggedModelOutput(model_id, step=checkpoint.epoch)])
