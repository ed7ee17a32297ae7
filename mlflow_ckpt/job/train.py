"""Train the classic small digits classifier with checkpoints, or resume such a run.

`train` is what `mlflow run .` (entry point `main`) runs through
`mlflow-ckpt train`; `resume_training` is the `resume` entry point. Both
print a short table comparing an untrained model, the trained model and the
model restored from the run's latest checkpoint on the test split.
"""

import dataclasses
import logging
import os

import mlflow

from mlflow_ckpt.job.data import load_dataset
from mlflow_ckpt.store import get_run

_logger = logging.getLogger(__name__)

HIDDEN_UNITS = 512
DROPOUT_RATE = 0.2


def build_model(input_dim: int, num_classes: int = 10, learning_rate: float = 0.001):
    """Build and compile Dense(512, relu) -> Dropout(0.2) -> Dense(num_classes) logits."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape=(input_dim,), name="pixels"),
            keras.layers.Dense(HIDDEN_UNITS, activation="relu"),
            keras.layers.Dropout(DROPOUT_RATE),
            keras.layers.Dense(num_classes),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return model


def seed_everything(seed: int | None) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow ops deterministic."""
    if seed is None:
        return
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@dataclasses.dataclass
class JobResult:
    """Outcome of one job: the run and the test-split scores that the table prints."""

    run_id: str
    untrained: dict
    trained: dict
    restored: dict | None
    latest_epoch: int | None

    def table(self) -> str:
        rows = [("untrained model", self.untrained), ("trained model", self.trained)]
        if self.restored is not None:
            rows.append((f"restored from epoch {self.latest_epoch}", self.restored))
        width = max(len(name) for name, _ in rows)
        lines = [f"{'model':<{width}}  test loss  test accuracy"]
        for name, scores in rows:
            lines.append(f"{name:<{width}}  {scores['loss']:9.6f}  {scores['accuracy']:13.4f}")
        return "\n".join(lines)


def _evaluate(model, data) -> dict:
    loss, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    return {"loss": float(loss), "accuracy": float(accuracy)}


def _evaluate_latest(run_id: str, data):
    import mlflow_ckpt

    latest = mlflow_ckpt.latest_checkpoint(run_id)
    if latest is None:
        return None, None
    restored = mlflow_ckpt.load_checkpoint(latest)
    return _evaluate(restored, data), latest.epoch


def train(
    epochs: int = 10,
    every_n_epochs: int = 5,
    format: str = "keras",
    batch_size: int = 32,
    dataset: str = "digits",
    data_path: str | None = None,
    seed: int | None = 0,
    verbose: int = 2,
) -> JobResult:
    """Train the digits classifier in an MLflow run, logging a checkpoint every N epochs.

    Uses the active run, the run `mlflow run` created (`MLFLOW_RUN_ID`), or a new one.

    Returns:
        A `JobResult`; `JobResult.table()` is what the command prints.
    """
    import mlflow_ckpt

    seed_everything(seed)
    data = load_dataset(dataset, data_path)
    model = build_model(data.input_dim, data.num_classes)
    untrained = _evaluate(model, data)

    with mlflow.start_run() as run:
        mlflow.log_params(
            {
                "epochs": epochs,
                "every_n_epochs": every_n_epochs,
                "format": format,
                "batch_size": batch_size,
                "dataset": dataset,
                "seed": seed,
                "train_size": len(data.x_train),
                "test_size": len(data.x_test),
            }
        )
        checkpoint = mlflow_ckpt.MlflowCheckpoint(
            every_n_epochs=every_n_epochs,
            format=format,
            monitor="val_loss",
            input_example=data.x_test[:2],
            verbose=1,
        )
        try:
            model.fit(
                data.x_train,
                data.y_train,
                epochs=epochs,
                batch_size=batch_size,
                shuffle=True,
                validation_data=(data.x_test, data.y_test),
                callbacks=[checkpoint],
                verbose=verbose,
            )
        except mlflow_ckpt.TrainingPreempted:
            # Leaving the `with` block on an exception would mark the run FAILED.
            mlflow.end_run(status="KILLED")
            raise
        trained = _evaluate(model, data)
        mlflow.log_metrics({"test_loss": trained["loss"], "test_accuracy": trained["accuracy"]})
        run_id = run.info.run_id

    restored, latest_epoch = _evaluate_latest(run_id, data)
    return JobResult(run_id, untrained, trained, restored, latest_epoch)


def resume_training(
    run_id: str,
    epoch: int | None = None,
    epochs: int | None = None,
    data_path: str | None = None,
    verbose: int = 2,
) -> JobResult:
    """Continue a run of `train` from one of its checkpoints, in the same MLflow run.

    Args:
        run_id: The run to continue.
        epoch: Checkpoint epoch to resume from; default the latest committed one.
        epochs: Total number of epochs to reach; default the run's `epochs` parameter.

    Returns:
        A `JobResult` for the continued run.
    """
    import mlflow_ckpt

    client = mlflow.MlflowClient()
    params = get_run(run_id, client).data.params
    epochs = int(epochs if epochs is not None else params.get("epochs", 10))
    every_n_epochs = int(params.get("every_n_epochs", 5))
    format = params.get("format", "keras")
    batch_size = int(params.get("batch_size", 32))
    seed = params.get("seed")
    seed_everything(int(seed) if seed not in (None, "None") else None)
    data = load_dataset(params.get("dataset", "digits"), data_path)

    state = mlflow_ckpt.resume(run_id, epoch=epoch)
    if state.initial_epoch >= epochs:
        raise ValueError(
            f"Run {run_id} is already at epoch {state.initial_epoch}; pass epochs greater "
            f"than that (received epochs={epochs})."
        )
    untrained = _evaluate(build_model(data.input_dim, data.num_classes), data)

    # `mlflow run` sets MLFLOW_RUN_ID to the run it created for this entry point;
    # training continues in the original run instead, so the variable must not win.
    launcher_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher_run_id and launcher_run_id != run_id:
        client.set_tag(launcher_run_id, "mlflow_ckpt.resumed_run", run_id)
    checkpoint = mlflow_ckpt.MlflowCheckpoint(
        every_n_epochs=every_n_epochs,
        format=format,
        monitor="val_loss",
        input_example=data.x_test[:2],
        resume_from=state,
        verbose=1,
    )
    state.model.fit(
        data.x_train,
        data.y_train,
        epochs=epochs,
        initial_epoch=state.initial_epoch,
        batch_size=batch_size,
        shuffle=True,
        validation_data=(data.x_test, data.y_test),
        callbacks=[checkpoint],
        verbose=verbose,
    )
    trained = _evaluate(state.model, data)
    restored, latest_epoch = _evaluate_latest(run_id, data)
    return JobResult(run_id, untrained, trained, restored, latest_epoch)
