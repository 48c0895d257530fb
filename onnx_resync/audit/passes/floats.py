"""Float types: every float tensor is float32.

Canonical form: fp16, bf16, fp64 (and float8) weights are cast to float32, Cast nodes to another
float type cast to float32, ConstantOfShape fills in float32 (canonical.py declares the graph's
float inputs and outputs float32). A model stored in half precision and its float32 original then
have the same graph and weights within the storage's step (the origin keeps the stored type). The
graph still computes what the file computes, in higher precision.

A weight of a huge model (a lazy tensor: mapped from its file) is cast *lazily*: its canonical
value is a computed lazy tensor (`lazy_weight`), computed from the mapping each time it is read and
never held, so the canonical form of a 1 GiB fp16 file does not cost 2 GiB of float32 copies.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..rewrite import STANDARD, Workspace, attr, set_attr
from ...io import is_lazy_tensor, tensor_values
from ...io.lazy import LazyTensor, point_at
from ...walk import registry
from ...walk.graph import subgraphs

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_TYPE_OF = {"bool": TensorProto.BOOL, "int64": TensorProto.INT64}


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16" or dtype.name.startswith("float8")


def lazy_weight(name: str, shape: tuple[int, ...], compute: Callable[[], np.ndarray],
                part: Callable[[list], np.ndarray] | None = None, major: int = 0) -> onnx.TensorProto:
    """A float32 weight computed by `compute()` each time it is read (a computed lazy tensor): what
    a pass makes of a lazy (mapped) weight, so that the canonical form of a huge model holds no copy.
    `part(index)`: the values at `index` alone (LazyTensor.select), where they can be computed so;
    `major`: the axis along which such parts are cheapest (LazyTensor.major)."""
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(int(d) for d in shape)
    point_at(t, LazyTensor.computed(t, lambda: np.asarray(compute(), dtype=np.float32),
                                    None if part is None else lambda index: np.asarray(part(index), dtype=np.float32),
                                    major))
    return t


def stored(value) -> np.ndarray:
    """A workspace constant's values: an array, or a lazy tensor read now (mapped: not copied)."""
    if isinstance(value, onnx.TensorProto):
        return LazyTensor.of(value).read() if is_lazy_tensor(value) else tensor_values(value)
    return value


def to_float32(ws: Workspace) -> bool:
    changed = False
    for name in list(ws.constants):
        dtype = ws.dtype(name)
        if is_float(dtype) and dtype != np.float32:
            value = ws.constants[name]
            if isinstance(value, onnx.TensorProto) and is_lazy_tensor(value):
                source = LazyTensor.of(value)
                ws.set_constant(name, lazy_weight(name, source.shape, lambda s=source: s.read().astype(np.float32),
                                                  lambda index, s=source: s.select(index).astype(np.float32),
                                                  source.major))
            else:
                ws.set_constant(name, ws.const(name).astype(np.float32))
            ws.origins[name].steps.append(f"cast {dtype} -> float32")
            ws.record(f"{dtype} weight cast to float32")
            changed = True
    lower = FLOAT_TYPES - {TensorProto.FLOAT}
    for node in ws.nodes:
        if node.op_type == "Cast" and attr(node, "to", None) in lower:
            set_attr(node, "to", TensorProto.FLOAT)
            changed = True
        if node.op_type == "ConstantOfShape":
            value = attr(node, "value", None)
            if value is not None and value.data_type in lower:
                set_attr(node, "value", numpy_helper.from_array(tensor_values(value).astype(np.float32), value.name))
                changed = True
    return changed


def tensor_types(ws: Workspace) -> dict[str, int | None]:
    """Element type of every tensor, as far as simple rules tell (None: unknown); float types read
    as float32 (the canonical form's)."""
    g = ws.graph
    types: dict[str, int | None] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        if t:
            types[vi.name] = TensorProto.FLOAT if t in FLOAT_TYPES else t
    for name in ws.constants:
        try:
            types[name] = helper.np_dtype_to_tensor_dtype(ws.dtype(name))
        except Exception:
            types[name] = None
    for node in ws.nodes:
        first = next((types.get(i) for i in node.input if i and types.get(i)), None)
        op = node.op_type
        spec = registry.lookup(op, node.domain) if node.domain in STANDARD else None
        if op == "Cast":
            out = [attr(node, "to", None)]
        elif op == "CastLike":
            out = [types.get(node.input[1])]
        elif spec is not None and spec.output_type:
            out = [_TYPE_OF[spec.output_type]]
        elif op == "DequantizeLinear":
            out = [TensorProto.FLOAT]
        elif op in ("QuantizeLinear", "DynamicQuantizeLinear"):
            zp = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else TensorProto.UINT8
            out = [zp, TensorProto.FLOAT, TensorProto.UINT8] if op == "DynamicQuantizeLinear" else [zp]
        elif op == "ConstantOfShape":
            value = attr(node, "value", None)
            out = [value.data_type if value is not None else TensorProto.FLOAT]
        elif op == "Where":
            out = [types.get(node.input[1])]
        elif op in ("TopK", "MaxPool"):
            out = [first, TensorProto.INT64]
        elif node.domain not in STANDARD or any(True for _ in subgraphs(node)):
            out = [None] * len(node.output)
        else:
            out = [first] * len(node.output)
        for name, t in zip(node.output, out + [None] * len(node.output)):
            if name and name not in types:
                types[name] = t
    return types
