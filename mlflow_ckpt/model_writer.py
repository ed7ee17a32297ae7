"""Write checkpoint model files on a background thread, from a copy of the training model.

Writing a `.keras`, `.h5` or SavedModel file reads every variable and takes
about 0.35 s for 57 MB of weights and optimizer state on a 2-core machine.
To keep that off the training thread, the callback builds a shadow model once
(same architecture, same compile arguments, its own optimizer). At each save
the training thread only copies the variables to NumPy arrays, which
`BackgroundWriter` then assigns to the shadow and writes out with the flavor.

A snapshot in that state lives in host memory until the writer has put it on
disk: a crash in between loses that one checkpoint, never an earlier one.
"""

import logging
import os
import queue
import sys
import threading
import time

from mlflow_ckpt import snapshot as snapshot_module
from mlflow_ckpt import training_state
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

    def assign(self, arrays: dict) -> None:
        for i, variable in enumerate(training_state._model_variables(self.model)):
            variable.assign(arrays[f"model/{i:05d}"])
        for i, variable in enumerate(training_state._optimizer_variables(self.model)):
            variable.assign(arrays[f"optimizer/{i:05d}"])


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
