"""Which process logs checkpoints when one model trains on several machines.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same
`fit` with the same callbacks and has the same variables. Only the chief
talks to MLflow: it starts or continues the run, stages and uploads the
checkpoints and logs the metrics. The other workers skip all of that, but
each can restore a checkpoint with `mlflow_ckpt.resume` (all of them must,
so that their variables agree before training continues).
"""

import json
import logging
import os

_logger = logging.getLogger(__name__)


def _chief_from_tf_config(tf_config: str | None) -> bool:
    """Apply TensorFlow's rule: the `chief` task, or worker 0 when the cluster has no chief."""
    if not tf_config:
        return True
    try:
        config = json.loads(tf_config)
    except ValueError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}). Received: TF_CONFIG={tf_config!r}"
        ) from error
    task = config.get("task") or {}
    task_type = task.get("type")
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    cluster = config.get("cluster") or {}
    return task_type == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cluster


def is_chief(model=None) -> bool:
    """Return True if this process should log checkpoints and metrics to MLflow.

    True without a distribution strategy and under single-machine strategies.
    Under a multi-worker strategy, True only on the chief worker.

    Args:
        model: The Keras model being trained; its `distribute_strategy` is
            asked first. Without it, the strategy in scope is used, then the
            `TF_CONFIG` environment variable.
    """
    strategy = getattr(model, "distribute_strategy", None) if model is not None else None
    if strategy is None:
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
    extended = getattr(strategy, "extended", None)
    if getattr(extended, "_in_multi_worker_mode", lambda: False)():
        return bool(extended.should_checkpoint)
    return _chief_from_tf_config(os.environ.get("TF_CONFIG"))


def worker_description() -> str:
    """Describe this process's task from `TF_CONFIG`, e.g. `"worker 1"`, for log messages."""
    try:
        task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
    except ValueError:
        return "unknown task"
    if not task:
        return "single worker"
    return f"{task.get('type')} {task.get('index', 0)}"
