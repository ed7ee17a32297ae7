"""The `python_function` side of the flavor: a fast, name-checked predictor.

MLflow's pyfunc loader calls `_load_pyfunc(path)`; `mlflow models serve` and
`mlflow models predict` go through it. The model is loaded without compiling,
so serving never needs the training loss or optimizer.
"""

import logging

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlflow_ckpt.flavor.inputs import STRUCTURE_DICT, STRUCTURE_LIST

logger = logging.getLogger(__name__)

# Rows sent to the model per call. One call replaces `model.predict`, whose
# per-call setup costs milliseconds; larger requests are cut into slices of
# this size to bound memory.
MAX_ROWS_PER_CALL = 1024


class KerasPredictor:
    """Predict with a Keras model or SavedModel, mapping inputs by name.

    Args:
        call: A function taking the model's input structure (one array, a list,
            or a dict, as described by `input_description`) and returning
            tensors.
        input_description: `{"structure", "specs"}` from `describe_inputs`.
        output_names: Names for the outputs when the model has several.
        raw_model: What `get_raw_model` returns.
    """

    def __init__(self, call, input_description, output_names, raw_model):
        self._call = call
        self._structure = input_description["structure"]
        self._specs = input_description["specs"]
        self._names = [spec["name"] for spec in self._specs]
        self._output_names = list(output_names or [])
        self._raw_model = raw_model

    def get_raw_model(self):
        """Return the loaded Keras model, or the `tf.saved_model.load` object for SavedModels."""
        return self._raw_model

    def predict(self, model_input, params=None):
        """Run the model on `model_input`.

        Args:
            model_input: A dict of input name to array, a pandas DataFrame, or,
                for a single-input model, an array or nested list.
            params: Unused; accepted for MLflow's pyfunc interface.

        Returns:
            A numpy array for a single-output model, else a dict of output name
            to array.

        Raises:
            MlflowException: With `INVALID_PARAMETER_VALUE` when an input is
                missing, unexpected, ragged or of the wrong shape.
        """
        arrays = self._arrays_by_name(model_input)
        rows = self._batch_size(arrays)
        if rows <= MAX_ROWS_PER_CALL:
            return self._run(arrays)

        parts = [
            self._run({name: array[start:start + MAX_ROWS_PER_CALL] for name, array in arrays.items()})
            for start in range(0, rows, MAX_ROWS_PER_CALL)
        ]
        if isinstance(parts[0], dict):
            return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        return np.concatenate(parts)

    def _run(self, arrays):
        import tensorflow as tf

        if self._structure == STRUCTURE_DICT:
            structured = {name: arrays[name] for name in self._names}
        elif self._structure == STRUCTURE_LIST:
            structured = [arrays[name] for name in self._names]
        else:
            structured = arrays[self._names[0]]
        outputs = self._call(tf.nest.map_structure(tf.convert_to_tensor, structured))
        return self._to_numpy(outputs)

    def _to_numpy(self, outputs):
        if isinstance(outputs, dict):
            return {name: np.asarray(value) for name, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            if len(outputs) == 1:
                return np.asarray(outputs[0])
            names = self._output_names if len(self._output_names) == len(outputs) else [
                f"output_{index}" for index in range(len(outputs))
            ]
            return {name: np.asarray(value) for name, value in zip(names, outputs)}
        return np.asarray(outputs)

    def _arrays_by_name(self, model_input) -> dict:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            model_input = self._dataframe_to_dict(model_input)
        if not isinstance(model_input, dict):
            if len(self._names) != 1:
                raise _invalid(
                    f"The model has {len(self._names)} inputs {self._names}, so the request must "
                    f"be a dict keyed by input name; received a {type(model_input).__name__}."
                )
            model_input = {self._names[0]: model_input}

        # NOTE: through `mlflow.pyfunc` or `mlflow models serve`, MLflow's schema
        # check drops input names the signature lacks (with a warning) before
        # this runs, so only direct callers get the "Unexpected" error.
        missing = [name for name in self._names if name not in model_input]
        extra = sorted(str(name) for name in model_input if name not in self._names)
        if missing or extra:
            raise _invalid(
                f"Input names do not match the model. Missing: {missing}. Unexpected: {extra}. "
                f"Expected exactly {self._names}."
            )
        return {spec["name"]: _to_array(spec, model_input[spec["name"]]) for spec in self._specs}

    def _dataframe_to_dict(self, frame):
        if len(self._names) == 1 and self._names[0] not in frame.columns:
            return {self._names[0]: frame.to_numpy()}
        return {column: np.stack(frame[column].to_list()) for column in frame.columns}

    def _batch_size(self, arrays):
        sizes = {name: array.shape[0] if array.ndim else 0 for name, array in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise _invalid(f"All inputs must have the same number of rows; received {sizes}.")
        return next(iter(sizes.values()))


def _to_array(spec, value):
    name = spec["name"]
    try:
        array = np.asarray(value, dtype=spec["dtype"])
    except ValueError as error:
        raise _invalid(
            f"Input {name!r} is not a rectangular array of {spec['dtype']} (for example, its "
            f"rows have unequal lengths): {error}"
        ) from error

    expected = spec["shape"]
    matches = array.ndim == len(expected) and all(
        want is None or want == got for want, got in zip(expected[1:], array.shape[1:])
    )
    if not matches:
        expected_shape = tuple(-1 if dim is None else dim for dim in expected)
        raise _invalid(
            f"Input {name!r} has shape {array.shape}, but the model expects {expected_shape} "
            "(-1 is any size, the first dimension is the batch)."
        )
    return array


def _invalid(message):
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _load_pyfunc(path, model_config=None):
    """Load the model at local folder `path` for `mlflow.pyfunc`.

    Args:
        path: The local MLflow model folder.
        model_config: Unused; accepted for MLflow's pyfunc loader.

    Returns:
        A `KerasPredictor`.
    """
    from mlflow_ckpt.flavor import formats
    from mlflow_ckpt.flavor.load import load_model_from_dir, read_flavor_conf

    conf = read_flavor_conf(path)
    inputs = conf["inputs"]
    output_names = [spec["name"] for spec in conf.get("outputs", [])]

    if conf["format"] == formats.FORMAT_SAVEDMODEL:
        return _savedmodel_predictor(path, conf, inputs, output_names)

    if conf["format"] == formats.FORMAT_WEIGHTS:
        from mlflow_ckpt.flavor.load import prepare_custom_objects

        custom_objects, _ = prepare_custom_objects(path, conf, None)
        model = formats.read_architecture(path, conf, custom_objects)
    else:
        model = load_model_from_dir(path, compile=False)
    return KerasPredictor(_compiled_call(model, inputs), inputs, output_names, model)


def _compiled_call(model, inputs):
    import tensorflow as tf

    specs = [tf.TensorSpec([None, *spec["shape"][1:]], spec["dtype"], name=spec["name"]) for spec in inputs["specs"]]
    if inputs["structure"] == STRUCTURE_DICT:
        signature = [{spec.name: spec for spec in specs}]
    elif inputs["structure"] == STRUCTURE_LIST:
        signature = [specs]
    else:
        signature = [specs[0]]

    # A traced function with a fixed signature runs in well under a
    # millisecond for small models, and never retraces on a new batch size.
    @tf.function(input_signature=signature)
    def call(structured):
        return model(structured, training=False)

    return call


def _savedmodel_predictor(path, conf, inputs, output_names):
    import os

    import tensorflow as tf

    loaded = tf.saved_model.load(os.path.join(path, conf["data"]))
    return KerasPredictor(loaded.serve, inputs, output_names, loaded)
