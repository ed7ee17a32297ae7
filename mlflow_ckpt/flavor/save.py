"""Save a Keras model as an MLflow model of the `mlflow_ckpt` flavor, or log it."""

import functools
import logging
import os

import yaml

from mlflow_ckpt.flavor import formats

logger = logging.getLogger(__name__)

_CONDA_ENV_FILE = "conda.yaml"
_PYTHON_ENV_FILE = "python_env.yaml"
_REQUIREMENTS_FILE = "requirements.txt"
_CONSTRAINTS_FILE = "constraints.txt"


def save_model(
    model,
    path,
    format="keras",
    custom_objects=None,
    code_paths=None,
    signature=None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    metadata=None,
    mlflow_model=None,
    include_optimizer=True,
):
    """Save a Keras model as a complete MLflow model folder.

    The folder contains the MLmodel file, `conda.yaml`, `python_env.yaml`,
    `requirements.txt` and the model data under `data/`. It has two flavors:
    `mlflow_ckpt` (load it back with `load_model`) and `python_function`
    (serve it with `mlflow models serve`).

    Args:
        model: A built `keras.Model`.
        path: Local folder to create. It must not exist or be empty.
        format: Storage format: `"keras"` (the `.keras` zip), `"h5"` (legacy
            HDF5), `"savedmodel"` (TensorFlow SavedModel, plus what Keras needs
            to rebuild a trainable model) or `"weights"` (weights only).
            Defaults to `"keras"`.
        custom_objects: Dict of name to class or function the model needs.
            Their import paths are recorded (never pickled), so a new process
            that can import them loads the model with no `custom_objects` argument.
        code_paths: List of local files or folders copied into the model and
            put on `sys.path` when it is loaded, for custom objects that the
            loading environment cannot import otherwise.
        signature: An MLflow `ModelSignature`. Defaults to one inferred from
            `input_example` when given, else one built from the model's named
            inputs and outputs.
        input_example: Example input: an array for a single-input model, or a
            dict of input name to array.
        pip_requirements: Replaces the default pip requirements.
        extra_pip_requirements: Added to the default pip requirements.
        conda_env: A conda environment dict or YAML path, instead of pip
            requirements.
        metadata: Dict stored in the MLmodel file's `metadata`.
        mlflow_model: The `mlflow.models.Model` to add the flavors to; used by
            `log_model`.
        include_optimizer: Whether to store the optimizer and its state. Has no
            effect for `"weights"`. Defaults to True.

    Raises:
        ValueError: If `format` is not one of the formats above, or the model
            is not built.
        MlflowException: If `path` exists and is not empty.

    Example:

    ```python
    mlflow_ckpt.save_model(model, "exported", format="savedmodel")
    restored = mlflow_ckpt.load_model("exported")
    ```
    """
    import keras
    import tensorflow as tf
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.pyfunc import add_to_model
    from mlflow.utils.file_utils import get_total_file_size
    from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path

    from mlflow_ckpt._version import __version__
    from mlflow_ckpt.flavor import FLAVOR_NAME
    from mlflow_ckpt.flavor.custom_objects import record_custom_objects
    from mlflow_ckpt.flavor.inputs import describe_inputs, describe_outputs

    formats.validate_format(format)
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so it has no weights to save. Call it "
            "on a batch, or start it with `keras.Input(...)`, before saving."
        )

    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    code_dir = _validate_and_copy_code_paths(code_paths, path)

    inputs = describe_inputs(model)
    outputs = describe_outputs(model)
    data_entries = formats.write_model_data(model, path, format, include_optimizer=include_optimizer)

    if mlflow_model is None:
        mlflow_model = Model()
    mlflow_model.signature = signature or _default_signature(model, inputs, outputs, input_example)
    if input_example is not None:
        _save_example(mlflow_model, input_example, path)
    if metadata is not None:
        mlflow_model.metadata = metadata

    mlflow_model.add_flavor(
        FLAVOR_NAME,
        format=format,
        **data_entries,
        code=code_dir,
        inputs=inputs,
        outputs=outputs,
        custom_objects=record_custom_objects(model, custom_objects),
        include_optimizer=bool(include_optimizer) and format != formats.FORMAT_WEIGHTS,
        keras_version=keras.__version__,
        tensorflow_version=tf.__version__,
        mlflow_ckpt_version=__version__,
    )
    add_to_model(
        mlflow_model,
        loader_module="mlflow_ckpt.flavor",
        code=code_dir,
        conda_env=_CONDA_ENV_FILE,
        python_env=_PYTHON_ENV_FILE,
    )
    size = get_total_file_size(path)
    if size:
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    _write_environment(path, conda_env, pip_requirements, extra_pip_requirements)
    logger.info("Saved %s model %r to %s", format, model.name, path)


