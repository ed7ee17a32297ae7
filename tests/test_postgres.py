"""The same checkpoint lifecycle against `mlflow server` with a PostgreSQL backend."""

import mlflow
import pytest

import mlflow_ckpt
from conftest import MlflowServer
from fault_tools import ErrorProxy, fit, metric_steps, models_folder, tiny_model, tree_size
from mlflow_ckpt.checkpoint import TAG_SNAPSHOT_ID

pytestmark = [pytest.mark.postgres, pytest.mark.server]

FINALIZE_PATH = r"/api/2\.0/mlflow/logged-models/m-[0-9a-f]+$"


@pytest.fixture(scope="module")
def postgres_server(postgres_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("postgres-server")
    server = MlflowServer(postgres_uri, root / "artifacts", root / "server.log").start()
    yield server
    server.stop()


@pytest.fixture
def postgres_tracking(postgres_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))
    mlflow.set_tracking_uri(postgres_server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_server.url)
    yield postgres_server
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_postgres_prune_and_resume(postgres_tracking, tmp_path):
    experiment_id = mlflow.MlflowClient().create_experiment(f"postgres-{tmp_path.name}")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        fit(tiny_model(), epochs=4, callbacks=[mlflow_ckpt.MlflowCheckpoint(keep_last=2, monitor="loss")])
    run_id = run.info.run_id
    remaining = mlflow_ckpt.list_checkpoints(run_id, include_pending=True)
    folder = models_folder(postgres_tracking.artifacts_dir, experiment_id)

    assert [c.epoch for c in remaining] == [3, 4]
    assert tree_size(folder) == sum(c.size_bytes for c in remaining)

    state = mlflow_ckpt.resume(run_id)
    with mlflow.start_run(run_id=run_id):
        fit(
            state.model, epochs=6, initial_epoch=state.initial_epoch,
            callbacks=[mlflow_ckpt.MlflowCheckpoint(keep_last=2, monitor="loss", resume_from=state)],
        )

    assert state.initial_epoch == 4
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [5, 6]
    assert metric_steps(mlflow.MlflowClient(), run_id, "loss") == [1, 2, 3, 4, 5, 6]


def test_postgres_lost_finalize_answer(postgres_tracking, monkeypatch):
    proxy = ErrorProxy(postgres_tracking.url)
    mlflow.set_tracking_uri(proxy.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    proxy.fail_once("PATCH", FINALIZE_PATH)
    try:
        with mlflow.start_run() as run:
            fit(tiny_model(), epochs=2, callbacks=[mlflow_ckpt.MlflowCheckpoint()])
    finally:
        proxy.close()
    direct = mlflow.MlflowClient(tracking_uri=postgres_tracking.url)
    everything = mlflow_ckpt.list_checkpoints(
        run.info.run_id, include_pending=True, tracking_uri=postgres_tracking.url
    )
    snapshot_ids = {direct.get_logged_model(c.model_id).tags[TAG_SNAPSHOT_ID] for c in everything}

    assert [(c.epoch, c.status) for c in everything] == [(1, "READY"), (2, "READY")]
    assert len(snapshot_ids) == 2
