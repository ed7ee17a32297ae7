"""Custom layers load in a new process from recorded import paths and `code_paths`, never pickles."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from conftest import REPO_ROOT
from mlflow_ckpt.flavor import FORMATS, load_model, read_flavor_conf, save_model

MODULE_NAME = "flavor_custom_layers"
MODULE_SOURCE = textwrap.dedent(
    """
    import keras


    @keras.saving.register_keras_serializable(package="flavor_tests")
    class Scale(keras.layers.Layer):
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, inputs):
            return inputs * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}


    class Shift(keras.layers.Layer):
        # Not registered: Keras finds it only through custom_objects.
        def __init__(self, offset=1.0, **kwargs):
            super().__init__(**kwargs)
            self.offset = offset

        def call(self, inputs):
            return inputs + self.offset

        def get_config(self):
            return {**super().get_config(), "offset": self.offset}
    """
)

# Loads every model given on the command line, as Keras model and as pyfunc,
# in a process that never imported the module defining the layers.
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import mlflow
    import numpy as np
    from mlflow_ckpt.flavor import load_model

    paths, x = json.loads(sys.argv[1]), np.array(json.loads(sys.argv[2]), "float32")
    results = {}
    for format, path in paths.items():
        results[format] = {"pyfunc": mlflow.pyfunc.load_model(path).predict(x).tolist()}
        if format != "weights":
            results[format]["keras"] = load_model(path).predict(x, verbose=0).tolist()
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def custom_module(tmp_path_factory):
    """Write the layers' module to a folder and import it in this process only."""
    folder = tmp_path_factory.mktemp("custom-code")
    path = folder / f"{MODULE_NAME}.py"
    path.write_text(MODULE_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        yield __import__(MODULE_NAME), path
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE_NAME, None)


@pytest.fixture(scope="module")
def custom_model(custom_module):
    module, _ = custom_module
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), module.Scale(3.0), module.Shift(0.5)])
    model.compile(optimizer="adam", loss="mse")
    return model


def run_fresh_process(paths, x, tmp_path):
    # Run from an empty folder, with only the repository on the path.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(paths), json.dumps(x.tolist())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_code_paths_load_in_new_process(custom_module, custom_model, tmp_path):
    module, module_path = custom_module
    x = np.arange(6, dtype="float32").reshape(2, 3)
    expected = custom_model(x).numpy().tolist()
    paths = {}
    for format in FORMATS:
        paths[format] = str(tmp_path / format)
        save_model(custom_model, paths[format], format=format, code_paths=[str(module_path)], custom_objects={"Shift": module.Shift})

    completed = run_fresh_process(paths, x, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for format in FORMATS:
        np.testing.assert_allclose(results[format]["pyfunc"], expected, atol=1e-6, err_msg=format)
        if format != "weights":
            np.testing.assert_allclose(results[format]["keras"], expected, atol=1e-6, err_msg=format)


def test_custom_objects_recorded_as_import_paths(custom_module, custom_model, tmp_path):
    module, _ = custom_module
    save_model(custom_model, tmp_path / "model", custom_objects={"Shift": module.Shift})
    recorded = read_flavor_conf(tmp_path / "model")["custom_objects"]
    assert recorded["flavor_tests>Scale"] == f"{MODULE_NAME}:Scale"
    assert recorded["Shift"] == f"{MODULE_NAME}:Shift"


def test_missing_class_error_names_it(custom_module, custom_model, tmp_path):
    module, _ = custom_module
    path = tmp_path / "model"
    save_model(custom_model, path, format="keras", custom_objects={"Shift": module.Shift})

    completed = run_fresh_process({"keras": str(path)}, np.zeros((1, 3), "float32"), tmp_path)
    assert completed.returncode != 0
    assert "custom object 'flavor_tests>Scale'" in completed.stderr
    assert "custom_objects=" in completed.stderr
    assert "code_paths=" in completed.stderr


def test_load_time_custom_objects_take_precedence(custom_module, custom_model, tmp_path):
    module, _ = custom_module

    class DoubleShift(module.Shift):
        def call(self, inputs):
            return inputs + 2 * self.offset

    path = tmp_path / "model"
    save_model(custom_model, path, custom_objects={"Shift": module.Shift})
    restored = load_model(str(path), custom_objects={"Shift": DoubleShift})
    assert isinstance(restored.layers[-1], DoubleShift)


def test_lambda_needs_safe_mode_off(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2.0)])
    path = tmp_path / "model"
    save_model(model, path)
    with pytest.raises(ValueError, match="safe_mode"):
        load_model(str(path))
    restored = load_model(str(path), safe_mode=False)
    np.testing.assert_allclose(restored(np.ones((1, 2), "float32")).numpy(), [[2.0, 2.0]])
