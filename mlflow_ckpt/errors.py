"""Exceptions raised by mlflow-ckpt.

Every error is an ``MlflowException`` with an error code, so code that already
handles MLflow failures handles these too, and the CLI can print the message
as one line.
"""

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_DOES_NOT_EXIST,
)


class CheckpointError(MlflowException):
    """Base class of the errors raised by mlflow-ckpt."""

    def __init__(self, message, error_code=INVALID_STATE, **kwargs):
        super().__init__(message, error_code=error_code, **kwargs)


class CheckpointNotFoundError(CheckpointError):
    """A run, epoch or checkpoint reference does not resolve to a committed checkpoint."""

    def __init__(self, message, **kwargs):
        super().__init__(message, error_code=RESOURCE_DOES_NOT_EXIST, **kwargs)


class InvalidCheckpointError(CheckpointError):
    """A checkpoint's files are missing, corrupt or do not match its manifest."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint does not fit the model or optimizer it is being restored into."""

    def __init__(self, message, **kwargs):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, **kwargs)
