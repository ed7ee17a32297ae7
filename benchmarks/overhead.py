"""Measure what checkpointing every epoch costs in wall time, against no checkpointing.

Trains the same model on the same data, in one process, with:

- no checkpointing (the baseline);
- `mlflow.tensorflow.autolog(checkpoint=True, checkpoint_save_best_only=False)`;
- `mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1)`;

each against a local store (SQLite file, local artifacts) and against a local
`mlflow server` subprocess (SQLite, proxied artifacts) on 127.0.0.1.

Every round runs each checkpointing configuration once, in an order that
rotates by one position per round, with a baseline fit before every
`--between` of them (two by default) and one more after the last round. So
every checkpointing fit has a baseline fit on each side, with at most one
other fit in between. Before each fit the Keras session is cleared and
garbage collected, so fits start from the same state.

Fits on these shared machines drift by 10 % or more over a few minutes, more
than the effect measured, and the drift moves every configuration of a round
together. So besides plain medians, each checkpointing fit is divided by the
baseline linearly interpolated at its midpoint between the baseline fits
before and after it ("bracketed"), which removes the part of the drift that
is linear over those few minutes.

The data is fed as one repeated `tf.data` pipeline per fit with tf.data's
autotuning turned off. With NumPy arrays, or with autotuning on, TensorFlow
2.21 sometimes stalls for about 7 s at the end of an epoch while it destroys
the epoch's iterator, on these 2-core machines in about half of the epochs,
with or without checkpointing. Those stalls are larger than the effect being
measured.

Two times are reported per fit:

- the whole fit, from `fit` to its return, which includes tracing the first
  epoch and waiting for pending uploads at the end;
- the steady-state epoch: the median time from the start of one epoch to the
  start of the next, over every epoch but the first (tracing) and the last
  (no next epoch). It contains the save, the training thread's share of the
  upload, and the background threads' competition for the CPU.

    pip install -e '.[bench]'
    python benchmarks/overhead.py [--rounds 4] [--epochs 5] [--samples 40960] [--between 2]

Prints one line per fit, then per configuration the median of each time, its
ratio to the baseline's median ("ratio") and the median of the bracketed
ratios ("bracketed"). The CPU column adds the CPU time of this process (all threads) and of the
`mlflow server` during the fit, and "extra" is its difference from the
baseline: the work that checkpointing costs, which the wall-time ratios show
only through the noise of a shared machine.
"""

import argparse
import gc
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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


def random_data(samples: int, validation_samples: int):
    """Return (x, y, x_val, y_val): `samples` random inputs and labels, validated on the first ones."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, INPUT_DIM)).astype("float32")
    y = rng.integers(0, CLASSES, size=samples)
    return x, y, x[:validation_samples], y[:validation_samples]


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


class EpochClock(keras.callbacks.Callback):
    """Record the monotonic time at the start of every epoch."""

    def __init__(self):
        super().__init__()
        self.starts = []

    def on_epoch_begin(self, epoch, logs=None):
        self.starts.append(time.monotonic())


def make_dataset(x, y, batch_size: int):
    """Return a repeated, batched pipeline over `(x, y)` with tf.data's autotuning off."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()
    return dataset.with_options(options)


