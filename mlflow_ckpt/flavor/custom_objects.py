"""Record and resolve the user classes and functions a Keras model needs to load.

Nothing is pickled. At save time the flavor records, for each custom object,
the name Keras looks it up by and the `module:qualname` it can be imported
from. At load time those modules are imported (after the model's `code_paths`
are put on `sys.path`), which also runs their
`@keras.saving.register_keras_serializable` decorators.
"""

import importlib
import inspect
import logging
import re

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

logger = logging.getLogger(__name__)

# Modules whose objects Keras always finds without help.
_BUILTIN_MODULE_PREFIXES = ("keras.", "tensorflow.", "tf_keras.", "builtins")

# Keras' messages for a class or function it cannot find (Keras 3.15).
_MISSING_OBJECT_PATTERNS = (
    re.compile(r"Could not locate (?:class|function) '([^']+)'"),
    re.compile(r"Unknown (?:layer|object|loss|metric|optimizer)[^:]*: '?([\w.>]+)'?"),
    re.compile(r"Could not deserialize '([^']+)'"),
)


def record_custom_objects(model, custom_objects=None) -> dict:
    """Map each custom object of `model` to the path it can be imported from.

    Args:
        model: The Keras model being saved.
        custom_objects: Optional dict of name to class or function, as passed to
            `save_model`. Every entry is recorded, used by the model or not.

    Returns:
        A dict of Keras lookup name to `"module:qualname"`.
    """
    import keras

    found = {}
    for obj in _custom_objects_of(model):
        found[keras.saving.get_registered_name(obj)] = obj
    for name, obj in (custom_objects or {}).items():
        found[name] = obj

    recorded = {}
    for name, obj in found.items():
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if not module or not qualname or "<locals>" in qualname:
            logger.warning(
                "Custom object %r has no importable path (module=%r, qualname=%r). A new "
                "process must pass it to load_model(custom_objects=...).",
                name, module, qualname,
            )
            continue
        if module == "__main__":
            logger.warning(
                "Custom object %r is defined in __main__, which another process cannot "
                "import. Move it to a module and pass that file in code_paths=, or pass it "
                "to load_model(custom_objects=...).",
                name,
            )
        recorded[name] = f"{module}:{qualname}"
    return recorded


def resolve_custom_objects(recorded: dict | None, supplied: dict | None):
    """Import the recorded custom objects and merge them with the caller's.

    Args:
        recorded: The `"name": "module:qualname"` dict written at save time.
        supplied: Objects the caller passed to `load_model`; they take
            precedence over recorded ones of the same name.

    Returns:
        A tuple `(custom_objects, failures)`: the dict to pass to Keras, and a
        list of `"name (module:qualname): error"` strings for the recorded
        objects that could not be imported.
    """
    resolved = {}
    failures = []
    for name, path in (recorded or {}).items():
        if supplied and name in supplied:
            continue
        try:
            resolved[name] = _import_object(path)
        except (ImportError, AttributeError) as error:
            logger.warning("Cannot import custom object %r from %s: %s", name, path, error)
            failures.append(f"{name} ({path}): {error}")
    resolved.update(supplied or {})
    return resolved, failures


def raise_if_missing_object(error: Exception, failures: list) -> None:
    """Re-raise a Keras deserialization error as one that names the missing object.

    Does nothing when `error` is not about an unknown class or function, so the
    caller re-raises the original.

    Raises:
        MlflowException: With `INVALID_PARAMETER_VALUE`, naming the object and
            the two ways to supply it.
    """
    message = str(error)
    for pattern in _MISSING_OBJECT_PATTERNS:
        match = pattern.search(message)
        if match:
            missing = match.group(1)
            break
    else:
        return

    hint = ""
    if failures:
        hint = " Recorded custom objects that failed to import: " + "; ".join(failures) + "."
    raise MlflowException(
        f"Cannot load the model because Keras cannot find the custom object {missing!r}. "
        f"Pass it to load_model(custom_objects={{{missing.split('>')[-1]!r}: ...}}), or log the "
        f"model with code_paths=[<file or package that defines it>] so that a new process "
        f"can import it.{hint} Keras error: {message.splitlines()[0]}",
        error_code=INVALID_PARAMETER_VALUE,
    ) from error


def _custom_objects_of(model):
    # `_flatten_layers` (Keras 3 private API) walks nested layers and models,
    # which the public `layers` attribute does not.
    layers = model._flatten_layers(include_self=True, recursive=True) if hasattr(model, "_flatten_layers") else [model]
    candidates = [type(layer) for layer in layers]
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        candidates.extend(loss.values())
    elif isinstance(loss, (list, tuple)):
        candidates.extend(loss)
    elif loss is not None:
        candidates.append(loss)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        candidates.append(optimizer)

    for candidate in candidates:
        # A loss given as a plain function is looked up as that function;
        # anything else (a string, a Loss or Optimizer instance) by its class.
        obj = candidate if isinstance(candidate, type) or inspect.isfunction(candidate) else type(candidate)
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith(_BUILTIN_MODULE_PREFIXES):
            yield obj


def _import_object(path: str):
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
