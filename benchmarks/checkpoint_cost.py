"""Measure the wall time that one checkpoint adds to training, inside a single fit.

`overhead.py` compares whole fits, and on a shared machine fits a few
minutes apart differ by several percent from drift alone. This script
compares epochs of the same fit instead, seconds apart. Each fit saves a
checkpoint at the end of every third epoch, so its epochs repeat in threes:

- a save epoch, which ends with the save (the training thread's share);
- the epoch after it, during which background threads write and upload;
- a clean epoch, with neither.

The cost of one checkpoint is estimated as
`save epoch + epoch after - clean epoch before - clean epoch after`, once per
three epochs. A fit without checkpointing goes through the same arithmetic;
its result, which should be near zero, shows the noise and any bias of the
estimate.

Configurations: no checkpointing; MLflow's
`autolog(checkpoint=True, checkpoint_save_best_only=False)` saving every
`3 * steps_per_epoch` steps, which is every third epoch; and
`MlflowCheckpoint(every_n_epochs=3, save_last=False)`. Both checkpointing
kinds run against a local store (SQLite file, local artifacts) and against a
local `mlflow server` subprocess (SQLite, proxied artifacts) on 127.0.0.1.

    pip install -e '.[bench]'
    python benchmarks/checkpoint_cost.py [--rounds 3] [--saves 8] [--samples 9216]
        [--stores local,server] [--intra-op-threads N]

Prints one line per fit, then per configuration the median cost per
checkpoint over all saves of all rounds, with its interquartile range, in
milliseconds and as a share of a clean epoch.
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from overhead import (  # noqa: E402 - after the path set-up
    EpochClock,
    build_model,
    describe_machine,
    make_dataset,
    random_data,
    start_server,
    state_megabytes,
    store_label,
)

import keras  # noqa: E402
import mlflow  # noqa: E402

import mlflow_ckpt  # noqa: E402

SAVE_EVERY = 3


def timed_fit(kind: str, tracking_uri: str | None, data, saves: int, batch_size: int, staging: str):
    """Train one fresh model that saves every third epoch; return (per-save costs, clean epoch s)."""
    keras.backend.clear_session()
    x, y, x_val, y_val = data
    steps_per_epoch = len(x) // batch_size
    model = build_model()
    clock = EpochClock()
    callbacks = [clock]
    if kind == "autolog":
        mlflow.tensorflow.autolog(
            checkpoint=True, checkpoint_save_best_only=False,
            checkpoint_save_freq=SAVE_EVERY * steps_per_epoch,
            log_models=False, log_datasets=False, silent=True,
        )
    elif kind == "mlflow_ckpt":
        callbacks.append(
            mlflow_ckpt.MlflowCheckpoint(every_n_epochs=SAVE_EVERY, save_last=False, staging_dir=staging)
        )
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    # One clean epoch before the first save epoch, and one after the last save's epoch.
    epochs = SAVE_EVERY * saves + SAVE_EVERY
    fit_arguments = dict(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=make_dataset(x_val, y_val, batch_size),
        validation_steps=max(1, len(x_val) // batch_size),
        callbacks=callbacks,
        verbose=0,
    )
    train = make_dataset(x, y, batch_size)
    if kind == "none":
        model.fit(train, **fit_arguments)
    else:
        with mlflow.start_run():
            model.fit(train, **fit_arguments)
    if kind == "autolog":
        mlflow.tensorflow.autolog(disable=True)

    # durations[j] is epoch j (0-based), from its start to the start of epoch j + 1.
    durations = [later - earlier for earlier, later in zip(clock.starts, clock.starts[1:])]
    costs = []
    for save in range(saves):
        # Epoch j ends with the save: it completes epoch j + 1, a multiple of SAVE_EVERY.
        j = SAVE_EVERY * save + SAVE_EVERY - 1
        costs.append(durations[j] + durations[j + 1] - durations[j - 1] - durations[j + 2])
    clean = [durations[SAVE_EVERY * save + SAVE_EVERY + 1] for save in range(saves)]
    return costs, statistics.median(clean)


def quartiles(values) -> tuple[float, float, float]:
    first, median, third = statistics.quantiles(values, n=4)
    return first, median, third


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Fits per configuration.")
    parser.add_argument("--saves", type=int, default=8, help="Checkpoints per fit (3 epochs each).")
    parser.add_argument(
        "--samples", type=int, default=9216,
        help="Training samples per epoch (9,216 make epochs of about 5.5 s on 2 CPU cores).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size.")
    parser.add_argument(
        "--stores", default="local,server",
        help="Comma-separated stores to checkpoint to: local, server.",
    )
    parser.add_argument(
        "--intra-op-threads", type=int, default=0,
        help="TensorFlow threads per operation; 0 lets TensorFlow choose (one per core). "
        "1 leaves a core idle, as when a GPU does the training.",
    )
    args = parser.parse_args()
    if args.saves < 2:
        parser.error(f"--saves must be at least 2. Received: --saves={args.saves}")
    stores = [store.strip() for store in args.stores.split(",") if store.strip()]
    if not stores or set(stores) - {"local", "server"}:
        parser.error(f"--stores accepts local and server. Received: --stores={args.stores}")
    if args.intra_op_threads:
        import tensorflow as tf

        # Must happen before TensorFlow runs its first operation.
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if importlib.util.find_spec("tensorboard") is None:
        parser.error(
            "MLflow's Keras autolog needs TensorBoard, which is not installed. "
            "Run `pip install -e '.[bench]'`."
        )

    root = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-cost-"))
    os.chdir(root)
    data = random_data(args.samples, validation_samples=640)
    print(f"machine: {describe_machine()}")
    print(f"TensorFlow threads per operation: {args.intra_op_threads or 'one per core'}")
    print(f"model state (weights + optimizer): {state_megabytes(build_model()):.1f} MB")

    server, server_url = start_server(root) if "server" in stores else (None, None)
    uris = {"local": f"sqlite:///{root / 'local.db'}", "server": server_url}
    configurations = [("none", None)] + [
        (kind, uris[store]) for store in stores for kind in ("autolog", "mlflow_ckpt")
    ]
    results = {}
    try:
        for round_number in range(args.rounds):
            shift = round_number % len(configurations)
            for kind, uri in configurations[shift:] + configurations[:shift]:
                started = time.monotonic()
                costs, clean = timed_fit(kind, uri, data, args.saves, args.batch_size, str(root / "staging"))
                key = (kind, store_label(uri))
                entry = results.setdefault(key, {"costs": [], "clean": []})
                entry["costs"] += costs
                entry["clean"].append(clean)
                print(
                    f"round {round_number + 1}: {kind:<12} {key[1]:<7} fit {time.monotonic() - started:7.1f} s"
                    f"  clean epoch {clean:5.2f} s  cost per save: median"
                    f" {statistics.median(costs) * 1000:5.0f} ms, each {[round(c * 1000) for c in costs]}",
                    flush=True,
                )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    print(
        f"\n{'configuration':<22} {'saves':>5} {'median ms':>10} {'IQR ms':>15}"
        f" {'clean epoch s':>14} {'share':>7}"
    )
    for kind, uri in configurations:
        key = (kind, store_label(uri))
        costs, clean = results[key]["costs"], statistics.median(results[key]["clean"])
        first, median, third = quartiles(costs)
        print(
            f"{kind + ' / ' + key[1]:<22} {len(costs):5d} {median * 1000:10.0f}"
            f" {f'{first * 1000:.0f} to {third * 1000:.0f}':>15} {clean:14.2f} {median / clean:7.1%}"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
