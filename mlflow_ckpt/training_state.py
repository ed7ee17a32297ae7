"""Capture and restore the training state that a saved model file does not carry.

A `.keras` or `.h5` file stores weights and, at best, optimizer slots. An exact
resume also needs the optimizer's step counter (which drives step-based
learning-rate schedules), every `SeedGenerator` state (Dropout draws its masks
from one), the epoch and step counters and the state of stateful callbacks.
This module writes all of that to a folder beside the model:

- `variables.npz`: the model variables (weights and seed generator states),
  optimizer variables and metric variables, stored by position as
  `model/00012`, `optimizer/00003` and `metrics/00001`. The metric variables
  hold the running totals of an epoch that a mid-epoch checkpoint interrupts.
  With the `keras` and `savedmodel` formats, the model file already restores
  every weight and optimizer variable exactly, so those are left out and
  `fill_from_model` takes them from the loaded model file instead;
- `state.json`: counters, variable paths and shapes, the architecture
  fingerprint, the optimizer config and the CRC-32 of every variable that
  was left out of `variables.npz`;
- `loop_state.json`: the state of the training loop outside the model,
  written later than the rest because other callbacks update their state
  after the checkpoint callback has seen the epoch end. It contains the state
  of stateful callbacks and the global random states of Python, NumPy and
  Keras at the start of the epoch that a resume begins or continues, which
  input pipelines such as `keras.utils.PyDataset` draw their shuffles from;
- `callbacks.npz`: array-valued callback state (EarlyStopping's best
  weights), only when there is some.

Checkpoints written by earlier development versions keep the callback
state in `callbacks.json` and the random states in `random_states.json`,
and both are still read. One file instead of three saves two uploads per
checkpoint, which against a tracking server are two requests.

Restoring checks everything before assigning anything, so a model that does
not match the checkpoint raises `IncompatibleCheckpointError` and is left as
it was.
"""

import hashlib
import json
import logging
import math
import os
import zlib

import numpy as np

from mlflow_ckpt.errors import IncompatibleCheckpointError, InvalidCheckpointError

_logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
VARIABLES_FILE = "variables.npz"
LOOP_STATE_FILE = "loop_state.json"
CALLBACK_ARRAYS_FILE = "callbacks.npz"
# Earlier versions wrote these instead of LOOP_STATE_FILE, and they are still read.
LEGACY_CALLBACKS_FILE = "callbacks.json"
LEGACY_RANDOM_STATES_FILE = "random_states.json"
STATE_VERSION = 1

# Formats whose model file is a `.keras` zip (`savedmodel` keeps one beside the
# SavedModel). Loading it with Keras 3.15 restores every weight and every
# optimizer variable bit for bit, but not the seed generator states.
FORMATS_STORING_VARIABLES = ("keras", "savedmodel")

# Attributes that make up the state of Keras' stateful callbacks, by class name.
# `best_weights` of EarlyStopping is saved too, so `restore_best_weights` still
# works after a resume.
CALLBACK_STATE_ATTRIBUTES = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch", "best_weights"),
    "ReduceLROnPlateau": ("wait", "cooldown_counter", "best"),
    "MlflowCheckpoint": ("best",),
}


def _variable_records(variables):
    return [
        {"path": getattr(v, "path", v.name), "shape": list(v.shape), "dtype": str(v.dtype)}
        for v in variables
    ]


def _model_variables(model):
    # `model.variables` includes SeedGenerator states, which `model.weights` leaves out.
    return list(model.variables)


