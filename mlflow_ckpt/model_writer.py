"""Write checkpoint model files on a background thread, from a copy of the training model.

Writing a `.keras`, `.h5` or SavedModel file reads every variable and takes
about 0.35 s for 57 MB of weights and optimizer state on a 2-core machine.
To keep that off the training thread, the callback builds a shadow model once
(same architecture, same compile arguments, its own optimizer). At each save
the training thread only copies the variables to NumPy arrays, which
`BackgroundWriter` then writes out. For the `keras` format it writes the
file directly from the arrays with a template learned from one save of the
shadow (`keras_archive`); other formats are assigned to the shadow and saved
through the flavor.

A snapshot in that state lives in host memory until the writer has put it on
disk: a crash in between loses that one checkpoint, never an earlier one.
"""

import copy
import datetime
import logging
import os
import queue
import shutil
import sys
import threading
import time
import uuid

from mlflow_ckpt import keras_archive
from mlflow_ckpt import snapshot as snapshot_module
from mlflow_ckpt import training_state
from mlflow_ckpt.flavor.formats import _KERAS_FILE, DATA_DIR, FORMAT_KERAS

MLMODEL_FILE = "MLmodel"
_KERAS_RELATIVE = os.path.join(DATA_DIR, _KERAS_FILE)
from mlflow_ckpt._threads import lower_current_thread_priority

_logger = logging.getLogger(__name__)


class ShadowModel:
    """A copy of the training model whose only job is to be written to disk.

    Use `ShadowModel.create`. It returns None when the model cannot be cloned
    faithfully (a subclassed model without `get_config`). It also returns
    None under a `tf.distribute` strategy or with `TF_CONFIG` set, because
    reading variables can then be a collective operation that every worker
    must perform the same way on its training thread.
    """

    def __init__(self, model):
        import keras

        clone = keras.models.clone_model(model)
        training_state.build_optimizer(model)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            compile_arguments = dict(model._compile_config.config)
            # The shadow gets its own optimizer object: sharing one would let
            # assignments to the shadow reach the training model.
            compile_arguments["optimizer"] = type(optimizer).from_config(optimizer.get_config())
            clone.compile(**compile_arguments)
            training_state.build_optimizer(clone)
        self.model = clone
        self._check_layout(model)
        # Set after the first `.keras` write, when a template reproduces it.
        self._template = None
        self._template_tried = False

    @classmethod
    def create(cls, model):
        """Return a `ShadowModel` of `model`, or None to write on the training thread."""
        import tensorflow as tf

        # Under a multi-worker strategy every worker must read the variables the
        # same way, so all of them write on the training thread instead.
        strategy = getattr(model, "distribute_strategy", None)
        default_strategy = tf.distribute.get_strategy() if not tf.distribute.has_strategy() else None
        if (
            tf.distribute.has_strategy()
            or os.environ.get("TF_CONFIG")
            or (strategy is not None and strategy is not default_strategy)
        ):
            return None
        # Building the copy draws initial weights and seeds from the global random
        # generators. Put them back, or creating the copy at the first save would
        # change the data order and dropout masks of everything that follows.
        random_states = training_state.capture_random_states()
        try:
            return cls(model)
        except Exception as error:  # noqa: BLE001 - any failure means "write synchronously"
            _logger.info(
                "Cannot copy model %r for background writes (%s: %s); checkpoints are written "
                "on the training thread instead.",
                getattr(model, "name", model),
                type(error).__name__,
                error,
            )
            return None
        finally:
            _restore_random_states(random_states)

    def _check_layout(self, model):
        pairs = [
            (training_state._model_variables(model), training_state._model_variables(self.model)),
            (training_state._optimizer_variables(model), training_state._optimizer_variables(self.model)),
        ]
        for original, copy in pairs:
            original_shapes = [tuple(v.shape) for v in original]
            copy_shapes = [tuple(v.shape) for v in copy]
            if original_shapes != copy_shapes:
                raise ValueError(
                    f"the copy has variables of shapes {copy_shapes}, the model {original_shapes}"
                )

    def write(self, folder: str, arrays: dict, format: str, flavor_options: dict) -> dict:
        """Write the MLflow model folder of `arrays` into the new `folder`.

        Before the first `.keras` checkpoint, one Keras save of the shadow
        with marker values teaches an `ArchiveTemplate`, which then writes
        every checkpoint directly. Other formats, and models whose file the
        template cannot reproduce, are saved through Keras each time.

        Returns:
            The SHA-256 of files hashed while writing, by path relative to `folder`.
        """
        from mlflow_ckpt.flavor import save_model

        if format == FORMAT_KERAS and not self._template_tried:
            self._template_tried = True
            self._template = _FolderTemplate.learn(
                self.model, folder + ".template", arrays, format, flavor_options
            )
        if self._template is not None and self._template.options == (format, flavor_options):
            try:
                return self._template.write(folder, arrays)
            except keras_archive.TemplateMismatch as error:
                _logger.warning("Saving checkpoints through Keras from now on: %s", error)
                self._template = None
                shutil.rmtree(folder, ignore_errors=True)
        self.assign(arrays)
        save_model(self.model, folder, format=format, **flavor_options)
        return {}

    def assign(self, arrays: dict) -> None:
        for i, variable in enumerate(training_state._model_variables(self.model)):
            variable.assign(arrays[f"model/{i:05d}"])
        for i, variable in enumerate(training_state._optimizer_variables(self.model)):
            variable.assign(arrays[f"optimizer/{i:05d}"])


