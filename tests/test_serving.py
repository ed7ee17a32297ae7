"""Serve models of every format through pyfunc, `mlflow models serve` and `mlflow models predict`.

One `mlflow models serve --env-manager local` subprocess per format runs on
127.0.0.1 for the whole module, each loading its model by a different kind of
URI: `models:/<id>`, `runs:/<run_id>/<name>` and `models:/<name>/<version>`.
"""

import json
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
import requests
from mlflow.exceptions import MlflowException

from conftest import free_port, wait_for_http
from mlflow_ckpt.flavor import log_model
from mlflow_ckpt.flavor.pyfunc import _load_pyfunc

REGISTERED_NAME = "it-minus-is"


def build_two_inputs():
    a = keras.Input((10,), name="a")
    b = keras.Input((2,), name="b")
    output = keras.layers.Dense(1)(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], output)


def build_it_minus_is():
    # Listed IT first: sorted order (IS, IT) would swap them and return -1.
    it = keras.Input((3,), name="IT")
    is_ = keras.Input((3,), name="IS")
    return keras.Model([it, is_], keras.layers.Subtract()([it, is_]))


def build_float32_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


class ServedModel:
    def __init__(self, name, model, uri, log_path):
        self.name = name
        self.model = model
        self.uri = uri
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "models", "serve",
                "-m", self.uri,
                "--env-manager", "local",
                "--host", "127.0.0.1",
                "--port", str(self.port),
            ],
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
        )

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def invoke(self, payload):
        return requests.post(f"{self.url}/invocations", json=payload, timeout=60)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A module-wide SQLite tracking store, set as the tracking URI."""
    root = tmp_path_factory.mktemp("serving-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        yield experiment_id, root
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def logged(store):
    """Log one model per format and return `ServedModel`s, not started yet."""
    experiment_id, root = store
    keras.utils.set_random_seed(3)
    two_inputs = build_two_inputs()
    it_minus_is = build_it_minus_is()
    float32_model = build_float32_model()
    weights_model = build_float32_model()
    float64_example = np.random.default_rng(0).normal(size=(2, 4))

    with mlflow.start_run(experiment_id=experiment_id) as run:
        savedmodel_info = log_model(two_inputs, name="two-inputs", format="savedmodel")
        keras_info = log_model(
            it_minus_is, name="it-minus-is", format="keras", registered_model_name=REGISTERED_NAME
        )
        log_model(float32_model, name="float32", format="h5", input_example=float64_example)
        weights_info = log_model(weights_model, name="weights", format="weights")

    version = keras_info.registered_model_version
    return {
        "savedmodel": ServedModel("savedmodel", two_inputs, savedmodel_info.model_uri, root / "savedmodel.log"),
        "keras": ServedModel("keras", it_minus_is, f"models:/{REGISTERED_NAME}/{version}", root / "keras.log"),
        "h5": ServedModel("h5", float32_model, f"runs:/{run.info.run_id}/float32", root / "h5.log"),
        "weights": ServedModel("weights", weights_model, weights_info.model_uri, root / "weights.log"),
    }


@pytest.fixture(scope="module")
def servers(logged):
    """Start all servers at once, so that their imports overlap."""
    for served in logged.values():
        served.start()
    try:
        for served in logged.values():
            wait_for_http(f"{served.url}/ping", timeout=240, process=served.process)
        yield logged
    finally:
        for served in logged.values():
            served.stop()


def two_input_batch():
    rng = np.random.default_rng(5)
    return {"a": rng.normal(size=(3, 10)).astype("float32"), "b": rng.normal(size=(3, 2)).astype("float32")}


def test_pyfunc_maps_dict_inputs_by_name(logged):
    served = logged["savedmodel"]
    batch = two_input_batch()
    expected = served.model([batch["a"], batch["b"]]).numpy()
    reordered = {"b": batch["b"], "a": batch["a"]}
    predictions = mlflow.pyfunc.load_model(served.uri).predict(reordered)
    np.testing.assert_allclose(predictions, expected, atol=1e-6)


def test_signature_names_both_inputs(logged):
    signature = mlflow.models.get_model_info(logged["savedmodel"].uri).signature
    assert signature.inputs.input_names() == ["a", "b"]


def test_pyfunc_it_minus_is_returns_one(logged):
    model = mlflow.pyfunc.load_model(logged["keras"].uri)
    predictions = model.predict({"IT": np.ones((4, 3), "float32"), "IS": np.zeros((4, 3), "float32")})
    np.testing.assert_array_equal(predictions, np.ones((4, 3)))


def test_pyfunc_missing_input_raises_invalid(logged):
    model = mlflow.pyfunc.load_model(logged["keras"].uri)
    with pytest.raises(MlflowException, match="IS") as error:
        model.predict({"IT": np.ones((1, 3), "float32")})
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_predictor_extra_input_raises_invalid(logged):
    predictor = _load_pyfunc(mlflow.artifacts.download_artifacts(logged["keras"].uri))
    batch = {"IT": np.ones((1, 3)), "IS": np.zeros((1, 3)), "IX": np.zeros((1, 3))}
    with pytest.raises(MlflowException, match=r"Unexpected: \['IX'\]") as error:
        predictor.predict(batch)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_predictor_wrong_shape_raises_invalid(logged):
    predictor = _load_pyfunc(mlflow.artifacts.download_artifacts(logged["keras"].uri))
    with pytest.raises(MlflowException, match=r"'IS' has shape \(1, 4\).*\(-1, 3\)") as error:
        predictor.predict({"IT": np.ones((1, 3)), "IS": np.zeros((1, 4))})
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_predictor_ragged_rows_raise_invalid(logged):
    predictor = _load_pyfunc(mlflow.artifacts.download_artifacts(logged["h5"].uri))
    with pytest.raises(MlflowException, match="rows have unequal lengths"):
        predictor.predict([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]])


def test_predictor_splits_large_batches(logged):
    served = logged["h5"]
    predictor = _load_pyfunc(mlflow.artifacts.download_artifacts(served.uri))
    batch = np.random.default_rng(2).normal(size=(2500, 4)).astype("float32")
    np.testing.assert_allclose(predictor.predict(batch), served.model(batch).numpy(), atol=1e-5)


def test_predictor_raw_model_is_keras(logged):
    predictor = _load_pyfunc(mlflow.artifacts.download_artifacts(logged["h5"].uri))
    assert isinstance(predictor.get_raw_model(), keras.Model)


@pytest.mark.parametrize("format", ["keras", "h5", "savedmodel", "weights"])
def test_server_answers_each_format(format, servers):
    served = servers[format]
    if format == "savedmodel":
        batch = two_input_batch()
        expected = served.model([batch["a"], batch["b"]]).numpy()
        payload = {"inputs": {name: array.tolist() for name, array in batch.items()}}
    elif format == "keras":
        batch = {"IT": np.full((2, 3), 5.0, "float32"), "IS": np.full((2, 3), 2.0, "float32")}
        expected = np.full((2, 3), 3.0)
        payload = {"inputs": {name: array.tolist() for name, array in batch.items()}}
    else:
        batch = np.arange(8, dtype="float32").reshape(2, 4)
        expected = served.model(batch).numpy()
        payload = {"inputs": batch.tolist()}
    response = served.invoke(payload)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected, atol=1e-5)


def test_server_it_minus_is_returns_one(servers):
    payload = {"inputs": {"IT": np.ones((2, 3)).tolist(), "IS": np.zeros((2, 3)).tolist()}}
    response = servers["keras"].invoke(payload)
    assert response.status_code == 200, response.text
    assert np.array(response.json()["predictions"]).tolist() == np.ones((2, 3)).tolist()


def test_server_accepts_instances_rows(servers):
    served = servers["h5"]
    rows = [[1, 2, 3, 4], [0.5, 0, -1, 2]]
    response = served.invoke({"instances": rows})
    assert response.status_code == 200, response.text
    expected = served.model(np.array(rows, "float32")).numpy()
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected, atol=1e-5)


def test_server_accepts_float_json_inputs(servers):
    served = servers["h5"]
    rows = [[1, 2, 3, 4]]
    response = served.invoke({"inputs": rows})
    assert response.status_code == 200, response.text
    expected = served.model(np.array(rows, "float32")).numpy()
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected, atol=1e-5)


def test_server_ragged_instances_return_400(servers):
    response = servers["h5"].invoke({"instances": [[1, 2, 3, 4], [1, 2]]})
    assert response.status_code == 400
    assert "inhomogeneous" in response.json()["message"]


def test_server_missing_input_returns_400(servers):
    response = servers["keras"].invoke({"inputs": {"IT": [[1, 1, 1]]}})
    assert response.status_code == 400
    assert "IS" in response.json()["message"]


def test_server_wrong_shape_returns_400(servers):
    response = servers["savedmodel"].invoke({"inputs": {"a": [[1.0] * 9], "b": [[1.0, 2.0]]}})
    assert response.status_code == 400
    assert "shape" in response.json()["message"]


@pytest.mark.parametrize("format", ["keras", "h5", "savedmodel", "weights"])
def test_models_predict_each_format(format, logged, tmp_path):
    served = logged[format]
    if format == "savedmodel":
        payload = {"inputs": {"a": [[0.0] * 10], "b": [[0.0, 0.0]]}}
    elif format == "keras":
        payload = {"inputs": {"IT": [[1.0, 1.0, 1.0]], "IS": [[0.0, 0.0, 0.0]]}}
    else:
        payload = {"inputs": [[0.0, 0.0, 0.0, 0.0]]}
    input_path = tmp_path / "input.json"
    output_path = tmp_path / "output.json"
    input_path.write_text(json.dumps(payload))
    completed = subprocess.run(
        [
            sys.executable, "-m", "mlflow", "models", "predict",
            "-m", served.uri,
            "-i", str(input_path),
            "-o", str(output_path),
            "-t", "json",
            "--env-manager", "local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "predictions" in json.loads(output_path.read_text())


def test_signature_inferred_from_float64_example(logged):
    signature = mlflow.models.get_model_info(logged["h5"].uri).signature
    assert signature.inputs.inputs[0].type == np.dtype("float64")
