"""Lazy tensors: weights of a huge model that stay out of memory until they are used.

A *lazy* tensor's data is not in its TensorProto: the proto is EXTERNAL, and its location says where
the data is. Three kinds:

- *mapped*: bytes in a file named by absolute path, the model's external-data file or the model file
  itself (a payload read *in place*: IN_PLACE_KEY, written inline again); memory-mapped when read,
  never written through. The file is *stamped* when loaded (STAMP_KEY: device, inode, size, mtime):
  one replaced or rewritten since is refused, never read at offsets that now hold something else.
- *permuted*: another lazy tensor's data reindexed along some axes (entry i along axis a is entry
  index[a][i] of the source): a permutation of a huge model. A sub-grid or some rows read only the
  source entries they need; a permutation of a permuted tensor is composed onto the first source.
- *computed*: what a function returns (same shape and dtype): new values set for a lazy weight.
  It may also compute a *part* (`part`: the values at some entries of each axis), so that a sample
  or a block of rows of a cast or dequantized huge weight costs what it holds, not the whole. Its
  maker may say which stored codes it dequantizes (`codes`, opaque here: the audit derives a
  quantization step from them).

Every kind has a *major* axis: the one along which a block of entries is cheapest to read (its
entries lie together in storage): 0 for a mapping, the source's for a permutation, and what the
maker of a computed tensor says (a dequantized MatMulNBits weight [K, N] is stored by rows of N:
its major axis is 1). A reader of a whole huge tensor in blocks cuts it along that axis.

Permuted and computed tensors are *deferred*: nothing is computed until the data is read or saved.
Their proto's location is DEFERRED_PREFIX + a number, which names the LazyTensor in the registry
`DEFERRED` (see DeferredRegistry for who owns an entry and how long it lives).

A LazyTensor reads as a whole (`read`), as a sub-grid (`grid`: values[np.ix_(*index)]; `select`:
the same with None for a whole axis), as some rows (`rows`: entries along the first axis), or as
bytes in pieces for a streaming write (`pieces`: copied from the file in chunks, or computed a piece
of rows at a time, the next piece computed while this one is written). A part is read from the
mapping, through the permutation, or computed by `part`, whichever the kind allows; a computed
tensor without `part`, or whose whole values are at hand (`_recent`), is read whole and indexed.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
import math
import mmap as mmap_module
import os
import threading
import time
import weakref
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from ..errors import LoadError
from .external import IN_PLACE_KEY, data_length, expected_nbytes, external_info, is_in_place, iter_graph_tensors, \
    set_external
from .prefetch import prefetched

# the identity of a mapped tensor's file when it was loaded (see the module's docstring)
STAMP_KEY = "onnx-resync:file"
# memory-mapped pages kept resident (the newest mappings); older ones are released (see _Residency)
LAZY_RESIDENT_BYTES = int(os.environ.get("ONNX_RESYNC_LAZY_RESIDENT_BYTES", 256 << 20))
# location of a deferred tensor (permuted or computed), followed by its number in DEFERRED
DEFERRED_PREFIX = "onnx-resync:deferred:"
COPY_CHUNK_BYTES = 16 << 20  # a mapped tensor is copied this many bytes at a time
WRITE_PIECE_BYTES = 16 << 20  # a deferred tensor is written this many bytes of rows at a time
# the newest computed tensors' values kept, for a tensor read in pieces or several times (_Recent)
COMPUTED_CACHE_BYTES = int(os.environ.get("ONNX_RESYNC_COMPUTED_CACHE_BYTES", 64 << 20))


class LazyTensor:
    """One lazy tensor's data: mapped, permuted or computed (see the module's docstring)."""

    __slots__ = ("kind", "name", "shape", "dtype", "nbytes", "location", "offset", "stamp", "source", "index",
                 "compute", "part", "computed_major", "codes")

    def __init__(self, kind: str, name: str, shape: tuple[int, ...], dtype: np.dtype, nbytes: int, *,
                 location: str = "", offset: int = 0, stamp: str | None = None,
                 source: "LazyTensor | None" = None, index: dict[int, np.ndarray] | None = None,
                 compute: Callable[[], np.ndarray] | None = None, part: "Callable[[Index], np.ndarray] | None" = None,
                 computed_major: int = 0):
        self.kind, self.name, self.shape, self.dtype, self.nbytes = kind, name, shape, dtype, nbytes
        self.location, self.offset, self.stamp = location, offset, stamp  # mapped
        self.source, self.index = source, index or {}  # permuted: axis -> source entry of each entry
        self.compute = compute  # computed: the whole
        self.part = part  # computed, optional: part(index) == select(compute(), index)
        self.computed_major = computed_major  # computed: its major axis (see the module's docstring)
        # computed, optional, set by its maker: the stored integer codes it dequantizes, as the maker
        # describes them (audit.storage derives a quantization step from them; opaque here)
        self.codes = None

    @staticmethod
    def of(tensor: onnx.TensorProto) -> "LazyTensor":
        """What a lazy proto points at: its registered deferred tensor, or its mapping (as it is now:
        the proto may be pointed elsewhere later)."""
        info = external_info(tensor)
        location = info["location"]
        if location.startswith(DEFERRED_PREFIX):
            return DEFERRED.get(location, tensor.name)
        return LazyTensor("mapped", tensor.name, *_layout(tensor), data_length(tensor, info), location=location,
                          offset=int(info.get("offset", 0)), stamp=info.get(STAMP_KEY))

    @staticmethod
    def computed(tensor: onnx.TensorProto, compute: Callable[[], np.ndarray],
                 part: "Callable[[Index], np.ndarray] | None" = None, major: int = 0) -> "LazyTensor":
        """The tensor's new values are what compute() returns (checked against its shape, cast to its
        dtype); `part(index)`, where given, computes select(compute(), index) alone; `major`: the
        axis along which its parts are cheapest."""
        shape, dtype = _layout(tensor)
        return LazyTensor("computed", tensor.name, shape, dtype, expected_nbytes(tensor) or 0, compute=compute,
                          part=part, computed_major=major)

    @property
    def major(self) -> int:
        """The axis along which a block of entries is cheapest to read (see the module's docstring)."""
        if self.kind == "permuted":
            return self.source.major
        return self.computed_major if self.kind == "computed" else 0

    def permuted(self, index: dict[int, np.ndarray]) -> "LazyTensor":
        """This tensor reindexed: entry i along axis a is this tensor's entry index[a][i]."""
        source, index = self, {axis: np.asarray(idx) for axis, idx in index.items()}
        if self.kind == "permuted":  # composed: never a chain of permutations
            source, inner = self.source, self.index
            index = {**inner, **{a: inner[a][idx] if a in inner else idx for a, idx in index.items()}}
        return LazyTensor("permuted", self.name, self.shape, self.dtype, self.nbytes, source=source, index=index)

    def read(self) -> np.ndarray:
        """The values: read-only (memory-mapped) for a mapped tensor, computed for a deferred one."""
        if self.kind == "computed":
            array = _recent.get(self)
            if array is not None:
                return array
            array = np.asarray(self.compute())
            if array.shape != self.shape:
                raise ValueError(f"weight {self.name!r}: computed shape {array.shape}, expected {self.shape}")
            array = array.astype(self.dtype, copy=False)
            _recent.put(self, array)
            return array
        if self.kind == "permuted":
            return self._moved(self.source.read(), self.index.items())
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype.newbyteorder("<"))
        self._check_unchanged()
        try:
            mm = np.memmap(self.location, dtype=self.dtype.newbyteorder("<"), mode="r", offset=self.offset,
                           shape=self.shape)
        except (OSError, ValueError) as exc:
            raise LoadError(f"weight {self.name!r}: cannot map its external data "
                            f"({type(exc).__name__}: {exc})") from None
        _residency.add(mm)
        return mm.view(np.ndarray)

    def select(self, index: "Index") -> np.ndarray:
        """values[np.ix_(*index)], an entry of `index` per axis and None for a whole axis: read from the
        mapping (a run of entries is a view), through the permutation, or computed by `part` (see the
        module's docstring). Read-only where it is a view of the mapping."""
        index = list(index) + [None] * (len(self.shape) - len(index))
        if self.kind == "permuted":
            return self.source.select(through(self.index, index))
        if self.kind == "computed" and self.part is not None and _recent.get(self) is None \
                and any(i is not None for i in index):
            index = [None if i is None else np.asarray(i) for i in index]
            # an axis read whole in another order (a permutation) beside a part of another: the part
            # computed in the stored order, then gathered, so that a reader of the same entries in
            # that order (the audit's steps) is handed it (_LastPart)
            split = split_whole(index, self.shape)
            if split is not None:
                return select(self.select(split[0]), split[1])
            out = _last_part.get(self, index)
            if out is None:
                out = np.asarray(self.part(index))
                expected = tuple(n if i is None else len(i) for n, i in zip(self.shape, index))
                if out.shape != expected:
                    raise ValueError(f"weight {self.name!r}: computed part of shape {out.shape}, expected {expected}")
                out = np.asarray(out, dtype=self.dtype)
                out.flags.writeable = False  # (handed to every reader of this part: _LastPart)
                _last_part.put(self, index, out)
            return out
        return select(self.read(), index)

    def grid(self, index: list[np.ndarray]) -> np.ndarray:
        """values[np.ix_(*index)] (a copy), reading only that sub-grid where the kind allows: samples
        of a huge model cost what they hold."""
        out = self.select(index)
        return out if out.flags.owndata and out.flags.writeable else np.array(out)  # (a shared part: copied)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """values[index] (entries along the first axis), reading only those rows where the kind
        allows: a saved tensor is produced a piece at a time."""
        if self.kind == "permuted":  # the source's rows, then its other axes moved
            piece = self.source.rows(self.index[0][index] if 0 in self.index else index)
            return self._moved(piece, [(a, idx) for a, idx in self.index.items() if a != 0])
        return self.select([np.asarray(index)])

    def pieces(self) -> Iterator[memoryview]:
        """The bytes (nbytes of them) in pieces, each valid until the next is asked for: copied from
        the file in chunks, or computed a piece of rows at a time."""
        return self._file_pieces() if self.kind == "mapped" else self._computed_pieces()

    @staticmethod
    def _moved(array: np.ndarray, index: Iterable[tuple[int, np.ndarray]]) -> np.ndarray:
        for axis, idx in index:
            array = np.take(array, idx, axis=axis)
        return array

    def _check_unchanged(self) -> None:
        try:
            same = self.stamp is None or file_stamp(self.location) == self.stamp
        except OSError:
            same = False
        if not same:
            raise LoadError(f"weight {self.name!r}: {self.location} was replaced or changed after the model was "
                            f"loaded; load it again")

    def _file_pieces(self) -> Iterator[memoryview]:
        self._check_unchanged()
        buffer = bytearray(min(COPY_CHUNK_BYTES, max(self.nbytes, 1)))
        left = self.nbytes
        with open(self.location, "rb") as src:
            src.seek(self.offset)
            while left:
                view = memoryview(buffer)[:min(left, len(buffer))]
                got = src.readinto(view)
                if not got:
                    raise LoadError(f"weight {self.name!r}: its external data file is shorter than before")
                yield view[:got]
                left -= got

    def _computed_pieces(self) -> Iterator[memoryview]:
        dtype, shape, expected = self.dtype.newbyteorder("<"), self.shape, self.nbytes
        if self.kind != "permuted" or not shape or not expected:
            pieces = [self.read()]
        else:  # a piece of rows at a time (no copy of the whole tensor), the next one computed
            #    while this one is written
            step = max(1, WRITE_PIECE_BYTES // max(1, expected // shape[0]))
            pieces = prefetched(self.rows(np.arange(a, min(a + step, shape[0]))) for a in range(0, shape[0], step))
        written = 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype=dtype)
            written += piece.nbytes
            if written > expected:
                break
            if piece.nbytes:
                yield memoryview(piece.reshape(-1)).cast("B")
        if written != expected:
            raise ValueError(f"weight {self.name!r}: computed {written} bytes, expected {expected}")


Index = list  # per axis: an array of entries, or None for the whole axis (LazyTensor.select)


def through(moves: dict[int, np.ndarray], index: Index) -> Index:
    """The source's entries that `index` reads through a permutation (axis -> source entry of each
    entry, as LazyTensor.index): an axis read whole is read in the permutation's order."""
    return [moves.get(a) if i is None else (moves[a][i] if a in moves else i) for a, i in enumerate(index)]


