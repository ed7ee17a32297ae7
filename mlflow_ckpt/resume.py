"""Resume training from a logged checkpoint, exactly where it stopped.

Exact means: with the same code, data, batch size and random seed, training
resumed from a checkpoint ends with the same variables and logs the same
epoch metrics as training that was never interrupted. That holds for
checkpoints at an epoch boundary and for mid-epoch ones (saved by
`save_freq=N` or on SIGTERM), where `MlflowCheckpoint(resume_from=...)`
fast-forwards the interrupted epoch with `EpochFastForward`.

NOTE: exact only for input whose batch order a fresh process reproduces.
NumPy arrays and tensors qualify, because Keras 3.15 shuffles them with an op
that gives the same order every epoch once a global seed is set. So does
`keras.utils.PyDataset`, which shuffles with Python's `random`, whose state
is restored. With `steps_per_epoch`, or a `tf.data` pipeline that reshuffles
each iteration, the batches after a resume differ from uninterrupted training.
"""

import dataclasses
import logging
import os
import warnings

from mlflow.exceptions import MlflowException

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
            `MlflowCheckpoint(resume_from=...)` skips that many batches of the
            epoch; without it, `fit` trains the epoch from its first batch.
        run_id: The run that logged the checkpoint, which training continues.
        checkpoint: The checkpoint resumed from.
        callback_states: Saved state of stateful callbacks, by key such as
            `"EarlyStopping:0"`; see `restore_callbacks`.
        callback_arrays: Arrays of those states, such as `best_weights`.
        fork: If True, `MlflowCheckpoint(resume_from=...)` logs to a new run
            tagged with the source run and epoch instead of continuing `run_id`.
        random_states: Global random states of Python, NumPy and Keras at the
            start of the epoch that training resumes in; see `restore_random_states`.
        training_state: The checkpoint's `state.json` contents.
        metric_arrays: Metric totals of the interrupted epoch, by variable
            position, for a mid-epoch checkpoint.
    """

    model: object
    initial_epoch: int
    global_step: int
    steps_into_epoch: int
    run_id: str | None
    checkpoint: Checkpoint
    # The large fields are left out of repr(), which would print thousands of numbers.
    callback_states: dict
    callback_arrays: dict = dataclasses.field(repr=False)
    fork: bool = False
    random_states: dict = dataclasses.field(default_factory=dict, repr=False)
    training_state: dict = dataclasses.field(default_factory=dict, repr=False)
    metric_arrays: dict = dataclasses.field(default_factory=dict, repr=False)

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

    def restore_random_states(self) -> list[str]:
        """Set Python's, NumPy's and Keras' global random states as they were at the checkpoint.

        `MlflowCheckpoint(resume_from=...)` calls this when the first resumed
        epoch begins, which is where the states were captured.

        Returns:
            The names of the generators restored, e.g. `["python", "numpy"]`.
        """
        return training_state.restore_random_states(self.random_states)


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
    staging_dir: str | None = None,
) -> ResumeState:
    """Restore a model and its full training state from a checkpoint.

    With a run id, checkpoints of that run that a killed or preempted process
    left in the staging folder are committed first, so the newest one is
    not lost.

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
        staging_dir: Staging folder to look in for uncommitted checkpoints of
            the run; `$MLFLOW_CKPT_STAGING_DIR` or `~/.cache/mlflow-ckpt/staging`
            by default.

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
    if _is_run_id(ref):
        commit_staged(ref, staging_dir, tracking_uri)
    errors = []
    for checkpoint in _candidates(ref, epoch, fallback, tracking_uri):
        try:
            local = store.download(checkpoint, dst_path=dst_path)
        except InvalidCheckpointError as error:
            if not fallback:
                raise
            errors.append(str(error))
            # The error's own advice (fallback=True) is already being followed.
            problems = "; ".join(getattr(error, "problems", None) or [str(error)])
            warnings.warn(
                f"Skipping checkpoint {checkpoint.model_uri} at epoch {checkpoint.epoch}, which "
                f"failed verification: {problems}",
                stacklevel=2,
            )
            continue
        return _restore_from_dir(local, checkpoint, model, custom_objects, fork)
    raise InvalidCheckpointError(
        "No checkpoint passed verification:\n" + "\n".join(errors)
    )


def _is_run_id(ref) -> bool:
    return (
        isinstance(ref, str)
        and not ref.startswith("models:/")
        and os.path.sep not in ref
        and not store.is_local_checkpoint_dir(ref)
    )


