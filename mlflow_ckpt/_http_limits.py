"""Short HTTP retry and timeout limits for MLflow calls made by one thread.

MLflow's REST client retries a failed request up to
`MLFLOW_HTTP_REQUEST_MAX_RETRIES` times (7 by default in MLflow 3.17) with
exponential back-off, and waits `MLFLOW_HTTP_REQUEST_TIMEOUT` seconds (120)
for a response. One call to a server that is down can then block for minutes.
The upload worker has its own retry loop with back-off, so it wants each call
to fail fast, while calls from the training thread and the user's code keep
the user's settings. MLflow reads these settings through the objects in
`mlflow.environment_variables` on every request, so this module gives those
objects a per-thread override.
"""

import contextlib
import threading

from mlflow import environment_variables

_overrides = threading.local()
_install_lock = threading.Lock()

# The settings that MLflow 3.17 reads per request in `mlflow.utils.rest_utils`
# and `mlflow.store.artifact.http_artifact_repo`.
_VARIABLES = {
    "max_retries": environment_variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    "backoff_factor": environment_variables.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    "timeout": environment_variables.MLFLOW_HTTP_REQUEST_TIMEOUT,
}


def _install(variable) -> None:
    if getattr(variable, "_mlflow_ckpt_per_thread", False):
        return
    read_environment = variable.get

    def get():
        value = getattr(_overrides, variable.name, None)
        return read_environment() if value is None else value

    # NOTE: this replaces `get` on MLflow's setting objects for the whole process;
    # threads without an override still read the environment as before.
    variable.get = get
    variable._mlflow_ckpt_per_thread = True


@contextlib.contextmanager
def short_http_limits(max_retries: int = 0, timeout: int = 30):
    """Make MLflow HTTP calls on the current thread fail after `max_retries` retries or `timeout` seconds.

    Args:
        max_retries: Retries of one HTTP request inside MLflow's client.
        timeout: Seconds to wait for the server to accept the connection or send data.
    """
    with _install_lock:
        for variable in _VARIABLES.values():
            _install(variable)
    values = {"max_retries": max_retries, "backoff_factor": 0, "timeout": timeout}
    previous = {name: getattr(_overrides, _VARIABLES[name].name, None) for name in values}
    for name, value in values.items():
        setattr(_overrides, _VARIABLES[name].name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(_overrides, _VARIABLES[name].name, value)
