"""SIGTERM handling during `fit`: turn a preemption notice into a checkpoint and a clean exit.

Schedulers (Kubernetes, SLURM, spot and preemptible VMs) send SIGTERM and
wait a grace period before SIGKILL. While `fit` runs, `SigtermWatcher`
replaces the SIGTERM handler with one that only records the signal. The
checkpoint callback then saves at the end of the current training step,
flushes its uploads and raises `TrainingPreempted`.
"""

import logging
import os
import signal
import sys
import threading

_logger = logging.getLogger(__name__)

# 128 + the signal number, the exit status a shell reports for a process ended by SIGTERM.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class TrainingPreempted(SystemExit):
    """Training stopped on SIGTERM after its state was checkpointed.

    A subclass of `SystemExit`, so an uncaught one ends the process with
    status 143 and no traceback, and `except Exception` does not swallow it.

    Attributes:
        run_id: The MLflow run that contains the checkpoint.
        epoch: Completed epochs at the checkpoint.
        steps_into_epoch: Steps of the next epoch that the checkpoint includes.
        unsent: Number of checkpoints still in the staging folder, not uploaded.
    """

    def __init__(self, message: str, run_id: str, epoch: int, steps_into_epoch: int, unsent: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message
        self.run_id = run_id
        self.epoch = epoch
        self.steps_into_epoch = steps_into_epoch
        self.unsent = unsent

    def __str__(self) -> str:
        return self.message


class SigtermWatcher:
    """Record SIGTERM while a model's `fit` runs, instead of ending the process at once.

    Args:
        model: The model whose `fit` is running. If a SIGTERM arrives when no
            `fit` of this model is on the main thread's stack (`fit` ended
            with an exception, so `uninstall` was never called), the watcher
            uninstalls itself and passes the signal to the previous handler.
    """

    def __init__(self, model):
        self.model = model
        self.received = False
        self._previous_handler = None
        self._installed = False

    def install(self) -> bool:
        """Replace the SIGTERM handler. Returns False (and does nothing) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            _logger.info(
                "fit runs outside the main thread, where Python cannot handle signals; "
                "a SIGTERM will end training without a checkpoint."
            )
            return False
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Put the previous SIGTERM handler back."""
        if not self._installed:
            return
        self._installed = False
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def _handle(self, signum, frame):
        if not _is_fitting(self.model, frame):
            self.uninstall()
            _deliver(signum, frame, self._previous_handler)
            return
        if not self.received:
            # The handler runs between two bytecodes of the training thread, which
            # may own the logging lock. So it only sets the flag, and the callback logs.
            self.received = True


def _is_fitting(model, frame) -> bool:
    """Return True if a `fit` call of `model` is on the stack that `frame` belongs to."""
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            return True
        frame = frame.f_back
    return False


def _deliver(signum, frame, handler) -> None:
    """Act on a signal as `handler` (the one replaced by the watcher) would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_IGN:
        return
    else:
        # The default action for SIGTERM: end the process with the signal.
        signal.signal(signum, signal.SIG_DFL)
        sys.stderr.flush()
        os.kill(os.getpid(), signum)