def timed_fit(kind: str, tracking_uri: str | None, data, epochs: int, batch_size: int, staging: str):
    """Train one fresh model with checkpointing `kind`; return (whole-fit s, steady epoch s)."""
    keras.backend.clear_session()
    gc.collect()
    x, y, x_val, y_val = data
    model = build_model()
    clock = EpochClock()
    callbacks = [clock]
    if kind == "autolog":
        mlflow.tensorflow.autolog(
            checkpoint=True, checkpoint_save_best_only=False, checkpoint_save_freq="epoch",
            log_models=False, log_datasets=False, silent=True,
        )
    elif kind == "mlflow_ckpt":
        callbacks.append(mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, staging_dir=staging))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    fit_arguments = dict(
        epochs=epochs,
        steps_per_epoch=len(x) // batch_size,
        validation_data=make_dataset(x_val, y_val, batch_size),
        validation_steps=max(1, len(x_val) // batch_size),
        callbacks=callbacks,
        verbose=0,
    )
    train = make_dataset(x, y, batch_size)
    started = time.monotonic()
    if kind == "none":
        model.fit(train, **fit_arguments)
    else:
        with mlflow.start_run():
            model.fit(train, **fit_arguments)
    elapsed = time.monotonic() - started
    if kind == "autolog":
        mlflow.tensorflow.autolog(disable=True)
    # Epoch i lasts from its start to the start of epoch i + 1, so the time spent
    # in every callback's on_epoch_end is counted, whatever the callbacks' order.
    steady = [later - earlier for earlier, later in zip(clock.starts[1:], clock.starts[2:])]
    return elapsed, statistics.median(steady)


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time so far of process `pid` and its descendants, from /proc.

    `mlflow server` handles requests in worker processes that it starts, so
    their time counts too.
    """
    parents, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The fields after the command name, which may contain spaces:
                # state, ppid, ..., utime (14th field overall), stime (15th).
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    tree = {pid}
    grew = True
    while grew:
        children = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(ticks.get(member, 0) for member in tree) / os.sysconf("SC_CLK_TCK")


def describe_machine() -> str:
    cores = os.cpu_count()
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kilobytes = int(f.readline().split()[1])
        memory = f", {kilobytes / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{platform.machine()}, {cores} cores{memory}, Python {platform.python_version()}, "
        f"TensorFlow {_version('tensorflow')}, Keras {keras.__version__}, MLflow {mlflow.__version__}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


class FitRecord(NamedTuple):
    """One timed fit: its configuration, when it ran and what it cost."""

    kind: str
    store: str
    started: float  # time.monotonic() at the start of the fit
    fit_seconds: float
    epoch_seconds: float
    cpu_seconds: float  # this process and the mlflow server, during the fit

    @property
    def midpoint(self) -> float:
        return self.started + self.fit_seconds / 2


def bracketed_ratios(records: list, index: int) -> tuple:
    """Divide fit `index` by the baseline interpolated at its midpoint; return (fit, epoch) ratios.

    The baseline is interpolated linearly between the nearest baseline fits
    before and after fit `index`, so drift that is linear over that span
    cancels. With a baseline on one side only, that fit is used alone.
    """
    record = records[index]
    before = next((r for r in reversed(records[:index]) if r.kind == "none"), None)
    after = next((r for r in records[index + 1:] if r.kind == "none"), None)
    if before is None or after is None:
        nearest = before or after
        return record.fit_seconds / nearest.fit_seconds, record.epoch_seconds / nearest.epoch_seconds
    weight = (record.midpoint - before.midpoint) / (after.midpoint - before.midpoint)
    baseline_fit = before.fit_seconds + weight * (after.fit_seconds - before.fit_seconds)
    baseline_epoch = before.epoch_seconds + weight * (after.epoch_seconds - before.epoch_seconds)
    return record.fit_seconds / baseline_fit, record.epoch_seconds / baseline_epoch


def print_summary(records: list, configurations: list) -> None:
    """Print medians, ratios and bracketed ratios of fit and steady-epoch times per configuration."""
    baseline = [r for r in records if r.kind == "none"]
    baseline_fit = statistics.median(r.fit_seconds for r in baseline)
    baseline_epoch = statistics.median(r.epoch_seconds for r in baseline)
    baseline_cpu = statistics.median(r.cpu_seconds for r in baseline)
    print(
        f"\n{'configuration':<22} {'fit s':>8} {'ratio':>7} {'bracket':>7}"
        f" {'epoch s':>8} {'ratio':>7} {'bracket':>7} {'CPU s':>7} {'extra':>7}"
    )
    for kind, store in configurations:
        indexes = [i for i, r in enumerate(records) if (r.kind, r.store) == (kind, store)]
        fit = statistics.median(records[i].fit_seconds for i in indexes)
        epoch = statistics.median(records[i].epoch_seconds for i in indexes)
        cpu = statistics.median(records[i].cpu_seconds for i in indexes)
        if kind == "none":
            bracket_fit = bracket_epoch = 1.0
        else:
            ratios = [bracketed_ratios(records, i) for i in indexes]
            bracket_fit = statistics.median(fit_ratio for fit_ratio, _ in ratios)
            bracket_epoch = statistics.median(epoch_ratio for _, epoch_ratio in ratios)
        print(
            f"{kind + ' / ' + store:<22} {fit:8.2f} {fit / baseline_fit:7.3f} {bracket_fit:7.3f}"
            f" {epoch:8.2f} {epoch / baseline_epoch:7.3f} {bracket_epoch:7.3f}"
            f" {cpu:7.1f} {cpu - baseline_cpu:7.1f}"
        )


def run_order(checkpointing: list, rounds: int, between: int) -> list:
    """Return the fit order: each round's checkpointing fits, a baseline before every `between`.

    The checkpointing configurations rotate by one position per round, and a
    last baseline fit closes the final round, so every checkpointing fit has
    a baseline on both sides.
    """
    baseline = ("none", "-")
    order = []
    for round_number in range(rounds):
        shift = round_number % len(checkpointing)
        rotated = checkpointing[shift:] + checkpointing[:shift]
        for position, configuration in enumerate(rotated):
            if position % between == 0:
                order.append((round_number, baseline))
            order.append((round_number, configuration))
    order.append((rounds - 1, baseline))
    return order


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="Fits per checkpointing configuration.")
    parser.add_argument(
        "--epochs", type=int, default=5,
        help="Epochs per fit; at least 3, so that one steady-state epoch is timed.",
    )
    parser.add_argument(
        "--samples", type=int, default=40960,
        help="Training samples per epoch (40,960 made epochs of 12 s to 25 s on the 2-core machines of docs/benchmarks.md).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size.")
    parser.add_argument(
        "--between", type=int, default=2,
        help="Checkpointing fits between two baseline fits; 1 brackets every fit on both sides.",
    )
    parser.add_argument(
        "--kinds", default="autolog,mlflow_ckpt",
        help="Comma-separated checkpointing kinds to time beside the baseline: autolog, mlflow_ckpt.",
    )
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error(f"--epochs must be at least 3. Received: --epochs={args.epochs}")
    if args.between < 1:
        parser.error(f"--between must be at least 1. Received: --between={args.between}")
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - {"autolog", "mlflow_ckpt"})
    if unknown:
        parser.error(f"--kinds accepts autolog and mlflow_ckpt. Received: --kinds={args.kinds}")
    if "autolog" in kinds and importlib.util.find_spec("tensorboard") is None:
        parser.error(
            "MLflow's Keras autolog needs TensorBoard, which is not installed. "
            "Run `pip install -e '.[bench]'`, or pass --kinds mlflow_ckpt."
        )

    root = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-bench-"))
    os.chdir(root)
    data = random_data(args.samples, validation_samples=512)
    print(f"machine: {describe_machine()}")
    print(f"model state (weights + optimizer): {state_megabytes(build_model()):.1f} MB")

    server, server_url = start_server(root)
    local_uri = f"sqlite:///{root / 'local.db'}"
    configurations = [("none", "-")] + [
        (kind, store)
        for store in ("local", "server")
        for kind in ("autolog", "mlflow_ckpt")
        if kind in kinds
    ]
    uris = {"local": local_uri, "server": server_url, "-": None}
    records = []
    try:
        # A warm-up fit loads TensorFlow's kernels so the first measured fit is not slower.
        timed_fit("none", None, data, 3, args.batch_size, str(root / "staging"))
        for round_number, (kind, store) in run_order(configurations[1:], args.rounds, args.between):
            # The server is a child of this process, so its time is in both trees.
            total_before, server_before = cpu_seconds(os.getpid()), cpu_seconds(server.pid)
            started = time.monotonic()
            elapsed, epoch = timed_fit(
                kind, uris[store], data, args.epochs, args.batch_size, str(root / "staging")
            )
            server_cpu = cpu_seconds(server.pid) - server_before
            cpu = cpu_seconds(os.getpid()) - total_before - server_cpu
            records.append(FitRecord(kind, store, started, elapsed, epoch, cpu + server_cpu))
            print(
                f"round {round_number + 1}: {kind:<12} {store:<7} fit {elapsed:7.2f} s"
                f"  steady epoch {epoch:6.2f} s  CPU {cpu:6.1f} s + server {server_cpu:5.1f} s",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    print_summary(records, configurations)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
