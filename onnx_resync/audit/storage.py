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
  float8), float16's subnormal step, and the clamp of fp16 converters: onnxconverter-common's
  defaults (0 < |w| < 1e-7 stored as +-1e-7, 1.19e-7 in float16; |w| > 1e4 clipped to 1e4) and ONNX
  Runtime's (5.96e-8, the smallest subnormal; 65504, the largest float16).
- **Computed from stored tensors** (a BatchNorm folded into its conv, a per-channel Mul/Div folded,
  a weight dequantized with a float16 scale): the bound is propagated from each stored operand's
  storage, never taken from the result's. Measured like an integer step: each low-precision float
  operand is moved by one unit in its last place (towards zero; a zero to the smallest subnormal)
  and the file canonicalized again, so 1/sqrt(var + eps) of a rounded variance counts as much as it
  moves the folded weight. A float16 value at a converter's clamp explains more than its rounding:
  one more probe moves those to what they may have been (+-1.19e-7 and +-5.96e-8 to 0, +-1e4 and
  +-65504 to +-inf: any larger original) and their elements are allowed that whole change (inf
  where a clipped operand leaves the weight unbounded: an unknown variance folds into any scale).

Where a canonical weight is provably the plain dequantization of stored codes, in the canonical form
and in every probe's (a lazy MatMulNBits weight that no other pass rewrote: io.lazy's
LazyTensor.codes, `_derived`), the probes' changes are computed from the codes themselves, by the
same float operations: the same steps, from one dequantization of the moved codes instead of one
per probe.

`measure_steps` does the first and the third for a model and its canonical form; `allowed` turns all
into one bound per element, given the origins of the two weights compared. A step is computed when
asked for (`LazyMap`: the probes' canonical forms are kept, lazy where the file is), one weight at a
time and a block of rows at a time, so that a huge int4 file's steps never cost more than two float
copies of its largest weight besides the one being read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import onnx
from onnx import helper

from ..io import WeightStore, copy_without_payloads, tensor_values
from ..io.lazy import select, split_whole
from .rewrite import STANDARD, WeightOrigin

# relative rounding of a value stored in this type (round to nearest), against its float32 form
STORAGE_ROUNDING = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -24,
                    "float8_e4m3fn": 2.0 ** -4, "float8_e4m3fnuz": 2.0 ** -4, "float8_e5m2": 2.0 ** -3,
                    "float8_e5m2fnuz": 2.0 ** -3}
FP16_SUBNORMAL_HALF_STEP = 2.0 ** -25
FP16_CLAMP_MIN = 1e-7  # fp16 converters write 0 < |w| < this as +-this (or 0) ...
FP16_CLAMP_STORED = 2.0 ** -23  # ... which float16 stores as 1.19e-7
FP16_CLAMP_MAX = 1e4  # ... and clip |w| above this to it
# float16 values a converter writes for any original below / above them (onnxconverter-common's and
# ONNX Runtime's min_positive_val and max_finite_val, as float16 stores them)
FP16_CLAMPED_LOW = (2.0 ** -23, 2.0 ** -24)
FP16_CLAMPED_HIGH = (1e4, 65504.0)
# elements of a weight's step computed together: a row block of a huge weight, never its float copies
STEP_BLOCK_ELEMENTS = 1 << 22
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
    # stored tensor -> (values, the value) at a float16 converter's upper clip that measured weights
    # read: their originals may have been any larger value, and the steps allow it
    clipped: dict[str, tuple[int, float]] = field(default_factory=dict)


def storage_dtype(origin: WeightOrigin | None) -> str:
    return origin.dtype if origin is not None and origin.sources else "float32"


def float_format(dtype: str) -> str:
    return dtype if dtype in STORAGE_ROUNDING else "float32"


