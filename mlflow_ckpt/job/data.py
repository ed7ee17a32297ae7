"""Data sets for the packaged training job, read from local files only.

`digits` is scikit-learn's handwritten digits (1,797 real 8x8 images shipped
inside scikit-learn): the first 1,000 images train, the other 797 test.
`mnist` reads Keras' MNIST file from the Keras cache or a given path; it is
never downloaded, because training jobs must work without internet access.
"""

import dataclasses
import os

import numpy as np

DIGITS_TRAIN_SIZE = 1000
DATASETS = ("digits", "mnist")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays: inputs are float32 in [0, 1], labels are int64 class ids."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])


def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 in this data set.
    x = (digits.images.reshape(len(digits.images), -1) / 16.0).astype("float32")
    y = digits.target.astype("int64")
    return Dataset(
        "digits",
        x[:DIGITS_TRAIN_SIZE],
        y[:DIGITS_TRAIN_SIZE],
        x[DIGITS_TRAIN_SIZE:],
        y[DIGITS_TRAIN_SIZE:],
    )


def default_mnist_path() -> str:
    cache = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(cache, "datasets", "mnist.npz")


def load_mnist_dataset(path: str | None = None) -> Dataset:
    path = path or default_mnist_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MNIST file {path} not found. Copy Keras' mnist.npz there (or pass its path "
            "with data_path=...), or use dataset=digits, which ships with scikit-learn."
        )
    with np.load(path, allow_pickle=False) as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test = data["x_test"], data["y_test"]
    return Dataset(
        "mnist",
        (x_train.reshape(len(x_train), -1) / 255.0).astype("float32"),
        y_train.astype("int64"),
        (x_test.reshape(len(x_test), -1) / 255.0).astype("float32"),
        y_test.astype("int64"),
    )


def load_dataset(name: str, path: str | None = None) -> Dataset:
    """Load the data set called `name` (`"digits"` or `"mnist"`)."""
    if name == "digits":
        return load_digits_dataset()
    if name == "mnist":
        return load_mnist_dataset(path)
    raise ValueError(f"Unknown dataset {name!r}. Use one of: {', '.join(DATASETS)}.")
