"""Resume training from a logged checkpoint, exactly where it stopped."""

import dataclasses
import logging
import os
import warnings

from mlflow_ckpt import store, training_state
from mlflow_ckpt.checkpoint import TRAINING_STATE_DIR, Checkpoint
from mlflow_ckpt.errors import CheckpointNotFoundError, InvalidCheckpointError

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ResumeState:
    """Everything needed to continue a run from a checkpoint.

    Attributes:
        model: The restored, compiled Keras model: weights, optimizer slots,
            `optimizer.iterations` and seed generator states.
        initial_epoch: Pass to `model.fit(initial_epoch=...)`. Equal to the
            checkpoint's epoch: the number of epochs already completed.
        global_step: Optimizer steps taken before the checkpoint.
        steps_into_epoch: Steps already taken in the interrupted epoch, for a
            checkpoint saved mid-epoch (on SIGTERM or by `save_freq`); else 0.
        run_id: The run that logged the checkpoint, which training continues.
        checkpoint: The checkpoint resumed from.
        fork: If True, `MlflowCheckpoint(resume_from=...)` logs to a new run
            tagged with the source run and epoch instead of continuing `run_id`.
    """

    model: object
    initial_epoch: int
    global_step: int
    steps_into_epoch: int
    run_id: str | None
    checkpoint: Checkpoint
    callback_states: dict
    callback_arrays: dict
    fork: bool = False

    def restore_callbacks(self, callbacks) -> list[str]:
        """Put the saved state back into EarlyStopping, ReduceLROnPlateau and the like.

        Call it after `on_train_begin` (which resets those callbacks); the
        `MlflowCheckpoint` callback does this itself at the first epoch.

        Returns:
            Keys of the callbacks restored, e.g. `["EarlyStopping:0"]`.
        """
        return training_state.restore_callback_states(
            callbacks, self.callback_states, self.callback_arrays
        )


def _candidates(ref, epoch, fallback: bool, tracking_uri):
    """Yield the checkpoint to try, then older ones if `fallback` is set."""
    first = store.resolve(ref, epoch=epoch, tracking_uri=tracking_uri)
    yield first
    if not fallback or first.run_id is None:
        return
    older = [
        c
        for c in store.list_checkpoints(first.run_id, tracking_uri=tracking_uri)
        if (c.epoch, c.global_step) < (first.epoch, first.global_step)
    ]
    yield from reversed(older)


def resume(
    ref,
    epoch: int | None = None,
    model=None,
    custom_objects=None,
    fallback: bool = False,
    fork: bool = False,
    dst_path: str | None = None,
    tracking_uri: str | None = None,
) -> ResumeState:
    """Restore a model and its full training state from a checkpoint.

    Args:
        ref: A run id (the latest committed checkpoint, or `epoch`), a
            `Checkpoint`, a `models:/<model_id>` URI or a local checkpoint folder.
        epoch: With a run id, the epoch to resume from.
        model: A compiled model built by the training code. Its architecture
            and optimizer are compared with the checkpoint's before anything is
            restored. Required for weights-only checkpoints; otherwise the
            saved model is used.
        custom_objects: Classes or functions the saved model refers to.
        fallback: If the checkpoint fails verification, resume from the newest
            older one that passes, with a warning naming the bad file.
        fork: Continue in a new MLflow run instead of the checkpoint's run.
        dst_path: Where to download the checkpoint; a temporary folder by default.
        tracking_uri: Tracking server to read from; defaults to the current one.

    Returns:
        A `ResumeState`.

    Raises:
        CheckpointNotFoundError: the run, epoch or URI does not exist.
        InvalidCheckpointError: the checkpoint is corrupt (and `fallback` is
            off or no older checkpoint is good).
        IncompatibleCheckpointError: `model` differs from the checkpoint.

    Example:

    ```python
    state = mlflow_ckpt.resume(run_id)
    state.model.fit(
        x, y, epochs=10, initial_epoch=state.initial_epoch,
        callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=5, resume_from=state)],
    )
    ```
    """
    errors = []
    for checkpoint in _candidates(ref, epoch, fallback, tracking_uri):
        try:
            local = store.download(checkpoint, dst_path=dst_path)
        except InvalidCheckpointError as error:
            if not fallback:
                raise
            errors.append(str(error))
            warnings.warn(
                f"Skipping checkpoint at epoch {checkpoint.epoch}: {error}", stacklevel=2
            )
            continue
        return _restore_from_dir(local, checkpoint, model, custom_objects, fork)
    raise InvalidCheckpointError(
        "No checkpoint passed verification:\n" + "\n".join(errors)
    )


def _restore_from_dir(local, checkpoint, model, custom_objects, fork) -> ResumeState:
    from mlflow_ckpt.flavor import load_model_from_dir

    state_dir = os.path.join(local, TRAINING_STATE_DIR)
    if not os.path.isdir(state_dir):
        raise CheckpointNotFoundError(
            f"Checkpoint {checkpoint.model_uri} has no training state, so it cannot be "
            "resumed exactly. It was not written by MlflowCheckpoint; load it with "
            "load_checkpoint() and train it as a new run."
        )
    state, arrays = training_state.read(state_dir)
    if model is not None:
        # Check the user's model before touching it, so a mismatch leaves it as it was.
        loaded = model
        if checkpoint.format == "weights":
            load_model_from_dir(local, custom_objects=custom_objects, compile=True, model=model)
    else:
        loaded = load_model_from_dir(local, custom_objects=custom_objects, compile=True)
    training_state.restore(loaded, state, arrays)

    callback_states, callback_arrays = training_state.read_callbacks(state_dir)
    steps_into_epoch = int(state.get("steps_into_epoch", 0))
    if steps_into_epoch:
        warnings.warn(
            f"Checkpoint at epoch {checkpoint.epoch} was saved {steps_into_epoch} steps into "
            f"epoch {checkpoint.epoch + 1}; that epoch restarts from its first batch, so those "
            "steps' samples are seen twice and the result differs from uninterrupted training.",
            stacklevel=3,
        )
    _logger.info(
        "Resuming run %s from epoch %d (global step %d)",
        checkpoint.run_id,
        checkpoint.epoch,
        state["global_step"],
    )
    return ResumeState(
        model=loaded,
        initial_epoch=int(state["epoch"]),
        global_step=int(state["global_step"]),
        steps_into_epoch=steps_into_epoch,
        run_id=checkpoint.run_id,
        checkpoint=checkpoint,
        callback_states=callback_states,
        callback_arrays=callback_arrays,
        fork=fork,
    )
