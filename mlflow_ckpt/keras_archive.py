"""Write a checkpoint's `.keras` file from captured arrays, without Keras.

Keras writes a `.keras` file as an uncompressed zip of `config.json`,
`metadata.json` and `model.weights.h5`. In that HDF5 file every variable is
a contiguous dataset at a fixed offset, and for one model the bytes around
the datasets never change. So after one Keras save of the shadow model,
later checkpoints of the same training can be written by copying those
fixed bytes and putting each variable's new array at its offset.

Measured on the 57 MB benchmark model (2-core x86_64), a Keras save of the
shadow costs about 0.1 s of CPU plus 0.02 s to assign the arrays to the
shadow, and the manifest then reads the file back to hash it (0.04 s). The
`ArchiveTemplate` writes the same file in one pass, hashing it on the way
(about 0.07 s of CPU), and the large copies and hashes release the GIL, so
the training thread runs in the meantime.

`ArchiveTemplate.learn` only returns a template that reproduces Keras'
own `model.weights.h5` byte for byte, checked against a real save;
otherwise the writer keeps saving through Keras.
"""

import datetime
import hashlib
import io
import json
import logging
import os
import zipfile

import numpy as np

_logger = logging.getLogger(__name__)

WEIGHTS_MEMBER = "model.weights.h5"
METADATA_MEMBER = "metadata.json"
# zipfile needs ZIP64 headers once a member may exceed 4 GiB.
_ZIP64_LIMIT = (1 << 31) - 1


class TemplateMismatch(Exception):
    """The captured arrays do not fit the template (another model, or other shapes)."""


class _HashingWriter:
    """A write-only, forward-only file: zipfile then writes data descriptors
    instead of seeking back, so the SHA-256 of everything written is the
    file's own."""

    def __init__(self, file):
        self._file = file
        self._position = 0
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._file.write(view)
        self.digest.update(view)
        self._position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._file.flush()


