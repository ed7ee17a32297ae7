"""Move a checkpoint's files to and from the artifact store one at a time, with progress.

MLflow's artifact calls move a whole folder, or a whole file, and report
nothing while a large file is on its way. The functions here list the
checkpoint's files, transfer them one by one and report each file to an
optional callback, so the command line can print progress. Against MLflow's
HTTP artifact proxy (`mlflow server` with proxied artifacts), files of at
least `STREAM_MIN_BYTES` are sent and received with the same requests that
MLflow makes, through a reader or a writer that counts the bytes done so
far, so that those can be reported too. The module also reads single small files
(`manifest.json`, `MLmodel`) without fetching the model.
"""

import dataclasses
import logging
import mimetypes
import os
import posixpath
import sys
import tempfile
import time

from mlflow.tracking import MlflowClient

from mlflow_ckpt import manifest
from mlflow_ckpt.checkpoint import MANIFEST_FILE, STATUS_READY, Checkpoint
from mlflow_ckpt.errors import InvalidCheckpointError

_logger = logging.getLogger(__name__)

# Files at least this large go through the chunked transfer that reports bytes.
STREAM_MIN_BYTES = 16 << 20
_CHUNK_BYTES = 1 << 20


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
    on_bytes=None,
) -> str:
    """Download every file of `checkpoint` into `dst_path`, one file at a time.

    Args:
        checkpoint: A committed checkpoint. A local one is returned as it is.
        dst_path: Folder to download into, created if missing; a new temporary
            folder by default.
        on_file: Called with a `FileProgress` after each file.
        client: MLflow client to use; one for the current tracking URI by default.
        on_bytes: Called as `on_bytes(done_bytes, total_bytes)` for the whole
            checkpoint, after each file and, for large files from an HTTP
            artifact proxy, after each chunk of 1 MiB.

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
    if dst_path:
        os.makedirs(dst_path, exist_ok=True)
    else:
        dst_path = tempfile.mkdtemp(prefix="mlflow-ckpt-")
    repository = _repository(checkpoint, client)
    files = artifact_sizes(repository)
    total_bytes = sum(files.values())
    done_bytes = 0
    _logger.info(
        "Downloading checkpoint %s of run %s (epoch %d): %d files, %d bytes",
        checkpoint.model_uri, checkpoint.run_id, checkpoint.epoch, len(files), total_bytes,
    )
    for index, (path, size) in enumerate(files.items(), start=1):
        done_before = done_bytes
        if on_bytes is not None and _streams(repository, size, None):
            _get_in_chunks(
                repository, path, os.path.join(dst_path, *path.split("/")),
                lambda done: on_bytes(done_before + done, total_bytes),
            )
        else:
            # The repository keeps the file's relative path under dst_path.
            repository.download_artifacts(path, dst_path)
        done_bytes += size
        if on_bytes is not None:
            on_bytes(done_bytes, total_bytes)
        if on_file is not None:
            on_file(FileProgress(checkpoint, path, size, index, len(files), done_bytes, total_bytes))
    return dst_path


class ProgressPrinter:
    """An `on_bytes` callback that prints a progress line to stderr every `interval` seconds.

    Nothing is printed for a transfer that ends within the first interval,
    so small checkpoints stay quiet.

    Args:
        label: What is transferred, such as `"epoch 12"`.
        verb: `"sent"` or `"received"`.
        interval: Seconds between two lines.
    """

    def __init__(self, label: str, verb: str, interval: float = 10.0):
        self.label = label
        self.verb = verb
        self.interval = interval
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last < self.interval:
            return
        self._last = now
        from mlflow_ckpt.run_index import format_size

        print(
            f"mlflow-ckpt: {self.label}: {format_size(done)} of {format_size(total)} {self.verb}",
            file=sys.stderr, flush=True,
        )


def upload_folder(repository, local_dir: str, on_bytes=None) -> None:
    """Upload every file of `local_dir` into `repository`, keeping their relative paths.

    Args:
        repository: An MLflow artifact repository, such as a LoggedModel's.
        local_dir: The folder to upload.
        on_bytes: Called as `on_bytes(done_bytes, total_bytes)` for the
            whole folder, after each file and, for large files sent to an
            HTTP artifact proxy, after each block that the HTTP client reads
            (a few KiB), so it must be cheap.
    """
    files = []
    for root, _, names in os.walk(local_dir):
        relative = os.path.relpath(root, local_dir)
        artifact_dir = None if relative == os.curdir else relative.replace(os.sep, "/")
        for name in sorted(names):
            path = os.path.join(root, name)
            files.append((path, artifact_dir, os.path.getsize(path)))
    total_bytes = sum(size for _, _, size in files)
    done_bytes = 0
    for path, artifact_dir, size in files:
        done_before = done_bytes
        if on_bytes is not None and _streams(repository, size, path):
            _put_in_chunks(
                repository, path, artifact_dir,
                lambda done: on_bytes(done_before + done, total_bytes),
            )
        else:
            repository.log_artifact(path, artifact_dir)
        done_bytes += size
        if on_bytes is not None:
            on_bytes(done_bytes, total_bytes)


def _streams(repository, size: int, local_file: str | None = None) -> bool:
    """Return True if a file of `size` bytes goes through this module's chunked transfer.

    Only MLflow's HTTP artifact proxy qualifies (`http://` artifact URIs and
    `mlflow-artifacts:/`), because the chunked transfer sends the same
    requests as MLflow's own calls. A file that MLflow would move in parts
    instead (multipart upload or download, when the server enables it) is
    left to MLflow: pass `local_file` for an upload, None for a download.
    """
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    if size < STREAM_MIN_BYTES:
        return False
    if type(repository) not in (HttpArtifactRepository, MlflowArtifactsRepository):
        return False
    if local_file is not None:
        in_parts = getattr(repository, "_should_multipart_upload", None)
        return not (in_parts is not None and in_parts(local_file))
    in_parts = getattr(repository, "_is_multipart_download_enabled", None)
    return not (in_parts is not None and in_parts())


class _CountingReader:
    """A read-only file wrapper that reports how many bytes were read so far."""

    def __init__(self, file, size: int, on_read):
        self._file = file
        self._size = size
        self._done = 0
        self._on_read = on_read

    def __len__(self) -> int:
        # requests sends this as Content-Length instead of a chunked body.
        return self._size

    def read(self, amount: int = -1) -> bytes:
        data = self._file.read(amount)
        if data:
            self._done += len(data)
            self._on_read(self._done)
        return data


def _put_in_chunks(repository, local_file: str, artifact_dir: str | None, on_done) -> None:
    """Send one file with the PUT request of MLflow's HTTP artifact repository, reporting bytes read."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

    name = os.path.basename(local_file)
    endpoint = posixpath.join("/", *([artifact_dir] if artifact_dir else []), name)
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    with open(local_file, "rb") as f:
        body = _CountingReader(f, os.fstat(f.fileno()).st_size, on_done)
        response = http_request(
            get_default_host_creds(repository.artifact_uri), endpoint, "PUT", data=body,
            extra_headers={"Content-Type": content_type},
        )
        augmented_raise_for_status(response)


