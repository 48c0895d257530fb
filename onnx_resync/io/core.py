"""Model I/O: safe loading (with external data), weight access, atomic saving.

Weights live in two places in real files: graph initializers and Constant nodes. `WeightStore` hides
the difference so the rest of the package reads and writes both the same way.
"""

from __future__ import annotations

import itertools
import math
import mmap as mmap_module
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from . import wire
from ..errors import LoadError, UsageError
from .prefetch import prefetched

# protobuf cannot serialize a message past 2 GiB; leave headroom for the graph itself.
INLINE_LIMIT_BYTES = 2**31 - 2**26

# Models with more external data than this are not read into memory ("lazy"): each large tensor
# stays in its file and is memory-mapped when used, and a tensor that is rewritten (permuted) is
# computed only when it is saved, tensor by tensor. Tensors under LAZY_MIN_TENSOR_BYTES (shapes,
# biases, norm parameters) are read as usual, so the walker sees them inline. (Read into memory, a
# model with external data costs several times its size in copies: a 1 GiB model peaked at 6 GiB.)
LAZY_EXTERNAL_BYTES = int(os.environ.get("ONNX_RESYNC_LAZY_BYTES", 64 << 20))
LAZY_MIN_TENSOR_BYTES = int(os.environ.get("ONNX_RESYNC_LAZY_MIN_TENSOR_BYTES", 1 << 20))
# The same holds for a model file past LAZY_EXTERNAL_BYTES with its weights inline: the initializers'
# raw payloads of at least IN_PLACE_MIN_TENSOR_BYTES are not parsed but memory-mapped from the model
# file itself (see wire.py), and the model is saved inline again, streamed. Parsing copies every
# payload, reading raw_data copies it again, and serializing once more: for a 100 MB model those
# copies cost more than the matching. Such tensors carry IN_PLACE_KEY in their external_data entries,
# which is never written to a file.
IN_PLACE_MIN_TENSOR_BYTES = int(os.environ.get("ONNX_RESYNC_IN_PLACE_MIN_TENSOR_BYTES", 64 << 10))
IN_PLACE_KEY = "onnx-resync:in-place"
# the identity of a lazy tensor's file when it was loaded: a file replaced or rewritten since (say, a
# model saved over its own source) is refused, never read at offsets that now hold something else
STAMP_KEY = "onnx-resync:file"
# memory-mapped pages kept resident (the newest mappings); older ones are released (see _Residency)
LAZY_RESIDENT_BYTES = int(os.environ.get("ONNX_RESYNC_LAZY_RESIDENT_BYTES", 256 << 20))
# location of a tensor whose new data is computed when it is read or saved (see set_lazy)
DEFERRED_PREFIX = "onnx-resync:deferred:"
_deferred: dict[str, "Callable[[], np.ndarray]"] = {}
_deferred_ids = itertools.count()


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that may carry weight data, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_graph_tensors(g)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that points outside the model's folder or is missing/short."""
    root = base_dir.resolve()
    for tensor in _iter_graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        if not location:
            raise LoadError(f"tensor {tensor.name!r} has external data without a location")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise LoadError(f"tensor {tensor.name!r}: external data path {location!r} is absolute; refused")
        if "\x00" in location:
            raise LoadError(f"tensor {tensor.name!r}: external data path {location!r} contains a NUL byte; refused")
        try:
            target = (root / location).resolve()
            if root not in target.parents:
                raise LoadError(f"tensor {tensor.name!r}: external data path {location!r} leaves the model's folder; refused")
            if not target.is_file():
                raise LoadError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
            # links are refused even inside the folder, as ONNX's own loader does (the memory-mapped
            # path of huge models must accept exactly what the in-memory path accepts)
            step = root
            for part in Path(location).parts:
                step = step / part
                if step.is_symlink():
                    raise LoadError(f"tensor {tensor.name!r}: external data path {location!r} goes through a "
                                    f"symbolic link; refused")
            stat = target.stat()
            if stat.st_nlink > 1:
                raise LoadError(f"tensor {tensor.name!r}: external data file {location!r} has several hard links; refused")
            size = stat.st_size
        except (OSError, RuntimeError) as exc:  # name too long, link loops, permissions
            raise LoadError(f"tensor {tensor.name!r}: external data path {location!r} cannot be read "
                            f"({type(exc).__name__})") from None
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise LoadError(f"tensor {tensor.name!r}: external data offset/length is not an integer") from None
        if length is None:
            length = _expected_nbytes(tensor)
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise LoadError(f"tensor {tensor.name!r}: external data file {location!r} is too short")


