"""The MLflow UI shows a run's checkpoints, and each checkpoint opens as a model.

A real `mlflow server` on 127.0.0.1 serves the UI (MLflow 3.17's React app),
and headless Chromium loads it as a person would. Screenshots are kept in
`test-artifacts/` at the repository root.
"""

import os

import mlflow
import pytest

import mlflow_ckpt
from chromium import Chromium, find_chromium
from conftest import REPO_ROOT
from helpers import tiny_data, tiny_model

ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
EPOCHS = 3


@pytest.fixture(scope="module")
def chromium_path():
    path = find_chromium()
    if path is None:
        message = "Chromium is not installed: run `apt-get install chromium` (tests/run.sh does as root)"
        if os.environ.get("MLFLOW_CKPT_REQUIRE_ALL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def browser(chromium_path, tmp_path):
    chromium = Chromium(chromium_path, tmp_path / "profile", width=1800, height=1300)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def ui_run(mlflow_server, tmp_path_factory):
    """A finished run on the server with a checkpoint at each of epochs 1..3."""
    mlflow.set_tracking_uri(mlflow_server.url)
    experiment_id = mlflow.MlflowClient().create_experiment("ui-checkpoints")
    x, y = tiny_data()
    model = tiny_model()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path_factory.mktemp("staging")))
        with mlflow.start_run(experiment_id=experiment_id) as run:
            model.fit(
                x, y, epochs=EPOCHS, verbose=0, validation_data=(x[:20], y[:20]),
                callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, input_example=x[:2])],
            )
    checkpoints = mlflow_ckpt.list_checkpoints(run.info.run_id)
    yield experiment_id, run.info.run_id, checkpoints
    mlflow.set_tracking_uri(None)


def test_run_page_lists_checkpoints(mlflow_server, ui_run, browser):
    experiment_id, run_id, checkpoints = ui_run
    ARTIFACTS_DIR.mkdir(exist_ok=True)

    browser.open(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}")
    names = [f"checkpoint-epoch-{checkpoint.epoch:04d}" for checkpoint in checkpoints]
    text = browser.wait_for_text(f"Logged models ({EPOCHS})", *names, "val_loss", "Ready")
    browser.scroll_to_text("Metrics (")
    browser.screenshot(ARTIFACTS_DIR / "ui-run-page.png")

    assert len(checkpoints) == EPOCHS
    for name in names:
        assert name in text
    assert "val_loss" in text


def test_run_index_previews(mlflow_server, ui_run, browser):
    experiment_id, run_id, checkpoints = ui_run

    browser.open(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts")
    browser.wait_for_text("checkpoints.md")
    browser.click_text("checkpoints.md", selector="*")
    text = browser.wait_for_text(f"Checkpoints of run {run_id}")
    browser.screenshot(ARTIFACTS_DIR / "ui-run-index.png")

    for checkpoint in checkpoints:
        assert checkpoint.model_uri in text


def test_checkpoint_page_shows_metrics(mlflow_server, ui_run, browser):
    experiment_id, _, checkpoints = ui_run
    latest = checkpoints[-1]

    browser.open(f"{mlflow_server.url}/#/experiments/{experiment_id}/models/{latest.model_id}")
    text = browser.wait_for_text("checkpoint-epoch-0003", "Register model", *latest.metrics, "Ready")

    assert sorted(latest.metrics) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    for name in latest.metrics:
        assert name in text
    assert latest.model_id in text


def test_register_checkpoint_from_ui(mlflow_server, ui_run, browser):
    experiment_id, _, checkpoints = ui_run
    chosen = checkpoints[1]
    name = "ui-registered-checkpoint"

    browser.open(f"{mlflow_server.url}/#/experiments/{experiment_id}/models/{chosen.model_id}")
    browser.wait_for_text("Register model")
    browser.click_text("Register model")
    browser.wait_for_text("Select a model")
    # The model picker is a custom select that opens on mousedown, not on click.
    browser.evaluate(
        "document.querySelector('#selectedModel').closest('[class*=select-selector]')"
        ".dispatchEvent(new MouseEvent('mousedown', {bubbles: true}))"
    )
    browser.wait_for_text("Create New Model")
    browser.evaluate("document.querySelector('.mlflow-create-new-model-option').click()")
    browser.type_into("#modelName", name)
    browser.click_text("Register", selector="button")
    browser.wait_for_text("Model versions", name)

    versions = mlflow.MlflowClient(mlflow_server.url).search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    assert versions[0].source == chosen.model_uri

    browser.open(f"{mlflow_server.url}/#/models/{name}/versions/1")
    browser.wait_for_text("Schema", "Inputs (1)")
    browser.click_text("Inputs (1)", selector="*")
    text = browser.wait_for_text("shape: [-1,8]")
    browser.screenshot(ARTIFACTS_DIR / "ui-model-schema.png")

    assert "dtype: float32" in text
