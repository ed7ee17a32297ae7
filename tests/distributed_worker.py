"""One worker of the two-process MultiWorkerMirroredStrategy test.

Usage: python distributed_worker.py train|resume OUTPUT_JSON [RUN_ID]

`train` trains 2 epochs from scratch; `resume` restores RUN_ID's latest
checkpoint and trains to epoch 4. Each worker writes what it saw to
OUTPUT_JSON: its task, the run it logged to (chief only), the epoch it
started at and a checksum of its variables after restoring.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mlflow_ckpt  # noqa: E402
from mlflow_ckpt import distributed  # noqa: E402


def build_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input(shape=(8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def train_loop(strategy, model, x, y, initial_epoch, epochs, callback):
    """Train with `strategy.run` and drive the Keras callbacks by hand.

    Keras 3.15's `Model.fit` raises "Attempt to convert a value (PerReplica...)"
    under MultiWorkerMirroredStrategy with TensorFlow 2.21, so the test uses
    the custom loop that such users write, calling the callback through a
    `CallbackList`.
    """
    global_batch = 16
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    )
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    @tf.function
    def train_step(batch_x, batch_y):
        def replica_step(batch_x, batch_y):
            with tf.GradientTape() as tape:
                per_example = loss_function(batch_y, model(batch_x, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss

        losses = strategy.run(replica_step, args=(batch_x, batch_y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    callbacks = keras.callbacks.CallbackList([callback], model=model, epochs=epochs)
    callbacks.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        callbacks.on_epoch_begin(epoch)
        total, batches = 0.0, 0
        for batch_x, batch_y in dataset:
            total += float(train_step(batch_x, batch_y))
            batches += 1
        callbacks.on_epoch_end(epoch, {"loss": total / batches})
    callbacks.on_train_end()


def main():
    phase, output = sys.argv[1], sys.argv[2]
    run_id = sys.argv[3] if len(sys.argv) > 3 else None
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 3, size=64)
    chief = distributed.is_chief()

    with strategy.scope():
        model = build_model()
        state = mlflow_ckpt.resume(run_id, model=model) if phase == "resume" else None
    checksum = float(sum(np.sum(np.abs(v.numpy())) for v in model.variables))

    callback = mlflow_ckpt.MlflowCheckpoint(monitor="loss", resume_from=state)
    initial_epoch = state.initial_epoch if state else 0
    train_loop(strategy, model, x, y, initial_epoch, initial_epoch + 2, callback)
    logged_run = callback._run.info.run_id if callback._run is not None else None
    with open(output, "w") as f:
        json.dump({"chief": chief, "run_id": logged_run, "initial_epoch": initial_epoch,
                   "checksum": checksum}, f)


if __name__ == "__main__":
    main()
