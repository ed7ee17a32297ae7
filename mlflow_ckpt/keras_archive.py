"""Write a checkpoint's `.keras` file from captured arrays, without Keras.

Keras writes a `.keras` file as an uncompressed zip of `config.json`,
`metadata.json` and `model.weights.h5`. In that HDF5 file every variable is
a contiguous dataset at a fixed offset, and for one model the bytes around
the datasets never change. So after one Keras save of the shadow model,
every checkpoint of the same training can be written by copying those
fixed bytes and putting each variable's new array at its offset.

Measured on the 57 MB benchmark model (2-core x86_64), a Keras save of the
shadow costs about 0.1 s of CPU, and assigning the arrays to the shadow
0.02 s. The manifest then reads the file back to hash it (0.04 s). The
`ArchiveTemplate` writes the same file in one pass and hashes it on the way
(about 0.07 s of CPU). Its large copies and hashes release the GIL, so the
training thread runs in the meantime.

That one Keras save has a marker array in each variable (`assign_markers`). A template is only returned if every dataset contains exactly
its marker's bytes; otherwise the writer keeps saving through Keras.
"""

import datetime
import hashlib
import io
import json
import logging
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
    def from_marked_file(cls, path: str, markers: dict):
        """Build the template from a `.keras` file saved after `assign_markers`, or return None.

        Each dataset is matched to a variable by its first element, and its
        bytes must equal the marker array's, whose values vary along the
        array, so a dataset stored in another order or type is rejected.
        Every byte outside the datasets is kept as Keras wrote it.
        """
        with zipfile.ZipFile(path) as archive:
            members = []
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    return _give_up(f"member {info.filename} is compressed")
                members.append((info, None if info.filename == WEIGHTS_MEMBER else archive.read(info.filename)))
            if sum(data is None for _, data in members) != 1:
                return _give_up(f"the archive has no single {WEIGHTS_MEMBER}")
            weights = archive.read(WEIGHTS_MEMBER)
        try:
            segments, expected = _weights_segments(weights, markers)
        except TemplateMismatch as error:
            return _give_up(str(error))
        return cls(members, segments, expected)

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


def assign_markers(model, arrays: dict):
    """Fill every variable of `model` with a marker array and return them by key, or None.

    The first element of the n-th variable's marker array is n, and the
    others cycle through 1 to 97. Returns None if a variable's dtype cannot
    represent those values exactly (booleans, or more variables than a float16
    counts exactly).
    """
    from mlflow_ckpt import training_state

    variables = {}
    for i, variable in enumerate(training_state._model_variables(model)):
        variables[f"model/{i:05d}"] = variable
    for i, variable in enumerate(training_state._optimizer_variables(model)):
        variables[f"optimizer/{i:05d}"] = variable
    markers = {}
    for number, (key, variable) in enumerate(variables.items(), start=1):
        dtype, shape = arrays[key].dtype, arrays[key].shape
        if not (_exact(number, dtype) and _exact(_MARKER_CYCLE, dtype)):
            return _give_up(f"variable {variable.path} of dtype {dtype} cannot represent a marker")
        cycle = np.arange(1, _MARKER_CYCLE + 1).astype(dtype)
        marker = np.resize(cycle, int(np.prod(shape, dtype=np.int64)))
        if marker.size:
            marker[0] = number
        marker = marker.reshape(shape)
        variable.assign(marker)
        markers[key] = marker
    return markers


_MARKER_CYCLE = 97


def _weights_segments(weights: bytes, markers: dict):
    """Split an HDF5 file saved with marker arrays into fixed bytes and array keys."""
    import h5py

    by_first = {(m.dtype.str, m.reshape(-1)[0].item()): key for key, m in markers.items() if m.size}
    placed = []

    def visit(name, item):
        if not isinstance(item, h5py.Dataset) or item.size == 0:
            return
        offset = item.id.get_offset()
        if offset is None or item.chunks is not None or item.compression is not None:
            raise TemplateMismatch(f"dataset {name} is not stored contiguously")
        first = item[(0,) * item.ndim] if item.ndim else item[()]
        key = by_first.get((item.dtype.str, np.asarray(first, dtype=item.dtype).item()))
        if key is None:
            raise TemplateMismatch(f"dataset {name} contains no variable marker")
        marker = markers[key]
        if item.shape != marker.shape or offset + marker.nbytes > len(weights):
            raise TemplateMismatch(f"dataset {name} does not contain variable {key}")
        stored = np.frombuffer(weights, dtype=np.uint8, count=marker.nbytes, offset=offset)
        if not np.array_equal(stored, marker.reshape(-1).view(np.uint8)):
            raise TemplateMismatch(f"dataset {name} does not contain the bytes of variable {key}")
        placed.append((offset, marker.nbytes, key))

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
    if position < len(weights):
        segments.append(weights[position:])
    expected = {key: (markers[key].dtype, markers[key].shape) for _, _, key in placed}
    return segments, expected


def _exact(number: int, dtype: np.dtype) -> bool:
    """Return True if `dtype` represents `number` exactly."""
    if dtype.kind not in "fiu":
        return False
    return np.asarray(number).astype(dtype).item() == number


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
