"""Write and read the model data of each storage format.

The flavor chooses every file name, so callers never meet Keras' suffix rules
(`.keras`, `.h5`, `.weights.h5`). Each writer returns the entries it adds to
the MLmodel flavor section, with paths relative to the model folder.

Formats:
    keras: the `.keras` zip (architecture, compile config, weights, optimizer).
    h5: legacy HDF5, plus the Keras compile config as JSON, because Keras 3.15
        cannot compile a model from the training config it writes into HDF5
        when the loss was given as a string.
    savedmodel: a TensorFlow SavedModel with a `serve` endpoint (for TF
        Serving, TFLite, TF.js), plus a `.keras` copy, because Keras 3 cannot
        rebuild a trainable model from a SavedModel.
    weights: the weights only, plus the architecture as JSON when the model
        can describe itself, so that the model can still be served.
"""

import json
import logging
import os

import numpy as np

from mlflow_ckpt.errors import IncompatibleCheckpointError, InvalidCheckpointError

logger = logging.getLogger(__name__)

FORMAT_KERAS = "keras"
FORMAT_H5 = "h5"
FORMAT_SAVEDMODEL = "savedmodel"
FORMAT_WEIGHTS = "weights"
FORMATS = (FORMAT_KERAS, FORMAT_H5, FORMAT_SAVEDMODEL, FORMAT_WEIGHTS)

DATA_DIR = "data"
_KERAS_FILE = "model.keras"
_H5_FILE = "model.h5"
_COMPILE_CONFIG_FILE = "compile_config.json"
_SAVEDMODEL_DIR = "saved_model"
_WEIGHTS_FILE = "model.weights.h5"
_ARCHITECTURE_FILE = "architecture.json"


def validate_format(format) -> str:
    """Return `format` if it names a storage format.

    Raises:
        ValueError: If it does not, naming the value and the accepted names.
    """
    if format not in FORMATS:
        raise ValueError(f"Invalid model format: format={format!r}. Expected one of {', '.join(map(repr, FORMATS))}.")
    return format


def write_model_data(model, model_dir: str, format: str, include_optimizer: bool = True) -> dict:
    """Write `model` under `<model_dir>/data` in `format`.

    Args:
        model: A built `keras.Model`.
        model_dir: The MLflow model folder being written.
        format: One of `FORMATS`.
        include_optimizer: Whether to store the optimizer and its state, for the
            formats that can (all but `weights`).

    Returns:
        The flavor-section entries that locate the data: always `data`, and
        `keras_model`, `compile_config` or `architecture` where the format
        stores them.
    """
    validate_format(format)
    os.makedirs(os.path.join(model_dir, DATA_DIR), exist_ok=True)

    # A compiled model that never trained has an unbuilt optimizer with no
    # slot variables. Loading compiles and builds it, and the variable counts
    # would then differ. Building it now stores the same zero slots that
    # `fit` would create.
    optimizer = getattr(model, "optimizer", None)
    if include_optimizer and optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)

    writer = {
        FORMAT_KERAS: _write_keras,
        FORMAT_H5: _write_h5,
        FORMAT_SAVEDMODEL: _write_savedmodel,
        FORMAT_WEIGHTS: _write_weights,
    }[format]
    return writer(model, model_dir, include_optimizer)


def read_keras_model(model_dir: str, conf: dict, custom_objects=None, compile=True, safe_mode=True, model=None):
    """Load the Keras model stored by `write_model_data`.

    Args:
        model_dir: The local MLflow model folder.
        conf: Its MLmodel flavor section.
        custom_objects: Dict passed to Keras' deserialization.
        compile: Whether to compile the model and restore its optimizer state.
        safe_mode: Keras' `safe_mode`: reject lambdas stored as bytecode.
        model: For the `weights` format, the model to load the weights into.

    Returns:
        A `keras.Model`.
    """
    import keras

    format = conf["format"]
    if format == FORMAT_WEIGHTS:
        return _read_weights(model_dir, conf, model)
    if format == FORMAT_H5:
        return _read_h5(model_dir, conf, custom_objects, compile, safe_mode)

    # `keras` stores the zip as its data; `savedmodel` keeps one beside the SavedModel.
    path = os.path.join(model_dir, conf.get("keras_model", conf["data"]))
    _require_path(path, conf)
    return keras.saving.load_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)


def read_architecture(model_dir: str, conf: dict, custom_objects=None):
    """Rebuild an uncompiled model from a `weights` checkpoint's architecture JSON.

    Raises:
        InvalidCheckpointError: If the checkpoint stored no architecture.
    """
    import keras

    if not conf.get("architecture"):
        raise InvalidCheckpointError(
            f"The weights-only model in {model_dir} has no stored architecture, so it "
            "cannot be rebuilt. Load it with load_model(model_uri, model=<your built model>)."
        )
    path = os.path.join(model_dir, conf["architecture"])
    _require_path(path, conf)
    with open(path) as file:
        model = keras.models.model_from_json(file.read(), custom_objects=custom_objects)
    model.load_weights(os.path.join(model_dir, conf["data"]))
    return model


def _write_keras(model, model_dir, include_optimizer):
    relative = os.path.join(DATA_DIR, _KERAS_FILE)
    model.save(os.path.join(model_dir, relative), include_optimizer=include_optimizer)
    return {"data": relative}


