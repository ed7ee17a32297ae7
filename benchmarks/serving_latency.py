"""Compare single-row pyfunc latency of mlflow-ckpt against MLflow's Keras flavor.

Both flavors save the same Keras model to a temporary folder, both are loaded
with `mlflow.pyfunc.load_model`, and their `predict` calls alternate in one
loop, so that machine load affects both alike. Each call gets one row, as a
single JSON request to `mlflow models serve` would.

Usage:

    python benchmarks/serving_latency.py --iterations 500
"""

import argparse
import logging
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def build_model(features, hidden, classes):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((features,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def load_both(model, row, folder):
    import mlflow
    import mlflow.keras
    from mlflow.models import infer_signature

    import mlflow_ckpt.flavor

    signature = infer_signature(row, model(row).numpy())
    ours_path = os.path.join(folder, "mlflow_ckpt")
    theirs_path = os.path.join(folder, "mlflow_keras")
    mlflow_ckpt.flavor.save_model(model, ours_path, signature=signature)
    mlflow.keras.save_model(model, theirs_path, signature=signature)
    return mlflow.pyfunc.load_model(ours_path), mlflow.pyfunc.load_model(theirs_path)


def time_call(predict, row):
    start = time.perf_counter()
    predict(row)
    return time.perf_counter() - start


def summarize(name, seconds):
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    print(f"{name:<22} median {median * 1e3:8.3f} ms   p90 {p90 * 1e3:8.3f} ms   n={len(ordered)}")
    return median


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500, help="Timed calls per flavor.")
    parser.add_argument("--warmup", type=int, default=20, help="Untimed calls per flavor before timing.")
    parser.add_argument("--features", type=int, default=32, help="Input features of the benchmark model.")
    parser.add_argument("--hidden", type=int, default=64, help="Units of each hidden Dense layer.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import keras
    import numpy as np
    import tensorflow as tf

    # MLflow's wrapper calls `model.predict`, which prints a progress bar per
    # call; silence it so that terminal output is not part of its time.
    keras.utils.disable_interactive_logging()

    model = build_model(args.features, args.hidden, classes=10)
    row = np.random.default_rng(0).normal(size=(1, args.features)).astype("float32")

    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = load_both(model, row, folder)
        np.testing.assert_allclose(ours.predict(row), theirs.predict(row), atol=1e-6)

        for _ in range(args.warmup):
            ours.predict(row)
            theirs.predict(row)

        ours_seconds, theirs_seconds = [], []
        for _ in range(args.iterations):
            ours_seconds.append(time_call(ours.predict, row))
            theirs_seconds.append(time_call(theirs.predict, row))

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, model {args.features}-{args.hidden}-{args.hidden}-10, one row per call")
    ours_median = summarize("mlflow_ckpt pyfunc", ours_seconds)
    theirs_median = summarize("mlflow.keras pyfunc", theirs_seconds)
    print(f"speedup (ratio of medians): {theirs_median / ours_median:.1f}x")


if __name__ == "__main__":
    main()