def _get_in_chunks(repository, path: str, local_file: str, on_done) -> None:
    """Fetch one file with the GET request of MLflow's HTTP artifact repository, reporting bytes written."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

    os.makedirs(os.path.dirname(local_file), exist_ok=True)
    response = http_request(
        get_default_host_creds(repository.artifact_uri), posixpath.join("/", path), "GET", stream=True
    )
    augmented_raise_for_status(response)
    done = 0
    with open(local_file, "wb") as f:
        for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
            f.write(chunk)
            done += len(chunk)
            on_done(done)


def verify(
    checkpoint: Checkpoint, on_file=None, client: MlflowClient | None = None, on_bytes=None
) -> list[str]:
    """Download `checkpoint` to a temporary folder and check every file against its manifest.

    Args:
        checkpoint: The checkpoint to check; a local one is checked in place.
        on_file: Called with a `FileProgress` after each downloaded file.
        client: MLflow client to use; one for the current tracking URI by default.
        on_bytes: Called as `on_bytes(done_bytes, total_bytes)`, as for `download`.

    Returns:
        One line per problem (`"data/model.keras: missing"`); empty if every
        file matches its size and SHA-256.
    """
    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-verify-") as scratch:
        local = download(checkpoint, scratch, on_file=on_file, client=client, on_bytes=on_bytes)
        if not os.path.isfile(os.path.join(local, MANIFEST_FILE)):
            return [f"{MANIFEST_FILE}: missing, so no file can be checked"]
        try:
            return manifest.find_problems(local)
        except (InvalidCheckpointError, KeyError, TypeError) as error:
            message = getattr(error, "message", None) or str(error)
            return [f"{MANIFEST_FILE}: unreadable ({' '.join(message.split())})"]
