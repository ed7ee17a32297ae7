"""Load a model of the `mlflow_ckpt` flavor back as a Keras model."""

import logging
import os
import sys

from mlflow_ckpt import manifest
from mlflow_ckpt.checkpoint import MANIFEST_FILE
from mlflow_ckpt.errors import InvalidCheckpointError

logger = logging.getLogger(__name__)


def load_model(model_uri, custom_objects=None, compile=True, safe_mode=True, dst_path=None, model=None):
    """Load a model logged or saved by this flavor as a Keras model.

    Every format but `weights` returns a new trainable model. With
    `compile=True`, the model also has its optimizer with the saved step
    count and slot variables, so `fit` continues where training stopped.

    Args:
        model_uri: Where the model is: a local path, `models:/<model_id>`,
            `models:/<name>/<version>`, `runs:/<run_id>/<name>`, or any
            artifact URI MLflow accepts.
        custom_objects: Dict of name to class or function, for objects the
            model needs that were not recorded at save time or cannot be
            imported here. Takes precedence over recorded ones.
        compile: Whether to compile the model and restore its optimizer state.
        safe_mode: Keras' `safe_mode`. Keep it on unless you trust the source:
            turning it off allows lambdas stored as Python bytecode.
        dst_path: Local folder to download the model to. Defaults to a new
            temporary folder.
        model: For the `weights` format only: the built model to load the
            weights into, which is also what is returned.

    Returns:
        A `keras.Model`.

    Raises:
        IncompatibleCheckpointError: For a `weights` model without `model`, or
            weights that do not fit `model`.
        MlflowException: If a custom object cannot be found.

    Example:

    ```python
    info = mlflow_ckpt.log_model(model, name="model", format="h5")
    restored = mlflow_ckpt.load_model(info.model_uri)
    restored.fit(x, y, epochs=1)  # continues with the saved optimizer state
    ```
    """
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local_dir = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    if os.path.isfile(os.path.join(local_dir, MANIFEST_FILE)):
        # A checkpoint carries the SHA-256 of each file: a corrupt file is then
        # named, instead of surfacing as a zip or HDF5 error from Keras.
        manifest.verify(local_dir, label=model_uri)
    return load_model_from_dir(local_dir, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode, model=model)


def load_model_from_dir(local_dir, custom_objects=None, compile=True, safe_mode=True, model=None):
    """Load the Keras model from a local MLflow model folder of this flavor.

    Args:
        local_dir: The folder that contains the `MLmodel` file.
        custom_objects, compile, safe_mode, model: As in `load_model`.

    Returns:
        A `keras.Model`.

    Raises:
        InvalidCheckpointError: If the folder is not a model of this flavor or
            its data is missing.
        IncompatibleCheckpointError: As in `load_model`.
        MlflowException: If a custom object cannot be found.
    """
    from mlflow_ckpt.flavor import formats
    from mlflow_ckpt.flavor.custom_objects import raise_if_missing_object

    conf = read_flavor_conf(local_dir)
    resolved, failures = prepare_custom_objects(local_dir, conf, custom_objects)
    logger.debug("Loading %s model from %s", conf["format"], local_dir)
    try:
        return formats.read_keras_model(
            local_dir, conf, custom_objects=resolved, compile=compile, safe_mode=safe_mode, model=model
        )
    except (TypeError, ValueError) as error:
        raise_if_missing_object(error, failures)
        raise


def read_flavor_conf(local_dir) -> dict:
    """Return the `mlflow_ckpt` section of the MLmodel file in `local_dir`.

    Raises:
        InvalidCheckpointError: If there is no MLmodel file or it has no
            `mlflow_ckpt` flavor.
    """
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    from mlflow_ckpt.flavor import FLAVOR_NAME

    mlmodel_path = os.path.join(local_dir, MLMODEL_FILE_NAME)
    if not os.path.isfile(mlmodel_path):
        raise InvalidCheckpointError(f"{local_dir} is not an MLflow model folder: it has no {MLMODEL_FILE_NAME} file.")
    flavors = Model.load(mlmodel_path).flavors
    if FLAVOR_NAME not in flavors:
        raise InvalidCheckpointError(
            f"The model in {local_dir} was not saved by mlflow-ckpt: its flavors are "
            f"{sorted(flavors)}, without {FLAVOR_NAME!r}. Load it with the flavor that saved it."
        )
    return dict(flavors[FLAVOR_NAME])


def prepare_custom_objects(local_dir, conf, supplied):
    """Put the model's `code_paths` on `sys.path` and import its recorded custom objects.

    Returns:
        The `(custom_objects, failures)` tuple of `resolve_custom_objects`.
    """
    from mlflow.utils.model_utils import _add_code_from_conf_to_system_path

    from mlflow_ckpt.flavor.custom_objects import resolve_custom_objects

    code_dir = os.path.join(local_dir, conf["code"]) if conf.get("code") else None
    if code_dir and code_dir not in sys.path:
        _add_code_from_conf_to_system_path(local_dir, conf)
    return resolve_custom_objects(conf.get("custom_objects"), supplied)