_FIXED_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16,
}
_FIXED_ITEMSIZE.update({getattr(onnx.TensorProto, n): 1 for n in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0") if hasattr(onnx.TensorProto, n)})
# packed types: bits per element
_SUBBYTE_BITS = {getattr(onnx.TensorProto, n): b for n, b in (
    ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6),
    ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, n)}
# typed storage field and values per element, where the count is simple
_TYPED_COUNT = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}
_TYPED_COUNT.update({t: ("int32_data", 1) for t, size in _FIXED_ITEMSIZE.items()
                     if t not in _TYPED_COUNT and size <= 4 and t != onnx.TensorProto.UINT32})


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's data must have; None where not simple (strings, unknown types)."""
    count = math.prod(int(d) for d in tensor.dims)  # Python ints: huge dims cannot wrap around
    if tensor.data_type in _SUBBYTE_BITS:
        return (count * _SUBBYTE_BITS[tensor.data_type] + 7) // 8
    itemsize = _FIXED_ITEMSIZE.get(tensor.data_type)
    if itemsize is None:
        return None
    return count * itemsize


def _tensor_problem(tensor: onnx.TensorProto) -> str | None:
    """Why a tensor's declared dims and type disagree with its data (None: they agree)."""
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        return f"has a negative dimension {dims}"
    if tensor.data_type not in onnx.TensorProto.DataType.values() or tensor.data_type == onnx.TensorProto.UNDEFINED:
        return f"has an unknown data type ({tensor.data_type})"
    expected = _expected_nbytes(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        length = _external_info(tensor).get("length")
        if expected is not None and length is not None and length.strip().isdigit() and int(length) != expected:
            return f"declares dims {dims} ({expected} bytes) but its external data has {int(length)} bytes"
        return None
    if tensor.HasField("raw_data"):
        if tensor.data_type == onnx.TensorProto.STRING:
            return "is a string tensor with raw data"
        have = len(tensor.raw_data)
        if expected is not None and have != expected:
            return f"declares dims {dims} ({expected} bytes) but holds {have} bytes"
        return None
    field, per = _TYPED_COUNT.get(tensor.data_type, (None, 1))
    if field is not None:
        count = math.prod(dims)
        have = len(getattr(tensor, field))
        if have != count * per:
            return f"declares dims {dims} ({count} values) but holds {have // per}"
    return None


def check_tensor_data(model: onnx.ModelProto, where: str | os.PathLike = "model") -> None:
    """Refuse tensors whose data disagrees with their dims or type, before anything allocates them
    (huge declared dims with little data, shapes that disagree with the data, unknown types)."""
    for tensor in _iter_graph_tensors(model.graph):
        problem = _tensor_problem(tensor)
        if problem:
            raise LoadError(f"{where}: tensor {tensor.name!r} {problem}")


def _external_nbytes(model: onnx.ModelProto) -> int:
    return sum(_data_length(t, _external_info(t)) or 0 for t in _in_file_data(model))


def _data_length(tensor: onnx.TensorProto, info: dict[str, str]) -> int | None:
    """Bytes of an external (or lazy) tensor's data: its declared length, else what its dims say."""
    return int(info["length"]) if info.get("length", "").isdigit() else _expected_nbytes(tensor)


def _in_file_data(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors whose data is in an external-data file (not yet read, nor mapped in place)."""
    for tensor in _iter_graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not is_in_place(tensor):
            yield tensor


def is_in_place(tensor: onnx.TensorProto) -> bool:
    """A lazy tensor whose data was inline in its model file (and is written inline again)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == IN_PLACE_KEY for e in tensor.external_data)


def _map_in_place(model: onnx.ModelProto, cuts: list, path: Path) -> None:
    """Point each initializer whose payload wire.cut_payloads left in the file at that place; one that
    cannot be mapped (a string or packed type, other data fields) gets its payload back."""
    location = str(path.resolve())
    stamp = _file_stamp(location)
    with open(path, "rb") as fh:
        for cut in cuts:
            tensor = model.graph.initializer[cut.index]
            mappable = (tensor.data_location != onnx.TensorProto.EXTERNAL and not len(tensor.external_data)
                        and tensor.data_type in _FIXED_ITEMSIZE and _expected_nbytes(tensor) == cut.length
                        and not any(len(getattr(tensor, f)) for f in _TYPED_FIELDS))
            if mappable:
                _set_external(tensor, {"location": location, "offset": str(cut.offset), "length": str(cut.length),
                                       IN_PLACE_KEY: "1", STAMP_KEY: stamp})
            else:
                fh.seek(cut.offset)
                tensor.raw_data = fh.read(cut.length)


def _load_external(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external tensor's data into the model."""
    for tensor in list(_in_file_data(model)):
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))


