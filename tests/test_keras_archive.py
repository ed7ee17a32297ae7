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
    markers = keras_archive.assign_markers(shadow.model, arrays)
    marked = str(tmp_path / "marked.keras")
    shadow.model.save(marked)
    return shadow, keras_archive.ArchiveTemplate.from_marked_file(marked, markers)


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


def test_template_rejects_wrong_shape(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    _, template = learned_template(model, tmp_path)
    _, arrays = training_state.capture(model, epoch=1)
    arrays["model/00000"] = np.zeros((9, 16), dtype="float32")
    with pytest.raises(keras_archive.TemplateMismatch, match=r"model/00000"):
        template.write(str(tmp_path / "bad.keras"), arrays)


def test_marker_mismatch_rejects_template(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    shadow = ShadowModel.create(model)
    _, arrays = training_state.capture(model, epoch=1)
    markers = keras_archive.assign_markers(shadow.model, arrays)
    marked = str(tmp_path / "marked.keras")
    shadow.model.save(marked)
    assert keras_archive.ArchiveTemplate.from_marked_file(marked, markers) is not None

    # One value off in the middle of a kernel, as if Keras stored it in another order.
    changed = markers["model/00000"].copy()
    changed.reshape(-1)[5] += 1
    assert keras_archive.ArchiveTemplate.from_marked_file(marked, {**markers, "model/00000": changed}) is None


def test_marker_needs_exact_values():
    model = keras.Sequential([keras.Input(shape=(2,)), keras.layers.Dense(1)])
    arrays = {"model/00000": np.zeros((2, 1), dtype=bool), "model/00001": np.zeros((1,), dtype="float32")}
    assert keras_archive.assign_markers(model, arrays) is None


def test_shadow_mismatch_falls_back(tmp_path):
    model = tiny_model()
    model.fit(*tiny_data(), epochs=1, verbose=0)
    shadow = ShadowModel.create(model)
    _, arrays = training_state.capture(model, epoch=1)
    assert set(shadow.write(str(tmp_path / "first"), arrays, "keras", {})) == {"data/model.keras"}
    assert shadow._template is not None
    assert sorted(os.listdir(tmp_path)) == ["first"]
    restored = keras.saving.load_model(str(tmp_path / "first" / "data" / "model.keras"))
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))

    arrays["model/00000"] = np.zeros((9, 16), dtype="float32")
    with pytest.raises(ValueError):
        # Keras refuses the wrong shape too, after the template gave up.
        shadow.write(str(tmp_path / "third"), arrays, "keras", {})
    assert shadow._template is None


def test_checkpoints_use_template(local_tracking):
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
    assert flags == [True, True, True]

    # The template-written checkpoint verifies, loads and contains the final weights.
    restored = mlflow_ckpt.load_checkpoint(checkpoints[-1].model_uri)
    np.testing.assert_array_equal(all_weights(restored), all_weights(model))
    # Serving loads the same file through the pyfunc flavor.
    served = mlflow.pyfunc.load_model(checkpoints[-1].model_uri).predict(x[:5])
    np.testing.assert_allclose(np.asarray(served), model.predict(x[:5], verbose=0), rtol=1e-5, atol=1e-6)
    uuids = set()
    for checkpoint in checkpoints:
        info = mlflow.models.get_model_info(checkpoint.model_uri)
        uuids.add(info.model_uuid)
    assert len(uuids) == 3


def test_manifest_reuses_write_digest(tmp_path, monkeypatch):
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
    assert [set(item.file_digests) for item in staged] == [{"data/model.keras"}] * 2

    # The manifest takes the recorded digest instead of reading the file.
    hashed = []
    real_sha256_of = snapshot.manifest.sha256_of
    monkeypatch.setattr(snapshot.manifest, "sha256_of", lambda path: hashed.append(path) or real_sha256_of(path))
    reloaded = snapshot.Snapshot.load(staged[1].folder)
    snapshot.write_snapshot_manifest(reloaded)
    assert not any(path.endswith("model.keras") for path in hashed)
    snapshot.manifest.verify(staged[1].model_dir)