class ArchiveTemplate:
    """The fixed parts of a model's `.keras` file, and where each array goes.

    Attributes:
        members: `(ZipInfo, bytes)` of every zip member but the weights, in
            the archive's order; the weights member is `None` bytes.
        segments: The weights file as a list of `bytes` (fixed parts) and
            `str` (the key of the captured array written there).
        expected: Array key to `(dtype, shape)`.
    """

    def __init__(self, members, segments, expected):
        self.members = members
        self.segments = segments
        self.expected = expected
        self.weights_size = sum(
            len(part) if isinstance(part, bytes) else _nbytes(expected[part]) for part in segments
        )

    @classmethod
    def learn(cls, shadow_model, arrays: dict, reference_path: str, include_optimizer: bool = True):
        """Build the template of `shadow_model`'s `.keras` file, or return None.

        Assigns a distinct marker value to every variable of the shadow,
        saves it to memory with Keras, and finds each marker's dataset. The
        template is then checked: filled with `arrays`, it must give the
        same weights file as `reference_path`, the `.keras` file that Keras
        wrote for those arrays.

        Args:
            shadow_model: The shadow's Keras model; its variables are
                overwritten by markers, so assign real values afterwards.
            arrays: The captured arrays that `reference_path` was saved from,
                keyed as `training_state.capture` keys them.
            reference_path: The `.keras` file of `arrays`, written by Keras.
            include_optimizer: As passed to Keras' save.
        """
        from mlflow_ckpt import training_state

        variables = {}
        for i, variable in enumerate(training_state._model_variables(shadow_model)):
            variables[f"model/{i:05d}"] = variable
        for i, variable in enumerate(training_state._optimizer_variables(shadow_model)):
            variables[f"optimizer/{i:05d}"] = variable
        markers = {}
        for number, (key, variable) in enumerate(variables.items(), start=1):
            marker = _marker(number, arrays[key].dtype)
            if marker is None:
                return _give_up(f"variable {variable.path} of dtype {arrays[key].dtype} cannot hold a marker")
            variable.assign(np.full(arrays[key].shape, marker, dtype=arrays[key].dtype))
            markers[(arrays[key].dtype.str, marker.item())] = key

        marked_path = reference_path + ".markers.keras"
        try:
            shadow_model.save(marked_path, include_optimizer=include_optimizer)
            with zipfile.ZipFile(marked_path) as archive:
                marked_weights = archive.read(WEIGHTS_MEMBER)
        finally:
            _remove_quietly(marked_path)

        try:
            segments, expected = _weights_segments(marked_weights, markers, arrays)
        except TemplateMismatch as error:
            return _give_up(str(error))

        with zipfile.ZipFile(reference_path) as archive:
            members = []
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    return _give_up(f"member {info.filename} is compressed")
                data = None if info.filename == WEIGHTS_MEMBER else archive.read(info.filename)
                members.append((info, data))
            reference_weights = archive.read(WEIGHTS_MEMBER)
        if sum(data is None for _, data in members) != 1:
            return _give_up(f"the archive has no single {WEIGHTS_MEMBER}")

        template = cls(members, segments, expected)
        produced = io.BytesIO()
        for part in template._weights_parts(arrays):
            produced.write(part)
        if produced.getvalue() != reference_weights:
            return _give_up("the rebuilt weights file differs from Keras' own")
        return template

    def write(self, path: str, arrays: dict) -> str:
        """Write the `.keras` file of `arrays` to `path` and return its SHA-256.

        Raises:
            TemplateMismatch: If an array is missing or has another dtype or shape.
        """
        parts = list(self._weights_parts(arrays))
        with open(path, "wb") as file:
            writer = _HashingWriter(file)
            with zipfile.ZipFile(writer, "w") as archive:
                for info, data in self.members:
                    entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                    entry.compress_type = zipfile.ZIP_STORED
                    entry.external_attr = info.external_attr
                    if data is None:
                        entry.date_time = datetime.datetime.now().timetuple()[:6]
                        entry.file_size = self.weights_size
                        with archive.open(entry, "w", force_zip64=self.weights_size > _ZIP64_LIMIT) as member:
                            for part in parts:
                                member.write(part)
                    elif info.filename == METADATA_MEMBER:
                        archive.writestr(entry, _fresh_metadata(data))
                    else:
                        archive.writestr(entry, data)
        return writer.digest.hexdigest()

    def _weights_parts(self, arrays: dict):
        for part in self.segments:
            if isinstance(part, bytes):
                yield part
                continue
            array = arrays.get(part)
            dtype, shape = self.expected[part]
            if array is None or array.dtype != dtype or array.shape != shape:
                found = None if array is None else (array.dtype, array.shape)
                raise TemplateMismatch(f"array {part} is {found}, the template expects {(dtype, shape)}")
            yield np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _weights_segments(weights: bytes, markers: dict, arrays: dict):
    """Split an HDF5 file saved with marker values into fixed bytes and array keys."""
    import h5py

    placed = []

    def visit(name, item):
        if not isinstance(item, h5py.Dataset):
            return
        if item.size == 0:
            return
        offset = item.id.get_offset()
        if offset is None or item.chunks is not None or item.compression is not None:
            raise TemplateMismatch(f"dataset {name} is not stored contiguously")
        first = item[(0,) * item.ndim] if item.ndim else item[()]
        key = markers.get((item.dtype.str, np.asarray(first, dtype=item.dtype).item()))
        if key is None:
            raise TemplateMismatch(f"dataset {name} holds no variable's marker")
        array = arrays[key]
        if item.shape != array.shape or item.id.get_storage_size() != array.nbytes:
            raise TemplateMismatch(f"dataset {name} has shape {item.shape}, variable {key} {array.shape}")
        placed.append((offset, array.nbytes, key))

    with h5py.File(io.BytesIO(weights), "r") as file:
        file.visititems(visit)
    placed.sort()
    segments = []
    position = 0
    for offset, size, key in placed:
        if offset < position:
            raise TemplateMismatch("two datasets overlap")
        if offset > position:
            segments.append(weights[position:offset])
        segments.append(key)
        position = offset + size
    if position > len(weights):
        raise TemplateMismatch("a dataset ends after the end of the file")
    if position < len(weights):
        segments.append(weights[position:])
    expected = {key: (arrays[key].dtype, arrays[key].shape) for _, _, key in placed}
    return segments, expected


def _marker(number: int, dtype: np.dtype):
    """Return `number` as a scalar of `dtype`, or None if the dtype cannot hold it exactly."""
    if dtype.kind not in "fiu":
        return None
    value = np.asarray(number).astype(dtype)
    if value.item() != number:
        return None
    return value


def _fresh_metadata(data: bytes) -> bytes:
    metadata = json.loads(data)
    if "date_saved" in metadata:
        metadata["date_saved"] = datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")
    return json.dumps(metadata).encode()


def _nbytes(expected) -> int:
    dtype, shape = expected
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _give_up(reason: str):
    _logger.debug("Checkpoints are saved through Keras, not rewritten from a template: %s", reason)
    return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
