"""Train the packaged digits model in a subprocess, for the exact-resume and SIGTERM tests.

    python tests/resume_job.py OUT_NPZ [--run-id RUN] [--sigterm-at EPOCH:BATCH] ...

Trains with seed 0 for `--epochs` epochs under the tracking URI in
`MLFLOW_TRACKING_URI`, with EarlyStopping and ReduceLROnPlateau beside the
checkpoint callback so their states take part in the resume. `--run-id`
resumes that run with `MlflowCheckpoint(resume=True)`. `--sigterm-at E:B`
sends SIGTERM to this process at the end of batch B (0-based) of epoch E
(0-based), the way a scheduler preempts a job. At the end the model's and
optimizer's variables are written to OUT_NPZ and the run id to OUT_NPZ.run_id.
"""

import argparse
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

import mlflow_ckpt  # noqa: E402
from mlflow_ckpt.job.data import load_dataset  # noqa: E402
from mlflow_ckpt.job.train import build_model, seed_everything  # noqa: E402


class SendSigterm(keras.callbacks.Callback):
    """Send SIGTERM to this process once, at the end of one training batch."""

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.target = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.target:
            os.kill(os.getpid(), signal.SIGTERM)


class ShuffledBatches(keras.utils.PyDataset):
    """Batches of the arrays; fit(shuffle=True) makes Keras shuffle their order with `random`."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[window], self.y[window]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--run-id")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every-n-epochs", type=int, default=1)
    parser.add_argument("--save-freq", type=int)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input", choices=["arrays", "pydataset"], default="arrays")
    parser.add_argument("--sigterm-at")
    args = parser.parse_args()

    seed_everything(0)
    data = load_dataset("digits")
    model = build_model(data.input_dim, data.num_classes)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=50),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2, min_delta=10.0),
    ]
    if args.sigterm_at:
        epoch, batch = (int(part) for part in args.sigterm_at.split(":"))
        callbacks.append(SendSigterm(epoch, batch))
    save_options = {"save_freq": args.save_freq} if args.save_freq else {"every_n_epochs": args.every_n_epochs}
    checkpoint = mlflow_ckpt.MlflowCheckpoint(
        run_id=args.run_id, resume=args.run_id is not None, sigterm_flush_timeout=60, **save_options
    )
    callbacks.insert(0, checkpoint)

    if args.input == "pydataset":
        x, y = ShuffledBatches(data.x_train, data.y_train, args.batch_size), None
        batch_size = None
    else:
        x, y, batch_size = data.x_train, data.y_train, args.batch_size
    try:
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=args.epochs,
            shuffle=True,
            validation_data=(data.x_test, data.y_test),
            callbacks=callbacks,
            verbose=0,
        )
    finally:
        with open(args.out + ".run_id", "w") as f:
            f.write(checkpoint._run.info.run_id)
    variables = list(model.variables) + list(model.optimizer.variables)
    np.savez(args.out, *[np.asarray(v.numpy()) for v in variables])


if __name__ == "__main__":
    main()