def commit_staged(run_id: str, staging_dir: str | None = None, tracking_uri: str | None = None) -> list:
    """Commit the checkpoints of `run_id` still waiting in the staging folder.

    A failure is logged and leaves them staged, so resuming from the
    checkpoints already committed still works.

    Returns:
        The `(epoch, model_id)` pairs committed.
    """
    from mlflow_ckpt.snapshot import default_staging_dir, find_staged, remove_abandoned
    from mlflow_ckpt.uploader import upload_staged

    staging_dir = staging_dir or default_staging_dir()
    remove_abandoned(staging_dir, run_id)
    if not find_staged(staging_dir, run_id):
        return []
    try:
        committed = upload_staged(staging_dir=staging_dir, run_id=run_id, tracking_uri=tracking_uri)
    except (MlflowException, OSError) as error:
        _logger.warning(
            "Run %s: committing the checkpoints left in %s failed, so they are not resumed "
            "from: %s",
            run_id,
            os.path.join(staging_dir, run_id),
            error,
        )
        return []
    for epoch, model_id in committed:
        _logger.info("Run %s: committed staged checkpoint of epoch %d as %s", run_id, epoch, model_id)
    return committed


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
        elif training_state.needs_model_file(state):
            saved = load_model_from_dir(local, custom_objects=custom_objects, compile=True)
            arrays = training_state.fill_from_model(state, arrays, saved)
    else:
        loaded = load_model_from_dir(local, custom_objects=custom_objects, compile=True)
        arrays = training_state.fill_from_model(state, arrays, loaded)
    training_state.restore(loaded, state, arrays)

    callback_states, callback_arrays = training_state.read_callbacks(state_dir)
    steps_into_epoch = int(state.get("steps_into_epoch", 0))
    _logger.info(
        "Resuming run %s from epoch %d, %d steps into epoch %d (global step %d)",
        checkpoint.run_id,
        checkpoint.epoch,
        steps_into_epoch,
        checkpoint.epoch + 1,
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
        random_states=training_state.read_random_states(state_dir),
        training_state=state,
        metric_arrays={key: value for key, value in arrays.items() if key.startswith("metrics/")},
    )


class EpochFastForward:
    """Skip the batches of an interrupted epoch that a mid-epoch checkpoint already trained on.

    Keras starts every epoch at its first batch. With the same data, batch
    size and random seed, an epoch's batch order repeats after a restart, so
    drawing the first `steps` batches from the input iterator without
    training puts it where the checkpoint left it. The checkpoint's metric
    totals are restored at the first batch, so the epoch's logs count the
    steps before the checkpoint too.

    The skip works by replacing `model.train_function` for one call at a
    time; the replacement puts the original back before it draws a batch.

    Args:
        model: The model being trained, already restored from the checkpoint.
        epoch: 0-based index of the interrupted epoch (the checkpoint's completed epochs).
        steps: Batches of that epoch the checkpoint already trained on.
        state: The checkpoint's `state.json` contents, for the metric records.
        metric_arrays: The checkpoint's metric variables (`metrics/00000`, ...).
    """

    def __init__(self, model, epoch: int, steps: int, state: dict, metric_arrays: dict):
        self.model = model
        self.epoch = epoch
        self.steps = steps
        self._state = state
        self._metric_arrays = metric_arrays
        self._train_function = None
        self._skipping = False
        self._metrics_restored = False
        self.done = steps <= 0

    def before_batch(self, epoch: int, step: int) -> None:
        """Arm the skip if batch `step` of `epoch` was trained before the checkpoint."""
        if self.done or epoch != self.epoch:
            return
        if step >= self.steps:
            self.done = True
            return
        self._train_function = self.model.train_function
        self.model.train_function = self._skip_batches
        self._skipping = True

    def after_batch(self) -> bool:
        """Return True if the batch that just ended was skipped."""
        skipped = self._skipping
        self._skipping = False
        self.close()
        return skipped

    def close(self) -> None:
        """Put the model's own train function back if a skip is still armed."""
        if self._train_function is not None and self.model.train_function == self._skip_batches:
            self.model.train_function = self._train_function
        self._train_function = None

    def _skip_batches(self, iterator):
        import tensorflow as tf

        self.model.train_function = self._train_function
        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        for drawn in range(steps_per_execution):
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                # The last execution of an epoch can be shorter than steps_per_execution.
                if drawn == 0:
                    raise
                break
            if not self._metrics_restored:
                self._restore_metrics(batch)
        return self.model.get_metrics_result()

    def _restore_metrics(self, batch):
        self._metrics_restored = True
        if not self.model.compiled:
            return
        # Keras builds compiled metrics when it first traces the train step, which
        # has not happened in this process; build them from the batch's shapes.
        # NOTE: `_symbolic_build` is private Keras API (present in Keras 3.15).
        self.model._symbolic_build(data_batch=batch)
        if not training_state.restore_metrics(self.model, self._state, self._metric_arrays):
            _logger.warning(
                "The checkpoint has no metric totals that fit this model's metrics, so the "
                "logs of epoch %d count only the steps after step %d.",
                self.epoch + 1,
                self.steps,
            )