def measure_steps(model: onnx.ModelProto, canon, names, canonicalize, floats: bool = True) -> Steps:
    """Steps of the canonical weights `names` of `canon` (the canonical form of `model`) that come from
    stored integer tensors or are computed from low-precision float ones; `canonicalize(model)` is the
    canonical form as the caller makes it. Where a float operand's probe fails (a pass that reads a
    constant's value, one ulp off, differently), the integer steps are measured alone (`floats`
    False: such weights keep allowed()'s estimate)."""
    stored = _stored(model)
    origins = {n: canon.origins[n] for n in names
               if n in canon.origins and _measured(canon.origins[n], stored, floats)}
    out = Steps()
    if not origins:
        return out
    readers = _readers(model)
    producers = {o: node for node in model.graph.node for o in node.output if o}
    data: dict[str, list[str]] = {}
    described: dict[str, str] = {}
    for n, o in origins.items():
        data[n] = []
        for src in o.sources:
            t = stored.get(src)
            if t is None:
                continue
            if t.data_type in _LOW_FLOAT:  # an operand of a computed weight: its rounding propagates
                if floats:
                    data[n].append(src)
                continue
            if t.data_type not in _INTEGER or _is_zero_point(src, readers, model):
                continue
            data[n].append(src)
            if src not in described:
                described[src] = _describe(src, t, readers, stored, producers)
    colour = _colours(data, stored)
    if not colour:
        return out
    base = WeightStore(canon.model)
    n_colours = max(colour.values()) + 1
    probes = [[s for s, c in colour.items() if c == k] for k in range(n_colours)]
    integer_colours = {c for t, c in colour.items() if stored[t].data_type in _INTEGER}
    cross = len(integer_colours) > 1  # products of two float roundings are below float32's: not probed
    if cross:
        probes.append(list(colour))  # all at once: the products of two roundings
    moved_stores = []
    for flips in probes:
        failed = ""
        try:
            canon2 = canonicalize(_probe(model, stored, {s: _moved(stored[s], _bits(s, readers)) for s in flips}))
        except Exception as exc:  # noqa: BLE001 - a probe that fails measures nothing
            failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        else:
            moved = WeightStore(canon2.model)
            changed = next((n for n in origins if n not in moved or moved.shape(n) != base.shape(n)), None)
            if changed is not None:
                failed = f"moving the stored values changed the canonical form ({changed!r})"
        if failed:
            if floats and any(stored[s].data_type in _LOW_FLOAT for s in colour):
                return measure_steps(model, canon, names, canonicalize, floats=False)
            return Steps(failed=failed, probes=len(moved_stores) + 1)
        moved_stores.append(moved)
    # Stored integers at an end of their range may have been clipped there: a symmetric quantizer that
    # maps the block's largest magnitude to -8 clips the other sign's +8 to +7 (MatMulNBits' default),
    # one step off, not half. One more probe moves only those: their elements get a step more.
    edges = _extra_probe(model, stored, canonicalize, base, origins,
                         {s: _edges_moved(tensor_values(stored[s]), _bits(s, readers))
                          for s in colour if stored[s].data_type in _INTEGER})
    # float16 values at a converter's clamp: moved to what they may have been, the whole change allowed
    clamps = _extra_probe(model, stored, canonicalize, base, origins,
                          {s: _clamps_moved(tensor_values(stored[s])) for s in colour
                           if stored[s].data_type == onnx.TensorProto.FLOAT16})
    out.probes = len(moved_stores) + (edges is not None) + (clamps is not None)
    if clamps is not None:
        for t in colour:
            if stored[t].data_type == onnx.TensorProto.FLOAT16:
                a = np.abs(tensor_values(stored[t]).astype(np.float64))
                high = np.isin(a, FP16_CLAMPED_HIGH)
                if high.any():
                    out.clipped[t] = (int(high.sum()), float(a[high].max()))

    derived = {n: c for n in origins if (c := _derived(n, data[n], base, [*moved_stores, edges, clamps],
                                                        colour, stored, readers)) is not None}

    def step(n: str, singles_only: bool = False, index: list | None = None) -> np.ndarray:
        """Summed a store at a time (a computed weight is produced whole, once), a block of rows at a
        time: never a float copy per probe. `singles_only`: the single-step probes alone (one step of
        each stored tensor, nothing for the ends of the range or a clamp): what the granularity of
        the storage is read from. `index`: the steps at those entries alone (WeightStore.select),
        each store read there only (a dequantized or cast weight computes those entries alone)."""
        # an axis read whole in another order (a permutation of a restored weight) beside a part of
        # another: each store read in its own order and the sum gathered once (elementwise: the same
        # values); the base's part is then the one its reader computed before its gather (LazyTensor.select)
        gather = [None] * len(base.shape(n))
        if index is not None:
            index = list(index) + [None] * (len(gather) - len(index))
            split = split_whole(index, base.shape(n))
            if split is not None:
                index, gather = split
        read = (lambda store: store.get(n)) if index is None else (lambda store: store.select(n, index))
        b = np.asarray(read(base), dtype=np.float32)
        shape = b.shape
        b = b.reshape(b.shape[0] if b.ndim else 1, -1)
        total = np.zeros_like(b)
        signed = np.zeros_like(b) if cross else None  # the sum of the singles' changes
        rows = max(1, STEP_BLOCK_ELEMENTS // max(b.shape[1], 1))
        added = []  # stores added: the first one's changes are written into `total` (0 + d is d)
        if n in derived:  # the probes' changes from the codes (_derived): one more dequantization, not two
            moved, edge = (x.reshape(b.shape) for x in derived[n].flipped(index or [None] * len(shape)))
            for a in range(0, b.shape[0], rows):
                block = slice(a, a + rows)
                with np.errstate(invalid="ignore", over="ignore"):
                    d = np.subtract(moved[block], b[block], dtype=np.float32, out=total[block])
                    np.abs(d, out=d)
                if not d.max(initial=0.0) < np.inf:
                    d[~np.isfinite(d)] = np.inf
                if edges is not None and not singles_only:  # the ends' probe moved them alike: d + d
                    np.add(d, d, out=d, where=edge[block])
            return select(total.reshape(shape), gather)

        def add(store: WeightStore, weight: float, single: bool = False, beyond_sum: bool = False) -> None:
            m = np.asarray(read(store)).reshape(b.shape)
            for a in range(0, b.shape[0], rows):
                block = slice(a, a + rows)
                with np.errstate(invalid="ignore", over="ignore"):
                    d = np.subtract(m[block], b[block], dtype=np.float32, out=None if added else total[block])
                    if single and signed is not None:
                        signed[block] += d
                    if beyond_sum:  # what moving them all changed beyond the sum of the singles
                        d -= signed[block]
                    np.abs(d, out=d)
                    if weight != 1.0:
                        d *= np.float32(weight)
                if not d.max(initial=0.0) < np.inf:  # (a NaN too) an operand clipped at a clamp: unbounded there
                    d[~np.isfinite(d)] = np.inf
                if added:
                    total[block] += d
            added.append(store)

        for m in moved_stores[:n_colours]:
            add(m, 1.0, single=True)
        if singles_only:
            return select(total.reshape(shape), gather)
        if cross:  # a quarter of the product of two roundings, in units of a half step
            add(moved_stores[-1], 0.5, beyond_sum=True)
        if edges is not None:
            add(edges, 1.0)
        if clamps is not None:  # the whole change (halved with the steps)
            add(clamps, 2.0)
        return select(total.reshape(shape), gather)

    measured = [n for n in origins if data[n]]
    out.steps = LazyMap(measured, step, lambda n, index: step(n, index=index))  # (a block: LazyMap.select)
    for n in measured:
        kinds = [described[s] for s in data[n] if s in described]
        if not kinds:  # a float weight computed from float16 operands: no integer format to name
            continue
        if any("{granularity}" in k for k in kinds):
            # from the single steps only: the extra step of values at an end of the range (or at a
            # clamp) falls on some elements, and would make a per-tensor step look per channel
            st = step(n, singles_only=True)
            st = st[np.isfinite(st)]
            top = float(st.max()) if st.size else 0.0
            fallback = "per tensor" if not st.size or np.ptp(st) <= 1e-3 * max(top, 1e-30) else "per channel"
            kinds = [k.replace("{granularity}", fallback) for k in kinds]
        out.formats[n] = ", ".join(dict.fromkeys(kinds))
    return out


def _derived(n: str, sources: list[str], base: WeightStore, stores: list, colour: dict[str, int],
             stored: dict[str, onnx.TensorProto], readers):
    """The codes weight `n` is a plain dequantization of (io.lazy's LazyTensor.codes, as the
    dequantize pass describes them), where the probes' changes of `n` can be derived from them; else
    None. Then `n` is, in the canonical form and in every probe's, the same function (`recipe`) of
    the same stored tensors, of which only the codes are moved, and moved as the codes' own
    `flipped` moves them: every code's lowest bit (_moved_by_one, the single probe of their colour),
    the codes at an end of their range alone (_edges_moved). Each element then changes by
    d = |w(c ^ 1) - w(c)| in the single probe, by the same d in the ends' probe where c is at an
    end, and not at all in any other probe (0, or inf where d is inf: w(c) not finite), so that
    the summed step is d, and 2 d at the ends (the same float sums)."""
    codes = _codes(base, n)
    if codes is None or sources != [codes.codes] or codes.codes not in stored:
        return None
    if stored[codes.codes].data_type != onnx.TensorProto.UINT8 \
            or _bits(codes.codes, readers) != (codes.bits if codes.bits < 8 else None):
        return None  # the probes would move the bytes otherwise than `flipped` moves the codes
    if any(r in colour for r in codes.reads if r != codes.codes):
        return None  # a probe moves another stored operand
    key = (codes.codes, codes.reads, codes.recipe, codes.bits)
    for store in stores:
        other = None if store is None else _codes(store, n)
        if store is not None and (other is None or (other.codes, other.reads, other.recipe, other.bits) != key):
            return None  # a probe's canonical weight is computed otherwise
    return codes


def _codes(store: WeightStore, n: str):
    """What the lazy weight `n` of `store` says of the codes it dequantizes (LazyTensor.codes), or None."""
    if n not in store or not store.is_lazy(n):
        return None
    lazy = store.reader(n)
    return lazy.codes if lazy.kind == "computed" else None


def _measured(origin: WeightOrigin, stored: dict[str, onnx.TensorProto], floats: bool = True) -> bool:
    """Its step is measured: it comes from stored integers, or is computed from a low-precision float."""
    if origin.quantized:
        return True
    return floats and origin.computed and any(s in stored and stored[s].data_type in _LOW_FLOAT
                                              for s in origin.sources)


def _moved(tensor: onnx.TensorProto, bits: int | None) -> np.ndarray:
    """A stored tensor's probe values: integers moved by one, low-precision floats by one ulp."""
    values = tensor_values(tensor)
    return _float_moved(values) if tensor.data_type in _LOW_FLOAT else _moved_by_one(values, bits)


def _probe(model: onnx.ModelProto, stored: dict[str, onnx.TensorProto], values: dict[str, np.ndarray]):
    """A copy of the model with these stored tensors' values replaced."""
    probe = copy_without_payloads(model, set(values))
    store = WeightStore(probe)
    for s, v in values.items():
        store.set(s, v)
    return probe


def _extra_probe(model, stored, canonicalize, base: WeightStore, origins, values: dict[str, np.ndarray | None]):
    """The canonical store of one more probe (some stored values moved), or None: nothing to move, or
    a probe that fails or changes the canonical form (then its elements get no more than the steps)."""
    values = {s: v for s, v in values.items() if v is not None}
    if not values:
        return None
    try:
        moved = WeightStore(canonicalize(_probe(model, stored, values)).model)
    except Exception:  # noqa: BLE001 - no extra probe: the steps alone, as before
        return None
    if any(n not in moved or moved.shape(n) != base.shape(n) for n in origins):
        return None
    return moved


class LazyMap(Mapping):
    """name -> array, computed when asked for (the last one kept): the steps of a huge model's
    weights are never all held at once. `select(name, index)`: one's values at some entries of each
    axis (io.lazy.select), computed alone where the map was given a way to (`compute_part`)."""

    def __init__(self, names, compute, compute_part=None):
        self._names, self._compute, self._compute_part = list(dict.fromkeys(names)), compute, compute_part
        self._known = set(self._names)
        self._last: tuple[str, np.ndarray] | None = None

    def select(self, name: str, index: list) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        if self._compute_part is None or (self._last is not None and self._last[0] == name):
            return select(np.asarray(self[name]), index)
        return self._compute_part(name, index)

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


def step_part(steps: Mapping[str, np.ndarray], name: str, index: list) -> np.ndarray:
    """steps[name] at `index` (io.lazy.select): computed there alone where `steps` is a LazyMap."""
    return steps.select(name, index) if isinstance(steps, LazyMap) else select(np.asarray(steps[name]), index)


def allowed(r: np.ndarray, so: WeightOrigin | None, ro: WeightOrigin | None,
            step_s: np.ndarray | None, step_r: np.ndarray | None, scale: float | None = None) -> np.ndarray:
    """Per element, how far the suspect's weight may lie from the reference's `r` by the two files'
    storage alone (steps: measured quantization steps in r's layout, or None). `r` may be a piece of
    the weight: `scale` is then the whole weight's max |r|."""
    a = np.abs(r)
    # constants in r's float type: a float32 piece (report's float32 screen) keeps a float32 bound
    real = a.dtype.type if a.dtype.kind == "f" else np.float64
    if scale is None:
        scale = float(a.max()) if a.size else 0.0
    dtype, ref_dtype = storage_dtype(so), storage_dtype(ro)
    eps = STORAGE_ROUNDING.get(dtype, 2.0 ** -24) + STORAGE_ROUNDING.get(ref_dtype, 2.0 ** -24)
    out = 1.01 * eps * a
    for d in {dtype, ref_dtype}:
        if d == "float16":
            out = out + FP16_SUBNORMAL_HALF_STEP
            out = out + np.where(a < real(FP16_CLAMP_MIN), real(FP16_CLAMP_STORED), real(0.0)) \
                + np.maximum(a - real(FP16_CLAMP_MAX), real(0.0))
    if (so is not None and so.computed) or (ro is not None and ro.computed):
        out = out + COMPUTED_REL * a + COMPUTED_ABS * scale
        if so is not None and so.computed and eps > 2 * STORAGE_ROUNDING["float32"] and step_s is None:
            # folded from low-precision tensors with no measured step (its probe failed): each
            # rounding counts, and a bias is a difference of larger terms
            out = out + len(so.sources) * eps * (a + scale)
    for step in (step_s, step_r):
        if step is not None:
            term = HALF_STEP * step
            if isinstance(out, np.ndarray) and out.shape == np.shape(term) and np.result_type(out, term) == out.dtype:
                out += term  # (in place: the same values, one array fewer)
            else:
                out = out + term
    return out


def clip_phrase(clipped: Mapping[str, tuple[int, float]] | None) -> str:
    """What a report adds to "every weight within its rounding" when float16 values at a converter's
    upper clip were read (Steps.clipped): the weights there are allowed any smaller scale."""
    if not clipped:
        return ""
    names = sorted(clipped, key=lambda t: -clipped[t][0])
    shown = ", ".join(f"{clipped[t][0]} of {t} at {clipped[t][1]:g}" for t in names[:3])
    more = f" and {len(names) - 3} more tensors" if len(names) > 3 else ""
    return f", or what the float16 converter's clip explains ({shown}{more}: the original any larger value)"


# ---- internals -------------------------------------------------------------------------------
_LOW_FLOAT = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(onnx.TensorProto, n)}
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


