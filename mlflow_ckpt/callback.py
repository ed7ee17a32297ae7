"""`MlflowCheckpoint`: the Keras callback that logs checkpoints into the active MLflow run."""

import logging
import shutil
import sys
import tempfile

import keras
import mlflow
from mlflow.exceptions import MlflowException

# Keras' own callbacks print through io_utils, which follows
# keras.config.disable_interactive_logging(); there is no public alias.
from keras.src.utils import io_utils

from mlflow_ckpt import distributed, policies, snapshot, store, training_state
from mlflow_ckpt._http_limits import short_http_limits
from mlflow_ckpt.model_writer import BackgroundWriter, ShadowModel
from mlflow_ckpt.preemption import SigtermWatcher, TrainingPreempted
from mlflow_ckpt.uploader import Uploader, _one_line, describe_unsent

_logger = logging.getLogger(__name__)

FORMATS = ("keras", "h5", "savedmodel", "weights")


def _require_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


class MlflowCheckpoint(keras.callbacks.Callback):
    """Log a checkpoint of the model into the active MLflow run every N epochs or steps.

    Each checkpoint is an MLflow model (LoggedModel) linked to the run, with
    the epoch's metrics linked to it and the full training state beside the
    model, so it can be loaded, served, registered or resumed exactly. Saving
    blocks training only while the checkpoint is written to a local staging
    folder; a background thread uploads and commits it. At the end of `fit`
    the callback waits for pending uploads, showing a progress line.

    With no active MLflow run, the callback starts one (and prints its id)
    and ends it when training ends. Every epoch's logs are logged as run
    metrics with `step` = epoch (1-based), unless `log_metrics=False`.

    Example:

    ```python
    import mlflow
    import mlflow_ckpt

    with mlflow.start_run() as run:
        model.fit(
            x_train, y_train, epochs=10, validation_data=(x_test, y_test),
            callbacks=[mlflow_ckpt.MlflowCheckpoint(every_n_epochs=5)],
        )
    latest = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    model = mlflow_ckpt.load_checkpoint(latest)
    ```

    Args:
        every_n_epochs: Save at the end of every N-th epoch (epochs N, 2N, ...).
            Defaults to 1. Only with `save_freq="epoch"`.
        save_freq: `"epoch"`, or an integer N to save when the global step
            (`optimizer.iterations`) reaches a multiple of N. N must be a
            multiple of the model's `steps_per_execution`, since Keras reports
            steps only at execution boundaries. If an epoch's step count is
            not a multiple of `steps_per_execution` either, some multiples
            are never reported and the save happens at the next reported step.
        save_last: Also save at the end of training if the last epoch was not
            a save point. Defaults to False.
        monitor: Metric that defines the best checkpoint, as in
            `keras.callbacks.ModelCheckpoint`. Defaults to `"val_loss"`.
        mode: `"min"`, `"max"` or `"auto"` (decided from the metric name).
        save_best_only: Save only when `monitor` improves on the best value so far.
        initial_value_threshold: Starting "best" value for `save_best_only`.
        save_weights_only: Save weights only (format `"weights"`); loading
            and resuming then need a model built by the training code.
        format: `"keras"` (the `.keras` zip, default), `"h5"` (legacy HDF5),
            `"savedmodel"` (TensorFlow SavedModel, for TF Serving, TFLite and
            TF.js) or `"weights"`.
        keep_last: Keep only the N newest checkpoints of the run.
        keep_best: Keep the K best checkpoints by `monitor`.
        keep_every: Keep checkpoints whose epoch is a multiple of M.
            Retention rules combine: a checkpoint kept by any rule stays, and
            the newest and the best are never deleted. Deleted checkpoints
            lose their files as well as their LoggedModel record.
        run_id: Log into this run (it is resumed if not active). Defaults to
            the active run, or a new one.
        log_metrics: Log each epoch's logs as run metrics. Turn off if
            another callback (e.g. `mlflow.keras.autolog`) already does.
        resume: If True and the run already has a committed checkpoint,
            restore the latest one when training begins and continue from its
            epoch, like `keras.callbacks.BackupAndRestore`.
        resume_from: A `ResumeState` from `mlflow_ckpt.resume`; the callback
            continues its run and restores the callback states and random
            states it carries. For a mid-epoch checkpoint it skips the batches
            of the interrupted epoch that the checkpoint already trained on,
            so training continues exactly where it stopped.
        callbacks: Callbacks whose state is saved and restored (EarlyStopping,
            ReduceLROnPlateau). Defaults to the other callbacks of the same
            `fit` call.
        custom_objects: Passed to the flavor, see `mlflow_ckpt.save_model`.
        code_paths: Local files or folders to ship with each checkpoint so a
            fresh process can import custom layers.
        signature: MLflow model signature of each checkpoint.
        input_example: Input example for each checkpoint (also infers the signature).
        pip_requirements: Override the requirements written into each checkpoint.
        staging_dir: Local folder for checkpoints waiting to upload. Defaults
            to `$MLFLOW_CKPT_STAGING_DIR` or `~/.cache/mlflow-ckpt/staging`.
        max_pending: Most checkpoints waiting to upload before training waits.
        flush_timeout: Seconds to wait for uploads at the end of training.
            None waits until they are done, or until they have failed without
            a break for 2 minutes. What is not uploaded by then stays in the
            staging folder, and a warning says how to upload it.
        save_on_sigterm: While `fit` runs, handle SIGTERM (what schedulers and
            preemptible VMs send before killing a process): save a checkpoint
            at the end of the current step, wait up to `sigterm_flush_timeout`
            seconds for uploads, end the run as KILLED if the callback started
            it, and raise `mlflow_ckpt.TrainingPreempted`, a `SystemExit`
            with status 143. Needs `fit` on the main thread. Defaults to True.
        sigterm_flush_timeout: Seconds to wait for uploads after a SIGTERM.
            Keep it below the scheduler's grace period (30 s by default on
            Kubernetes). What is not uploaded stays in the staging folder and
            is committed when the run is resumed from that folder.
        verbose: 1 prints a line per committed checkpoint with its epoch and
            URI; 2 also prints a line when a checkpoint is staged.

    Raises:
        ValueError: at construction, naming any argument with an invalid value.
    """

    def __init__(
        self,
        every_n_epochs=None,
        save_freq="epoch",
        save_last=False,
        monitor="val_loss",
        mode="auto",
        save_best_only=False,
        initial_value_threshold=None,
        save_weights_only=False,
        format="keras",
        keep_last=None,
        keep_best=None,
        keep_every=None,
        run_id=None,
        log_metrics=True,
        resume=False,
        resume_from=None,
        callbacks=None,
        custom_objects=None,
        code_paths=None,
        signature=None,
        input_example=None,
        pip_requirements=None,
        staging_dir=None,
        max_pending=4,
        flush_timeout=None,
        save_on_sigterm=True,
        sigterm_flush_timeout=20.0,
        verbose=0,
    ):
        super().__init__()
        if (
            isinstance(sigterm_flush_timeout, bool)
            or not isinstance(sigterm_flush_timeout, (int, float))
            or sigterm_flush_timeout < 0
        ):
            raise ValueError(
                "sigterm_flush_timeout must be a number of seconds >= 0. "
                f"Received: sigterm_flush_timeout={sigterm_flush_timeout!r}"
            )
        self.save_on_sigterm = bool(save_on_sigterm)
        self.sigterm_flush_timeout = sigterm_flush_timeout
        self._validate(
            every_n_epochs, save_freq, mode, format, save_weights_only, keep_last, keep_best,
            keep_every, max_pending, flush_timeout, verbose, monitor, resume, resume_from,
        )
        if save_weights_only:
            format = "weights"
        self.save_freq = save_freq
        self.every_n_epochs = every_n_epochs or 1
        self.save_last = save_last
        self.monitor = monitor
        self.mode = policies.resolve_mode(monitor, mode)
        self.save_best_only = save_best_only
        self.initial_value_threshold = initial_value_threshold
        self.format = format
        self.run_id = run_id
        self.log_metrics = log_metrics
        self.resume = resume
        self.resume_from = resume_from
        self.tracked_callbacks = callbacks
        self.staging_dir = staging_dir or snapshot.default_staging_dir()
        self.max_pending = max_pending
        self.flush_timeout = flush_timeout
        self.verbose = verbose
        self.flavor_options = {
            key: value
            for key, value in {
                "custom_objects": custom_objects,
                "code_paths": code_paths,
                "signature": signature,
                "input_example": input_example,
                "pip_requirements": pip_requirements,
            }.items()
            if value is not None
        }

        self.retention = []
        if keep_last is not None:
            self.retention.append(policies.KeepLast(keep_last))
        if keep_best is not None:
            self.retention.append(policies.KeepBest(keep_best, monitor, self.mode))
        if keep_every is not None:
            self.retention.append(policies.KeepEvery(keep_every))

        if save_freq == "epoch":
            self._save_policy = policies.EveryNEpochs(self.every_n_epochs)
        else:
            self._save_policy = policies.EveryNSteps(save_freq)
        self._best = policies.BestOnly(monitor, self.mode, initial_value_threshold)

        self._uploader = None
        self._shadow = None
        self._writer = None
        self._is_chief = True
        self._run = None
        self._started_run = False
        self._staged = None
        self._pending_callback_restore = None
        self._completed_epochs = 0
        self._last_logs = {}
        self._last_saved_key = None
        self._logged_steps = set()
        self._earlier_history = {}
        # Epoch -> timestamp (ms) of the metrics this process logged for it.
        self._metric_timestamps = {}
        self._previous_step = 0
        self._sigterm = None
        self._fast_forward = None
        self._epoch_random_states = None
        self._staged_random_states = None
        self._saved_global_step = None

    @staticmethod
    def _validate(
        every_n_epochs, save_freq, mode, format, save_weights_only, keep_last, keep_best,
        keep_every, max_pending, flush_timeout, verbose, monitor, resume, resume_from,
    ):
        _require_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        if save_freq != "epoch":
            if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1:
                raise ValueError(
                    "save_freq must be 'epoch' or a positive integer number of steps. "
                    f"Received: save_freq={save_freq!r}"
                )
            if every_n_epochs is not None:
                raise ValueError(
                    "every_n_epochs applies only with save_freq='epoch'. Received: "
                    f"every_n_epochs={every_n_epochs!r} with save_freq={save_freq!r}"
                )
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max'. Received: mode={mode!r}")
        if format not in FORMATS:
            raise ValueError(
                f"format must be one of {', '.join(repr(f) for f in FORMATS)}. "
                f"Received: format={format!r}"
            )
        if save_weights_only and format not in ("keras", "weights"):
            raise ValueError(
                "save_weights_only=True saves format 'weights'; it cannot be combined with "
                f"format={format!r}"
            )
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every)):
            _require_positive_int(name, value, allow_none=True)
        _require_positive_int("max_pending", max_pending)
        if flush_timeout is not None and (not isinstance(flush_timeout, (int, float)) or flush_timeout < 0):
            raise ValueError(
                f"flush_timeout must be None or a number of seconds >= 0. Received: flush_timeout={flush_timeout!r}"
            )
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2. Received: verbose={verbose!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name. Received: monitor={monitor!r}")
        if resume and resume_from is not None:
            raise ValueError("Pass either resume=True or resume_from=<ResumeState>, not both.")

    # Keras hooks.

    def on_train_begin(self, logs=None):
        self._check_steps_per_execution()
        if self.tracked_callbacks is None:
            self.tracked_callbacks = self._sibling_callbacks()
        self._is_chief = distributed.is_chief(self.model)
        if self._is_chief:
            self._attach_run()
            self._uploader = Uploader(
                max_pending=self.max_pending,
                retention=self.retention,
                monitor=self.monitor,
                mode=self.mode,
                staging_dir=self.staging_dir,
                on_commit=self._report_commit,
            )
        else:
            _logger.info(
                "MlflowCheckpoint on %s: only the chief worker logs to MLflow.",
                distributed.worker_description(),
            )
        try:
            if self.resume_from is not None:
                self._apply_resume_state(self.resume_from)
            elif self.resume:
                self._resume_latest()
        except BaseException:
            # Keras calls no other hook after a failed on_train_begin.
            self._flush()
            self._end_fit(status="FAILED")
            raise
        if self.save_on_sigterm:
            self._sigterm = SigtermWatcher(self.model)
            self._sigterm.install()

    def on_epoch_begin(self, epoch, logs=None):
        self._completed_epochs = epoch
        self._finish_staged()
        if self._pending_callback_restore is not None:
            state, self._pending_callback_restore = self._pending_callback_restore, None
            restored = state.restore_callbacks(self._callbacks_to_capture())
            restored += state.restore_random_states()
            if restored:
                _logger.info("Restored callback and random states: %s", ", ".join(restored))
        # A mid-epoch checkpoint stores the random states from here, before the
        # epoch's input pipeline draws its shuffle from them.
        self._epoch_random_states = training_state.capture_random_states()
        self._stop_if_preempted(epoch, 0)

    def on_train_batch_begin(self, batch, logs=None):
        if self._fast_forward is not None:
            self._fast_forward.before_batch(self._completed_epochs, batch)

    def on_train_batch_end(self, batch, logs=None):
        if self._fast_forward is not None and self._fast_forward.after_batch():
            # A skipped batch changed nothing, so a SIGTERM now saves nothing new.
            self._stop_if_preempted(self._completed_epochs, batch + 1)
            return
        self._stop_if_preempted(self._completed_epochs, batch + 1)
        if self.save_freq == "epoch":
            return
        global_step = int(self.model.optimizer.iterations.numpy())
        crossed = self._save_policy.crossed(self._previous_step, global_step)
        self._previous_step = global_step
        if crossed:
            self._stage(epoch=self._completed_epochs, steps_into_epoch=batch + 1, logs=logs or {})
            self._finish_staged()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        completed = epoch + 1
        self._completed_epochs = completed
        self._last_logs = logs
        if self._should_save_epoch(completed, logs):
            self._stage(epoch=completed, steps_into_epoch=0, logs=logs)
        elif self.log_metrics:
            self._log_epoch_metrics(completed, logs)
        self._best.record(logs)

    def on_train_end(self, logs=None):
        preempted = self._sigterm is not None and self._sigterm.received
        try:
            self._finish_staged()
            if self.save_last and self._last_saved_key != (self._completed_epochs, 0):
                if self._completed_epochs > 0:
                    self._stage(epoch=self._completed_epochs, steps_into_epoch=0, logs=self._last_logs)
                    self._finish_staged()
            if preempted:
                self._save_for_preemption(self._completed_epochs, 0)
            result = self._flush(preempted=preempted)
        finally:
            self._end_fit(status="KILLED" if preempted else "FINISHED")
        if preempted:
            self._raise_preempted(self._completed_epochs, 0, result)

    # Decisions.

    def _is_final_epoch(self, epoch: int) -> bool:
        return epoch == (self.params or {}).get("epochs") or bool(self.model.stop_training)

    def _should_save_epoch(self, epoch: int, logs: dict) -> bool:
        if self.save_last and self._is_final_epoch(epoch):
            return True
        if self.save_freq != "epoch" or not self._save_policy.should_save_epoch(epoch):
            return False
        if self.save_best_only:
            if policies.metric_value(logs, self.monitor) is None:
                _logger.warning(
                    "save_best_only: metric %r is not in the logs of epoch %d (available: %s); "
                    "skipping the save.",
                    self.monitor,
                    epoch,
                    ", ".join(sorted(logs)),
                )
                return False
            return self._best.improves(logs)
        return True

    def _check_steps_per_execution(self):
        if self.save_freq == "epoch":
            return
        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if self.save_freq % steps_per_execution:
            raise ValueError(
                f"save_freq={self.save_freq} is not a multiple of the model's "
                f"steps_per_execution={steps_per_execution}, so Keras never reports those "
                "steps. Use a multiple of steps_per_execution."
            )
        steps_per_epoch = (self.params or {}).get("steps")
        if steps_per_epoch and steps_per_epoch % steps_per_execution:
            _logger.warning(
                "An epoch of %d steps is not a multiple of steps_per_execution=%d, so the last "
                "execution of each epoch is shorter and some multiples of save_freq=%d are "
                "never reported. Those checkpoints are saved at the first step reported after "
                "the multiple.",
                steps_per_epoch,
                steps_per_execution,
                self.save_freq,
            )
        optimizer = getattr(self.model, "optimizer", None)
        self._previous_step = int(optimizer.iterations.numpy()) if optimizer is not None else 0

    # Saving.

    def _stage(self, epoch: int, steps_into_epoch: int, logs: dict):
        if not self._is_chief:
            self._stage_and_discard(epoch, steps_into_epoch)
            return
        self._finish_staged()
        metrics = {key: value for key, value in logs.items() if _is_number(value)}
        if steps_into_epoch:
            # Mid-epoch logs are running averages of a partial epoch, not the
            # metrics of epoch `epoch`.
            metrics = {}
        # A checkpoint always carries its epoch's metrics, so it can be ranked by
        # `monitor`. The run may already have them: this process logs them before
        # a save at the end of training or on SIGTERM, and an earlier process did
        # for an epoch trained again with identical results. Then the same
        # timestamp links them without adding a value to the run's history. An
        # epoch trained again with other results gets a second value.
        metrics_timestamp_ms = self._metric_timestamps.get(epoch)
        if metrics_timestamp_ms is None and metrics:
            metrics_timestamp_ms = self._earlier_timestamp(epoch, metrics)
        self._staged = snapshot.write_snapshot(
            self.model,
            shadow=self._background_shadow(),
            staging_dir=self.staging_dir,
            run_id=self._run.info.run_id,
            experiment_id=self._run.info.experiment_id,
            epoch=epoch,
            steps_into_epoch=steps_into_epoch,
            metrics=metrics,
            format=self.format,
            monitor=self.monitor,
            mode=self.mode,
            flavor_options=self.flavor_options,
            metrics_timestamp_ms=metrics_timestamp_ms,
        )
        self._last_saved_key = (epoch, steps_into_epoch)
        self._saved_global_step = self._staged.global_step
        self._staged_random_states = self._epoch_random_states if steps_into_epoch else None
        if self.verbose > 1:
            io_utils.print_msg(
                f"\nEpoch {epoch}: MlflowCheckpoint staged a checkpoint of run "
                f"{self._run.info.run_id}; uploading in the background."
            )

    def _stage_and_discard(self, epoch: int, steps_into_epoch: int):
        """Take the chief's snapshot on a non-chief worker too, then throw it away.

        Under MultiWorkerMirroredStrategy, reading a sync-on-read variable is a
        collective operation: the chief's reads block until every worker makes
        the same reads.
        """
        scratch = tempfile.mkdtemp(prefix="mlflow-ckpt-worker-")
        try:
            snapshot.write_snapshot(
                self.model, staging_dir=scratch, run_id="worker", experiment_id="",
                epoch=epoch, steps_into_epoch=steps_into_epoch, metrics={},
                format=self.format, flavor_options=self.flavor_options,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _finish_staged(self):
        """Complete the staged snapshot with the callbacks' state, then hand it to the uploader.

        This runs at the next hook after the save point, when every other
        callback has processed the epoch.
        """
        if self._staged is None:
            return
        staged, self._staged = self._staged, None
        snapshot.complete_snapshot(
            staged, self._callbacks_to_capture(), random_states=self._staged_random_states
        )
        if staged.pending is not None:
            self._writer.submit(staged)
        else:
            self._uploader.submit_snapshot(staged)

    def _background_shadow(self):
        """Return the shadow model for background writes, building it at the first save.

        Returns None when the model cannot be copied; files are then written
        on the training thread.
        """
        if self._shadow is None:
            self._shadow = ShadowModel.create(self.model) or False
            if self._shadow:
                self._writer = BackgroundWriter(
                    self._shadow, on_written=self._uploader.submit_snapshot
                )
        return self._shadow or None

    def _callbacks_to_capture(self):
        return list(self.tracked_callbacks or []) + [self]

    @property
    def best(self):
        """Best value of `monitor` seen so far (saved with each checkpoint)."""
        return self._best.best

    @best.setter
    def best(self, value):
        self._best.best = value

    def _log_epoch_metrics(self, epoch: int, logs: dict):
        if not self._is_chief or epoch in self._logged_steps:
            return
        metrics = {key: value for key, value in logs.items() if _is_number(value)}
        self._metric_timestamps[epoch] = self._uploader.submit_metrics(self._run.info.run_id, metrics, epoch)

    def _report_commit(self, epoch: int, model_uri: str):
        if self.verbose:
            io_utils.print_msg(
                f"\nEpoch {epoch}: MlflowCheckpoint committed {model_uri}"
            )

    def _flush(self, preempted=False):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._shadow = None
        if self._uploader is None:
            return None
        timeout = self.flush_timeout
        if preempted:
            timeout = min(timeout, self.sigterm_flush_timeout) if timeout is not None else self.sigterm_flush_timeout
        result = self._uploader.close(timeout=timeout, show_progress=True)
        self._uploader = None
        if not result.ok:
            _logger.error(
                "%s Last error: %s",
                describe_unsent(result, self.staging_dir, self._run.info.run_id),
                result.errors[-1] if result.errors else "none",
            )
        return result

    # Preemption.

    def _stop_if_preempted(self, epoch: int, steps_into_epoch: int):
        """After a SIGTERM: checkpoint this position, flush uploads and raise `TrainingPreempted`."""
        if self._sigterm is None or not self._sigterm.received:
            return
        # From here a second SIGTERM ends the process at once.
        self._sigterm.uninstall()
        _logger.warning(
            "Run %s: SIGTERM received %d steps into epoch %d; saving a checkpoint and stopping.",
            self._run.info.run_id if self._run is not None else None,
            steps_into_epoch,
            epoch + 1,
        )
        try:
            self._finish_staged()
            self._save_for_preemption(epoch, steps_into_epoch)
            result = self._flush(preempted=True)
        finally:
            self._end_fit(status="KILLED")
        self._raise_preempted(epoch, steps_into_epoch, result)

    def _save_for_preemption(self, epoch: int, steps_into_epoch: int):
        if not self._is_chief:
            # NOTE: only the chief saves; other workers stop without waiting for it.
            return
        optimizer = getattr(self.model, "optimizer", None)
        global_step = int(optimizer.iterations.numpy()) if optimizer is not None else 0
        if global_step == 0 or global_step == self._saved_global_step:
            # No step since the last checkpoint (or the one resumed from): it is already safe.
            return
        self._stage(epoch=epoch, steps_into_epoch=steps_into_epoch, logs=self._last_logs)
        self._finish_staged()

    def _raise_preempted(self, epoch: int, steps_into_epoch: int, result):
        run_id = self._run.info.run_id if self._run is not None else None
        unsent = 0 if result is None else len(result.unsent) + len(result.failed)
        where = f"epoch {epoch}" + (f" + {steps_into_epoch} steps" if steps_into_epoch else "")
        message = f"Training of run {run_id} stopped on SIGTERM; its state at {where} is checkpointed"
        if unsent:
            message += (
                f", but {unsent} checkpoint(s) are still in {self.staging_dir}. "
                "Resuming the run with that staging folder commits them first."
            )
        else:
            message += "."
        raise TrainingPreempted(
            message, run_id=run_id, epoch=epoch, steps_into_epoch=steps_into_epoch, unsent=unsent
        )

    def _end_fit(self, status: str):
        """Undo what `on_train_begin` set up: the SIGTERM handler, the epoch override, the run."""
        if self._sigterm is not None:
            self._sigterm.uninstall()
            self._sigterm = None
        if self._fast_forward is not None:
            self._fast_forward.close()
            self._fast_forward = None
        self.model._initial_epoch = None
        self._detach_run(status)

    # MLflow run handling.

    def _attach_run(self):
        run_id = self.run_id
        if self.resume_from is not None and not self.resume_from.fork and run_id is None:
            run_id = self.resume_from.run_id
        active = mlflow.active_run()
        if active is not None and run_id is not None and active.info.run_id != run_id:
            raise ValueError(
                f"MlflowCheckpoint was asked to log into run {run_id}, but run "
                f"{active.info.run_id} is active. End the active run first, or drop run_id."
            )
        if active is not None:
            self._run = active
            self._started_run = False
        else:
            if run_id is not None:
                store.get_run(run_id)
            self._run = mlflow.start_run(run_id=run_id)
            self._started_run = True
            verb = "Resumed" if run_id else "Started"
            io_utils.print_msg(
                f"MlflowCheckpoint: {verb} MLflow run {self._run.info.run_id}"
            )
        if self.resume_from is not None and self.resume_from.fork:
            mlflow.set_tags(
                {
                    "mlflow_ckpt.resumed_from_run": str(self.resume_from.run_id),
                    "mlflow_ckpt.resumed_from_epoch": str(self.resume_from.initial_epoch),
                }
            )
        self._earlier_history = self._read_earlier_history()
        self._logged_steps = set(self._earlier_history)

    def _read_earlier_history(self) -> dict:
        """Return `{epoch: {timestamp_ms: {key: value}}}` for the metrics already in this run.

        Empty for a new run. A continued run has the epochs of earlier processes.
        """
        client = mlflow.MlflowClient()
        run_id = self._run.info.run_id
        history = {}
        for key in client.get_run(run_id).data.metrics:
            for metric in client.get_metric_history(run_id, key):
                history.setdefault(metric.step, {}).setdefault(metric.timestamp, {})[key] = metric.value
        return history

    def _earlier_timestamp(self, epoch: int, metrics: dict) -> int | None:
        """Return the timestamp under which this run already has exactly `metrics` at `epoch`."""
        for timestamp, values in self._earlier_history.get(epoch, {}).items():
            if all(values.get(key) == float(value) for key, value in metrics.items()):
                return timestamp
        return None

    def _detach_run(self, status="FINISHED"):
        if self._started_run and mlflow.active_run() is not None:
            run_id = mlflow.active_run().info.run_id
            try:
                # Fail fast: MLflow's default retries would hold the end of a finished
                # fit for minutes while the server is down, then raise.
                with short_http_limits(max_retries=2, timeout=10):
                    mlflow.end_run(status)
            except MlflowException as error:
                # mlflow.end_run has already made the run inactive in this process.
                _logger.error(
                    "Run %s could not be marked %s, so MLflow still shows it RUNNING: %s. Once "
                    "the tracking server is reachable, run "
                    "`mlflow.MlflowClient().set_terminated(%r, %r)`.",
                    run_id, status, _one_line(error), run_id, status,
                )
        self._started_run = False

    # Resuming.

    def _apply_resume_state(self, state):
        from mlflow_ckpt.resume import EpochFastForward

        self._check_resume_position(state)
        if state.model is not self.model:
            training_state.restore(self.model, *_state_arrays(state))
        self.model._initial_epoch = state.initial_epoch
        self._completed_epochs = state.initial_epoch
        self._pending_callback_restore = state
        self._last_saved_key = (state.initial_epoch, state.steps_into_epoch)
        self._saved_global_step = state.global_step
        if state.steps_into_epoch:
            self._fast_forward = EpochFastForward(
                self.model,
                epoch=state.initial_epoch,
                steps=state.steps_into_epoch,
                state=state.training_state,
                metric_arrays=state.metric_arrays,
            )

    def _check_resume_position(self, state):
        steps_per_epoch = (self.params or {}).get("steps")
        steps_per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        # The last execution of an epoch may report up to steps_per_execution - 1
        # steps past the end, so a checkpoint taken there can count them too.
        if steps_per_epoch and state.steps_into_epoch >= steps_per_epoch + steps_per_execution:
            raise ValueError(
                f"The checkpoint was saved {state.steps_into_epoch} steps into epoch "
                f"{state.initial_epoch + 1}, but this fit has {steps_per_epoch} steps per epoch. "
                "Pass the same training data and batch_size as the run that saved it."
            )

    def _resume_latest(self):
        from mlflow_ckpt.resume import commit_staged, resume

        run_id = self._run.info.run_id if self._run is not None else self.run_id
        if run_id is None:
            raise ValueError(
                f"MlflowCheckpoint(resume=True) on {distributed.worker_description()} needs the "
                "run to resume: pass run_id=<the chief's run id>, or resume_from=mlflow_ckpt.resume(run_id)."
            )
        commit_staged(run_id, self.staging_dir)
        latest = store.latest_checkpoint(run_id)
        if latest is None:
            _logger.info("Run %s has no checkpoint yet; training from the start.", run_id)
            return
        state = resume(latest, model=self.model)
        self._apply_resume_state(state)
        position = f"epoch {latest.epoch}"
        if state.steps_into_epoch:
            position += f", {state.steps_into_epoch} steps into epoch {latest.epoch + 1}"
        io_utils.print_msg(f"MlflowCheckpoint: resuming run {run_id} from {position}")

    def _sibling_callbacks(self):
        """Find the other callbacks of this `fit` call, to save their state with each checkpoint.

        Keras calls `on_train_begin` from its `CallbackList`, which is the
        caller's `self`; Keras offers no public way to reach it.
        """
        # NOTE: relies on keras.callbacks.CallbackList calling hooks directly (true in
        # Keras 3.15); pass callbacks=[...] explicitly if it ever stops matching.
        frame = sys._getframe(2)
        caller = frame.f_locals.get("self")
        if isinstance(caller, keras.callbacks.CallbackList):
            return [c for c in caller.callbacks if c is not self]
        return []


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _state_arrays(state):
    # A ResumeState built for another model object: re-read its variables from
    # that model, which resume() restored.
    captured, arrays = training_state.capture(state.model, epoch=state.initial_epoch)
    return captured, arrays
