"""mlflow-ckpt: Keras 3 checkpoints logged to MLflow, with exact resume and serving.

Public names are loaded on first use, so `import mlflow_ckpt` (and the
`mlflow-ckpt` command) does not pay for importing TensorFlow until needed.
"""

import importlib
import sys
import types

from mlflow_ckpt._version import __version__

_PUBLIC_NAMES = {
    "MlflowCheckpoint": "mlflow_ckpt.callback",
    "Checkpoint": "mlflow_ckpt.checkpoint",
    "list_checkpoints": "mlflow_ckpt.store",
    "latest_checkpoint": "mlflow_ckpt.store",
    "best_checkpoint": "mlflow_ckpt.store",
    "get_checkpoint": "mlflow_ckpt.store",
    "load_checkpoint": "mlflow_ckpt.store",
    "delete_checkpoint": "mlflow_ckpt.store",
    "resume": "mlflow_ckpt.resume",
    "ResumeState": "mlflow_ckpt.resume",
    "promote": "mlflow_ckpt.promote",
    "TrainingPreempted": "mlflow_ckpt.preemption",
    "upload_staged": "mlflow_ckpt.uploader",
    "save_model": "mlflow_ckpt.flavor",
    "log_model": "mlflow_ckpt.flavor",
    "load_model": "mlflow_ckpt.flavor",
    "CheckpointError": "mlflow_ckpt.errors",
    "CheckpointNotFoundError": "mlflow_ckpt.errors",
    "InvalidCheckpointError": "mlflow_ckpt.errors",
    "IncompatibleCheckpointError": "mlflow_ckpt.errors",
}

__all__ = ["__version__", *_PUBLIC_NAMES]


def __getattr__(name):
    module_name = _PUBLIC_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mlflow_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


class _Package(types.ModuleType):
    """The package module, keeping functions that share a name with their submodule.

    Importing the submodule `mlflow_ckpt.resume` sets the package attribute
    `resume` to that module, which would hide the function
    `mlflow_ckpt.resume` from then on. Such assignments are dropped, so the
    name keeps resolving to the function through `__getattr__`. Reach the
    submodules with `from mlflow_ckpt.resume import ...`, since
    `import mlflow_ckpt.resume as m` binds the function too.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC_NAMES.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
