"""The checkpoint manifest: SHA-256 and size of every file, and the versions that wrote it."""

import datetime
import hashlib
import json
import os

from mlflow_ckpt.checkpoint import MANIFEST_FILE
from mlflow_ckpt.errors import InvalidCheckpointError

_CHUNK_BYTES = 1 << 20


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _iter_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            if relative != MANIFEST_FILE:
                yield relative, path


def _versions() -> dict:
    import keras
    import mlflow
    import tensorflow as tf

    from mlflow_ckpt._version import __version__

    return {
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "mlflow": mlflow.__version__,
        "mlflow_ckpt": __version__,
    }


def write_manifest(
    directory,
    *,
    fingerprint: dict | None = None,
    extra: dict | None = None,
    known_digests: dict | None = None,
) -> dict:
    """Hash every file under `directory` and write `manifest.json` beside them.

    Args:
        known_digests: SHA-256 of files already hashed by their writer, by
            relative path with `/` separators; those files are not read again.

    Returns:
        The manifest as a dict. Its `total_bytes` includes the manifest itself.
    """
    known_digests = known_digests or {}
    files = {}
    for relative, path in sorted(_iter_files(directory)):
        digest = known_digests.get(relative) or sha256_of(path)
        files[relative] = {"sha256": digest, "size": os.path.getsize(path)}
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": _versions(),
        "fingerprint": fingerprint,
        "files": files,
        **(extra or {}),
    }
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    manifest["total_bytes"] = sum(entry["size"] for entry in files.values()) + os.path.getsize(
        manifest_path
    )
    return manifest


def read_manifest(directory) -> dict:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        raise InvalidCheckpointError(
            f"{path} is missing, so the checkpoint's files cannot be verified. "
            "Was this folder written by mlflow-ckpt?"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise InvalidCheckpointError(f"Manifest {path} is unreadable: {error}") from error


def find_problems(directory) -> list[str]:
    """Compare every file under `directory` with the manifest and list the mismatches."""
    manifest = read_manifest(directory)
    problems = []
    for relative, expected in sorted(manifest["files"].items()):
        path = os.path.join(directory, relative)
        if not os.path.exists(path):
            problems.append(f"{relative}: missing")
            continue
        size = os.path.getsize(path)
        if size != expected["size"]:
            problems.append(f"{relative}: size {size} bytes, manifest says {expected['size']}")
            continue
        if sha256_of(path) != expected["sha256"]:
            problems.append(f"{relative}: SHA-256 differs from the manifest (file is corrupt)")
    return problems


STORED_CHECKPOINT_HINT = (
    "Load another epoch, or call resume(..., fallback=True) to use the newest good one."
)
LOCAL_FOLDER_HINT = (
    "The folder changed after the checkpoint was written. Use an intact copy, or load "
    "the checkpoint from its MLflow run."
)


def verify(directory, *, label: str | None = None, hint: str = STORED_CHECKPOINT_HINT) -> dict:
    """Raise `InvalidCheckpointError` naming each bad file, or return the manifest.

    `hint` ends the error message: what the user can do instead.
    """
    problems = find_problems(directory)
    if problems:
        where = label or directory
        error = InvalidCheckpointError(
            f"Checkpoint {where} failed verification:\n  - " + "\n  - ".join(problems) + "\n" + hint
        )
        error.problems = problems
        raise error
    return read_manifest(directory)