def _optimizer_variables(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    return list(optimizer.variables)


def _metric_variables(model):
    # Built by `compile` and the first `fit` (loss tracker and compiled metrics);
    # a model that has never been compiled has none.
    return list(getattr(model, "metrics_variables", None) or [])


def build_optimizer(model):
    """Create the optimizer's slot variables now instead of on the first step.

    Restoring into an optimizer that is not built would leave its slots to be
    created, and filled with zeros, on the next `fit`.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or getattr(optimizer, "built", True):
        return
    optimizer.build(model.trainable_variables)


def architecture_fingerprint(model) -> dict:
    """Describe the model's structure in a way that survives a new process.

    Layer names are left out on purpose: Keras numbers them per process
    (`dense`, `dense_1`, ...), so the same code can give other names after a
    restart. The layer classes, the variable shapes and dtypes and the
    optimizer class are what must match.
    """
    layers = [type(layer).__name__ for layer in model._flatten_layers(include_self=False)]
    variables = [[list(v.shape), str(v.dtype)] for v in _model_variables(model)]
    optimizer = getattr(model, "optimizer", None)
    optimizer_class = type(optimizer).__name__ if optimizer is not None else None
    description = {"layers": layers, "variables": variables, "optimizer": optimizer_class}
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, **description}


def _to_json_value(value):
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return {"float": repr(float(np.asarray(value)))}


def _from_json_value(value):
    if isinstance(value, dict) and "float" in value:
        return float(value["float"])
    return value


def capture_callback_states(callbacks) -> tuple[dict, dict]:
    """Return the JSON state and the array state of the known stateful callbacks.

    Callbacks are keyed by class name and position among callbacks of that
    class, e.g. `EarlyStopping:0`, so two EarlyStopping callbacks stay apart.
    """
    json_states, array_states = {}, {}
    seen = {}
    for callback in callbacks:
        class_name = type(callback).__name__
        attributes = CALLBACK_STATE_ATTRIBUTES.get(class_name)
        if attributes is None:
            continue
        index = seen.get(class_name, 0)
        seen[class_name] = index + 1
        key = f"{class_name}:{index}"
        state = {}
        for attribute in attributes:
            if not hasattr(callback, attribute):
                continue
            value = getattr(callback, attribute)
            if attribute == "best_weights":
                if value is not None:
                    for i, array in enumerate(value):
                        array_states[f"callback/{key}/best_weights/{i:05d}"] = np.asarray(array)
                    state["best_weights"] = len(value)
                continue
            state[attribute] = _to_json_value(value)
        json_states[key] = state
    return json_states, array_states


def restore_callback_states(callbacks, json_states: dict, arrays) -> list[str]:
    """Set the saved state on matching callbacks and return the keys restored."""
    restored = []
    seen = {}
    for callback in callbacks:
        class_name = type(callback).__name__
        index = seen.get(class_name, 0)
        seen[class_name] = index + 1
        key = f"{class_name}:{index}"
        state = json_states.get(key)
        if state is None:
            continue
        for attribute, value in state.items():
            if attribute == "best_weights":
                value = [arrays[f"callback/{key}/best_weights/{i:05d}"] for i in range(value)]
            else:
                value = _from_json_value(value)
            setattr(callback, attribute, value)
        restored.append(key)
    return restored


def _host_copy(variable) -> np.ndarray:
    # TensorFlow's `numpy()` already returns a fresh array, so copying it again
    # would double the time the training thread spends here.
    array = np.asarray(variable.numpy())
    return array if array.flags.owndata else array.copy()


def capture(model, *, epoch: int, steps_into_epoch: int = 0, extra=None):
    """Read the model's full training state into host memory.

    This is the part of a snapshot that must run on the training thread: it
    copies every variable to NumPy so training can go on while the copy is
    written and uploaded.

    Args:
        model: A built Keras model.
        epoch: Number of completed epochs (1-based count).
        steps_into_epoch: Optimizer steps already taken in the epoch that is
            in progress, or 0 for a checkpoint at an epoch boundary.
        extra: JSON-serializable values to store as they are.

    Returns:
        A `(state, arrays)` pair for `write`.
    """
    build_optimizer(model)
    model_variables = _model_variables(model)
    optimizer_variables = _optimizer_variables(model)
    metric_variables = _metric_variables(model)
    weight_ids = {id(variable) for variable in model.weights}
    arrays = {}
    for i, variable in enumerate(model_variables):
        arrays[f"model/{i:05d}"] = _host_copy(variable)
    for i, variable in enumerate(optimizer_variables):
        arrays[f"optimizer/{i:05d}"] = _host_copy(variable)
    for i, variable in enumerate(metric_variables):
        arrays[f"metrics/{i:05d}"] = _host_copy(variable)

    optimizer = getattr(model, "optimizer", None)
    global_step = int(optimizer.iterations.numpy()) if optimizer is not None else 0
    state = {
        "version": STATE_VERSION,
        "epoch": int(epoch),
        "global_step": global_step,
        "steps_into_epoch": int(steps_into_epoch),
        "model_variables": _variable_records(model_variables),
        # Seed generator states are variables but not weights, and a model
        # file does not restore them.
        "model_weight_positions": [
            i for i, variable in enumerate(model_variables) if id(variable) in weight_ids
        ],
        "optimizer_variables": _variable_records(optimizer_variables),
        "metric_variables": _variable_records(metric_variables),
        "optimizer_config": _optimizer_config(optimizer),
        "fingerprint": architecture_fingerprint(model),
        "extra": extra or {},
    }
    return state, arrays


def _optimizer_config(optimizer):
    if optimizer is None:
        return None
    import keras

    try:
        return keras.optimizers.serialize(optimizer)
    except (TypeError, ValueError) as error:
        # A custom optimizer without get_config still resumes through its
        # variables; only rebuilding it from scratch needs the config.
        _logger.warning("Could not serialize optimizer %r: %s", type(optimizer).__name__, error)
        return None


def write(directory, state: dict, arrays: dict, format: str | None = None) -> None:
    """Write a captured state into `directory` (created if missing).

    With a `format` in `FORMATS_STORING_VARIABLES`, the weights and optimizer
    variables are left out of `variables.npz`, because the model file beside
    it contains them. Their CRC-32 go into `state.json`, so `fill_from_model`
    can check that the model file gave back the same values.
    """
    os.makedirs(directory, exist_ok=True)
    stored = dict(arrays)
    state = dict(state)
    if format in FORMATS_STORING_VARIABLES:
        in_model_file = [f"model/{i:05d}" for i in state.get("model_weight_positions", [])]
        in_model_file += [f"optimizer/{i:05d}" for i in range(len(state["optimizer_variables"]))]
        state["in_model_file"] = {
            key: zlib.crc32(np.ascontiguousarray(stored.pop(key)).data) for key in in_model_file
        }
    np.savez(os.path.join(directory, VARIABLES_FILE), **stored)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2, default=_json_default)


def needs_model_file(state: dict) -> bool:
    """Return True if some variables of `state` must come from the model file (`fill_from_model`)."""
    return bool(state.get("in_model_file"))


def fill_from_model(state: dict, arrays: dict, model) -> dict:
    """Return `arrays` completed with the variables that `write` left to the model file.

    Args:
        state, arrays: As returned by `read`.
        model: The model loaded from the checkpoint's own model file, compiled,
            so that its optimizer variables contain the saved values.

    Raises:
        IncompatibleCheckpointError: if `model` has fewer variables or other
            shapes than the checkpoint records.
        InvalidCheckpointError: if a value from the model file differs from
            the CRC-32 recorded at save time.
    """
    missing = state.get("in_model_file") or {}
    if not missing:
        return arrays
    build_optimizer(model)
    groups = {
        "model": (_model_variables(model), state["model_variables"]),
        "optimizer": (_optimizer_variables(model), state["optimizer_variables"]),
    }
    completed = dict(arrays)
    for key, expected_crc in missing.items():
        group, position = key.split("/")
        variables, records = groups[group]
        index = int(position)
        record = records[index]
        if index >= len(variables) or list(variables[index].shape) != list(record["shape"]):
            raise IncompatibleCheckpointError(
                f"The model loaded from the checkpoint's model file has no variable of shape "
                f"{record['shape']} at position {index} ({record['path']}), so its training "
                "state cannot be completed. The model file and training_state/ do not belong "
                "together, so resume from another checkpoint."
            )
        value = _host_copy(variables[index])
        if zlib.crc32(np.ascontiguousarray(value).data) != expected_crc:
            raise InvalidCheckpointError(
                f"Variable {record['path']} loaded from the checkpoint's model file differs "
                "from the value saved with it (CRC-32 mismatch), so resuming would not be "
                "exact. Check that the same Keras version reads the file, or resume from "
                "another checkpoint."
            )
        completed[key] = value
    return completed


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in state.json")


def write_loop_state(directory, callbacks, random_states: dict) -> list[str]:
    """Write the callbacks' state and the random states, and return the callback keys.

    `random_states` comes from `capture_random_states`.
    """
    json_states, array_states = capture_callback_states(callbacks)
    os.makedirs(directory, exist_ok=True)
    if array_states:
        np.savez(os.path.join(directory, CALLBACK_ARRAYS_FILE), **array_states)
    with open(os.path.join(directory, LOOP_STATE_FILE), "w") as f:
        json.dump({"callbacks": json_states, "random_states": random_states}, f, indent=2)
    return sorted(json_states)


def _read_loop_state(directory) -> dict | None:
    path = os.path.join(directory, LOOP_STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_callbacks(directory):
    """Read the callbacks' state. Returns `(json_states, arrays)`, empty if absent."""
    loop_state = _read_loop_state(directory)
    if loop_state is not None:
        json_states = loop_state.get("callbacks", {})
    else:
        json_path = os.path.join(directory, LEGACY_CALLBACKS_FILE)
        if not os.path.exists(json_path):
            return {}, {}
        with open(json_path) as f:
            json_states = json.load(f)
    arrays_path = os.path.join(directory, CALLBACK_ARRAYS_FILE)
    arrays = {}
    if os.path.exists(arrays_path):
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    return json_states, arrays


def read_state(directory) -> dict:
    """Read only `state.json`: counters, variable records and fingerprint."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def read(directory):
    """Read a state written by `write`. Returns `(state, arrays)`."""
    state_path = os.path.join(directory, STATE_FILE)
    variables_path = os.path.join(directory, VARIABLES_FILE)
    for path in (state_path, variables_path):
        if not os.path.exists(path):
            raise InvalidCheckpointError(
                f"Training state file {path} is missing. The checkpoint cannot be resumed; "
                "load it with load_checkpoint() for inference, or pick another epoch."
            )
    with open(state_path) as f:
        state = json.load(f)
    try:
        with np.load(variables_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise InvalidCheckpointError(
            f"Training state file {variables_path} is corrupt: {error}"
        ) from error
    return state, arrays


def describe_differences(expected: dict, actual: dict, limit: int = 8) -> list[str]:
    """List how two architecture fingerprints differ, most telling first."""
    differences = []
    if expected.get("optimizer") != actual.get("optimizer"):
        differences.append(
            f"optimizer: checkpoint has {expected.get('optimizer')}, model has {actual.get('optimizer')}"
        )
    if expected.get("layers") != actual.get("layers"):
        differences.append(
            f"layers: checkpoint has {expected.get('layers')}, model has {actual.get('layers')}"
        )
    expected_variables = expected.get("variables", [])
    actual_variables = actual.get("variables", [])
    if len(expected_variables) != len(actual_variables):
        differences.append(
            f"variable count: checkpoint has {len(expected_variables)}, "
            f"model has {len(actual_variables)}"
        )
    for i, (want, got) in enumerate(zip(expected_variables, actual_variables)):
        if want != got:
            differences.append(f"variable {i}: checkpoint has shape/dtype {want}, model has {got}")
    return differences[:limit]


def restore(model, state: dict, arrays: dict) -> None:
    """Assign a captured state to `model` and its optimizer.

    Raises:
        IncompatibleCheckpointError: if the model's architecture or optimizer
            differs from the checkpoint's. Nothing is assigned in that case.
    """
    build_optimizer(model)
    model_variables = _model_variables(model)
    optimizer_variables = _optimizer_variables(model)

    differences = describe_differences(state["fingerprint"], architecture_fingerprint(model))
    if len(state["optimizer_variables"]) != len(optimizer_variables):
        differences.append(
            f"optimizer variable count: checkpoint has {len(state['optimizer_variables'])}, "
            f"model has {len(optimizer_variables)}"
        )
    else:
        for i, (record, variable) in enumerate(zip(state["optimizer_variables"], optimizer_variables)):
            if list(record["shape"]) != list(variable.shape):
                differences.append(
                    f"optimizer variable {record['path']}: checkpoint shape {record['shape']}, "
                    f"model shape {list(variable.shape)}"
                )
                break
    if differences:
        raise IncompatibleCheckpointError(
            "The model does not match the checkpoint, so nothing was restored:\n  - "
            + "\n  - ".join(differences)
            + "\nBuild the model with the same code and optimizer that trained it, "
            "or load the checkpoint without a model to get the saved architecture."
        )

    for i, variable in enumerate(model_variables):
        variable.assign(arrays[f"model/{i:05d}"])
    for i, variable in enumerate(optimizer_variables):
        variable.assign(arrays[f"optimizer/{i:05d}"])
    _logger.debug(
        "Restored %d model and %d optimizer variables at epoch %s, step %s",
        len(model_variables),
        len(optimizer_variables),
        state.get("epoch"),
        state.get("global_step"),
    )


def restore_metrics(model, state: dict, arrays: dict) -> bool:
    """Assign the saved metric totals of an interrupted epoch to `model`'s metrics.

    Call it after `fit` has reset the metrics for the epoch, so the epoch's
    logs cover the steps taken before the checkpoint too.

    Returns:
        True if the metrics were restored. False if the checkpoint has no
        metric state or the model's metrics differ in number or shape, in
        which case nothing is assigned.
    """
    records = state.get("metric_variables") or []
    variables = _metric_variables(model)
    if not records or len(records) != len(variables):
        return False
    for record, variable in zip(records, variables):
        if list(record["shape"]) != list(variable.shape):
            return False
    for i, variable in enumerate(variables):
        variable.assign(arrays[f"metrics/{i:05d}"])
    return True


def _keras_global_seed_generator():
    """Return Keras' global `SeedGenerator`, or None if nothing has created it yet.

    Random ops called with `seed=None` draw from it. Keras exposes no public
    getter that does not also create it.
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    except ImportError:
        return None
    return global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)


