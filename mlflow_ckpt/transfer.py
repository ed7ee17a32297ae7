"""Read a checkpoint's files from the artifact store one at a time, with progress.

`store.download` fetches a whole checkpoint in one MLflow call, which shows
nothing while a large checkpoint downloads. The functions here list the
checkpoint's files, fetch them one by one and report each file to an
optional callback, so the command line can print progress. They also read
single small files (`manifest.json`, `MLmodel`) without fetching the model.
"""

import dataclasses
import logging
import os
import tempfile

from mlflow.tracking import MlflowClient

from mlflow_ckpt import manifest
from mlflow_ckpt.checkpoint import MANIFEST_FILE, STATUS_READY, Checkpoint
from mlflow_ckpt.errors import InvalidCheckpointError

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FileProgress:
    """One file of a checkpoint transfer, reported after the file is done.

    Attributes:
        checkpoint: The checkpoint being transferred.
        path: Path of the file inside the checkpoint, with `/` separators.
        size_bytes: Size of this file.
        done_files: Files transferred so far, this one included.
        total_files: Files in the checkpoint.
        done_bytes: Bytes transferred so far, this file included.
        total_bytes: Bytes in the checkpoint.
    """

    checkpoint: Checkpoint
    path: str
    size_bytes: int
    done_files: int
    total_files: int
    done_bytes: int
    total_bytes: int


def _repository(checkpoint: Checkpoint, client: MlflowClient | None = None):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = client or MlflowClient()
    logged_model = client.get_logged_model(checkpoint.model_id)
    return get_artifact_repository(logged_model.artifact_location)


def list_files(checkpoint: Checkpoint, client: MlflowClient | None = None) -> dict:
    """Return `{path: size_bytes}` for every file the artifact store has for `checkpoint`."""
    if checkpoint.local_path:
        return {
            os.path.relpath(os.path.join(root, name), checkpoint.local_path).replace(os.sep, "/"):
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(checkpoint.local_path)
            for name in names
        }
    return artifact_sizes(_repository(checkpoint, client))


def artifact_sizes(repository) -> dict:
    """Return `{path: size_bytes}` for every file in an artifact repository, sorted by path."""
    files = {}
    folders = [None]
    while folders:
        folder = folders.pop()
        for entry in repository.list_artifacts(folder):
            if entry.is_dir:
                folders.append(entry.path)
            else:
                files[entry.path] = entry.file_size or 0
    return dict(sorted(files.items()))


def read_texts(checkpoint: Checkpoint, paths, client: MlflowClient | None = None) -> dict:
    """Return `{path: text}` for small files of `checkpoint`; a missing file maps to None."""
    if checkpoint.local_path:
        texts = {}
        for path in paths:
            local = os.path.join(checkpoint.local_path, path)
            texts[path] = None
            if os.path.isfile(local):
                with open(local) as f:
                    texts[path] = f.read()
        return texts
    existing = list_files(checkpoint, client)
    repository = _repository(checkpoint, client)
    texts = {}
    with tempfile.TemporaryDirectory() as scratch:
        for path in paths:
            if path not in existing:
                texts[path] = None
                continue
            with open(repository.download_artifacts(path, scratch)) as f:
                texts[path] = f.read()
    return texts


def download(
    checkpoint: Checkpoint,
    dst_path: str | None = None,
    on_file=None,
    client: MlflowClient | None = None,
) -> str:
    """Download every file of `checkpoint` into `dst_path`, one file at a time.

    Args:
        checkpoint: A committed checkpoint. A local one is returned as it is.
        dst_path: Folder to download into; a new temporary folder by default.
        on_file: Called with a `FileProgress` after each file.
        client: MLflow client to use; one for the current tracking URI by default.

    Returns:
        The local folder of the checkpoint (it contains `MLmodel`).

    Raises:
        InvalidCheckpointError: if the checkpoint is not committed.
    """
    if checkpoint.local_path:
        return checkpoint.local_path
    if checkpoint.status != STATUS_READY:
        raise InvalidCheckpointError(
            f"Checkpoint {checkpoint.model_uri} (epoch {checkpoint.epoch}) is "
            f"{checkpoint.status}, not committed. Wait for its upload to finish, or pick a "
            "READY checkpoint from `mlflow-ckpt list`."
        )
    dst_path = dst_path or tempfile.mkdtemp(prefix="mlflow-ckpt-")
    repository = _repository(checkpoint, client)
    files = list_files(checkpoint, client)
    total_bytes = sum(files.values())
    done_bytes = 0
    _logger.info(
        "Downloading checkpoint %s of run %s (epoch %d): %d files, %d bytes",
        checkpoint.model_uri, checkpoint.run_id, checkpoint.epoch, len(files), total_bytes,
    )
    for index, (path, size) in enumerate(files.items(), start=1):
        # The repository keeps the file's relative path under dst_path.
        repository.download_artifacts(path, dst_path)
        done_bytes += size
        if on_file is not None:
            on_file(FileProgress(checkpoint, path, size, index, len(files), done_bytes, total_bytes))
    return dst_path


def verify(checkpoint: Checkpoint, on_file=None, client: MlflowClient | None = None) -> list[str]:
    """Download `checkpoint` to a temporary folder and check every file against its manifest.

    Args:
        checkpoint: The checkpoint to check; a local one is checked in place.
        on_file: Called with a `FileProgress` after each downloaded file.
        client: MLflow client to use; one for the current tracking URI by default.

    Returns:
        One line per problem (`"data/model.keras: missing"`); empty if every
        file matches its size and SHA-256.
    """
    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-verify-") as scratch:
        local = download(checkpoint, scratch, on_file=on_file, client=client)
        if not os.path.isfile(os.path.join(local, MANIFEST_FILE)):
            return [f"{MANIFEST_FILE}: missing, so no file can be checked"]
        try:
            return manifest.find_problems(local)
        except (InvalidCheckpointError, KeyError, TypeError) as error:
            message = getattr(error, "message", None) or str(error)
            return [f"{MANIFEST_FILE}: unreadable ({' '.join(message.split())})"]
