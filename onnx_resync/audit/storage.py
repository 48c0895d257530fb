"""What a file's own storage explains: for every canonical weight, how far it may lie from the float
weight it was made from, and in words how it is stored ("int8 per channel", "float16").

- **Integer storage** (int8, uint8, int4, uint4, int32 biases; per tensor, per channel, in blocks;
  behind DequantizeLinear, QLinear*, QGemm, ConvInteger/MatMulInteger, DynamicQuantize*,
  MatMulNBits): half a quantization step, from the file's own scales. The step is measured, not
  modelled: the stored integers are moved by one (their lowest bit flipped; every packed value of a
  sub-byte tensor) and the file is canonicalized again. Canonicalization is linear in each stored
  integer tensor (dequantize, transpose, fold a per-channel factor), so the change of a canonical
  weight is one step of its storage in the canonical layout, however the passes moved it. Integer
  tensors that one canonical weight reads together (a conv weight and a quantized BatchNorm scale
  folded into it) are moved in different probes and their half steps add; one more probe moves them
  all, and what it changes beyond the sum is the product of two roundings (a quarter of it is
  added). Zero points are never moved: ONNX's (and ONNX Runtime's) op schemas name them. A stored
  integer at an end of its range may have been clipped (symmetric int4: +8 stored as +7): one more
  probe moves only those, and their elements are allowed a whole step.
- **Float storage**: the type's rounding relative to the value (float16 2^-11, bfloat16 2^-8,
  float8), float16's subnormal step, and the clamp of fp16 converters (onnxconverter-common's
  defaults): |w| < 1e-7 stored as +-1e-7 (1.19e-7 in float16) or 0, |w| > 1e4 clipped to 1e4.

`measure_steps` does the first for a model and its canonical form; `allowed` turns both into one
bound per element, given the origins of the two weights compared. A step is computed when asked for
(`LazyMap`: the probes' canonical forms are kept, lazy where the file is), one weight at a time, so
that a huge int4 file's steps never cost a float copy of the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import onnx
from onnx import helper

from ..io import WeightStore, copy_without_payloads, tensor_values
from .rewrite import STANDARD, WeightOrigin

# relative rounding of a value stored in this type (round to nearest), against its float32 form
STORAGE_ROUNDING = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -24,
                    "float8_e4m3fn": 2.0 ** -4, "float8_e4m3fnuz": 2.0 ** -4, "float8_e5m2": 2.0 ** -3,
                    "float8_e5m2fnuz": 2.0 ** -3}
FP16_SUBNORMAL_HALF_STEP = 2.0 ** -25
FP16_CLAMP_MIN = 1e-7  # fp16 converters write 0 < |w| < this as +-this (or 0) ...
FP16_CLAMP_STORED = 2.0 ** -23  # ... which float16 stores as 1.19e-7
FP16_CLAMP_MAX = 1e4  # ... and clip |w| above this to it
COMPUTED_ABS = 1e-5  # x max|w|: rounding of folded / computed weights (BatchNorm folded on one side only)
COMPUTED_REL = 2.0 ** -21
# half a step, and a little for the float rounding of scale products (round(w / scale) in float32)
HALF_STEP = 0.5 * (1 + 2.0 ** -10)
ZERO_POINT = "zero_point"  # what an op schema's input name says of a zero point


@dataclass
class Steps:
    """One quantization step per element of each canonical weight that integer storage explains."""

    # canonical weight -> step (its layout); measured: a LazyMap, each computed when asked for
    steps: Mapping[str, np.ndarray] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # canonical weight -> "int8 per channel", ...
    probes: int = 0  # canonicalizations run to measure them
    failed: str = ""  # why no step could be measured (a probe that changed the canonical structure)


def storage_dtype(origin: WeightOrigin | None) -> str:
    return origin.dtype if origin is not None and origin.sources else "float32"


def float_format(dtype: str) -> str:
    return dtype if dtype in STORAGE_ROUNDING else "float32"


def measure_steps(model: onnx.ModelProto, canon, names, canonicalize) -> Steps:
    """Steps of the canonical weights `names` of `canon` (the canonical form of `model`) that come from
    stored integer tensors; `canonicalize(model)` is the canonical form as the caller makes it."""
    origins = {n: canon.origins[n] for n in names if n in canon.origins and canon.origins[n].quantized}
    out = Steps()
    if not origins:
        return out
    stored = _stored(model)
    readers = _readers(model)
    data: dict[str, list[str]] = {}
    described: dict[str, str] = {}
    for n, o in origins.items():
        data[n] = []
        for src in o.sources:
            t = stored.get(src)
            if t is None or t.data_type not in _INTEGER or _is_zero_point(src, readers, model):
                continue
            data[n].append(src)
            if src not in described:
                described[src] = _describe(src, t, readers, stored)
    colour = _colours(data, stored)
    if not colour:
        return out
    base = WeightStore(canon.model)
    n_colours = max(colour.values()) + 1
    probes = [[s for s, c in colour.items() if c == k] for k in range(n_colours)]
    if n_colours > 1:
        probes.append(list(colour))  # all at once: the products of two roundings
    moved_stores = []
    for flips in probes:
        probe = copy_without_payloads(model, set(flips))
        store = WeightStore(probe)
        for s in flips:
            store.set(s, _moved_by_one(tensor_values(stored[s]), _bits(s, readers)))
        try:
            canon2 = canonicalize(probe)
        except Exception as exc:  # noqa: BLE001 - a probe that fails measures nothing
            out.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            return Steps(failed=out.failed, probes=len(moved_stores) + 1)
        moved = WeightStore(canon2.model)
        for n in origins:
            if n not in moved or moved.shape(n) != base.shape(n):
                return Steps(failed=f"moving the stored integers changed the canonical form ({n!r})",
                             probes=len(moved_stores) + 1)
        moved_stores.append(moved)
    # Stored integers at an end of their range may have been clipped there: a symmetric quantizer that
    # maps the block's largest magnitude to -8 clips the other sign's +8 to +7 (MatMulNBits' default),
    # one step off, not half. One more probe moves only those: their elements get a step more.
    edges = None
    moved_edges = {s: _edges_moved(tensor_values(stored[s]), _bits(s, readers)) for s in colour}
    moved_edges = {s: v for s, v in moved_edges.items() if v is not None}
    if moved_edges:
        probe = copy_without_payloads(model, set(moved_edges))
        store = WeightStore(probe)
        for s, v in moved_edges.items():
            store.set(s, v)
        try:
            canon2 = canonicalize(probe)
            edges = WeightStore(canon2.model)
            if any(n not in edges or edges.shape(n) != base.shape(n) for n in origins):
                edges = None
        except Exception:  # noqa: BLE001 - no edge probe: half a step everywhere, as before
            edges = None
    out.probes = len(moved_stores) + (edges is not None)

    def step(n: str) -> np.ndarray:
        b = np.asarray(base.get(n), dtype=np.float32)
        deltas = [np.asarray(m.get(n), dtype=np.float32) - b for m in moved_stores]
        singles = deltas[:n_colours]
        total = np.abs(singles[0])
        for d in singles[1:]:
            total += np.abs(d)
        if n_colours > 1:  # a quarter of the product of two roundings, in units of a half step
            total += 0.5 * np.abs(deltas[-1] - np.sum(singles, axis=0))
        if edges is not None:
            total += np.abs(np.asarray(edges.get(n), dtype=np.float32) - b)
        return total

    measured = [n for n in origins if data[n]]
    out.steps = LazyMap(measured, step)
    for n in measured:
        kinds = [described[s] for s in data[n]]
        if any("{granularity}" in k for k in kinds):
            st = out.steps[n]
            fallback = "per tensor" if np.ptp(st) <= 1e-3 * max(float(st.max()), 1e-30) else "per channel"
            kinds = [k.replace("{granularity}", fallback) for k in kinds]
        out.formats[n] = ", ".join(dict.fromkeys(kinds))
    return out


class LazyMap(Mapping):
    """name -> array, computed when asked for (the last one kept): the steps of a huge model's
    weights are never all held at once."""

    def __init__(self, names, compute):
        self._names, self._compute = list(dict.fromkeys(names)), compute
        self._known = set(self._names)
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        if self._last is None or self._last[0] != name:
            self._last = (name, self._compute(name))
        return self._last[1]

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def allowed(r: np.ndarray, so: WeightOrigin | None, ro: WeightOrigin | None,
            step_s: np.ndarray | None, step_r: np.ndarray | None, scale: float | None = None) -> np.ndarray:
    """Per element, how far the suspect's weight may lie from the reference's `r` by the two files'
    storage alone (steps: measured quantization steps in r's layout, or None). `r` may be a piece of
    the weight: `scale` is then the whole weight's max |r|."""
    a = np.abs(r)
    if scale is None:
        scale = float(a.max()) if a.size else 0.0
    dtype, ref_dtype = storage_dtype(so), storage_dtype(ro)
    eps = STORAGE_ROUNDING.get(dtype, 2.0 ** -24) + STORAGE_ROUNDING.get(ref_dtype, 2.0 ** -24)
    out = 1.01 * eps * a
    for d in {dtype, ref_dtype}:
        if d == "float16":
            out = out + FP16_SUBNORMAL_HALF_STEP
            out = out + np.where(a < FP16_CLAMP_MIN, FP16_CLAMP_STORED, 0.0) + np.maximum(a - FP16_CLAMP_MAX, 0.0)
    if (so is not None and so.computed) or (ro is not None and ro.computed):
        out = out + COMPUTED_REL * a + COMPUTED_ABS * scale
        if so is not None and so.computed and eps > 2 * STORAGE_ROUNDING["float32"]:
            # folded from several low-precision tensors (BatchNorm of an fp16 model): each
            # rounding counts, and a bias is a difference of larger terms
            out = out + len(so.sources) * eps * (a + scale)
    for step in (step_s, step_r):
        if step is not None:
            out = out + HALF_STEP * step
    return out


# ---- internals -------------------------------------------------------------------------------
_INTEGER = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
            onnx.TensorProto.INT32, onnx.TensorProto.UINT32} | {
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


def _stored(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    return out


def _readers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((node, i))
    return out


def _opset(model: onnx.ModelProto, domain: str) -> int:
    domain = "" if domain in STANDARD else domain
    return next((o.version for o in model.opset_import if (o.domain or "") == domain), 1)


@lru_cache(maxsize=None)
def _formal_inputs(op: str, domain: str, opset: int) -> tuple[str, ...]:
    """The op's input names as its schema gives them (ONNX's; ONNX Runtime's for its own domains)."""
    domain = "" if domain in STANDARD else domain
    try:
        return tuple(i.name for i in onnx.defs.get_schema(op, opset, domain).inputs)
    except Exception:  # noqa: BLE001 - not an ONNX op
        pass
    return _runtime_schemas().get((domain, op), ())


@lru_cache(maxsize=1)
def _runtime_schemas() -> dict[tuple[str, str], tuple[str, ...]]:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except Exception:  # noqa: BLE001 - no ONNX Runtime: contrib ops' zero points are not recognized
        return {}
    out, since = {}, {}
    for s in C.get_all_operator_schema():
        key = (s.domain, s.name)
        if s.since_version >= since.get(key, -1):
            since[key] = s.since_version
            out[key] = tuple(i.name for i in s.inputs)
    return out


def _formal(node: onnx.NodeProto, index: int, model: onnx.ModelProto) -> str:
    names = _formal_inputs(node.op_type, node.domain, _opset(model, node.domain))
    if not names:
        return ""
    return names[min(index, len(names) - 1)]  # a variadic last input repeats its name


def _is_zero_point(name: str, readers, model: onnx.ModelProto) -> bool:
    return any(ZERO_POINT in _formal(node, i, model).lower() for node, i in readers.get(name, []))


def _bits(name: str, readers) -> int | None:
    """Bits per value of a tensor that packs several into a byte (MatMulNBits: the reader's `bits`)."""
    for node, _ in readers.get(name, []):
        for a in node.attribute:
            if a.name == "bits" and a.type == onnx.AttributeProto.INT and 0 < a.i < 8:
                return int(a.i)
    return None


def _moved_by_one(values: np.ndarray, bits: int | None) -> np.ndarray:
    """Every stored integer moved by one (its lowest bit flipped: never out of range); `bits`: values
    packed several to a byte."""
    if values.dtype.kind in "iu":
        mask = sum(1 << (k * bits) for k in range(8 // bits)) if bits and values.dtype.itemsize == 1 else 1
        return values ^ np.asarray(mask, dtype=values.dtype)
    wide = values.astype(np.int16)  # int4 / uint4 (ml_dtypes): flip as integers, store back
    return (wide ^ 1).astype(values.dtype)


_SUBBYTE_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def _edges_moved(values: np.ndarray, bits: int | None) -> np.ndarray | None:
    """The stored integers at an end of their range moved by one (lowest bit flipped), the others
    kept; None when there are none. Packed values (`bits`) are unsigned codes."""
    if values.dtype.kind in "iu" and bits and values.dtype.itemsize == 1:
        v = values.view(np.uint8)
        top, flip = (1 << bits) - 1, np.zeros_like(v)
        for k in range(8 // bits):
            code = (v >> (k * bits)) & top
            flip |= (((code == 0) | (code == top)).astype(np.uint8) << (k * bits))
        return (v ^ flip).view(values.dtype) if flip.any() else None
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        edge = (values == info.min) | (values == info.max)
        return values ^ edge.astype(values.dtype) if edge.any() else None
    low_high = _SUBBYTE_RANGES.get(values.dtype.name)
    if low_high is None:
        return None
    wide = values.astype(np.int16)
    edge = (wide == low_high[0]) | (wide == low_high[1])
    return (wide ^ edge.astype(np.int16)).astype(values.dtype) if edge.any() else None


def _describe(name: str, tensor: onnx.TensorProto, readers, stored) -> str:
    """'int8 per channel', 'int4 in blocks of 32', 'int32 {granularity}' (filled in from the steps)."""
    type_name = helper.tensor_dtype_to_string(tensor.data_type).split(".")[-1].lower()
    bits = _bits(name, readers)
    if bits:
        type_name = f"int{bits}"
    granularity = "{granularity}"
    for node, index in readers.get(name, []):
        block = next((int(a.i) for a in node.attribute if a.name == "block_size"), 0)
        if block > 0:
            granularity = f"in blocks of {block}"
            break
        scale = _scale_input(node, index)
        if scale and scale in stored:
            size = int(np.prod(stored[scale].dims)) if stored[scale].dims else 1
            granularity = "per tensor" if size == 1 else "per channel"
            break
    return f"{type_name} {granularity}"


def _scale_input(node: onnx.NodeProto, index: int) -> str:
    """The input that holds the scale of input `index` (by the schema's names: w -> w_scale)."""
    names = _formal_inputs(node.op_type, node.domain, 10 ** 6)
    if not names or index >= len(names):
        return ""
    me = names[index].lower()
    scales = [k for k, n in enumerate(names) if "scale" in n.lower() and k < len(node.input)]
    mine = [k for k in scales if names[k].lower().startswith(me + "_")]
    pick = mine or (scales if len(scales) == 1 else [])
    return node.input[pick[0]] if pick else ""


def _colours(data: dict[str, list[str]], stored) -> dict[str, int]:
    """A probe number per stored integer tensor, different for tensors that one weight reads together."""
    together: dict[str, set[str]] = {}
    for sources in data.values():
        for s in sources:
            together.setdefault(s, set()).update(t for t in sources if t != s)
    size = {s: int(np.prod(stored[s].dims)) if stored[s].dims else 1 for s in together}
    colour: dict[str, int] = {}
    for s in sorted(together, key=lambda x: (-size[x], x)):
        used = {colour[t] for t in together[s] if t in colour}
        colour[s] = next(k for k in range(len(used) + 1) if k not in used)
    return colour