def split_whole(index: Index, shape: tuple[int, ...]) -> tuple[Index, Index] | None:
    """(part, gather) where `index` reads some axis whole, in another order (a permutation), beside a
    part of another axis: select(select(v, part), gather) == select(v, index), the part read in the
    stored order; None where it does not."""
    whole = [i is not None and len(i) == n for i, n in zip(index, shape)]
    if not any(whole) or all(w or i is None for i, w in zip(index, whole)):
        return None
    return [None if w else i for i, w in zip(index, whole)], [i if w else None for i, w in zip(index, whole)]


def select(values: np.ndarray, index: Index) -> np.ndarray:
    """values[np.ix_(*index)] with None for a whole axis; a run of entries is sliced (a view). An
    array stored by columns (a part computed by rows of its transpose) is gathered in that order,
    and stays so (numpy's gather writes rows: reading by columns, it runs across memory)."""
    out = values
    for axis, idx in enumerate(index):
        if idx is None:
            continue
        idx = np.asarray(idx)
        if idx.size and idx.ndim == 1 and idx[-1] - idx[0] + 1 == idx.size and (np.diff(idx) == 1).all():
            out = out[(slice(None),) * axis + (slice(int(idx[0]), int(idx[-1]) + 1),)]
        elif out.ndim > 1 and out.flags.f_contiguous and not out.flags.c_contiguous:
            out = np.take(out.T, idx, axis=out.ndim - 1 - axis).T
        else:
            out = np.take(out, idx, axis=axis)
    return out


