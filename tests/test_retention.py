"""Retention keeps the checkpoints the rules ask for and frees the bytes of the others."""

import mlflow
import pytest

import mlflow_ckpt
from fault_tools import fit, models_folder, tree_size, tiny_model
from mlflow_ckpt import policies, store
from mlflow_ckpt.checkpoint import Checkpoint
from mlflow_ckpt.uploader import finish_deletions


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))


def _checkpoint(epoch, loss):
    return Checkpoint(
        run_id="run", model_id=f"m-{epoch}", epoch=epoch, global_step=epoch * 10,
        metrics={"val_loss": loss}, format="keras", model_uri=f"models:/m-{epoch}",
    )


LOSSES = [0.9, 0.5, 0.7, 0.2, 0.6, 0.4, 0.8, 0.3, 0.65, 0.75]
CHECKPOINTS = [_checkpoint(epoch, loss) for epoch, loss in enumerate(LOSSES, start=1)]


def _kept_epochs(rules, monitor="val_loss"):
    deleted = {c.epoch for c in policies.checkpoints_to_delete(CHECKPOINTS, rules, monitor, "min")}
    return sorted({c.epoch for c in CHECKPOINTS} - deleted)


def test_keep_last_keeps_newest():
    assert _kept_epochs([policies.KeepLast(2)], monitor=None) == [9, 10]


def test_keep_best_keeps_lowest_loss():
    assert _kept_epochs([policies.KeepBest(2, "val_loss", "min")]) == [4, 8, 10]


def test_keep_every_keeps_multiples():
    assert _kept_epochs([policies.KeepEvery(3)], monitor=None) == [3, 6, 9, 10]


def test_rules_combine_by_union():
    rules = [policies.KeepLast(1), policies.KeepBest(1, "val_loss", "min"), policies.KeepEvery(5)]
    assert _kept_epochs(rules) == [4, 5, 10]


def test_best_kept_without_best_rule():
    assert _kept_epochs([policies.KeepLast(1)]) == [4, 10]


def test_no_rules_delete_nothing():
    assert policies.checkpoints_to_delete(CHECKPOINTS, [], "val_loss", "min") == []


def _artifact_root(tracking, request, tmp_path):
    if tracking.startswith("http"):
        return request.getfixturevalue("mlflow_server").artifacts_dir
    # local_tracking runs in tmp_path with SQLite, whose default artifact root is ./mlruns.
    return tmp_path / "mlruns"


def test_keep_last_keep_best_frees_bytes(tracking, request, tmp_path):
    # An experiment of its own, so the size of its models folder is this run's alone.
    experiment_id = mlflow.MlflowClient().create_experiment(f"retention-{tmp_path.name}")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        history = fit(
            tiny_model(),
            epochs=10,
            callbacks=[mlflow_ckpt.MlflowCheckpoint(keep_last=2, keep_best=1, monitor="val_loss")],
        )
    run_id = run.info.run_id
    val_losses = history.history["val_loss"]
    best_epoch = min(range(10), key=lambda i: (val_losses[i], -i)) + 1
    remaining = mlflow_ckpt.list_checkpoints(run_id, include_pending=True)
    folder = models_folder(_artifact_root(tracking, request, tmp_path), experiment_id)
    logged_models = mlflow.MlflowClient().search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )

    assert [c.epoch for c in remaining] == sorted({9, 10, best_epoch})
    assert len(logged_models.to_list()) == len(remaining)
    assert tree_size(folder) == sum(c.size_bytes for c in remaining)
    # No empty folder is left behind for a deleted checkpoint.
    assert sorted(p.name for p in folder.iterdir()) == sorted(c.model_id for c in remaining)


def test_interrupted_deletion_is_finished(local_tracking, tmp_path):
    with mlflow.start_run() as run:
        fit(tiny_model(), epochs=2, callbacks=[mlflow_ckpt.MlflowCheckpoint()])
    run_id = run.info.run_id
    client = mlflow.MlflowClient()
    first = mlflow_ckpt.list_checkpoints(run_id)[0]
    # A process killed in the middle of deleting epoch 1 left only its mark behind.
    client.set_logged_model_tags(first.model_id, {store.TAG_DELETING: "true"})

    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id, include_pending=True)] == [2]

    # The upload worker does this at its first commit to the run.
    finish_deletions(
        store.search_checkpoint_models(run_id, client, experiment_id=run.info.experiment_id), client
    )
    folder = models_folder(tmp_path / "mlruns", run.info.experiment_id) / first.model_id

    assert not folder.exists()
    assert len(client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ).to_list()) == 1
