"""MlflowCheckpoint: save points, argument checks, run handling and metric logging."""

import mlflow
import pytest

import mlflow_ckpt
from helpers import tiny_data, tiny_model


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))


def fit(model, callback, epochs, x=None, y=None, batch_size=32, **kwargs):
    if x is None:
        x, y = tiny_data()
    model.fit(
        x, y, epochs=epochs, batch_size=batch_size, verbose=0,
        validation_data=(x[:20], y[:20]), callbacks=[callback], **kwargs,
    )


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_every_n_epochs_saves_exact_epochs(local_tracking, steps_per_execution):
    model = tiny_model(steps_per_execution=steps_per_execution)
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2), epochs=6)

    checkpoints = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [c.epoch for c in checkpoints] == [2, 4, 6]
    # 100 samples in batches of 32 make 4 steps per epoch.
    assert [c.global_step for c in checkpoints] == [8, 16, 24]


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_save_freq_steps_are_exact_multiples(local_tracking, steps_per_execution):
    model = tiny_model(steps_per_execution=steps_per_execution)
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(save_freq=6), epochs=6)

    checkpoints = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [c.global_step for c in checkpoints] == [6, 12, 18, 24]
    # 4 steps per epoch, so step 6 is 2 steps into epoch 2. Step 12 is the last step of
    # epoch 3, but the save comes before that epoch's validation and on_epoch_end, so it
    # is labelled 2 epochs and 4 steps.
    assert [(c.epoch, c.steps_into_epoch) for c in checkpoints] == [(1, 2), (2, 4), (4, 2), (5, 4)]


def test_save_freq_unaligned_epoch_saves_next_step(local_tracking):
    # 4 steps per epoch run as executions of 3 and 1 steps, so Keras reports
    # steps 3, 4, 7, 8, ...: step 6 is never seen and the save happens at 7.
    model = tiny_model(steps_per_execution=3)
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(save_freq=6), epochs=6)

    steps = [c.global_step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
    assert steps == [7, 12, 19, 24]


def test_save_freq_not_multiple_of_steps_per_execution(local_tracking):
    model = tiny_model(steps_per_execution=3)
    with mlflow.start_run():
        with pytest.raises(ValueError, match="save_freq=5 is not a multiple"):
            fit(model, mlflow_ckpt.MlflowCheckpoint(save_freq=5), epochs=1)


def test_save_last_adds_final_epoch(local_tracking):
    model = tiny_model()
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2, save_last=True), epochs=5)

    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [2, 4, 5]


def test_save_best_only_skips_worse_epochs(local_tracking):
    model = tiny_model()
    # A huge learning rate makes the validation loss go up after the first epoch.
    model.optimizer.learning_rate.assign(50.0)
    with mlflow.start_run() as run:
        callback = mlflow_ckpt.MlflowCheckpoint(save_best_only=True, monitor="val_loss")
        fit(model, callback, epochs=4)

    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    improving = [
        epoch
        for epoch, value in enumerate(values, start=1)
        if value < min(values[: epoch - 1], default=float("inf"))
    ]
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == improving


def test_checkpoint_links_epoch_metrics(local_tracking):
    model = tiny_model()
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2), epochs=2)

    checkpoint = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    logged_model = mlflow.MlflowClient().get_logged_model(checkpoint.model_id)
    linked = {m.key: m for m in logged_model.metrics}
    assert set(linked) >= {"loss", "val_loss", "accuracy", "val_accuracy"}
    assert linked["val_loss"].step == 2
    assert checkpoint.metrics["val_loss"] == linked["val_loss"].value


def test_save_last_checkpoint_links_metrics(local_tracking):
    model = tiny_model()
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2, save_last=True), epochs=5)

    last = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert last.epoch == 5
    assert "val_loss" in last.metrics
    # The epoch was logged once by on_epoch_end; linking it to the checkpoint
    # reuses that value instead of adding a second one.
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert last.metrics["val_loss"] == next(m.value for m in history if m.step == 5)


def test_every_epoch_logged_once(local_tracking):
    model = tiny_model()
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=2), epochs=5)

    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]


def test_starts_and_ends_run_when_none_active(local_tracking, capsys):
    model = tiny_model()
    fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1), epochs=1)

    assert mlflow.active_run() is None
    run = mlflow.last_active_run()
    assert run.info.status == "FINISHED"
    assert run.info.run_id in capsys.readouterr().out
    assert [c.epoch for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [1]


def test_run_id_other_than_active_run(local_tracking):
    other = mlflow.MlflowClient().create_run("0").info.run_id
    model = tiny_model()
    with mlflow.start_run():
        with pytest.raises(ValueError, match=other):
            fit(model, mlflow_ckpt.MlflowCheckpoint(run_id=other), epochs=1)


def test_verbose_prints_epoch_and_uri(local_tracking, capsys):
    model = tiny_model()
    with mlflow.start_run() as run:
        fit(model, mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, verbose=1), epochs=1)

    uri = mlflow_ckpt.latest_checkpoint(run.info.run_id).model_uri
    assert f"Epoch 1: MlflowCheckpoint committed {uri}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"every_n_epochs": 2.5}, "every_n_epochs=2.5"),
        ({"save_freq": "batch"}, "save_freq='batch'"),
        ({"save_freq": 0}, "save_freq=0"),
        ({"save_freq": 10, "every_n_epochs": 2}, "every_n_epochs=2"),
        ({"mode": "biggest"}, "mode='biggest'"),
        ({"format": "pickle"}, "format='pickle'"),
        ({"keep_last": -1}, "keep_last=-1"),
        ({"max_pending": 0}, "max_pending=0"),
        ({"verbose": 3}, "verbose=3"),
        ({"monitor": ""}, "monitor=''"),
        ({"save_weights_only": True, "format": "h5"}, "format='h5'"),
    ],
)
def test_invalid_argument_named(arguments, named):
    with pytest.raises(ValueError) as error:
        mlflow_ckpt.MlflowCheckpoint(**arguments)
    assert named in str(error.value)