def _layout(tensor: onnx.TensorProto) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(d) for d in tensor.dims), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


class DeferredRegistry:
    """The deferred tensors that protos point at by location (DEFERRED_PREFIX + a number).

    A ModelProto is what flows through the package, and it cannot hold a Python object, so a
    deferred tensor's proto names its LazyTensor here. Owner: this module (one registry, DEFERRED).
    Lifetime: an entry lives until release() names its location (release_lazy(model): the caller
    is done with the model). It cannot go by itself: protobuf messages cannot be weakly referenced,
    and a copy of a model (CopyFrom, copy_without_payloads) points at the same entries, so nothing
    tells when the last proto naming an entry is gone. An entry is small (a permutation: its index
    arrays and a reference to the mapping) unless it holds the new values of a weight (WeightStore.set
    on a lazy weight); a permutation of a permuted tensor does not keep the first one alive.
    """

    def __init__(self) -> None:
        self._entries: dict[str, LazyTensor] = {}
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, lazy: LazyTensor) -> str:
        location = f"{DEFERRED_PREFIX}{next(self._numbers)}"
        self._entries[location] = lazy
        return location

    def get(self, location: str, name: str) -> LazyTensor:
        try:
            return self._entries[location]
        except KeyError:
            raise LoadError(f"weight {name!r}: its computed data was released (release_lazy)") from None

    def release(self, locations: Iterable[str]) -> int:
        """Forget these entries; returns how many there were."""
        return sum(self._entries.pop(location, None) is not None for location in locations)