def capture_random_states() -> dict:
    """Return the global random states of Python, NumPy and Keras as JSON values.

    `keras.utils.PyDataset` shuffles its batches with Python's `random`, and
    NumPy-based augmentation draws from NumPy's global generator, so an exact
    resume of such input pipelines needs these states.
    """
    import random

    version, internal_state, gauss_next = random.getstate()
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states = {
        "python": {"version": version, "state": list(internal_state), "gauss_next": gauss_next},
        "numpy": {
            "algorithm": algorithm,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    generator = _keras_global_seed_generator()
    if generator is not None:
        states["keras"] = np.asarray(generator.state.numpy()).tolist()
    return states


def restore_random_states(states: dict) -> list[str]:
    """Set the global random states saved by `capture_random_states`.

    Returns:
        The names of the generators restored, e.g. `["python", "numpy"]`.
    """
    import random

    restored = []
    if "keras" in states:
        # Creating the global generator draws a seed from Python's `random`,
        # so it is created before that state is restored.
        from keras.src.random.seed_generator import global_seed_generator

        generator = global_seed_generator()
        generator.state.assign(np.asarray(states["keras"], dtype=generator.state.dtype))
        restored.append("keras")
    if "python" in states:
        python = states["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        restored.append("python")
    if "numpy" in states:
        numpy_state = states["numpy"]
        np.random.set_state(
            (
                numpy_state["algorithm"],
                np.asarray(numpy_state["keys"], dtype=np.uint32),
                numpy_state["position"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        restored.append("numpy")
    return restored


def read_random_states(directory) -> dict:
    """Read the random states saved with the checkpoint; empty if it has none."""
    loop_state = _read_loop_state(directory)
    if loop_state is not None:
        return loop_state.get("random_states", {})
    path = os.path.join(directory, LEGACY_RANDOM_STATES_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
