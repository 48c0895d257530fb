"""Where a tensor's data lives and how long it is: external-data entries, their checks, data lengths.

Every TensorProto that may carry weight data (graph initializers, Constant-node tensors, subgraphs)
is found by iter_graph_tensors. A tensor's data is inline (raw_data or a typed field) or EXTERNAL:
its external_data entries (key -> value) name a location, an offset and a length.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import onnx

from ..errors import LoadError

# protobuf cannot serialize a message past 2 GiB; leave headroom for the graph itself.
INLINE_LIMIT_BYTES = 2**31 - 2**26
# A lazy tensor whose data was inline in its model file carries this key in its external_data
# entries (never written to a file): it is written inline again (see load.py, in place).
IN_PLACE_KEY = "onnx-resync:in-place"
# Keys with this prefix are ours (IN_PLACE_KEY, lazy.STAMP_KEY), never read from a file.
PRIVATE_KEY_PREFIX = "onnx-resync:"
# Subgraphs (If branches, Loop and Scan bodies, any GRAPH/GRAPHS attribute) per model, and how deep
# they nest: past these a model is refused in one line before anything walks it (65,536 tiny If
# nodes in a 16 MB file took `permute` past 60 s and 5.3 GB; refused now in about 3 s; protobuf's
# own parser stops nesting at about 33 subgraph levels).
MAX_SUBGRAPHS = 4096
MAX_SUBGRAPH_DEPTH = 32

TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")

FIXED_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16,
}
FIXED_ITEMSIZE.update({getattr(onnx.TensorProto, n): 1 for n in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0") if hasattr(onnx.TensorProto, n)})
# packed types: bits per element
SUBBYTE_BITS = {getattr(onnx.TensorProto, n): b for n, b in (
    ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6),
    ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, n)}
# typed storage field and values per element, where the count is simple
_TYPED_COUNT = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}
_TYPED_COUNT.update({t: ("int32_data", 1) for t, size in FIXED_ITEMSIZE.items()
                     if t not in _TYPED_COUNT and size <= 4 and t != onnx.TensorProto.UINT32})


def iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that may carry weight data, subgraphs included (a sparse tensor's values
    and indices too: either may be external data, read from the model's folder like any other)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graph_tensors(g)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def check_graph_limits(model: onnx.ModelProto, where: str | os.PathLike = "model") -> None:
    """Refuse a model with more than MAX_SUBGRAPHS subgraphs or subgraphs nested deeper than
    MAX_SUBGRAPH_DEPTH (one LoadError line); a loop over the nodes, no recursion."""
    count = 0
    stack = [(model.graph, 0)]
    while stack:
        graph, depth = stack.pop()
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    subgraphs = [attr.g]
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    subgraphs = list(attr.graphs)
                else:
                    continue
                if subgraphs and depth + 1 > MAX_SUBGRAPH_DEPTH:
                    raise LoadError(f"{where}: subgraphs nested too deep (more than {MAX_SUBGRAPH_DEPTH} levels); "
                                    "refused")
                count += len(subgraphs)
                stack.extend((g, depth + 1) for g in subgraphs)
    if count > MAX_SUBGRAPHS:
        raise LoadError(f"{where}: too many subgraphs ({count} > {MAX_SUBGRAPHS}); refused")


def set_inline(tensor: onnx.TensorProto, raw: bytes, had_location: bool) -> None:
    """Give `tensor` its bytes inline again (undoing a save's move to external data)."""
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    if had_location:  # proto2: an explicitly set default is serialized, an unset one is not
        tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


def set_external(tensor: onnx.TensorProto, info: dict[str, str]) -> None:
    """Point the tensor's data at `info` (its external_data entries, in this order)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def is_in_place(tensor: onnx.TensorProto) -> bool:
    """A lazy tensor whose data was inline in its model file (and is written inline again)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == IN_PLACE_KEY for e in tensor.external_data)


def in_file_data(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors whose data is in an external-data file (not yet read, nor mapped in place)."""
    for tensor in iter_graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not is_in_place(tensor):
            yield tensor


def expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's data must have; None where not simple (strings, unknown types)."""
    count = math.prod(int(d) for d in tensor.dims)  # Python ints: huge dims cannot wrap around
    if tensor.data_type in SUBBYTE_BITS:
        return (count * SUBBYTE_BITS[tensor.data_type] + 7) // 8
    itemsize = FIXED_ITEMSIZE.get(tensor.data_type)
    if itemsize is None:
        return None
    return count * itemsize


def data_length(tensor: onnx.TensorProto, info: dict[str, str]) -> int | None:
    """Bytes of an external (or lazy) tensor's data: its declared length, else what its dims say."""
    return int(info["length"]) if info.get("length", "").isdigit() else expected_nbytes(tensor)


def external_nbytes(model: onnx.ModelProto) -> int:
    return sum(data_length(t, external_info(t)) or 0 for t in in_file_data(model))


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that points outside the model's folder or is missing/short."""
    root = base_dir.resolve()
    for tensor in iter_graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        keys = [e.key for e in tensor.external_data]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:  # onnx reads the last one, another reader the first: ambiguous
            raise LoadError(f"tensor {tensor.name!r}: external data has {keys.count(twice)} {twice!r} entries; "
                            "refused (ambiguous)")
        private = next((k for k in keys if k.startswith(PRIVATE_KEY_PREFIX)), None)
        if private is not None:
            raise LoadError(f"tensor {tensor.name!r}: external data key {private!r} is reserved; refused")
        info = external_info(tensor)
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
            if not target.exists():
                raise LoadError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
            if not target.is_file():  # a FIFO would block, a device be read until memory runs out
                raise LoadError(f"tensor {tensor.name!r}: external data file {location!r} is not a regular file; "
                                "refused")
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
            length = expected_nbytes(tensor)
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise LoadError(f"tensor {tensor.name!r}: external data file {location!r} is too short")


def _tensor_problem(tensor: onnx.TensorProto) -> str | None:
    """Why a tensor's declared dims and type disagree with its data (None: they agree)."""
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        return f"has a negative dimension {dims}"
    if tensor.data_type not in onnx.TensorProto.DataType.values() or tensor.data_type == onnx.TensorProto.UNDEFINED:
        return f"has an unknown data type ({tensor.data_type})"
    expected = expected_nbytes(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        length = external_info(tensor).get("length")
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
    (huge declared dims with little data, shapes that disagree with the data, unknown types), and
    models past the subgraph limits (check_graph_limits)."""
    check_graph_limits(model, where)
    for tensor in iter_graph_tensors(model.graph):
        problem = _tensor_problem(tensor)
        if problem:
            raise LoadError(f"{where}: tensor {tensor.name!r} {problem}")


def over_inline_limit(model: onnx.ModelProto) -> bool:
    """Would the model serialize past protobuf's limit? ByteSize() walks the whole message (0.4 s
    for 100 MB); the tensor payloads decide it unless they come within 256 MiB of the limit."""
    payload = 0
    for t in iter_graph_tensors(model.graph):
        if is_in_place(t):
            payload += expected_nbytes(t) or 0
        payload += len(t.raw_data) + 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data)
                                          + len(t.double_data) + len(t.uint64_data))
        payload += sum(len(b) for b in t.string_data)
    if payload < INLINE_LIMIT_BYTES - (256 << 20):
        return False
    return model.ByteSize() >= INLINE_LIMIT_BYTES
