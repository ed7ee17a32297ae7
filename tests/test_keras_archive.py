"""Checkpoint `.keras` files written from a learned template instead of through Keras."""

import hashlib
import os
import zipfile

import keras
import mlflow
import numpy as np
import pytest

import mlflow_ckpt
from helpers import all_weights, tiny_data, tiny_model
from mlflow_ckpt import keras_archive, snapshot, training_state
from mlflow_ckpt.model_writer import ShadowModel

# zipfile's flag for a member whose CRC and sizes follow its data: set by the
# template writer, which never seeks back, and never by Keras.
DATA_DESCRIPTOR_FLAG = 0x08


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_CKPT_STAGING_DIR", str(tmp_path / "staging"))


def normalized_model():
    # BatchNormalization adds non-trainable variables, Dropout a seed generator.
    model = keras.Sequential(
        [
            keras.Input(shape=(8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def learned_template(model, tmp_path):
    shadow = ShadowModel.create(model)
    _, arrays = training_state.capture(model, epoch=1)
    shadow.assign(arrays)
    reference = str(tmp_path / "reference.keras")
    shadow.model.save(reference)
    return shadow, keras_archive.ArchiveTemplate.learn(shadow.model, arrays, reference)


def weights_member(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read(keras_archive.WEIGHTS_MEMBER)


def test_template_writes_what_keras_writes(tmp_path):
    model = normalized_model()
    x, y = tiny_data()
    model.fit(x, y, epochs=1, verbose=0)
    shadow, template = learned_template(model, tmp_path)
    assert template is not None

    # Later arrays: the template must place the new values, not the learned ones.
    model.fit(x, y, epochs=2, verbose=0)
    _, arrays = training_state.capture(model, epoch=3)
    written = str(tmp_path / "written.keras")
    digest = template.write(written, arrays)

    with open(written, "rb") as file:
        assert digest == hashlib.sha256(file.read()).hexdigest()
    shadow.assign(arrays)
    shadow.model.save(str(tmp_path / "keras.keras"))
    assert weights_member(written) == weights_member(str(tmp_path / "keras.keras"))
    with zipfile.ZipFile(written) as archive:
        assert archive.testzip() is None

    restored = keras.saving.load_model(written)
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))
    for restored_variable, variable in zip(restored.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(restored_variable.numpy(), variable.numpy())


def test_template_rejects_arrays_of_another_shape(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    _, template = learned_template(model, tmp_path)
    _, arrays = training_state.capture(model, epoch=1)
    arrays["model/00000"] = np.zeros((9, 16), dtype="float32")
    with pytest.raises(keras_archive.TemplateMismatch, match=r"model/00000"):
        template.write(str(tmp_path / "bad.keras"), arrays)


def test_template_refused_when_it_cannot_reproduce_keras(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    shadow = ShadowModel.create(model)
    _, arrays = training_state.capture(model, epoch=1)
    shadow.assign(arrays)
    reference = str(tmp_path / "reference.keras")
    shadow.model.save(reference)
    # The reference no longer holds `arrays`: the check against it must fail.
    arrays = {key: value + 1 if value.dtype.kind == "f" else value for key, value in arrays.items()}
    assert keras_archive.ArchiveTemplate.learn(shadow.model, arrays, reference) is None


def test_shadow_falls_back_to_keras_after_mismatch(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    shadow = ShadowModel.create(model)
    _, arrays = training_state.capture(model, epoch=1)
    assert shadow.write(str(tmp_path / "first"), arrays, "keras", {}) == {}
    assert shadow._template is not None
    assert set(shadow.write(str(tmp_path / "second"), arrays, "keras", {})) == {"data/model.keras"}

    arrays["model/00000"] = np.zeros((9, 16), dtype="float32")
    with pytest.raises(ValueError):
        # Keras refuses the wrong shape too, after the template gave up.
        shadow.write(str(tmp_path / "third"), arrays, "keras", {})
    assert shadow._template is None


def test_checkpoints_after_the_first_use_the_template(local_tracking):
    model = tiny_model()
    x, y = tiny_data()
    with mlflow.start_run() as run:
        model.fit(x, y, epochs=3, callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=1)], verbose=0)
    checkpoints = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [c.epoch for c in checkpoints] == [1, 2, 3]

    flags = []
    for checkpoint in checkpoints:
        folder = mlflow.artifacts.download_artifacts(checkpoint.model_uri)
        with zipfile.ZipFile(os.path.join(folder, "data", "model.keras")) as archive:
            flags.append(bool(archive.getinfo(keras_archive.WEIGHTS_MEMBER).flag_bits & DATA_DESCRIPTOR_FLAG))
        with open(os.path.join(folder, "MLmodel")) as file:
            mlmodel = file.read()
        assert "model_uuid" in mlmodel
    assert flags == [False, True, True]

    # The template-written checkpoint verifies, loads and holds the final weights.
    restored = mlflow_ckpt.load_checkpoint(checkpoints[-1].model_uri)
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))
    uuids = set()
    for checkpoint in checkpoints:
        info = mlflow.models.get_model_info(checkpoint.model_uri)
        uuids.add(info.model_uuid)
    assert len(uuids) == 3


def test_staged_snapshot_records_digest_for_manifest(tmp_path, monkeypatch):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    shadow = ShadowModel.create(model)
    staged = []
    for epoch in (1, 2):
        item = snapshot.write_snapshot(
            model, shadow=shadow, staging_dir=str(tmp_path / "staging"), run_id="run",
            experiment_id="0", epoch=epoch, steps_into_epoch=0, metrics={}, format="keras",
        )
        snapshot.complete_snapshot(item)
        snapshot.write_pending(item)
        staged.append(item)
    assert staged[0].file_digests == {}
    assert set(staged[1].file_digests) == {"data/model.keras"}

    # The manifest takes the recorded digest instead of reading the file.
    hashed = []
    real_sha256_of = snapshot.manifest.sha256_of
    monkeypatch.setattr(snapshot.manifest, "sha256_of", lambda path: hashed.append(path) or real_sha256_of(path))
    reloaded = snapshot.Snapshot.load(staged[1].folder)
    snapshot.write_snapshot_manifest(reloaded)
    assert not any(path.endswith("model.keras") for path in hashed)
    snapshot.manifest.verify(staged[1].model_dir)