def _float_moved(values: np.ndarray) -> np.ndarray:
    """Every stored float moved by one unit in its last place, towards zero (the larger change of a
    reciprocal or a square root of it); a zero to the smallest subnormal. Representable: same dtype."""
    info = np.finfo(values.dtype)
    v = values.astype(np.float64)
    a = np.abs(v)
    with np.errstate(divide="ignore"):
        exponent = np.maximum(np.floor(np.log2(np.where(a > 0, a, 1.0))), info.minexp)
    ulp = np.exp2(exponent - info.nmant)
    moved = np.where(a > 0, v - np.sign(v) * ulp, float(info.smallest_subnormal))
    moved = np.where(np.isfinite(v), moved, v)
    return moved.astype(values.dtype)


def _clamps_moved(values: np.ndarray) -> np.ndarray | None:
    """float16 values at a converter's clamp moved to what they may have been (FP16_CLAMPED_LOW to
    0, FP16_CLAMPED_HIGH to +-inf), the others kept; None when there are none."""
    a = np.abs(values.astype(np.float64))
    low, high = np.isin(a, FP16_CLAMPED_LOW), np.isin(a, FP16_CLAMPED_HIGH)
    if not (low.any() or high.any()):
        return None
    out = np.where(low, 0.0, values.astype(np.float64))
    out = np.where(high, np.copysign(np.inf, out), out)
    return out.astype(values.dtype)


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


