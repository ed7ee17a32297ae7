"""Describe a Keras model's inputs and outputs by name, for signatures and serving.

A functional model keeps its inputs in the structure it was built with: one
tensor, a list, or a dict. `model.inputs` flattens a dict in sorted key order,
so mapping request fields by position or sorted order feeds the wrong tensor.
The description written here keeps the names and the structure, and the
serving wrapper rebuilds the exact structure the model was called with.
"""

import numpy as np

STRUCTURE_SINGLE = "single"
STRUCTURE_LIST = "list"
STRUCTURE_DICT = "dict"


def describe_inputs(model) -> dict:
    """Describe the inputs of a built Keras model.

    Args:
        model: A built `keras.Model`.

    Returns:
        A JSON-serializable dict with `structure` (`"single"`, `"list"` or
        `"dict"`) and `specs`, a list of `{"name", "dtype", "shape"}` in the
        order the model's call receives them. `shape` has `None` for the batch
        dimension and for any other dynamic dimension.
    """
    structure = _input_structure(model)
    if isinstance(structure, dict):
        specs = [_tensor_spec(name, tensor) for name, tensor in structure.items()]
        return {"structure": STRUCTURE_DICT, "specs": specs}
    if isinstance(structure, (list, tuple)):
        if len(structure) == 1:
            return {"structure": STRUCTURE_SINGLE, "specs": [_tensor_spec(structure[0].name, structure[0])]}
        specs = [_tensor_spec(tensor.name, tensor) for tensor in structure]
        return {"structure": STRUCTURE_LIST, "specs": specs}
    return {"structure": STRUCTURE_SINGLE, "specs": [_tensor_spec(structure.name, structure)]}


def describe_outputs(model) -> list:
    """Return `{"name", "dtype", "shape"}` for each output of a built Keras model."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        # A subclassed model has no symbolic outputs: trace one call symbolically.
        import keras

        structure = _input_structure(model)
        if isinstance(structure, (list, tuple)) and len(structure) == 1:
            structure = structure[0]
        outputs = keras.tree.flatten(model.compute_output_spec(structure))
        return [_tensor_spec(f"output_{i}", tensor) for i, tensor in enumerate(outputs)]
    names = list(getattr(model, "output_names", None) or [tensor.name for tensor in outputs])
    return [_tensor_spec(name, tensor) for name, tensor in zip(names, outputs)]


def signature_from_description(inputs: dict, outputs: list):
    """Build an MLflow `ModelSignature` of named tensors from the descriptions above."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def to_schema(specs):
        # One tensor is left unnamed: Keras names an unnamed `Input` by a
        # counter, so the name carries no meaning for the caller.
        return Schema([
            TensorSpec(
                np.dtype(spec["dtype"]),
                tuple(-1 if dim is None else dim for dim in spec["shape"]),
                spec["name"] if len(specs) > 1 else None,
            )
            for spec in specs
        ])

    return ModelSignature(inputs=to_schema(inputs["specs"]), outputs=to_schema(outputs) if outputs else None)


def _input_structure(model):
    # `model.input` is the structure the functional graph was built with. A
    # Sequential model that was never called has none, but `inputs` is set
    # once it is built.
    try:
        return model.input
    except (AttributeError, ValueError):
        pass
    inputs = getattr(model, "inputs", None)
    if not inputs:
        inputs = _inputs_from_build_shape(model)
    if not inputs:
        raise ValueError(
            f"Model {model.name!r} has no known inputs, so its input names and "
            "shapes cannot be recorded. Build it first, for example by calling it "
            "on a batch or by starting it with `keras.Input(...)`."
        )
    return inputs


def _inputs_from_build_shape(model):
    """Describe the single input of a subclassed model built by `fit` or a call.

    Such a model has no symbolic inputs, but Keras records the shape it was
    built with (`_build_shapes_dict`, private in Keras 3.15).
    """
    import keras

    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        return None
    (shape,) = shapes.values()
    if not isinstance(shape, (list, tuple)) or not all(d is None or isinstance(d, int) for d in shape):
        return None
    dtype = getattr(model, "input_dtype", None) or "float32"
    return [keras.KerasTensor(tuple(shape), dtype=dtype, name="input")]


def _tensor_spec(name, tensor) -> dict:
    import keras

    dtype = keras.backend.standardize_dtype(tensor.dtype)
    return {"name": str(name), "dtype": dtype, "shape": [None if dim is None else int(dim) for dim in tensor.shape]}
