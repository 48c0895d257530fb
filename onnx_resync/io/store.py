"""Weight access by tensor name: `WeightStore`.

Weights live in two places in real files: graph initializers and Constant nodes. `WeightStore` hides
the difference so the rest of the package reads and writes both the same way, inline or lazy
(lazy.py).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from . import wire
from ..errors import LoadError
from .external import SUBBYTE_BITS, TYPED_FIELDS, is_in_place
from .lazy import COPY_CHUNK_BYTES, LazyTensor, is_lazy_tensor, point_at, select


def tensor_values(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, also for a lazy tensor (mapped from its file or computed: then a
    private, writable copy)."""
    if is_lazy_tensor(tensor):
        return np.array(LazyTensor.of(tensor).read())
    return numpy_helper.to_array(tensor)


class WeightStore:
    """Read and write weights by tensor name, whether initializer or Constant-node output."""

    def __init__(self, model: onnx.ModelProto, *, cache: bool = False):
        """cache: keep what get() returns for in-memory weights (each read copies the tensor's
        bytes), for a caller that reads a model several times and never changes it elsewhere."""
        self.model = model
        self._cache: dict[str, np.ndarray] | None = {} if cache else None
        self._tensors: dict[str, onnx.TensorProto] = {}
        graphs = [model.graph]
        while graphs:  # the graph's and every subgraph's (If branches are walked: their weights move)
            graph = graphs.pop()
            for init in graph.initializer:
                self._tensors.setdefault(init.name, init)
            for node in graph.node:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                    for attr in node.attribute:
                        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                            self._tensors.setdefault(node.output[0], attr.t)
                for attr in node.attribute:
                    graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))

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
            return LazyTensor.of(tensor).read()  # read-only (memory-mapped) or computed: do not write into it
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
            return LazyTensor.of(tensor).grid(index)
        return self.get(name)[np.ix_(*index)]

    def select(self, name: str, index: list) -> np.ndarray:
        """get(name)[np.ix_(*index)], None for a whole axis; a lazy weight reads or computes only
        those entries where it can (LazyTensor.select). Read-only where it is a view."""
        tensor = self._tensors[name]
        if is_lazy_tensor(tensor):
            return LazyTensor.of(tensor).select(index)
        return select(self.get(name), index)

    def major(self, name: str) -> int:
        """The axis along which a block of the weight is cheapest to read (LazyTensor.major)."""
        tensor = self._tensors[name]
        return LazyTensor.of(tensor).major if is_lazy_tensor(tensor) else 0

    def row_blocks(self, name: str, block_bytes: int = COPY_CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The weight in consecutive blocks of whole rows (first axis) of about block_bytes: a
        deferred weight is computed a block at a time where it can be, never whole."""
        shape = self.shape(name)
        tensor = self._tensors[name]
        if not shape:
            yield self.get(name)
            return
        lazy = LazyTensor.of(tensor) if is_lazy_tensor(tensor) else None
        whole = None if lazy is not None else self.get(name)
        row_bytes = max(1, math.prod(shape[1:]) * np.dtype(self.dtype(name)).itemsize)
        step = max(1, block_bytes // row_bytes)
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            yield whole[start:stop] if whole is not None else lazy.rows(np.arange(start, stop))

    def is_lazy(self, name: str) -> bool:
        """The weight stays on disk (memory-mapped) or is computed when saved: rewrite it with set_lazy."""
        return is_lazy_tensor(self._tensors[name])

    def reader(self, name: str) -> LazyTensor:
        """A lazy weight's current data (still the same after the weight is set again): read it,
        or make a permutation of it for set_lazy (LazyTensor.permuted)."""
        return LazyTensor.of(self._tensors[name])

    def set_lazy(self, name: str, values: LazyTensor | Callable[[], np.ndarray]) -> None:
        """A lazy weight's new values: a LazyTensor (say, a permutation of reader(name)), or what
        `values()` returns (same shape and dtype); computed when read or saved, so a huge model is
        rewritten one tensor at a time, never held in memory at once."""
        if self._cache is not None:
            self._cache.pop(name, None)
        tensor = self._tensors[name]
        if not isinstance(values, LazyTensor):
            values = LazyTensor.computed(tensor, values)
        elif values.shape != self.shape(name):
            raise ValueError(f"weight {name!r}: new shape {values.shape}, expected {self.shape(name)}")
        point_at(tensor, values)

    def set(self, name: str, array: np.ndarray) -> None:
        """Replace a weight's values in place, keeping its name and dtype."""
        if self._cache is not None:
            self._cache.pop(name, None)
        old = self._tensors[name]
        array = np.ascontiguousarray(array).astype(self.dtype(name), copy=False)
        if is_lazy_tensor(old) and not is_in_place(old):  # a huge model stays lazy: held here until saved
            if array.shape != self.shape(name):
                raise ValueError(f"weight {name!r}: new shape {array.shape}, expected {self.shape(name)}")
            point_at(old, LazyTensor.computed(old, lambda: array))
            return
        typed = next((f for f in TYPED_FIELDS if len(getattr(old, f))), None)
        raw_storage = old.HasField("raw_data") or typed is None
        new = None
        if raw_storage and array.dtype.kind in "fiub" and old.data_type not in SUBBYTE_BITS:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()  # one copy (from_array: four)
        elif raw_storage:
            new = numpy_helper.from_array(array, name=old.name)
        else:  # keep the file's own storage field, so that undo restores the original bytes
            new = onnx.helper.make_tensor(old.name, old.data_type, array.shape, array.reshape(-1).tolist())
        if old.data_location == onnx.TensorProto.EXTERNAL:
            old.ClearField("external_data")
            old.ClearField("data_location")  # not DEFAULT: proto2 would serialize it, changing the bytes
        for field in TYPED_FIELDS:
            old.ClearField(field)
        if new is None:
            old.raw_data = raw
        elif new.HasField("raw_data"):
            old.raw_data = new.raw_data
        else:
            getattr(old, typed).extend(getattr(new, typed))
        del old.dims[:]
        old.dims.extend(array.shape)


def copy_without_payloads(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of the model in which the raw data of the initializers `names` is left empty, for a
    caller about to write new data into them all (a permuted copy): copying the old data first
    would copy the weights once more for nothing."""
    def copy(source: onnx.TensorProto, target: onnx.TensorProto) -> None:
        if source.name in names and source.HasField("raw_data"):
            wire.copy_fields(source, target, {"raw_data"})  # every field but its raw data
        else:
            target.CopyFrom(source)

    return copy_model(model, copy)


def copy_model(model: onnx.ModelProto, copy_initializer) -> onnx.ModelProto:
    """A copy of the model, its graph's initializers copied by copy_initializer(source, target)."""
    out = wire.copy_fields(model, onnx.ModelProto(), {"graph"})
    wire.copy_fields(model.graph, out.graph, {"initializer"})
    for t in model.graph.initializer:
        copy_initializer(t, out.graph.initializer.add())
    return out