DEFERRED = DeferredRegistry()


def point_at(tensor: onnx.TensorProto, lazy: LazyTensor) -> None:
    """From now on the tensor's data is `lazy` (deferred: computed when read or saved)."""
    info = {"location": DEFERRED.add(lazy), "length": str(expected_nbytes(tensor) or 0)}
    if is_in_place(tensor):  # still written inline
        info[IN_PLACE_KEY] = "1"
    set_external(tensor, info)


def release_lazy(model: onnx.ModelProto) -> int:
    """Free the deferred data that the model's tensors point at (permuted or computed weights), once
    the caller is done with the model and every copy of it; returns how many entries were freed.
    Reading or saving those tensors afterwards raises LoadError."""
    return DEFERRED.release(external_info(t).get("location", "") for t in iter_graph_tensors(model.graph)
                            if t.data_location == onnx.TensorProto.EXTERNAL)


def file_stamp(location: str) -> str:
    st = os.stat(location)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def is_lazy_tensor(tensor: onnx.TensorProto) -> bool:
    """Data in a file named by absolute path (a lazily loaded model) or computed on demand."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    location = external_info(tensor).get("location", "")
    return location.startswith(DEFERRED_PREFIX) or os.path.isabs(location)


def is_lazy_model(model: onnx.ModelProto) -> bool:
    return any(is_lazy_tensor(t) for t in iter_graph_tensors(model.graph))


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


class _Recent:
    """The values of the most recently computed tensors, COMPUTED_CACHE_BYTES at most, or the newest
    alone where it is larger: a computed tensor read a piece at a time (rows(), a wide slot) or
    several times in a row is computed once, not once per read (a dequantized or cast weight of a
    huge model read in 12 pieces was computed 12 times). Small, so that a pass over a whole model
    (a cast or dequantized one) does not keep a share of it: only its reader's current tensor."""

    def __init__(self) -> None:
        self._items: "OrderedDict[int, tuple[LazyTensor, np.ndarray]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, lazy: LazyTensor) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(id(lazy))
            if item is None or item[0] is not lazy:
                return None
            self._items.move_to_end(id(lazy))
            return item[1]

    def put(self, lazy: LazyTensor, array: np.ndarray) -> None:
        with self._lock:
            old = self._items.pop(id(lazy), None)
            self._bytes -= old[1].nbytes if old is not None else 0
            self._items[id(lazy)] = (lazy, array)  # the entry keeps `lazy` alive: its id is not reused
            self._bytes += array.nbytes
            while self._bytes > COMPUTED_CACHE_BYTES and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes


_recent = _Recent()


class _LastPart:
    """The part of a computed tensor computed last (LazyTensor.select), read-only, for a reader that
    asks for the same part again: the audit's precision check reads a block of the restored weight,
    then the same block of the suspect's weight for its quantization steps (the same tensor: the
    restored one is a permutation of it, read at the source's entries; a whole axis read in another
    order is kept before its gather, and the steps read it so: storage.measure_steps)."""

    def __init__(self) -> None:
        self._item: tuple[LazyTensor, list, np.ndarray] | None = None
        self._lock = threading.Lock()

    def get(self, lazy: LazyTensor, index: list) -> np.ndarray | None:
        with self._lock:
            item = self._item
        if item is None or item[0] is not lazy or len(item[1]) != len(index):
            return None
        same = all(a is b or (a is not None and b is not None and np.array_equal(a, b))
                   for a, b in zip(item[1], index))
        return item[2] if same else None

    def put(self, lazy: LazyTensor, index: list, array: np.ndarray) -> None:
        with self._lock:
            self._item = (lazy, index, array)


_last_part = _LastPart()
