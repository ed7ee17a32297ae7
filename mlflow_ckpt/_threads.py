"""Thread helpers for the background writer and uploader."""

import logging
import os
import threading

_logger = logging.getLogger(__name__)

# Linux nice value for background threads. A nice-10 thread gets about a tenth
# of a core that a nice-0 training thread also wants, and all of an idle one.
# NOTE: SCHED_IDLE was tried instead and was not faster in a short
# benchmark run; see docs/benchmarks.md.
BACKGROUND_NICE = 10


def lower_current_thread_priority() -> None:
    """Give the calling thread a lower CPU priority, where the OS allows it per thread.

    On Linux each thread has its own nice value. Elsewhere this does nothing.
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError as error:
        _logger.debug("Could not lower the priority of thread %s: %s", threading.current_thread().name, error)
