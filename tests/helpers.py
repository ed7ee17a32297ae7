"""Small models and data shared by the tests."""

import numpy as np


def tiny_data(samples=100, features=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = rng.integers(0, classes, size=samples).astype("int64")
    return x, y


def tiny_model(features=8, classes=3, steps_per_execution=1, dropout=True):
    import keras

    layers = [keras.Input(shape=(features,)), keras.layers.Dense(16, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(0.2))
    layers.append(keras.layers.Dense(classes))
    model = keras.Sequential(layers)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def all_weights(model) -> np.ndarray:
    return np.concatenate([np.ravel(w) for w in model.get_weights()])
