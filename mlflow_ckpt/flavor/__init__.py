"""The `mlflow_ckpt` MLflow flavor for Keras 3 models.

Saving and logging live in `save`, loading in `load`, the per-format file
handling in `formats`, and the `python_function` predictor in `pyfunc`.
"""

FLAVOR_NAME = "mlflow_ckpt"

from mlflow_ckpt.flavor.formats import FORMATS  # noqa: E402
from mlflow_ckpt.flavor.load import load_model, load_model_from_dir, read_flavor_conf  # noqa: E402
from mlflow_ckpt.flavor.pyfunc import _load_pyfunc  # noqa: E402
from mlflow_ckpt.flavor.save import get_default_pip_requirements, log_model, save_model  # noqa: E402

__all__ = [
    "FLAVOR_NAME",
    "FORMATS",
    "get_default_pip_requirements",
    "load_model",
    "load_model_from_dir",
    "log_model",
    "read_flavor_conf",
    "save_model",
]