def _describe(name: str, tensor: onnx.TensorProto, readers, stored, producers=None) -> str:
    """'int8 per channel', 'int4 in blocks of 32', 'int32 {granularity}' (filled in from the steps).
    The granularity is the stored scale's: the reader's block size, its scale input's size, or that
    of the scale the reader's integer result is multiplied by (ConvInteger/MatMulInteger); never the
    steps of a folded weight, which a folded BatchNormalization scales channel by channel."""
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
        size = (int(np.prod(stored[scale].dims)) if stored[scale].dims else 1) if scale and scale in stored \
            else _scale_after(node, readers, stored, producers or {})
        if size and node.op_type in _BY_DIRECTION and tensor.dims and size == tensor.dims[0]:
            size = 1  # one scale per direction's weight: per tensor (the op's schema says so)
        if size:
            granularity = "per tensor" if size == 1 else "per channel"
            break
    return f"{type_name} {granularity}"


# ops whose weight is a stack of one tensor per direction ([num_directions, ...]) and whose scale of
# [num_directions] is per tensor ("per-tensor/layer quantization"; [num_directions, 4*hidden]: per channel)
_BY_DIRECTION = {"DynamicQuantizeLSTM"}


def _scale_after(node: onnx.NodeProto, readers, stored, producers) -> int | None:
    """Elements of the stored scale that an integer op's result is multiplied by (quantize_dynamic:
    ConvInteger -> [Add of an integer bias] -> Cast -> Mul by Mul(input scale, weight scale)): the
    largest stored float constant in that product (a weight's scales per channel, the input's one
    per tensor); None where the result goes elsewhere or no stored scale is found."""
    if not node.output or (node.domain or "") not in STANDARD or node.op_type not in ("ConvInteger", "MatMulInteger"):
        return None
    t = node.output[0]
    for _ in range(3):
        users = readers.get(t, [])
        if len(users) != 1 or (users[0][0].domain or "") not in STANDARD:
            return None
        user = users[0][0]
        if user.op_type in ("Add", "Cast"):
            t = user.output[0]
            continue
        if user.op_type != "Mul" or len(user.input) != 2:
            return None
        sizes, stack = [], [i for i in user.input if i != t]
        for _ in range(16):  # a product of a few factors
            if not stack:
                break
            x = stack.pop()
            if x in stored and stored[x].data_type in _FLOAT_SCALES:
                sizes.append(int(np.prod(stored[x].dims)) if stored[x].dims else 1)
            elif x in producers and producers[x].op_type == "Mul" and (producers[x].domain or "") in STANDARD:
                stack.extend(i for i in producers[x].input if i)
        return max(sizes) if sizes else None
    return None


_FLOAT_SCALES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


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
