"""Save, log and load in every format, checked from a new Python process.

The models are logged to a real `mlflow server` (SQLite, proxied artifacts),
and a subprocess that never saw the original model loads them back.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import keras
import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from conftest import REPO_ROOT
from mlflow_ckpt._version import __version__
from mlflow_ckpt.errors import IncompatibleCheckpointError
from mlflow_ckpt.flavor import FLAVOR_NAME, FORMATS, load_model, log_model, read_flavor_conf, save_model

# Shared by the test process and the subprocess, so that the weights-only
# checkpoint can be loaded into the same architecture there.
BUILD_MODEL_SOURCE = textwrap.dedent(
    """
    import keras

    def build_model():
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
        return model
    """
)
_namespace = {}
exec(BUILD_MODEL_SOURCE, _namespace)
build_model = _namespace["build_model"]

FRESH_PROCESS_SCRIPT = BUILD_MODEL_SOURCE + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from mlflow_ckpt.flavor import load_model

    uris, data_path, out_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    data = np.load(data_path)
    for format, uri in uris.items():
        if format == "weights":
            model = load_model(uri, model=build_model())
        else:
            model = load_model(uri)
        result = {"predictions": model.predict(data["x"], verbose=0)}
        result["iterations_before"] = int(model.optimizer.iterations.numpy())
        model.train_on_batch(data["x"], data["y"])
        result["iterations_after"] = int(model.optimizer.iterations.numpy())
        result["kernel_after"] = model.layers[0].kernel.numpy()
        np.savez(f"{out_dir}/{format}.npz", **result)
    """
)

# Warnings that mean optimizer state was deferred or dropped on load.
RESTORE_WARNINGS = ("Value in checkpoint could not be found", "Unresolved object", "Skipping variable loading")


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def training_data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


@pytest.fixture(scope="module")
def trained_model(training_data):
    x, y = training_data
    keras.utils.set_random_seed(1)
    model = build_model()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def logged_uris(mlflow_server, trained_model):
    mlflow.set_tracking_uri(mlflow_server.url)
    uris = {}
    with mlflow.start_run():
        for format in FORMATS:
            uris[format] = log_model(trained_model, name=f"model-{format}", format=format).model_uri
    yield uris
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def fresh_process(logged_uris, trained_model, training_data, mlflow_server, tmp_path_factory):
    """Load every logged model in a new process; return its outputs and stderr."""
    out_dir = tmp_path_factory.mktemp("fresh-process")
    data_path = out_dir / "data.npz"
    np.savez(data_path, x=training_data[0], y=training_data[1])
    env = subprocess_env()
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, json.dumps(logged_uris), str(data_path), str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = {format: dict(np.load(out_dir / f"{format}.npz")) for format in logged_uris}
    return results, completed.stderr


@pytest.fixture(scope="module")
def original_after_step(trained_model, training_data, fresh_process):
    """The original model's predictions, step count and kernel around one more step."""
    x, y = training_data
    before = {
        "predictions": trained_model.predict(x, verbose=0),
        "iterations": int(trained_model.optimizer.iterations.numpy()),
    }
    trained_model.train_on_batch(x, y)
    before["kernel_after"] = trained_model.layers[0].kernel.numpy()
    return before


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_predictions_match(format, fresh_process, original_after_step):
    results, _ = fresh_process
    np.testing.assert_allclose(results[format]["predictions"], original_after_step["predictions"], atol=1e-6)


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_training_continues(format, fresh_process, original_after_step):
    result = fresh_process[0][format]
    assert int(result["iterations_before"]) == original_after_step["iterations"]
    assert int(result["iterations_after"]) == original_after_step["iterations"] + 1
    np.testing.assert_allclose(result["kernel_after"], original_after_step["kernel_after"], atol=1e-6)


def test_round_trip_prints_no_restore_warnings(fresh_process):
    stderr = fresh_process[1]
    for warning in RESTORE_WARNINGS:
        assert warning not in stderr


def test_save_model_writes_mlflow_folder(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path, format="h5")
    names = {entry.name for entry in path.iterdir()}
    assert {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "data"} <= names


def test_flavor_conf_records_format_and_versions(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path, format="savedmodel")
    conf = read_flavor_conf(path)
    assert conf["format"] == "savedmodel"
    assert conf["data"] == "data/saved_model"
    assert (path / conf["data"] / "saved_model.pb").is_file()
    assert conf["keras_version"] == keras.__version__
    assert conf["mlflow_ckpt_version"] == __version__
    assert "tensorflow_version" in conf


def test_requirements_pin_this_package(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path)
    requirements = (path / "requirements.txt").read_text().splitlines()
    assert f"mlflow-ckpt=={__version__}" in requirements
    assert any(line.startswith("tensorflow==") for line in requirements)


def test_pyfunc_flavor_points_at_loader(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path)
    flavors = mlflow.models.Model.load(str(path)).flavors
    assert flavors["python_function"]["loader_module"] == "mlflow_ckpt.flavor"
    assert FLAVOR_NAME in flavors


def test_invalid_format_names_value(trained_model, tmp_path):
    with pytest.raises(ValueError, match=r"format='onnx'.*'keras', 'h5', 'savedmodel', 'weights'"):
        save_model(trained_model, tmp_path / "model", format="onnx")


def test_weights_load_without_model_raises(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path, format="weights")
    with pytest.raises(IncompatibleCheckpointError, match="model=<built keras.Model"):
        load_model(str(path))


def test_weights_load_into_wrong_model_raises(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path, format="weights")
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    with pytest.raises(IncompatibleCheckpointError):
        load_model(str(path), model=other)


def test_h5_save_keeps_live_compile_config(training_data, tmp_path):
    model = build_model()
    model.fit(*training_data, epochs=1, verbose=0)
    save_model(model, tmp_path / "h5", format="h5")
    model.save(tmp_path / "after.keras")
    with zipfile.ZipFile(tmp_path / "after.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert "optimizer" in config["compile_config"]


def test_load_without_compile_has_no_optimizer(trained_model, tmp_path):
    path = tmp_path / "model"
    save_model(trained_model, path, format="h5")
    assert getattr(load_model(str(path), compile=False), "optimizer", None) is None


def test_load_from_foreign_folder_raises(tmp_path):
    with pytest.raises(MlflowException, match="no MLmodel file"):
        load_model(str(tmp_path))


def test_save_unbuilt_model_raises(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        save_model(model, tmp_path / "model")


def test_log_model_returns_logged_model_uri(local_tracking, trained_model):
    with mlflow.start_run():
        info = log_model(trained_model, name="model", format="weights")
    assert info.model_uri == f"models:/{info.model_id}"
    assert mlflow.get_logged_model(info.model_id).name == "model"


@pytest.mark.parametrize("format", ["keras", "h5"])
def test_untrained_model_restores_optimizer(format, tmp_path):
    path = tmp_path / "model"
    save_model(build_model(), path, format=format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = load_model(str(path))
    assert not [str(warning.message) for warning in caught if "Skipping variable loading" in str(warning.message)]
    assert restored.optimizer.built
    assert int(restored.optimizer.iterations.numpy()) == 0


def test_default_environment_matches_mlflow_processing():
    # The default files skip MLflow's installed-package check; they must
    # still be what MLflow's own processing renders.
    from mlflow_ckpt.flavor import save

    save._default_environment_files.cache_clear()
    try:
        assert save._default_environment_files() == save._render_environment_files(None, None, None)
    finally:
        save._default_environment_files.cache_clear()