def _make_lazy(model: onnx.ModelProto, base_dir: Path) -> None:
    """Small external tensors are read in; large ones point at their (checked) file by absolute path."""
    root = base_dir.resolve()
    for tensor in list(_in_file_data(model)):
        info = _external_info(tensor)
        nbytes = _data_length(tensor, info) or 0
        if nbytes < LAZY_MIN_TENSOR_BYTES or _expected_nbytes(tensor) is None or tensor.data_type in _SUBBYTE_BITS:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(root))
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            continue
        info["location"] = str((root / info["location"]).resolve())
        info[STAMP_KEY] = _file_stamp(info["location"])
        _set_external(tensor, info)


def _file_stamp(location: str) -> str:
    st = os.stat(location)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _check_unchanged(tensor: onnx.TensorProto, info: dict[str, str]) -> None:
    stamp = info.get(STAMP_KEY)
    try:
        same = stamp is None or _file_stamp(info["location"]) == stamp
    except OSError:
        same = False
    if not same:
        raise LoadError(f"weight {tensor.name!r}: {info['location']} was replaced or changed after the model was "
                        f"loaded; load it again")


def _set_external(tensor: onnx.TensorProto, info: dict[str, str]) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def is_lazy_tensor(tensor: onnx.TensorProto) -> bool:
    """Data in a file named by absolute path (a lazily loaded model) or computed on demand."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    location = _external_info(tensor).get("location", "")
    return location.startswith(DEFERRED_PREFIX) or os.path.isabs(location)


def is_lazy_model(model: onnx.ModelProto) -> bool:
    return any(is_lazy_tensor(t) for t in _iter_graph_tensors(model.graph))


def read_lazy(tensor: onnx.TensorProto) -> np.ndarray:
    """A lazy tensor's values: memory-mapped from its file (read-only), or computed."""
    info = _external_info(tensor)
    location = info["location"]
    if location.startswith(DEFERRED_PREFIX):
        return _deferred[location]()
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    _check_unchanged(tensor, info)
    try:
        mm = np.memmap(location, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)
    except (OSError, ValueError) as exc:
        raise LoadError(f"weight {tensor.name!r}: cannot map its external data ({type(exc).__name__}: {exc})") from None
    _residency.add(mm)
    return mm.view(np.ndarray)