def log_model(
    model,
    name=None,
    format="keras",
    custom_objects=None,
    code_paths=None,
    signature=None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    metadata=None,
    include_optimizer=True,
    registered_model_name=None,
    await_registration_for=None,
    run_id=None,
    params=None,
    tags=None,
    model_type=None,
    step=0,
    model_id=None,
    artifact_path=None,
):
    """Log a Keras model as an MLflow LoggedModel of the `mlflow_ckpt` flavor.

    Without an active run and without `run_id`, MLflow starts a run. The model
    gets a `models:/<model_id>` URI that `load_model`, `mlflow.pyfunc` and
    `mlflow models serve` accept.

    Args:
        model, format, custom_objects, code_paths, signature, input_example,
        pip_requirements, extra_pip_requirements, conda_env, metadata,
        include_optimizer: As in `save_model`.
        name: Name of the logged model.
        registered_model_name: If given, also register the model under this
            name, creating the registered model if needed.
        await_registration_for: Seconds to wait for the model version to be
            READY. Defaults to MLflow's default (300 seconds).
        run_id: Run to link the model to. Defaults to the active run.
        params, tags, model_type: Stored on the LoggedModel.
        step: Step the model belongs to (the epoch, for checkpoints); the run's
            metrics at that step are linked to the model.
        model_id: ID of an existing LoggedModel to log the files into, instead
            of creating one.
        artifact_path: Deprecated name of `name`, kept for MLflow 2 callers.

    Returns:
        The `mlflow.models.model.ModelInfo` of the logged model; its
        `model_uri` is `models:/<model_id>`.

    Example:

    ```python
    with mlflow.start_run():
        info = mlflow_ckpt.log_model(model, name="model", input_example=x[:2])
    predictions = mlflow.pyfunc.load_model(info.model_uri).predict(x)
    ```
    """
    from mlflow.models import Model
    from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

    import mlflow_ckpt.flavor as flavor_module

    formats.validate_format(format)
    if await_registration_for is None:
        await_registration_for = DEFAULT_AWAIT_MAX_SLEEP_SECONDS
    return Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=flavor_module,
        flavor_name=flavor_module.FLAVOR_NAME,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        run_id=run_id,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        model=model,
        format=format,
        custom_objects=custom_objects,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        include_optimizer=include_optimizer,
    )


def get_default_pip_requirements() -> list:
    """Return the pinned pip requirements of a model of this flavor."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    from mlflow_ckpt._version import __version__

    # mlflow-ckpt is pinned to the running version. An editable install has the
    # same version number, and `--env-manager local` installs nothing.
    # NOTE: other env managers pip-install these requirements, so they need
    # mlflow-ckpt on a package index that pip can reach.
    return [
        _get_pinned_requirement("tensorflow"),
        _get_pinned_requirement("keras"),
        _get_pinned_requirement("h5py"),
        f"mlflow-ckpt=={__version__}",
    ]


def _default_signature(model, inputs, outputs, input_example):
    from mlflow.models import infer_signature

    from mlflow_ckpt.flavor.inputs import signature_from_description
    from mlflow_ckpt.flavor.pyfunc import KerasPredictor

    if input_example is None:
        return signature_from_description(inputs, outputs)

    # Run the model through the serving wrapper, so the example is checked
    # against the input names exactly as a request will be.
    predictor = KerasPredictor(lambda structured: model(structured, training=False), inputs, [o["name"] for o in outputs], model)
    return infer_signature(input_example, predictor.predict(input_example))


def _write_environment(path, conda_env, pip_requirements, extra_pip_requirements):
    if conda_env is None and pip_requirements is None and extra_pip_requirements is None:
        # A checkpoint callback saves the same default environment at every
        # epoch, so the files are rendered once.
        files = _default_environment_files()
    else:
        files = _render_environment_files(conda_env, pip_requirements, extra_pip_requirements)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as file:
            file.write(text)


def _python_env_yaml(python_env) -> str:
    # The same content as MLflow's `_PythonEnv.to_yaml`, which only writes to a path.
    data = {key: value for key, value in python_env.to_dict().items() if value}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


@functools.lru_cache(maxsize=1)
def _default_environment_files() -> dict:
    """Return the environment files of the default requirements.

    MLflow's `_process_pip_requirements` checks every requirement against the
    installed packages, and its first call in a process maps every installed
    module to its package: about 1 s of CPU, which the first checkpoint of a
    training paid. The default requirements are pinned to the installed
    versions, so that check finds no mismatch in them, and they are
    assembled here without it. `MLFLOW_LOCK_MODEL_DEPENDENCIES` still goes through MLflow.
    """
    from mlflow.environment_variables import MLFLOW_LOCK_MODEL_DEPENDENCIES
    from mlflow.utils.environment import _generate_mlflow_version_pinning, _mlflow_conda_env, _PythonEnv

    if MLFLOW_LOCK_MODEL_DEPENDENCIES.get():
        return _render_environment_files(None, None, None)
    requirements = [_generate_mlflow_version_pinning(), *get_default_pip_requirements()]
    conda_env = _mlflow_conda_env(additional_pip_deps=requirements, install_mlflow=False)
    return {
        _CONDA_ENV_FILE: yaml.safe_dump(conda_env, default_flow_style=False),
        _REQUIREMENTS_FILE: "\n".join(requirements),
        _PYTHON_ENV_FILE: _python_env_yaml(_PythonEnv.current()),
    }


def _render_environment_files(conda_env, pip_requirements, extra_pip_requirements) -> dict:
    """Return the environment files of a model, by file name."""
    from mlflow.utils.environment import _process_conda_env, _process_pip_requirements, _PythonEnv

    if conda_env is None:
        default = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, constraints = _process_pip_requirements(
            default, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, constraints = _process_conda_env(conda_env)

    files = {
        _CONDA_ENV_FILE: yaml.safe_dump(conda_env, default_flow_style=False),
        _REQUIREMENTS_FILE: "\n".join(pip_requirements),
        _PYTHON_ENV_FILE: _python_env_yaml(_PythonEnv.current()),
    }
    if constraints:
        files[_CONSTRAINTS_FILE] = "\n".join(constraints)
    return files
