"""Measure what checkpointing every epoch costs in wall time, against no checkpointing.

Trains the same model on the same data, in one process, with:

- no checkpointing (the baseline);
- `mlflow.tensorflow.autolog(checkpoint=True, checkpoint_save_best_only=False)`;
- `mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1)`;

each against a local store (SQLite file, local artifacts) and against a local
`mlflow server` subprocess (SQLite, proxied artifacts) on 127.0.0.1. The
configurations alternate round by round so that drifts in machine load hit
all of them alike. A fit's time includes the wait for uploads at its end.

    pip install -e '.[bench]'
    python benchmarks/overhead.py [--rounds 2] [--epochs 6] [--samples 40960]

Prints one line per fit, then the median wall time of each configuration and
its ratio to the baseline.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

import mlflow_ckpt  # noqa: E402

INPUT_DIM = 1024
CLASSES = 10


def build_model(seed: int = 0):
    """Build Dense 1024 -> 2048 -> 1280 -> 10 with Adam: 4.7M weights, 57 MB with optimizer state."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(INPUT_DIM,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(1280, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def state_megabytes(model) -> float:
    model.optimizer.build(model.trainable_variables)
    variables = list(model.variables) + list(model.optimizer.variables)
    return sum(int(np.prod(v.shape)) * 4 for v in variables) / 1e6


def start_server(root: Path):
    port = _free_port()
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "server-artifacts"), "--serve-artifacts",
            "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/health", timeout=2)
            return process, url
        except requests.RequestException:
            time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"mlflow server at {url} did not start; see {root / 'server.log'}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_fit(kind: str, tracking_uri: str | None, data, epochs: int, batch_size: int, staging: str) -> float:
    x, y, x_val, y_val = data
    model = build_model()
    callbacks = []
    if kind == "autolog":
        mlflow.tensorflow.autolog(
            checkpoint=True, checkpoint_save_best_only=False, checkpoint_save_freq="epoch",
            log_models=False, log_datasets=False, silent=True,
        )
    elif kind == "mlflow_ckpt":
        callbacks.append(mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, staging_dir=staging))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    started = time.monotonic()
    if kind == "none":
        model.fit(x, y, epochs=epochs, batch_size=batch_size, validation_data=(x_val, y_val), verbose=0)
    else:
        with mlflow.start_run():
            model.fit(
                x, y, epochs=epochs, batch_size=batch_size, validation_data=(x_val, y_val),
                callbacks=callbacks, verbose=0,
            )
    elapsed = time.monotonic() - started
    if kind == "autolog":
        mlflow.tensorflow.autolog(disable=True)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="Fits per configuration.")
    parser.add_argument("--epochs", type=int, default=6, help="Epochs per fit.")
    parser.add_argument(
        "--samples", type=int, default=40960,
        help="Training samples per epoch (40,960 make epochs of about 18 s on 2 CPU cores).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size.")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-bench-"))
    os.chdir(root)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, INPUT_DIM)).astype("float32")
    y = rng.integers(0, CLASSES, size=args.samples)
    data = (x, y, x[:512], y[:512])
    print(f"model state (weights + optimizer): {state_megabytes(build_model()):.1f} MB")

    server, server_url = start_server(root)
    local_uri = f"sqlite:///{root / 'local.db'}"
    configurations = [
        ("none", None),
        ("autolog", local_uri),
        ("mlflow_ckpt", local_uri),
        ("autolog", server_url),
        ("mlflow_ckpt", server_url),
    ]
    times = {}
    try:
        # A warm-up fit traces the train function so the first measured fit is not slower.
        timed_fit("none", None, data, 1, args.batch_size, str(root / "staging"))
        for round_number in range(args.rounds):
            for kind, uri in configurations:
                if uri is None:
                    store = "-"
                elif uri.startswith("http"):
                    store = "server"
                else:
                    store = "local"
                elapsed = timed_fit(kind, uri, data, args.epochs, args.batch_size, str(root / "staging"))
                times.setdefault((kind, store), []).append(elapsed)
                print(f"round {round_number + 1}: {kind:<12} {store:<7} {elapsed:7.2f} s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    baseline = statistics.median(times[("none", "-")])
    print(f"\n{'configuration':<22} {'median s':>9} {'ratio':>7}")
    for (kind, store), values in times.items():
        median = statistics.median(values)
        print(f"{kind + ' / ' + store:<22} {median:9.2f} {median / baseline:7.3f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
