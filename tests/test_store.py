"""The checkpoint store, against a local SQLite store and a real `mlflow server`."""

import shutil

import mlflow
import numpy as np
import pytest

import mlflow_ckpt
from helpers import all_weights, tiny_data, tiny_model
from mlflow_ckpt import snapshot
from mlflow_ckpt.uploader import Uploader


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))


def train_run(epochs, **callback_arguments):
    x, y = tiny_data()
    model = tiny_model()
    with mlflow.start_run() as run:
        model.fit(
            x, y, epochs=epochs, batch_size=32, verbose=0,
            validation_data=(x[:20], y[:20]),
            callbacks=[mlflow_ckpt.MlflowCheckpoint(**callback_arguments)],
        )
    return run.info.run_id, model


def test_latest_is_highest_epoch(tracking):
    run_id, _ = train_run(10, every_n_epochs=9, save_last=True)

    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [9, 10]
    assert mlflow_ckpt.latest_checkpoint(run_id).epoch == 10


def test_latest_ignores_commit_order(tracking, tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    run = mlflow.MlflowClient().create_run("0")
    staged = []
    for epoch in (10, 9):
        snap = snapshot.write_snapshot(
            model,
            staging_dir=str(tmp_path / "staging"),
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            epoch=epoch,
            steps_into_epoch=0,
            metrics={"loss": float(epoch)},
            format="keras",
        )
        staged.append(snapshot.complete_snapshot(snap))
    uploader = Uploader()
    for snap in staged:
        uploader.commit(snap)
    uploader.close()

    assert mlflow_ckpt.latest_checkpoint(run.info.run_id).epoch == 10


def test_run_without_checkpoints(tracking):
    run_id = mlflow.MlflowClient().create_run("0").info.run_id

    assert mlflow_ckpt.latest_checkpoint(run_id) is None
    assert mlflow_ckpt.list_checkpoints(run_id) == []


def test_unknown_run_named(tracking):
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="no-such-run"):
        mlflow_ckpt.latest_checkpoint("no-such-run")


def test_missing_epoch_lists_available(tracking):
    run_id, _ = train_run(4, every_n_epochs=2)

    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError) as error:
        mlflow_ckpt.load_checkpoint(run_id, epoch=3)
    assert "epoch 3" in str(error.value)
    assert "[2, 4]" in str(error.value)


def test_best_checkpoint_by_metric(tracking):
    run_id, _ = train_run(4, every_n_epochs=1)
    checkpoints = mlflow_ckpt.list_checkpoints(run_id)

    best = mlflow_ckpt.best_checkpoint(run_id, "val_loss", mode="min")
    assert best.metrics["val_loss"] == min(c.metrics["val_loss"] for c in checkpoints)
    worst = mlflow_ckpt.best_checkpoint(run_id, "val_loss", mode="max")
    assert worst.metrics["val_loss"] == max(c.metrics["val_loss"] for c in checkpoints)


def test_load_latest_matches_trained_model(tracking):
    run_id, model = train_run(2, every_n_epochs=2)
    x, _ = tiny_data()

    restored = mlflow_ckpt.load_checkpoint(run_id)
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_load_by_model_uri(tracking):
    run_id, model = train_run(2, every_n_epochs=1)
    first = mlflow_ckpt.list_checkpoints(run_id)[0]

    restored = mlflow_ckpt.load_checkpoint(first.model_uri)
    assert int(restored.optimizer.iterations.numpy()) == first.global_step


def test_downloaded_checkpoint_loads_elsewhere(tracking, tmp_path):
    run_id, model = train_run(2, every_n_epochs=2)
    checkpoint = mlflow_ckpt.latest_checkpoint(run_id)
    first_copy = tmp_path / "download"
    first_copy.mkdir()
    local = mlflow_ckpt.store.download(checkpoint, dst_path=str(first_copy))
    moved = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(local, moved)
    shutil.rmtree(first_copy)
    # The tracking store is gone too: only the copied folder remains.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")

    restored = mlflow_ckpt.load_checkpoint(str(moved))
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))

    state = mlflow_ckpt.resume(str(moved))
    assert state.initial_epoch == 2
    x, y = tiny_data()
    state.model.fit(
        x, y, epochs=3, initial_epoch=state.initial_epoch, batch_size=32, verbose=0,
        callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, resume_from=state)],
    )
    assert int(state.model.optimizer.iterations.numpy()) == 12


def test_resume_continues_same_run(tracking):
    run_id, _ = train_run(2, every_n_epochs=2)

    state = mlflow_ckpt.resume(run_id)
    x, y = tiny_data()
    state.model.fit(
        x, y, epochs=4, initial_epoch=state.initial_epoch, batch_size=32, verbose=0,
        validation_data=(x[:20], y[:20]),
        callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2, resume_from=state)],
    )

    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run_id)] == [2, 4]
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_retrained_epoch_checkpoint_has_metrics(tracking):
    run_id, _ = train_run(3, every_n_epochs=1)
    first_attempt = mlflow_ckpt.list_checkpoints(run_id)[-1]

    state = mlflow_ckpt.resume(run_id, epoch=2)
    # A different learning rate makes epoch 3 differ from the first attempt.
    state.model.optimizer.learning_rate.assign(0.5)
    x, y = tiny_data()
    state.model.fit(
        x, y, epochs=3, initial_epoch=state.initial_epoch, batch_size=32, verbose=0,
        validation_data=(x[:20], y[:20]),
        callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, resume_from=state)],
    )

    retrained = mlflow_ckpt.latest_checkpoint(run_id)
    assert retrained.epoch == 3
    assert retrained.model_id != first_attempt.model_id
    assert "val_loss" in retrained.metrics
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 3]
    newest_at_3 = max((m for m in history if m.step == 3), key=lambda m: m.timestamp)
    assert retrained.metrics["val_loss"] == newest_at_3.value


def test_run_index_lists_checkpoints(tracking, tmp_path):
    run_id, _ = train_run(2, every_n_epochs=1)

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/checkpoints.md")
    for checkpoint in mlflow_ckpt.list_checkpoints(run_id):
        assert checkpoint.model_uri in text


def test_load_into_given_model(tracking):
    run_id, model = train_run(2, every_n_epochs=2)
    target = tiny_model()

    returned = mlflow_ckpt.load_checkpoint(run_id, model=target)
    assert returned is target
    np.testing.assert_array_equal(all_weights(target), all_weights(model))
    assert int(target.optimizer.iterations.numpy()) == 8


def test_weights_only_needs_model(tracking):
    run_id, model = train_run(2, every_n_epochs=2, save_weights_only=True)
    target = tiny_model()

    returned = mlflow_ckpt.load_checkpoint(run_id, model=target)
    assert returned is target
    np.testing.assert_array_equal(all_weights(target), all_weights(model))


def test_load_into_mismatched_model(tracking):
    run_id, _ = train_run(2, every_n_epochs=2)
    import keras

    other = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(5)])
    before = all_weights(other)

    with pytest.raises(mlflow_ckpt.IncompatibleCheckpointError):
        mlflow_ckpt.load_checkpoint(run_id, model=other)
    np.testing.assert_array_equal(all_weights(other), before)