def _write_h5(model, model_dir, include_optimizer):
    relative = os.path.join(DATA_DIR, _H5_FILE)
    compile_config = model._compile_config
    saved_entries = dict(compile_config.config) if compile_config is not None else None
    try:
        model.save(os.path.join(model_dir, relative), include_optimizer=include_optimizer)
    finally:
        # Keras 3.15's HDF5 writer pops "optimizer" from the live model's
        # compile config, after which a later `.keras` save has no optimizer.
        if saved_entries is not None:
            compile_config.config.clear()
            compile_config.config.update(saved_entries)

    entries = {"data": relative}
    if include_optimizer and compile_config is not None:
        config_relative = os.path.join(DATA_DIR, _COMPILE_CONFIG_FILE)
        with open(os.path.join(model_dir, config_relative), "w") as file:
            json.dump(model.get_compile_config(), file)
        entries["compile_config"] = config_relative
    return entries


def _write_savedmodel(model, model_dir, include_optimizer):
    relative = os.path.join(DATA_DIR, _SAVEDMODEL_DIR)
    model.export(os.path.join(model_dir, relative), format="tf_saved_model", verbose=False)
    entries = _write_keras(model, model_dir, include_optimizer)
    return {"data": relative, "keras_model": entries["data"]}


def _write_weights(model, model_dir, include_optimizer):
    relative = os.path.join(DATA_DIR, _WEIGHTS_FILE)
    model.save_weights(os.path.join(model_dir, relative))
    entries = {"data": relative}
    try:
        architecture = model.to_json()
    except NotImplementedError as error:
        # NOTE: a subclassed model without `get_config` stores weights only and
        # cannot be served or loaded without the caller's model.
        logger.warning("Model %r stores no architecture, so it cannot be served: %s", model.name, error)
        return entries
    architecture_relative = os.path.join(DATA_DIR, _ARCHITECTURE_FILE)
    with open(os.path.join(model_dir, architecture_relative), "w") as file:
        file.write(architecture)
    entries["architecture"] = architecture_relative
    return entries


def _read_weights(model_dir, conf, model):
    if model is None:
        raise IncompatibleCheckpointError(
            f"The model in {model_dir} stores weights only (format='weights'). Pass the "
            "model to load them into: load_model(model_uri, model=<built keras.Model with "
            "the same architecture>)."
        )
    path = os.path.join(model_dir, conf["data"])
    _require_path(path, conf)
    # Keras writes the optimizer's variables into `.weights.h5` too. An
    # optimizer that is not built has no variables to receive them, and Keras
    # would skip them with a warning. So build it on this model first.
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and model.built and not optimizer.built:
        optimizer.build(model.trainable_variables)
    try:
        model.load_weights(path)
    except ValueError as error:
        raise IncompatibleCheckpointError(
            f"The weights in {path} do not fit model {model.name!r}: {error}. Pass a model "
            "built with the same architecture as the one that was saved."
        ) from error
    return model


def _read_h5(model_dir, conf, custom_objects, compile, safe_mode):
    import keras

    path = os.path.join(model_dir, conf["data"])
    _require_path(path, conf)
    # Keras' own HDF5 compile path fails on string losses and builds an
    # optimizer that cannot continue `fit`, so compile and restore here.
    model = keras.saving.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)
    if not compile or not conf.get("compile_config"):
        return model

    with open(os.path.join(model_dir, conf["compile_config"])) as file:
        compile_config = json.load(file)
    with keras.saving.custom_object_scope(custom_objects or {}):
        model.compile_from_config(compile_config)
    if getattr(model, "optimizer", None) is not None:
        _restore_h5_optimizer(path, model)
    return model


def _restore_h5_optimizer(path, model):
    import h5py

    optimizer = model.optimizer
    # Build the optimizer on this model's variables before assigning its
    # state, so that `fit` updates the slots restored here.
    if not optimizer.built:
        optimizer.build(model.trainable_variables)

    with h5py.File(path, "r") as file:
        if "optimizer_weights" not in file:
            logger.warning("%s stores no optimizer state; the optimizer starts fresh.", path)
            return
        group = file["optimizer_weights"]
        names = _read_h5_name_list(group, "weight_names")
        values = [np.asarray(group[name]) for name in names]

    variables = optimizer.variables
    if len(values) != len(variables):
        raise IncompatibleCheckpointError(
            f"The optimizer state in {path} has {len(values)} variables, but optimizer "
            f"{optimizer.name!r} built on this model has {len(variables)}. Load with "
            "compile=False and compile the model yourself to start a fresh optimizer."
        )
    for variable, value, name in zip(variables, values, names):
        if tuple(variable.shape) != value.shape:
            raise IncompatibleCheckpointError(
                f"Optimizer variable {name!r} in {path} has shape {value.shape}, but "
                f"{variable.path!r} has shape {tuple(variable.shape)}."
            )
        variable.assign(value)


def _read_h5_name_list(group, attribute):
    # HDF5 caps attribute size, so long lists are split into name0, name1, ...
    if attribute in group.attrs:
        chunks = [group.attrs[attribute]]
    else:
        chunks = []
        index = 0
        while f"{attribute}{index}" in group.attrs:
            chunks.append(group.attrs[f"{attribute}{index}"])
            index += 1
    return [name.decode("utf8") if isinstance(name, bytes) else str(name) for chunk in chunks for name in chunk]


def _require_path(path, conf):
    if not os.path.exists(path):
        raise InvalidCheckpointError(
            f"Model data {path} is missing (format={conf.get('format')!r}). The model "
            "folder is incomplete; download or log the model again."
        )
