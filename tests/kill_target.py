"""A process that forks training processes for the SIGKILL test, one per request.

Importing TensorFlow takes seconds, which twenty fresh processes cannot
afford. This process imports it once, runs no TensorFlow op itself, and
forks a child per request. Each child trains a small model in one MLflow
run with a checkpoint every epoch until the test kills it with SIGKILL.

Protocol: each line on stdin is a JSON request `{"tracking_uri", "run_id"
(null for a new run), "staging_dir", "status_path", "log_path", "seed"}`;
the reply on stdout is the child's pid. The child appends JSON lines to
`status_path`: `{"run_id"}` once the run is active, `{"first_epoch"}` (the
0-based epoch that training starts at, after resuming), and `{"committed"}`
after each commit.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

import mlflow_ckpt  # noqa: E402
import mlflow_ckpt.callback  # noqa: E402, F401 - import before forking, not in each child


def _append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class _Report(keras.callbacks.Callback):
    def __init__(self, status_path):
        super().__init__()
        self.status_path = status_path
        self.first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first:
            _append(self.status_path, {"first_epoch": epoch})
            self.first = False


def train(request):
    log = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    keras.utils.set_random_seed(request["seed"])
    rng = np.random.default_rng(request["seed"])
    x = rng.normal(size=(64, 256)).astype("float32")
    y = rng.integers(0, 4, size=64)
    # About 5 MB of weights and optimizer state, so that uploads take a while.
    model = keras.Sequential(
        [keras.Input(shape=(256,)), keras.layers.Dense(512, activation="relu"),
         keras.layers.Dense(512, activation="relu"), keras.layers.Dense(4)]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    mlflow.set_tracking_uri(request["tracking_uri"])
    with mlflow.start_run(run_id=request["run_id"]) as run:
        _append(request["status_path"], {"run_id": run.info.run_id})
        checkpoint = mlflow_ckpt.MlflowCheckpoint(
            monitor="loss",
            keep_last=3,
            resume=request["run_id"] is not None,
            staging_dir=request["staging_dir"],
            max_pending=2,
        )
        checkpoint_report = checkpoint._report_commit

        def report_commit(epoch, model_uri):
            _append(request["status_path"], {"committed": epoch})
            checkpoint_report(epoch, model_uri)

        checkpoint._report_commit = report_commit
        model.fit(x, y, epochs=100_000, batch_size=16, verbose=0,
                  callbacks=[checkpoint, _Report(request["status_path"])])


def main():
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                train(request)
            finally:
                os._exit(0)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
