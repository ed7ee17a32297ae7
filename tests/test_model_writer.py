"""Background writes of checkpoint files through a shadow copy of the model."""

import json
import os
import random
import re
import threading
import time
import types

import keras
import mlflow
import numpy as np
import pytest

import mlflow_ckpt
from helpers import all_weights, tiny_data, tiny_model
from mlflow_ckpt import model_writer, snapshot, training_state
from mlflow_ckpt.errors import InvalidCheckpointError
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


def _staged_checkpoint(tmp_path, model, format):
    staged = snapshot.write_snapshot(
        model, shadow=ShadowModel.create(model), staging_dir=str(tmp_path / "staging"),
        run_id="run", experiment_id="0", epoch=1, steps_into_epoch=0, metrics={}, format=format,
    )
    snapshot.complete_snapshot(staged)
    snapshot.write_pending(staged)
    return staged


@pytest.mark.parametrize("format", ["keras", "savedmodel"])
def test_training_state_leaves_weights_to_model_file(tmp_path, format):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    staged = _staged_checkpoint(tmp_path, model, format)
    state, arrays = training_state.read(os.path.join(staged.model_dir, "training_state"))

    # Only the seed generator state of the Dropout layer stays among the model variables.
    seed_positions = [
        i for i, record in enumerate(state["model_variables"]) if "seed_generator" in record["path"]
    ]
    assert sorted(key for key in arrays if key.startswith("model/")) == [f"model/{i:05d}" for i in seed_positions]
    assert not [key for key in arrays if key.startswith("optimizer/")]
    assert len(state["in_model_file"]) == len(model.weights) + len(model.optimizer.variables)


def test_h5_training_state_keeps_every_variable(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    staged = _staged_checkpoint(tmp_path, model, "h5")

    state, arrays = training_state.read(os.path.join(staged.model_dir, "training_state"))

    assert not state.get("in_model_file")
    assert len([key for key in arrays if key.startswith("model/")]) == len(model.variables)


def test_resume_from_deduplicated_state_restores_optimizer(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=2, verbose=0)
    staged = _staged_checkpoint(tmp_path, model, "keras")
    snapshot.write_snapshot_manifest(staged)

    target = tiny_model()
    target.fit(*tiny_data(seed=1), epochs=1, verbose=0)
    mlflow_ckpt.load_checkpoint(staged.model_dir, model=target)

    np.testing.assert_array_equal(all_weights(target), all_weights(model))
    for expected, actual in zip(model.optimizer.variables, target.optimizer.variables):
        np.testing.assert_array_equal(actual.numpy(), expected.numpy())


def test_model_file_mismatch_named(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    staged = _staged_checkpoint(tmp_path, model, "keras")
    state_path = os.path.join(staged.model_dir, "training_state", "state.json")
    with open(state_path) as f:
        state = json.load(f)
    first_key = sorted(state["in_model_file"])[0]
    state["in_model_file"][first_key] ^= 1
    with open(state_path, "w") as f:
        json.dump(state, f)
    # A manifest written after the change, so only the CRC-32 check can catch it.
    snapshot.write_snapshot_manifest(staged)
    record = state["model_variables"][int(first_key.split("/")[1])]

    target = tiny_model()
    target.fit(*tiny_data(), epochs=1, verbose=0)
    before = all_weights(target)
    with pytest.raises(InvalidCheckpointError, match=re.escape(record["path"])):
        mlflow_ckpt.load_checkpoint(staged.model_dir, model=target)
    np.testing.assert_array_equal(all_weights(target), before)


def test_close_counts_snapshot_being_written(monkeypatch, capfd):
    started = threading.Event()

    def slow_write(snapshot, shadow):
        started.set()
        time.sleep(0.3)

    monkeypatch.setattr(model_writer.snapshot_module, "write_pending", slow_write)
    written = []
    writer = model_writer.BackgroundWriter(shadow=None, on_written=written.append)
    writer.submit(types.SimpleNamespace(run_id="run", epoch=1))
    writer.submit(types.SimpleNamespace(run_id="run", epoch=2))
    started.wait(timeout=10)
    writer.close()

    assert "writing 2 checkpoint(s)" in capfd.readouterr().err
    assert [s.epoch for s in written] == [1, 2]