def tensor_values(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, also for a lazy tensor (mapped from its file or computed: then a
    private, writable copy)."""
    if is_lazy_tensor(tensor):
        return np.array(read_lazy(tensor))
    return numpy_helper.to_array(tensor)


def read_lazy_grid(tensor: onnx.TensorProto, index: list[np.ndarray]) -> np.ndarray:
    """values[np.ix_(*index)] of a lazy tensor, reading only that sub-grid where the storage allows
    (a mapped file, a permutation of one): samples of a huge model cost what they hold."""
    location = _external_info(tensor)["location"]
    if location.startswith(DEFERRED_PREFIX):
        compute = _deferred[location]
        grid = getattr(compute, "grid", None)
        return grid(index) if grid is not None else compute()[np.ix_(*index)]
    return np.asarray(read_lazy(tensor)[np.ix_(*index)])


def read_lazy_rows(tensor: onnx.TensorProto, index: np.ndarray) -> np.ndarray:
    """values[index] (entries along the first axis) of a lazy tensor, reading only those rows where
    the storage allows: a saved tensor is produced a piece at a time."""
    location = _external_info(tensor)["location"]
    if location.startswith(DEFERRED_PREFIX):
        compute = _deferred[location]
        rows = getattr(compute, "rows", None)
        return rows(index) if rows is not None else compute()[index]
    values = read_lazy(tensor)
    if len(index) and index[-1] - index[0] + 1 == len(index) and (np.diff(index) == 1).all():
        return values[int(index[0]):int(index[-1]) + 1]  # a run of rows: a view of the mapping
    return np.take(values, index, axis=0)


class _Residency:
    """Keeps the resident part of the memory-mapped tensors under LAZY_RESIDENT_BYTES.

    A mapped page that was read stays resident (and counts in the process's RSS) for as long as the
    mapping lives, and callers may keep arrays for a whole run (resync caches both models' weights):
    a huge model would end up resident twice over. So the mappings past the newest
    LAZY_RESIDENT_BYTES are told to drop their pages (madvise MADV_DONTNEED: the data stays valid and
    is read again from the page cache when touched), at every new mapping and every RELEASE_SECONDS
    while mappings are alive (a daemon thread)."""

    RELEASE_SECONDS = 0.5

    def __init__(self) -> None:
        self._maps: list[tuple[weakref.ref, int]] = []  # oldest first
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, mm: np.memmap) -> None:
        if not hasattr(mmap_module, "MADV_DONTNEED") or getattr(mm, "_mmap", None) is None:
            return
        with self._lock:
            self._maps.append((weakref.ref(mm), mm.nbytes))
        self.release()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="onnx-resync-residency", daemon=True)
            self._thread.start()

    def release(self) -> None:
        with self._lock:
            live = [(ref, size) for ref, size in self._maps if ref() is not None]
            self._maps = live
        kept = 0
        for ref, size in reversed(live):  # the newest mappings keep their pages
            kept += size
            if kept <= LAZY_RESIDENT_BYTES:
                continue
            mm = ref()
            if mm is not None:
                try:
                    mm._mmap.madvise(mmap_module.MADV_DONTNEED)
                except (ValueError, OSError, AttributeError):  # closed meanwhile
                    pass

    def _loop(self) -> None:
        while True:
            time.sleep(self.RELEASE_SECONDS)
            self.release()


_residency = _Residency()


def _lazy_reader(tensor: onnx.TensorProto) -> Callable[[], np.ndarray]:
    """A callable that reads the tensor's current data (even after the tensor is re-pointed)."""
    snapshot = onnx.TensorProto()
    snapshot.name, snapshot.data_type = tensor.name, tensor.data_type
    snapshot.dims.extend(tensor.dims)
    _set_external(snapshot, _external_info(tensor))

    def read() -> np.ndarray:
        return read_lazy(snapshot)

    read.grid = lambda index: read_lazy_grid(snapshot, index)
    read.rows = lambda index: read_lazy_rows(snapshot, index)
    return read


def set_deferred(tensor: onnx.TensorProto, compute: Callable[[], np.ndarray]) -> None:
    """From now on the tensor's data is what `compute()` returns (called when read or saved)."""
    key = f"{DEFERRED_PREFIX}{next(_deferred_ids)}"
    _deferred[key] = compute
    info = {"location": key, "length": str(_expected_nbytes(tensor) or 0)}
    if is_in_place(tensor):  # still written inline
        info[IN_PLACE_KEY] = "1"
    _set_external(tensor, info)


def _check_text(message) -> None:
    """Every string field must be UTF-8 text: protobuf parses invalid UTF-8 in ONNX's proto2 strings
    and hands it out as bytes (a node name, a tensor name), which breaks name lookups far away, or
    raises later. Raises UnicodeDecodeError. Tensor data is not touched."""
    if isinstance(message, onnx.TensorProto):
        values = [message.name, message.doc_string] + [v for e in message.external_data for v in (e.key, e.value)]
        if any(not isinstance(v, str) for v in values):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "tensor name or external data key")
        return
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        items = value if repeated else [value]
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                _check_text(item)
        elif field.type == field.TYPE_STRING and any(not isinstance(v, str) for v in items):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, f"field {field.name}")


def load_model(path: str | os.PathLike, *, load_weights: bool = True, check: bool = True,
               lazy: bool | None = None) -> onnx.ModelProto:
    """Load an ONNX file, turning every failure into a one-line LoadError.

    With load_weights=False, external data is left on disk (the walker needs shapes only).
    check=False skips onnx.checker (for callers such as ORT sessions that validate the graph anyway).
    lazy: keep large external tensors in their files, memory-mapped when read (WeightStore) and
    streamed when saved (save_model); None: lazy when the external data exceeds LAZY_EXTERNAL_BYTES.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if not path.is_file():
        raise LoadError(f"{path}: not a regular file")
    in_place = path.stat().st_size > LAZY_EXTERNAL_BYTES if lazy is None else lazy
    try:
        model, cuts = _parse(path, in_place)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise LoadError(f"{path}: not a readable ONNX protobuf ({type(exc).__name__})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise LoadError(f"{path}: not an ONNX model (no graph or ir_version)")
    try:
        _check_text(model)
    except UnicodeDecodeError:
        raise LoadError(f"{path}: not a valid ONNX model (a name or attribute is not UTF-8 text)") from None
    check_external_data(model, path.parent)
    _map_in_place(model, cuts, path)
    check_tensor_data(model, path)
    if load_weights:
        if lazy is None:
            lazy = in_place or _external_nbytes(model) > LAZY_EXTERNAL_BYTES
        try:
            if lazy:
                _make_lazy(model, path.parent)
            else:
                _load_external(model, path.parent)
        except Exception as exc:
            raise LoadError(f"{path}: cannot read external data ({exc})") from None
    if check:
        _check(model, path)
    return model


def _parse(path: Path, in_place: bool) -> tuple[onnx.ModelProto, list]:
    """The model, and (in_place) the initializer payloads left in the file (see wire.cut_payloads)."""
    found = None
    if in_place:
        with open(path, "rb") as fh:
            try:
                buf = mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ)
            except (ValueError, OSError):  # an empty file cannot be mapped
                buf = None
        if buf is not None:
            try:
                found = wire.cut_payloads(buf, IN_PLACE_MIN_TENSOR_BYTES)
            finally:
                buf.close()
    if found is None:
        return onnx.load_model(str(path), load_external_data=False), []
    skeleton, cuts = found
    model = onnx.ModelProto()
    if model.ParseFromString(skeleton) != len(skeleton):
        raise ValueError("trailing bytes")
    return model, cuts


def over_inline_limit(model: onnx.ModelProto) -> bool:
    """Would the model serialize past protobuf's limit? ByteSize() walks the whole message (0.4 s
    for 100 MB); the tensor payloads decide it unless they come within 256 MiB of the limit."""
    payload = 0
    for t in _iter_graph_tensors(model.graph):
        if is_in_place(t):
            payload += _expected_nbytes(t) or 0
        payload += len(t.raw_data) + 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data)
                                          + len(t.double_data) + len(t.uint64_data))
        payload += sum(len(b) for b in t.string_data)
    if payload < INLINE_LIMIT_BYTES - (256 << 20):
        return False
    return model.ByteSize() >= INLINE_LIMIT_BYTES


def _check(model: onnx.ModelProto, path: Path) -> None:
    try:
        if any(True for _ in _in_file_data(model)) or over_inline_limit(model):
            # Unloaded external data is resolved against the model's folder only when checked by path
            # (checking the proto looks in the current directory); a path check also has no 2 GiB limit.
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(_checker_copy(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise LoadError(f"{path}: invalid ONNX model: {first}") from None
    except Exception as exc:
        raise LoadError(f"{path}: invalid ONNX model ({type(exc).__name__})") from None


def _checker_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for onnx.checker, its initializers' large raw payloads cut to one element of a
    [1, ..., 1] tensor.

    The checker copies the whole model to C++ and reads no weight value, only that each tensor's
    data fits its dims and type, which check_tensor_data has verified for the real dims. Building
    this copy never touches a payload: setting the real ones aside and back in place copied every
    weight twice (0.12 s of the 0.32 s that loading two 98 MiB models took)."""
    def cut(source: onnx.TensorProto, target: onnx.TensorProto) -> None:
        count, nbytes = math.prod(source.dims), _expected_nbytes(source)
        in_place = is_in_place(source)  # (its data is checked in its file: check_tensor_data)
        if not in_place and (not source.HasField("raw_data") or not source.dims or source.data_type in _SUBBYTE_BITS
                             or count <= 0 or nbytes is None or nbytes <= 4096):
            target.CopyFrom(source)
            return
        placement = {"external_data", "data_location"} if in_place else set()
        wire.copy_fields(source, target, {"raw_data", "dims"} | placement)
        target.dims.extend([1] * len(source.dims))
        target.raw_data = bytes(nbytes // max(count, 1))

    return _copy_model(model, cut)


def copy_without_payloads(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of the model in which the raw data of the initializers `names` is left empty, for a
    caller about to write new data into them all (a permuted copy): copying the old data first
    would copy the weights once more for nothing."""
    def copy(source: onnx.TensorProto, target: onnx.TensorProto) -> None:
        if source.name in names and source.HasField("raw_data"):
            _copy_tensor_header(source, target)
        else:
            target.CopyFrom(source)

    return _copy_model(model, copy)


def _copy_model(model: onnx.ModelProto, copy_initializer) -> onnx.ModelProto:
    """A copy of the model, its graph's initializers copied by copy_initializer(source, target)."""
    out = wire.copy_fields(model, onnx.ModelProto(), {"graph"})
    wire.copy_fields(model.graph, out.graph, {"initializer"})
    for t in model.graph.initializer:
        copy_initializer(t, out.graph.initializer.add())
    return out


def _copy_tensor_header(source: onnx.TensorProto, target: onnx.TensorProto) -> None:
    """Every field of the tensor but its raw data."""
    wire.copy_fields(source, target, {"raw_data"})


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(out_path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise UsageError when out_path names one of the inputs or their external data (also through
    symbolic or hard links)."""
    out = Path(out_path)
    for inp in inputs:
        inp = Path(inp)
        if out.resolve() == inp.resolve() or _same_file(out, inp):
            raise UsageError(f"output {out} is an input file; refusing to overwrite it")
    for data in _protected_files(inputs):
        if _is_one_of(out, [data]):
            raise UsageError(f"output {out} is the external data of an input; refusing to overwrite it")


def check_output_path(path: str | os.PathLike) -> None:
    """Fail early (before any slow work) for an output that cannot be written: no folder, a folder."""
    out = Path(path)
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")


def save_model(
    model: onnx.ModelProto, out_path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Write atomically: temp files in the target folder, then rename; never over an input.

    Models past the protobuf limit get their large tensors in '<name>.data' beside the file.
    A run killed at any point leaves the old output or the complete new one.
    """
    out = Path(out_path)
    inputs = list(inputs)
    refuse_overwrite(out, inputs)
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")
    move_inline = over_inline_limit(model)
    streamed = not move_inline and streams_inline(model)
    external = move_inline or (is_lazy_model(model) and not streamed)
    candidates = _data_candidates(out)
    old_data = _data_files_of(out) & set(candidates)  # our data file that the current output uses
    data_name = None
    if external:
        # never the data file the current output reads (a kill between the two renames would leave the
        # old model over new data), nor an input's
        protected = _protected_files(inputs)
        data_name = next((c for c in candidates if c not in old_data and not _is_one_of(folder / c, protected)), None)
        if data_name is None:
            raise UsageError(f"no name for {out}'s external data that is not an input file")
    tmp_paths: list[Path] = []
    try:
        restore: list[Callable[[], None]] = []
        try:
            if external:
                data_tmp = _temp_path(folder, data_name)
                tmp_paths.append(data_tmp)
                _write_external_data(model, data_tmp, data_name, restore, move_inline)
            model_tmp = _temp_path(folder, out.name)
            tmp_paths.append(model_tmp)
            _write_bytes(model_tmp, _inline_chunks(model) if streamed else [model.SerializeToString()])
        finally:
            for undo in reversed(restore):  # give the caller's model its data back, byte for byte
                undo()
        if external:
            os.replace(data_tmp, folder / data_name)
        os.replace(model_tmp, out)
        _fsync_dir(folder)
        for stale in old_data - {data_name}:  # the previous output's data file, now unused
            if not _is_one_of(folder / stale, _protected_files(inputs)):
                (folder / stale).unlink(missing_ok=True)
    finally:
        for p in tmp_paths:
            if p.exists():
                p.unlink()
    return out


def _data_candidates(out: Path) -> list[str]:
    """Two names that alternate, so a new data file never replaces the one the old output reads."""
    return [out.name + ".data", out.name + ".1.data"]


def _data_files_of(model_path: Path) -> set[str]:
    """External-data locations of an existing (small, external-data) model file; empty if none/unreadable."""
    try:
        if not model_path.is_file() or model_path.stat().st_size > 64 << 20:
            return set()
        model = onnx.load_model(str(model_path), load_external_data=False)
        return {_external_info(t).get("location", "") for t in _iter_graph_tensors(model.graph)
                if t.data_location == onnx.TensorProto.EXTERNAL}
    except Exception:  # noqa: BLE001 - a broken old output uses no data file we need to keep
        return set()


def _protected_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The input files and the external-data files they read."""
    files = []
    for inp in inputs:
        inp = Path(inp)
        files.append(inp)
        files.extend(inp.parent / loc for loc in _data_files_of(inp) if loc and "\x00" not in loc)
    return files


def _is_one_of(path: Path, files: Iterable[Path]) -> bool:
    for f in files:
        try:
            if path.resolve() == f.resolve() or _same_file(path, f):
                return True
        except (OSError, RuntimeError, ValueError):
            continue
    return False


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (a power cut after the rename keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, chunks: Iterable) -> None:
    """Write the chunks as they come (a streamed one is valid only until the next is made)."""
    with open(path, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def streams_inline(model: onnx.ModelProto) -> bool:
    """A lazy model whose every lazy tensor was inline in its file (a graph initializer mapped in
    place, or computed from one): it is written inline again, its payloads streamed."""
    lazy = [t for t in _iter_graph_tensors(model.graph) if is_lazy_tensor(t)]
    return bool(lazy) and all(is_in_place(t) for t in lazy) and len(lazy) == sum(
        is_lazy_tensor(t) for t in model.graph.initializer)


def _inline_chunks(model: onnx.ModelProto) -> Iterator:
    return wire.model_chunks(model, is_lazy_tensor, lazy_payload)


def serialize(model: onnx.ModelProto) -> bytes:
    """model.SerializeToString(), also for a model whose weights are mapped in place or computed."""
    if streams_inline(model) and not over_inline_limit(model):
        out = bytearray()
        for chunk in _inline_chunks(model):  # (each valid only until the next is made: no join)
            out += chunk
        return bytes(out)
    if is_lazy_model(model):
        raise UsageError("a model with lazy external data cannot be serialized in one piece; save it")
    return model.SerializeToString()


def _write_external_data(model: onnx.ModelProto, data_path: Path, location: str,
                         restore: list[Callable[[], None]], move_inline: bool) -> None:
    """Write lazy tensors (streamed one at a time) and, when the model is past the protobuf limit,
    every large inline tensor into data_path, pointing the tensors at it; `restore` gets (as it goes,
    so that a failure half-way can still be undone) what gives the caller's model back."""
    with open(data_path, "wb") as fh:
        for tensor in _iter_graph_tensors(model.graph):
            if is_lazy_tensor(tensor):
                fh.write(b"\0" * (-fh.tell() % 64))  # aligned, for memory-mapping
                offset = fh.tell()
                length = _write_lazy(tensor, fh)
                restore.append(lambda t=tensor, info=_external_info(tensor): _set_external(t, info))
                _set_external(tensor, {"location": location, "offset": str(offset), "length": str(length)})
                continue
            if not move_inline or not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                continue
            offset = fh.tell()
            raw = tensor.raw_data
            fh.write(raw)
            restore.append(lambda t=tensor, raw=raw, had=tensor.HasField("data_location"): _restore_inline(t, raw, had))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        fh.flush()
        os.fsync(fh.fileno())


def _restore_inline(tensor: onnx.TensorProto, raw: bytes, had_location: bool) -> None:
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    if had_location:  # proto2: an explicitly set default is serialized, an unset one is not
        tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


COPY_CHUNK_BYTES = 16 << 20
WRITE_PIECE_BYTES = 16 << 20  # a computed tensor is written this many bytes of rows at a time


def _write_lazy(tensor: onnx.TensorProto, fh) -> int:
    """Append a lazy tensor's bytes to fh; returns the length."""
    length, pieces = lazy_payload(tensor)
    for piece in pieces:
        fh.write(piece)
    return length


def lazy_payload(tensor: onnx.TensorProto) -> tuple[int, Iterator[memoryview]]:
    """A lazy tensor's length in bytes and its bytes in pieces (each valid until the next is asked
    for): copied in chunks from its file, or computed a piece of rows at a time."""
    info = _external_info(tensor)
    expected = _expected_nbytes(tensor)
    if info["location"].startswith(DEFERRED_PREFIX):
        return expected, _computed_pieces(tensor, _deferred[info["location"]], expected)
    length = _data_length(tensor, info)
    return length, _file_pieces(tensor, info, length)


def _computed_pieces(tensor: onnx.TensorProto, compute, expected: int) -> Iterator[memoryview]:
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = [int(d) for d in tensor.dims]
    if getattr(compute, "rows", None) is None or not shape or not expected:
        pieces = [read_lazy(tensor)]
    else:  # a piece of rows at a time (no copy of the whole tensor), the next one computed
        #    while this one is written
        step = max(1, WRITE_PIECE_BYTES // max(1, expected // shape[0]))
        pieces = prefetched(compute.rows(np.arange(a, min(a + step, shape[0]))) for a in range(0, shape[0], step))
    written = 0
    for piece in pieces:
        piece = np.ascontiguousarray(piece, dtype=dtype)
        written += piece.nbytes
        if written > expected:
            break
        if piece.nbytes:
            yield memoryview(piece.reshape(-1)).cast("B")
    if written != expected:
        raise ValueError(f"weight {tensor.name!r}: computed {written} bytes, expected {expected}")


def _file_pieces(tensor: onnx.TensorProto, info: dict[str, str], length: int) -> Iterator[memoryview]:
    _check_unchanged(tensor, info)
    buffer = bytearray(min(COPY_CHUNK_BYTES, max(length, 1)))
    left = length
    with open(info["location"], "rb") as src:
        src.seek(int(info.get("offset", 0)))
        while left:
            view = memoryview(buffer)[:min(left, len(buffer))]
            got = src.readinto(view)
            if not got:
                raise LoadError(f"weight {tensor.name!r}: its external data file is shorter than before")
            yield view[:got]
            left -= got


def _temp_path(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file 0600; a saved model should get the usual mode (or keep the old file's).
        target = folder / name
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
    except (AttributeError, OSError):  # no fchmod on Windows
        pass
    finally:
        os.close(fd)
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WeightStore:
    """Read and write weights by tensor name, whether initializer or Constant-node output."""

    def __init__(self, model: onnx.ModelProto, *, cache: bool = False):
        """cache: keep what get() returns for in-memory weights (each read copies the tensor's
        bytes), for a caller that reads a model several times and never changes it elsewhere."""
        self.model = model
        self._cache: dict[str, np.ndarray] | None = {} if cache else None
        self._tensors: dict[str, onnx.TensorProto] = {}
        for init in model.graph.initializer:
            self._tensors[init.name] = init
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self._tensors[node.output[0]] = attr.t

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._tensors[name].dims)

    def dtype(self, name: str) -> np.dtype:
        return onnx.helper.tensor_dtype_to_np_dtype(self._tensors[name].data_type)

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if is_lazy_tensor(tensor):
            return read_lazy(tensor)  # read-only (memory-mapped) or computed: do not write into it
        if tensor.data_location == onnx.TensorProto.EXTERNAL:  # never resolved against the current folder
            raise LoadError(f"weight {name!r} is in external data that was not loaded")
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        try:
            array = numpy_helper.to_array(tensor)
        except Exception as exc:
            raise LoadError(f"weight {name!r} cannot be read ({exc})") from None
        if self._cache is not None:
            array.flags.writeable = False  # shared by every later reader
            self._cache[name] = array
        return array

    def get_grid(self, name: str, index: list[np.ndarray]) -> np.ndarray:
        """get(name)[np.ix_(*index)]: one index array per axis; a lazy weight reads only those entries."""
        tensor = self._tensors[name]
        if is_lazy_tensor(tensor):
            return read_lazy_grid(tensor, index)
        return self.get(name)[np.ix_(*index)]

    def row_blocks(self, name: str, block_bytes: int = COPY_CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The weight in consecutive blocks of whole rows (first axis) of about block_bytes: a
        computed (deferred) weight is computed a block at a time, never whole."""
        shape = self.shape(name)
        tensor = self._tensors[name]
        if not shape:
            yield self.get(name)
            return
        whole = None if is_lazy_tensor(tensor) else self.get(name)
        row_bytes = max(1, math.prod(shape[1:]) * np.dtype(self.dtype(name)).itemsize)
        step = max(1, block_bytes // row_bytes)
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            yield whole[start:stop] if whole is not None else read_lazy_rows(tensor, np.arange(start, stop))

    def is_lazy(self, name: str) -> bool:
        """The weight stays on disk (memory-mapped) or is computed when saved: rewrite it with set_lazy."""
        return is_lazy_tensor(self._tensors[name])

    def reader(self, name: str) -> Callable[[], np.ndarray]:
        """For a lazy weight: a callable reading its current values, valid after the weight is set again."""
        return _lazy_reader(self._tensors[name])

    def set_lazy(self, name: str, compute: Callable[[], np.ndarray]) -> None:
        """A lazy weight's new values are `compute()` (same shape and dtype), computed when read or
        saved: a huge model is rewritten one tensor at a time, never held in memory at once."""
        if self._cache is not None:
            self._cache.pop(name, None)
        tensor = self._tensors[name]
        shape, dtype = self.shape(name), self.dtype(name)

        def checked() -> np.ndarray:
            array = np.asarray(compute())
            if array.shape != shape:
                raise ValueError(f"weight {name!r}: computed shape {array.shape}, expected {shape}")
            return array.astype(dtype, copy=False)

        grid = getattr(compute, "grid", None)
        if grid is not None:  # the computation can produce a sub-grid alone (a permutation)
            checked.grid = lambda index: np.asarray(grid(index)).astype(dtype, copy=False)
        rows = getattr(compute, "rows", None)
        if rows is not None and len(shape):  # ... or some of its rows (saved a piece at a time)
            def checked_rows(index: np.ndarray) -> np.ndarray:
                piece = np.asarray(rows(index))
                if piece.shape != (len(index),) + shape[1:]:
                    raise ValueError(f"weight {name!r}: computed rows of shape {piece.shape}, expected "
                                     f"{(len(index),) + shape[1:]}")
                return piece.astype(dtype, copy=False)
            checked.rows = checked_rows
        set_deferred(tensor, checked)

    def set(self, name: str, array: np.ndarray) -> None:
        """Replace a weight's values in place, keeping its name and dtype."""
        if self._cache is not None:
            self._cache.pop(name, None)
        old = self._tensors[name]
        array = np.ascontiguousarray(array).astype(self.dtype(name), copy=False)
        if is_lazy_tensor(old) and not is_in_place(old):  # a huge model stays lazy: held here until saved
            if array.shape != self.shape(name):
                raise ValueError(f"weight {name!r}: new shape {array.shape}, expected {self.shape(name)}")
            set_deferred(old, lambda: array)
            return
        typed = next((f for f in _TYPED_FIELDS if len(getattr(old, f))), None)
        raw_storage = old.HasField("raw_data") or typed is None
        new = None
        if raw_storage and array.dtype.kind in "fiub" and old.data_type not in _SUBBYTE_BITS:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()  # one copy (from_array: four)
        elif raw_storage:
            new = numpy_helper.from_array(array, name=old.name)
        else:  # keep the file's own storage field, so that undo restores the original bytes
            new = onnx.helper.make_tensor(old.name, old.data_type, array.shape, array.reshape(-1).tolist())
        if old.data_location == onnx.TensorProto.EXTERNAL:
            old.ClearField("external_data")
            old.ClearField("data_location")  # not DEFAULT: proto2 would serialize it, changing the bytes
        for field in _TYPED_FIELDS:
            old.ClearField(field)
        if new is None:
            old.raw_data = raw
        elif new.HasField("raw_data"):
            old.raw_data = new.raw_data
        else:
            getattr(old, typed).extend(getattr(new, typed))
        del old.dims[:]
        old.dims.extend(array.shape)


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON record, report) with the same temp-then-rename guarantee."""
    out = Path(path)
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")
    tmp = _temp_path(out.parent, out.name)
    try:
        _write_bytes(tmp, [text.encode()])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