class _FolderTemplate:
    """Writes a checkpoint's MLflow model folder with an `ArchiveTemplate` for its `.keras` file.

    The other files (environment files, input example, code) are the same
    for every checkpoint of a training and are kept in memory; MLmodel gets
    a new `model_uuid`, creation time and size each time.
    """

    def __init__(self, archive, options, fixed_files, mlmodel, reference_size):
        self.archive = archive
        self.options = options
        self.fixed_files = fixed_files
        self.mlmodel = mlmodel
        self.reference_size = reference_size

    @classmethod
    def learn(cls, model, scratch: str, arrays: dict, format: str, flavor_options: dict):
        """Save `model` with markers into the `scratch` folder, learn from it, delete it."""
        from mlflow.models import Model

        from mlflow_ckpt.flavor import save_model

        started = time.monotonic()
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            markers = keras_archive.assign_markers(model, arrays)
            if markers is None:
                return None
            save_model(model, scratch, format=format, **flavor_options)
            keras_path = os.path.join(scratch, _KERAS_RELATIVE)
            archive = keras_archive.ArchiveTemplate.from_marked_file(keras_path, markers)
            if archive is None:
                return None
            fixed_files = {}
            for root, _, names in os.walk(scratch):
                for name in names:
                    path = os.path.join(root, name)
                    relative = os.path.relpath(path, scratch)
                    if relative not in (_KERAS_RELATIVE, MLMODEL_FILE):
                        with open(path, "rb") as file:
                            fixed_files[relative] = file.read()
            template = cls(
                archive, (format, dict(flavor_options)), fixed_files,
                Model.load(os.path.join(scratch, MLMODEL_FILE)), os.path.getsize(keras_path),
            )
        except Exception as error:  # noqa: BLE001 - saving through Keras still works
            _logger.debug("Cannot learn the .keras layout (%s: %s)", type(error).__name__, error)
            return None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _logger.debug("Learned the .keras layout of the checkpoints in %.2f s", time.monotonic() - started)
        return template

    def write(self, folder: str, arrays: dict) -> dict:
        keras_path = os.path.join(folder, _KERAS_RELATIVE)
        os.makedirs(os.path.dirname(keras_path))
        digest = self.archive.write(keras_path, arrays)
        for relative, data in self.fixed_files.items():
            path = os.path.join(folder, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as file:
                file.write(data)
        mlmodel = copy.copy(self.mlmodel)
        mlmodel.model_uuid = uuid.uuid4().hex
        mlmodel.utc_time_created = str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
        if mlmodel.model_size_bytes is not None:
            mlmodel.model_size_bytes += os.path.getsize(keras_path) - self.reference_size
        mlmodel.save(os.path.join(folder, MLMODEL_FILE))
        return {_KERAS_RELATIVE.replace(os.sep, "/"): digest}


def _restore_random_states(states: dict) -> None:
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

    training_state.restore_random_states(states)
    if "keras" not in states:
        # The copy created Keras' global seed generator; remove it again so it
        # is created later exactly as it would have been without the copy.
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)


class BackgroundWriter:
    """Write staged snapshots to disk in order, then pass each one on.

    Args:
        shadow: The `ShadowModel` to write through.
        on_written: Called with each snapshot once it is complete on disk,
            from the writer thread (the uploader's `submit_snapshot`).
        max_pending: Most snapshots held in memory; `submit` blocks the
            training thread beyond that.
    """

    def __init__(self, shadow: ShadowModel, on_written, max_pending: int = 2):
        self.shadow = shadow
        self.on_written = on_written
        self._queue = queue.Queue(maxsize=max_pending)
        # Submitted and not yet written, the one being written included.
        self._unwritten = 0
        self._lock = threading.Lock()
        self._errors = []
        self._thread = threading.Thread(target=self._work, name="mlflow-ckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, snapshot) -> None:
        with self._lock:
            self._unwritten += 1
        self._queue.put(snapshot)

    @property
    def errors(self) -> list:
        return list(self._errors)

    def close(self, show_progress: bool = True) -> None:
        """Write every snapshot still in memory, then stop the thread."""
        with self._lock:
            waiting = self._unwritten
        if show_progress and waiting:
            print(
                f"mlflow-ckpt: writing {waiting} checkpoint(s) to the staging folder",
                file=sys.stderr,
                flush=True,
            )
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        lower_current_thread_priority()
        while True:
            snapshot = self._queue.get()
            if snapshot is None:
                return
            try:
                self._write(snapshot)
            finally:
                with self._lock:
                    self._unwritten -= 1

    def _write(self, snapshot) -> None:
        started = time.monotonic()
        try:
            snapshot_module.write_pending(snapshot, self.shadow)
        except Exception as error:  # noqa: BLE001 - reported, and training goes on
            message = (
                f"Writing the checkpoint of run {snapshot.run_id} at epoch {snapshot.epoch} "
                f"failed: {type(error).__name__}: {error}"
            )
            self._errors.append(message)
            _logger.error("%s. The next save point will try again.", message)
            snapshot.discard()
            return
        _logger.debug(
            "Wrote checkpoint of run %s at epoch %d in the background (%.2f s)",
            snapshot.run_id,
            snapshot.epoch,
            time.monotonic() - started,
        )
        self.on_written(snapshot)
