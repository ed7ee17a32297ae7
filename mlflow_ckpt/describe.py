"""Collect what is known about one checkpoint: its record, manifest, signature and lineage.

`mlflow-ckpt show` prints this. Only the small files (`manifest.json` and
`MLmodel`) are read from the artifact store, never the model data.
"""

import json
import logging

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_ckpt import transfer
from mlflow_ckpt.checkpoint import MANIFEST_FILE, RUN_TAG_BEST, RUN_TAG_LATEST

_logger = logging.getLogger(__name__)

MLMODEL_FILE = "MLmodel"
# Run tags written when training continues in a new run (`resume(..., fork=True)`).
RUN_TAG_RESUMED_FROM_RUN = "mlflow_ckpt.resumed_from_run"
RUN_TAG_RESUMED_FROM_EPOCH = "mlflow_ckpt.resumed_from_epoch"


def describe_checkpoint(checkpoint, tracking_uri: str | None = None) -> dict:
    """Return a JSON-serializable description of `checkpoint`.

    Args:
        checkpoint: A `Checkpoint`, logged or in a local folder.
        tracking_uri: Tracking server to read from; the current one by default.

    Returns:
        A dict with four keys. `checkpoint` is the record and `manifest` the
        parsed `manifest.json` (None if missing). `signature` is the model's
        input and output schema from `MLmodel` (None if absent). `lineage`
        names the run, what it was resumed from, whether this is the run's
        latest or best checkpoint, and the model versions promoted from it.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    texts = transfer.read_texts(checkpoint, [MANIFEST_FILE, MLMODEL_FILE], client)
    return {
        "checkpoint": checkpoint.to_dict(),
        "manifest": json.loads(texts[MANIFEST_FILE]) if texts[MANIFEST_FILE] else None,
        "signature": _signature(texts[MLMODEL_FILE]),
        "lineage": _lineage(checkpoint, client, tracking_uri),
    }


def _signature(mlmodel_text: str | None) -> dict | None:
    if not mlmodel_text:
        return None
    signature = (yaml.safe_load(mlmodel_text) or {}).get("signature")
    if not signature:
        return None
    # MLmodel stores each schema as a JSON string inside the YAML.
    return {
        key: json.loads(value) if isinstance(value, str) else value
        for key, value in signature.items()
        if value is not None
    }


def _lineage(checkpoint, client: MlflowClient, tracking_uri: str | None) -> dict:
    from mlflow_ckpt.promote import promoted_versions

    if checkpoint.run_id is None:
        return {"run_id": None}
    run = client.get_run(checkpoint.run_id)
    tags = run.data.tags
    lineage = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "run_status": run.info.status,
        "is_latest": tags.get(RUN_TAG_LATEST) == checkpoint.model_id,
        "is_best": tags.get(RUN_TAG_BEST) == checkpoint.model_id,
        "resumed_from_run": tags.get(RUN_TAG_RESUMED_FROM_RUN),
        "resumed_from_epoch": tags.get(RUN_TAG_RESUMED_FROM_EPOCH),
        "registered_versions": [],
    }
    try:
        versions = promoted_versions(checkpoint, tracking_uri=tracking_uri)
    except MlflowException as error:
        # A tracking server without a model registry still describes the checkpoint.
        _logger.warning("Listing registered versions of %s failed: %s", checkpoint.model_uri, error)
        versions = []
    lineage["registered_versions"] = [
        {"name": v.name, "version": str(v.version), "model_uri": f"models:/{v.name}/{v.version}"}
        for v in versions
    ]
    return lineage
