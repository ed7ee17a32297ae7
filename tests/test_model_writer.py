"""Background writes of checkpoint files through a shadow copy of the model."""

import random

import keras
import mlflow
import numpy as np
import pytest

import mlflow_ckpt
from helpers import all_weights, tiny_data, tiny_model
from mlflow_ckpt import snapshot
from mlflow_ckpt.model_writer import ShadowModel


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))


class NoConfigModel(keras.Model):
    """A subclassed model without get_config, which clone_model cannot copy."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.logits = keras.layers.Dense(3)

    def call(self, inputs):
        return self.logits(self.hidden(inputs))


def test_shadow_write_matches_model(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    shadow = ShadowModel.create(model)
    assert shadow is not None

    staged = snapshot.write_snapshot(
        model, shadow=shadow, staging_dir=str(tmp_path / "staging"), run_id="run",
        experiment_id="0", epoch=1, steps_into_epoch=0, metrics={}, format="keras",
    )
    snapshot.complete_snapshot(staged)
    snapshot.write_pending(staged)
    snapshot.write_snapshot_manifest(staged)

    restored = mlflow_ckpt.load_checkpoint(staged.model_dir)
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))
    assert int(restored.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())


def test_shadow_creation_keeps_random_states():
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    python_before = random.getstate()
    numpy_before = np.random.get_state(legacy=True)[1].copy()

    ShadowModel.create(model)

    assert random.getstate() == python_before
    np.testing.assert_array_equal(np.random.get_state(legacy=True)[1], numpy_before)


def test_uncloneable_model_has_no_shadow():
    model = NoConfigModel()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*tiny_data(), epochs=1, verbose=0)

    assert ShadowModel.create(model) is None


def test_uncloneable_model_still_checkpoints(local_tracking):
    model = NoConfigModel()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = tiny_data()
    with mlflow.start_run() as run:
        model.fit(
            x, y, epochs=2, verbose=0,
            callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1, save_weights_only=True)],
        )

    target = NoConfigModel()
    target.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    target.fit(x[:32], y[:32], epochs=1, verbose=0)
    mlflow_ckpt.load_checkpoint(run.info.run_id, model=target)
    np.testing.assert_array_equal(all_weights(target), all_weights(model))
