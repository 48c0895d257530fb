"""Input planning for verify: which graph inputs to vary so that every branch of the graph runs.

One random feed runs one branch: a bool `cond` drawn True never runs an If's else-branch, so a change
made there goes unseen. The plan finds the inputs that decide control flow and the values that take
each side of it:

- conditions: the condition of every If, and the trip count and condition of every Loop, in the main
  graph and in every subgraph (nested Ifs, an If inside a Loop body);
- a backward walk from each condition over the producing nodes finds the graph inputs that reach it:
  through any op, and through the outer-scope names that a node's subgraphs read; not through Shape
  or Size, which read no values (a condition on a shape is not decided by the values fed);
- values: every bool input, whether it reaches a condition or not, takes False and True. A numeric
  input that reaches a condition takes 0 and 1 (and -1 when signed), and where it is compared
  (Equal, Less, Greater, LessOrEqual, GreaterOrEqual) with a constant c, directly or through ops that
  keep a filled value (Cast, Identity, Reshape, Squeeze, Gather, ReduceMax, ...), c-1, c and c+1
  (inside its dtype's range; at most MAX_CONSTANTS constants per input);
- feeds: each varied feed is the first base feed with the varied inputs filled with one value each.
  Every combination when there are at most MAX_VARIED_FEEDS of them; otherwise each input alone
  through each of its values (the other inputs as in the base feed), cut at MAX_VARIED_FEEDS.

The *input plan* (`plan_inputs`): for every graph input, a shape and values the model accepts, read
from the graph, with the reason; runtime.settle tries it in ONNX Runtime:

- dims: a dim given with --shape binds every input dim of the same name; a dim whose size the op
  reading the input requires (its registry entry's `input_dims`: an attention cache's heads, head size
  and an empty past, a rotary cos/sin table's width and rows past every position fed, a recurrent
  input's features and state sizes; walk/registry.py), then a
  dim that a Reshape target, a Concat partner or a constant operand of Add/Sub/Mul/Div fixes takes
  that size first; the spatial
  dims of an image-like input (4-D float, NCHW or NHWC) take the sizes detectors and classifiers use,
  multiples of 32 from 224 to 640, smallest first (when height and width are separate dims, the
  text-line sizes 48, 32 and 64 high by 320 wide come right after 224: a model that refuses 224x224
  usually wants another shape, not a larger square), then squares of 192 down to 32, then 1; the first
  dim of an input of rank 2 or more is a batch of 1, unless it sets a Loop's trip count (Shape ->
  Gather -> M) or a Scan's scan axis: then 4 steps, so a carried state is read back; every other
  symbolic dim is a length of 16, 8, 4, 2 or 1, at most the rows of a positional table (a Gather of
  a constant table by Range or a constant index list), and at least what an op reading that axis
  needs (`length_floors`: a reflect Pad more than its pads, a Conv or pool its window less its pads;
  the usual lengths that qualify, else powers of two from there); the dim before the last of a
  recurrent initial state is its batch, 1; dims of the same name take the same size;
- forward walks from an input (what reads it) go through an If: a branch's output i leaves the
  branch as the If's output i;
- values: floats N(0,1); integers below the rows of every constant table they index (Gather data,
  EmbedLayerNormalization's word, position and segment tables, through Cast/Reshape/Unsqueeze/...
  and Add/Sub of a constant), else 0..9; masks (an int or bool input named *mask*, or
  EmbedLayerNormalization's mask) ones; recurrent initial states (reaching an LSTM/GRU/RNN
  initial_h or initial_c through layout ops) zeros; a scalar compared with constants
  (Equal/Less/Greater/..., anywhere in the graph) each constant in turn; bools random bits;
- tries: try k gives every dim and every scalar its k-th candidate (its last when it has fewer); a
  try whose shapes equal an earlier one's is skipped; at most MAX_TRIES tries (runtime.settle keeps
  the first that ONNX Runtime runs, and records the others' messages).

Pure graph reading (onnx, numpy, walk's registry and shapes): no ONNX Runtime here, so the CLI can
import the limits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedError
from .walk import registry
from .walk.graph import GraphView

# random input batches per check: more is refused (the CLI's --samples says so)
MAX_SAMPLES = 1000
# varied feeds run on top of the base feed(s)
MAX_VARIED_FEEDS = 64
# constants per input whose both sides are tried
MAX_CONSTANTS = 8

COMPARISONS = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"})
# ops that map an input filled with one value v to a tensor of v (through input 0): a comparison
# downstream of them sees the value fed
VALUE_KEEPING = frozenset({
    "Cast", "CastLike", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Transpose",
    "Gather", "GatherElements", "GatherND", "Slice", "Tile", "ReduceMax", "ReduceMin", "ReduceMean",
})
SHAPE_ONLY = frozenset({"Shape", "Size"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class VariationPlan:
    """The inputs to vary, each with its values and why; empty when nothing decides control flow."""

    values: dict[str, list] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.values)

    def assignments(self) -> tuple[list[dict], str]:
        """The varied feeds as {input: value} dicts, and how they were chosen (words for the report)."""
        names = list(self.values)
        if not names:
            return [], ""
        total = math.prod(len(self.values[n]) for n in names)
        if total <= MAX_VARIED_FEEDS:
            return [dict(zip(names, combo)) for combo in product(*(self.values[n] for n in names))], \
                "every combination"
        alone = [{n: v} for n in names for v in self.values[n]]
        if len(alone) <= MAX_VARIED_FEEDS:
            return alone, f"each input alone ({total} combinations is over {MAX_VARIED_FEEDS})"
        return alone[:MAX_VARIED_FEEDS], f"each input alone, cut at {MAX_VARIED_FEEDS} feeds of {len(alone)}"


def fill(base: dict[str, np.ndarray], assignment: dict) -> dict[str, np.ndarray]:
    """`base` with each input of `assignment` filled with its value (made when run, not kept)."""
    feed = dict(base)
    for name, value in assignment.items():
        feed[name] = np.full(base[name].shape, value, dtype=base[name].dtype)
    return feed


def plan_variations(models, in_specs) -> VariationPlan:
    """The variation plan for graph inputs `in_specs` (TensorSpec) over one or more ModelProtos (the
    reference and the candidate: a branch that either of them has is exercised)."""
    dtypes = {s.name: s.dtype for s in in_specs}
    reached: dict[str, set[str]] = defaultdict(set)
    constants: dict[str, set[float]] = defaultdict(set)
    for model in models:
        _Graph(model, set(dtypes)).collect(reached, constants)
    plan = VariationPlan()
    for s in in_specs:  # in the model's input order
        dtype = dtypes[s.name]
        if dtype.kind == "b":
            values, why = [False, True], "bool input"
            if reached.get(s.name):
                why += ", reaches " + " and ".join(sorted(reached[s.name]))
        elif s.name in reached:
            values = _values_around(dtype, sorted(constants.get(s.name, ()))[:MAX_CONSTANTS])
            why = "reaches " + " and ".join(sorted(reached[s.name]))
            if constants.get(s.name):
                why += ", compared with " + ", ".join(f"{c:g}" for c in sorted(constants[s.name])[:MAX_CONSTANTS])
        else:
            continue
        plan.values[s.name] = values
        plan.why[s.name] = why
    return plan


def _values_around(dtype: np.dtype, consts: list[float]) -> list:
    """0, 1 (-1 when signed), and both sides of every constant, in the dtype's range."""
    signed = dtype.kind in "fi"
    wanted = {0.0, 1.0} | ({-1.0} if signed else set())
    for c in consts:
        if dtype.kind == "f":
            wanted |= {c - 1.0, c, c + 1.0}
        else:
            wanted |= {math.floor(c) - 1.0, float(math.floor(c)), float(math.ceil(c)), math.ceil(c) + 1.0}
    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)
        lo, hi = -top, top
    else:
        info = np.iinfo(dtype)
        lo, hi = float(info.min), float(info.max)
    out = []
    for v in sorted(wanted):
        if lo <= v <= hi:
            out.append(float(v) if dtype.kind == "f" else int(v))
    return out


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


class _Graph:
    """Producers and small constants of a model, its subgraphs included (ONNX names are unique
    across nested scopes, so one map serves every scope)."""

    def __init__(self, model: onnx.ModelProto, input_names: set[str]):
        self.inputs = input_names
        self.producer: dict[str, onnx.NodeProto] = {}
        self.const: dict[str, object] = {}  # name -> TensorProto or Constant node (read on demand)
        self.sinks: dict[str, list[str]] = {"If condition": [], "Loop trip count or condition": []}
        if not model.HasField("graph"):
            return
        for g in _all_graphs(model.graph):
            for t in g.initializer:
                self.const.setdefault(t.name, t)
            for node in g.node:
                for out in node.output:
                    if out:
                        self.producer.setdefault(out, node)
                if node.domain not in _DEFAULT_DOMAINS:
                    continue
                if node.op_type == "Constant" and node.output:
                    self.const.setdefault(node.output[0], node)
                elif node.op_type == "If" and node.input and node.input[0]:
                    self.sinks["If condition"].append(node.input[0])
                elif node.op_type == "Loop":
                    self.sinks["Loop trip count or condition"].extend(i for i in node.input[:2] if i)
        for name in self.inputs:  # a graph input shadows an initializer of the same name (old models)
            self.const.pop(name, None)

    def collect(self, reached: dict[str, set[str]], constants: dict[str, set[float]]) -> None:
        for kind, sinks in self.sinks.items():
            for name in self._walk(sinks, constants):
                reached[name].add(kind)

    def _walk(self, sinks: list[str], constants: dict[str, set[float]]) -> set[str]:
        """Graph inputs that reach any of `sinks`; comparisons with constants met on the way."""
        found: set[str] = set()
        seen: set[str] = set()
        expanded: set[int] = set()  # nodes whose inputs are on the stack already (several outputs)
        stack = list(sinks)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in self.inputs:
                found.add(name)
                continue
            node = self.producer.get(name)
            if node is None or id(node) in expanded or (node.op_type in SHAPE_ONLY and node.domain in _DEFAULT_DOMAINS):
                continue
            expanded.add(id(node))
            if node.op_type in COMPARISONS and node.domain in _DEFAULT_DOMAINS and len(node.input) == 2:
                self._note_comparison(node, constants)
            stack.extend(i for i in node.input if i)
            for sub in _subgraphs(node):  # outer-scope names a branch or body reads
                for g in _all_graphs(sub):
                    for n in g.node:
                        stack.extend(i for i in n.input if i)
                    stack.extend(o.name for o in g.output if o.name)
        return found

    def _note_comparison(self, node: onnx.NodeProto, constants: dict[str, set[float]]) -> None:
        a, b = self._source(node.input[0]), self._source(node.input[1])
        for x, y in ((a, b), (b, a)):
            if x in self.inputs and y not in self.inputs:
                values = self._const_values(y)
                if values is not None:
                    constants[x].update(values)

    def _source(self, name: str) -> str:
        """Follow value-keeping ops back through their input 0."""
        for _ in range(1000):
            if name in self.inputs or name in self.const:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in VALUE_KEEPING or node.domain not in _DEFAULT_DOMAINS \
                    or not node.input or not node.input[0]:
                return name
            name = node.input[0]
        return name

    def const_array(self, name: str, limit: int = 64) -> np.ndarray | None:
        """A constant's values, when it has at most `limit` and they are in the file's protobuf."""
        item = self.const.get(name)
        if item is None:
            return None
        try:
            if isinstance(item, onnx.NodeProto):
                attr = next((a for a in item.attribute if a.name.startswith("value")), None)
                value = helper.get_attribute_value(attr) if attr is not None else None
                return _small_array(value, limit) if isinstance(value, onnx.TensorProto) else (
                    None if value is None else np.asarray(value))
            return _small_array(item, limit)
        except Exception:
            return None

    def _const_values(self, name: str) -> list[float] | None:
        """The distinct finite values of a small numeric constant (what a comparison tests against)."""
        arr = self.const_array(name)
        if arr is None or arr.dtype.kind not in "biuf" or arr.size > 64:
            return None
        return sorted({float(v) for v in arr.astype(np.float64).ravel() if math.isfinite(v)})


def _small_array(t: onnx.TensorProto, limit: int = 64) -> np.ndarray | None:
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) or math.prod(t.dims) > limit:
        return None
    return numpy_helper.to_array(t)


# --- the input plan -------------------------------------------------------------------------------

# tries of the plan in ONNX Runtime before it gives up (runtime.settle)
MAX_TRIES = 24
IMAGE_SIDES = tuple(range(224, 641, 32))  # the sizes detectors and classifiers use, smallest first
TEXT_LINES = ((48, 320), (32, 320), (64, 320))  # text recognizers: fixed height, wide lines
SMALL_SIDES = tuple(range(192, 31, -32)) + (1,)
LENGTHS = (16, 8, 4, 2, 1)
# ops whose window must fit the (padded) axis they slide along
_WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
INT_HIGH = 10  # integers that no table bounds: 0..9
RECURRENT = frozenset({"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"})
# ops whose output keeps the leading axes of their inputs (is_trip_count follows them)
_KEEPS_LEADING = frozenset({"Add", "Sub", "Mul", "Div", "MatMul", "Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Cast",
                            "Identity", "Dropout", "LeakyRelu", "Elu", "Softplus", "Neg", "Exp", "Sqrt", "Clip"})
STATE_INPUTS = (5, 6)  # initial_h, initial_c
# ops that move or select values without arithmetic (an index stays an index, a state a state)
LAYOUT = frozenset({
    "Cast", "CastLike", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Transpose", "Gather",
    "Slice", "Split", "Tile", "Concat",
})
# EmbedLayerNormalization (com.microsoft): index input -> the table input it indexes
_EMBED_TABLES = {0: 2, 1: 4, 8: 3}
_EMBED_MASK = 7


@dataclass
class DimChoice:
    """One symbolic dim (by name; an unnamed dim is its own): the sizes to try, in order, and why."""

    key: str
    candidates: list[int]
    why: str
    role: str  # "given", "fixed by the graph", "image", "batch", "length"
    reasons: list[str] = field(default_factory=list)  # per candidate, where it says more than `why`

    def at(self, k: int) -> int:
        return self.candidates[min(k, len(self.candidates) - 1)]


@dataclass
class InputChoice:
    """One graph input: its declared shape (ints, dim names, None), the dims of its shape (an int or a
    DimChoice key), and how its values are drawn."""

    name: str
    dtype: np.dtype
    declared: list
    dims: list  # int or str (a DimChoice key)
    fill: str  # "normal", "ints", "bits", "ones", "zeros", "value"
    high: int = INT_HIGH  # ints: 0 .. high - 1
    values: list = field(default_factory=list)  # "value": the candidates, in order
    why: str = ""

    def value_at(self, k: int):
        return self.values[min(k, len(self.values) - 1)]

    def range_text(self, k: int) -> str:
        if self.fill == "normal":
            return "N(0,1)"
        if self.fill == "ints":
            return f"ints 0..{self.high - 1}"
        if self.fill == "bits":
            return "random bits"
        if self.fill == "value":
            return f"= {self.value_at(k):g}"
        return self.fill


@dataclass
class InputPlan:
    """The inputs of a model as the graph implies them; `chosen` is the try that ONNX Runtime ran (set
    by runtime.settle), `failures` the tries it refused with its message, whole."""

    inputs: list[InputChoice]
    dims: dict[str, DimChoice]
    chosen: int = 0
    settled: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)  # (shapes tried, ONNX Runtime's message)

    def tries(self) -> list[int]:
        """The tries worth making: k = 0, 1, ... whose shapes or values differ from every earlier one."""
        n = max([len(d.candidates) for d in self.dims.values()] + [len(i.values) for i in self.inputs] + [1])
        seen, out = set(), []
        for k in range(min(n, MAX_TRIES)):
            key = (tuple(self.shape(i, k) for i in self.inputs),
                   tuple(i.value_at(k) for i in self.inputs if i.fill == "value"))
            if key not in seen:
                seen.add(key)
                out.append(k)
        return out

    def shape(self, choice: InputChoice, k: int | None = None) -> tuple[int, ...]:
        k = self.chosen if k is None else k
        return tuple(d if isinstance(d, int) else self.dims[d].at(k) for d in choice.dims)

    def shapes_text(self, k: int | None = None) -> str:
        return ", ".join(f"{i.name} {_shape_text(self.shape(i, k))}" for i in self.inputs)

    def feeds(self, samples: int = 1, seed: int = 0, k: int | None = None) -> list[dict[str, np.ndarray]]:
        """`samples` seeded feeds of try k (default: the chosen one)."""
        k = self.chosen if k is None else k
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(samples):
            feed = {}
            for i in self.inputs:
                shape = self.shape(i, k)
                if i.fill == "normal":
                    arr = rng.standard_normal(shape).astype(i.dtype)
                elif i.fill == "ints":
                    arr = rng.integers(0, i.high, size=shape).astype(i.dtype)
                elif i.fill == "bits":
                    arr = rng.integers(0, 2, size=shape).astype(i.dtype)
                elif i.fill == "ones":
                    arr = np.ones(shape, i.dtype)
                elif i.fill == "zeros":
                    arr = np.zeros(shape, i.dtype)
                else:
                    arr = np.full(shape, i.value_at(k), i.dtype)
                feed[i.name] = arr
            out.append(feed)
        return out

    def why(self, choice: InputChoice) -> str:
        """Why this input has this shape and these values (for the report)."""
        parts, image = [], []
        for d in dict.fromkeys(d for d in choice.dims if isinstance(d, str)):
            dim = self.dims[d]
            size = dim.at(self.chosen)
            k = min(self.chosen, len(dim.candidates) - 1)
            if dim.role == "image":
                image.append(str(size))
            elif dim.role == "batch":
                parts.append(f"batch {size}")
            elif dim.role == "length":
                parts.append(f"{_dim_label(d)} {size}: {dim.why if k == 0 else 'the first length it accepts'}")
            else:
                reason = dim.reasons[k] if k < len(dim.reasons) and dim.reasons[k] else dim.why
                parts.append(f"{_dim_label(d)} {size}: {reason}")
        if image:
            if self.chosen > 0 and self.failures:
                ops = sorted({op for op in (_failing_op(m) for _, m in self.failures) if op})
                reason = (f"the first of the sizes tried that {'its ' + '/'.join(ops) if ops else 'it'} accepts "
                          f"({len(self.failures)} refused)")
            else:
                reason = "the smallest of the sizes detectors and classifiers use (multiples of 32 from 224 to 640)"
            parts.insert(0, f"{'x'.join(image)}: {reason}")
        if choice.why:
            parts.append(choice.why)
        return "; ".join(dict.fromkeys(parts))

    def describe(self) -> list[dict]:
        """Each input: declared and chosen shape, dtype, range and why (JSON-ready)."""
        return [{
            "name": i.name, "dtype": str(i.dtype),
            "declared": [d if isinstance(d, int) else (d or "?") for d in i.declared],
            "shape": list(self.shape(i)), "range": i.range_text(self.chosen), "why": self.why(i),
        } for i in self.inputs]

    def lines(self) -> list[str]:
        """'images 1x3x320x320 float32 N(0,1): why' per input."""
        return [f"{d['name']} {_shape_text(d['shape'])} {d['dtype']} {d['range']}" + (f": {d['why']}" if d["why"] else "")
                for d in self.describe()]


def _shape_text(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def _dim_label(key: str) -> str:
    """A dim's name, or 'dim N' for an unnamed one (keyed 'input#N')."""
    return f"dim {key.rpartition('#')[2]}" if "#" in key else key


def _failing_op(message: str) -> str | None:
    import re

    m = re.search(r"running (\w+) node", message)
    return m.group(1) if m else None


def is_quantized(model: onnx.ModelProto) -> bool:
    """A QDQ, QOperator or dynamically quantized graph: QuantizeLinear/DequantizeLinear,
    DynamicQuantize*, *Integer, QLinear* or a com.microsoft Q* op (QGemm, QAttention, ...)."""
    if not model.HasField("graph"):
        return False
    for g in _all_graphs(model.graph):
        for n in g.node:
            op = n.op_type
            if "Quantize" in op or op.endswith("Integer") or op.startswith("QLinear") or (
                    n.domain == "com.microsoft" and op[:1] == "Q" and op[1:2].isupper()):
                return True
    return False


def activation_quantizers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, dict]]:
    """The nodes that quantize or round their float activations before computing (their registry
    entry's `quantizes_activations`, e.g. MatMulNBits at accuracy_level 4), each with the attribute
    values of its exact form, in graph order (subgraphs included)."""
    if not model.HasField("graph"):
        return []
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    found = []
    for g in _all_graphs(model.graph):
        for n in g.node:
            spec = registry.spec_of(n, opsets)
            exact = spec.quantizes_activations(n) if spec is not None and spec.quantizes_activations else None
            if exact:
                found.append((n, exact))
    return found


def half_precision(model: onnx.ModelProto) -> str | None:
    """"float16" or "bfloat16" when the graph computes in it (an initializer of that type or a Cast
    to it), else None."""
    if not model.HasField("graph"):
        return None
    names = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
    for g in _all_graphs(model.graph):
        for t in g.initializer:
            if t.data_type in names:
                return names[t.data_type]
        for n in g.node:
            if n.op_type == "Cast":
                to = next((a.i for a in n.attribute if a.name == "to"), None)
                if to in names:
                    return names[to]
    return None


def plan_inputs(model: onnx.ModelProto, in_specs, shapes: dict[str, list[int]] | None = None) -> InputPlan:
    """The input plan of `model` for graph inputs `in_specs` (objects with .name, .dtype, .shape; the
    fed inputs, in order). `shapes` (name -> dims, checked by the caller) fixes inputs' shapes and
    binds their named dims."""
    reader = _Reader(model, {s.name for s in in_specs})
    declared = {}
    for v in model.graph.input if model.HasField("graph") else ():
        t = v.type.tensor_type
        declared[v.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else
                            (d.dim_param or None) for d in t.shape.dim]
    dims: dict[str, DimChoice] = {}
    choices: list[InputChoice] = []
    given = shapes or {}
    # dims named in --shape bind every input that shares the name
    bound: dict[str, int] = {}
    for s in in_specs:
        decl = declared.get(s.name, list(s.shape))
        if s.name in given and len(given[s.name]) == len(decl):
            for d, v in zip(decl, given[s.name]):
                if isinstance(d, str) and d not in ("?",):
                    bound[d] = int(v)
    for s in in_specs:
        decl = declared.get(s.name)
        if decl is None or len(decl) != len(s.shape):
            decl = [d if isinstance(d, int) and d >= 0 else None for d in s.shape]
        dtype = s.dtype
        layout = _image_axes(decl, dtype)
        fixed = reader.fixed_dims(s.name, decl)
        cap = reader.length_cap()
        keys = []
        for axis, d in enumerate(decl):
            if isinstance(d, int):
                keys.append(d)
                continue
            named = isinstance(d, str) and d not in ("?", "")
            key = d if named else f"{s.name}#{axis}"
            keys.append(key)
            if s.name in given:
                value = int(given[s.name][axis])
                dims[key] = DimChoice(key, [value], "given with --shape", "given")
                continue
            if named and key in bound:
                dims.setdefault(key, DimChoice(key, [bound[key]], "given with --shape (another input)", "given"))
                continue
            if axis in fixed:
                size, why = fixed[axis]
                old = dims.get(key)
                if old is None or old.role not in ("given", "fixed by the graph"):
                    rest = old.candidates if old is not None else _generic(axis, decl, layout, cap)[0]
                    dims[key] = DimChoice(key, [size] + [c for c in rest if c != size], why, "fixed by the graph",
                                          [why])
                continue
            candidates, why, role = _generic(axis, decl, layout, cap)
            if role == "batch" and reader.is_trip_count(s.name, axis):  # one step would read no state back
                candidates, role = [4, 2, 1], "length"
                why = "4 steps of a Loop or Scan (its trip count: a carried state is read back)"
            if role == "length" and axis == len(decl) - 2 and reader.is_state(s.name):
                candidates, why, role = [1], "batch of 1 (a recurrent state is [..., batch, hidden])", "batch"
            if role == "length" and key in reader.length_floors(declared):
                candidates, why = _at_least(candidates, *reader.length_floors(declared)[key])
            old = dims.get(key)
            if old is None or _RANK[role] > _RANK[old.role]:
                dims[key] = DimChoice(key, candidates, why, role)
        choice = InputChoice(s.name, dtype, decl, keys, "normal")
        _values(choice, reader, decl)
        choices.append(choice)
    # an image's height and width given by separate names try text lines after the squares
    for c in choices:
        axes = _image_axes(c.declared, c.dtype)
        if axes is None:
            continue
        h, w = (c.dims[a] for a in axes)
        if isinstance(h, str) and isinstance(w, str) and h != w and dims[h].role == dims[w].role == "image":
            n = dims[h].candidates.index(IMAGE_SIDES[0]) + 1  # after the first square
            if dims[w].candidates.index(IMAGE_SIDES[0]) + 1 == n:
                dims[h].candidates[n:n] = [t[0] for t in TEXT_LINES]
                dims[w].candidates[n:n] = [t[1] for t in TEXT_LINES]
    return InputPlan(choices, dims)


_RANK = {"length": 0, "batch": 1, "image": 2, "fixed by the graph": 3, "given": 4}


def _image_axes(decl: list, dtype: np.dtype) -> tuple[int, int] | None:
    """The (height, width) axes of an image-like input: 4-D float with a symbolic spatial dim."""
    if dtype.kind != "f" or len(decl) != 4:
        return None
    if isinstance(decl[3], int) and decl[3] in (1, 3, 4) and not isinstance(decl[1], int):
        axes = (1, 2)  # NHWC
    else:
        axes = (2, 3)
    return axes if any(not isinstance(decl[a], int) for a in axes) else None


def _generic(axis: int, decl: list, image: tuple[int, int] | None, cap: int | None) -> tuple[list[int], str, str]:
    if image is not None and axis in image:
        return (list(IMAGE_SIDES) + list(SMALL_SIDES),
                "the smallest of the sizes detectors and classifiers use (multiples of 32 from 224 to 640)", "image")
    if axis == 0 and len(decl) >= 2:
        return [1], "batch of 1", "batch"
    lengths = [n for n in LENGTHS if cap is None or n <= cap] or [1]
    why = f"a length of {lengths[0]}"
    if cap is not None and cap < LENGTHS[0]:
        why += f" (its positional table has {cap} rows)"
    return lengths, why, "length"


def _at_least(lengths: list[int], least: int, words: str) -> tuple[list[int], str]:
    """Lengths of at least `least` (the usual ones that qualify, else powers of two from there up:
    an op further on may need more still)."""
    kept = [n for n in lengths if n >= least]
    if not kept:
        start = 1 << (least - 1).bit_length()
        kept = [start << i for i in range(4)]
    return kept, f"a length of {kept[0]}: {words} (needs at least {least})"


def _values(choice: InputChoice, reader: "_Reader", decl: list) -> None:
    """How `choice`'s values are drawn (see the module docstring)."""
    kind = choice.dtype.kind
    name = choice.name
    lowered = name.lower()
    scalar = all(isinstance(d, int) and d == 1 for d in decl)
    consts = reader.compared_constants(name) if scalar else []
    if consts:
        lo, hi = _dtype_range(choice.dtype)
        values = [c for c in consts if lo <= c <= hi][:MAX_CONSTANTS]
        if values:
            choice.fill = "value"
            choice.values = [int(v) if kind in "iub" else float(v) for v in values]
            choice.why = "a scalar compared with " + ", ".join(f"{v:g}" for v in values) + ": each in turn"
            return
    if kind == "b":
        if "mask" in lowered or reader.is_mask(name):
            choice.fill, choice.why = "ones", "a mask: ones"
        else:
            choice.fill = "bits"
        return
    if kind in "iu":
        if "mask" in lowered or reader.is_mask(name):
            choice.fill, choice.why = "ones", "a mask: ones"
            return
        bound = reader.index_bound(name)
        choice.fill = "ints"
        if bound is not None:
            high, why = bound
            choice.high = max(1, min(high, int(np.iinfo(choice.dtype).max)))
            choice.why = f"indexes {why}: ids below {high}"
        return
    if kind == "f" and reader.is_state(name):
        choice.fill, choice.why = "zeros", "a recurrent initial state: zeros"


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)
        return -top, top
    if dtype.kind == "b":
        return 0.0, 1.0
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


class _Reader(_Graph):
    """What the input plan reads of a graph: consumers, constant shapes and values."""

    def __init__(self, model: onnx.ModelProto, input_names: set[str]):
        super().__init__(model, input_names)
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.nodes: list[onnx.NodeProto] = []
        # an If branch's output i leaves the branch as the If's output i: walks forward go on there
        self.branch_exits: dict[str, list[str]] = defaultdict(list)
        if model.HasField("graph"):
            for g in _all_graphs(model.graph):
                for node in g.node:
                    self.nodes.append(node)
                    for idx, name in enumerate(node.input):
                        if name:
                            self.consumers[name].append((node, idx))
                    if node.op_type == "If" and node.domain in _DEFAULT_DOMAINS:
                        for branch in _subgraphs(node):
                            for out, exit_name in zip(branch.output, node.output):
                                if exit_name:
                                    self.branch_exits[out.name].append(exit_name)
        self._cap: int | None | bool = False
        self.model = model
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        self._view: GraphView | None | bool = None

    # constants -------------------------------------------------------------------------------------

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        item = self.const.get(name)
        if item is None:
            return None
        if isinstance(item, onnx.NodeProto):
            attr = next((a for a in item.attribute if a.name.startswith("value")), None)
            if attr is None:
                return None
            value = helper.get_attribute_value(attr)
            if isinstance(value, onnx.TensorProto):
                return tuple(value.dims)
            return tuple(np.shape(value))
        return tuple(item.dims)

    def table_rows(self, name: str, axis: int = 0) -> int | None:
        """Rows (along `axis`) of a constant table, through Cast/Identity/DequantizeLinear."""
        for _ in range(16):
            shape = self.const_shape(name)
            if shape is not None:
                if not shape:
                    return None
                a = axis + len(shape) if axis < 0 else axis
                return int(shape[a]) if 0 <= a < len(shape) else None
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Cast", "Identity", "DequantizeLinear") or not node.input:
                return None
            name = node.input[0]
        return None

    # forward walks from an input ---------------------------------------------------------------------

    def _forward(self, name: str, through: frozenset[str], shifts: bool = False):
        """(node, input index, shift) for every use of `name`, through `through` ops (index shift:
        Add/Sub of a constant scalar when `shifts`)."""
        stack, seen = [(name, 0.0)], set()
        while stack:
            cur, shift = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            stack.extend((o, shift) for o in self.branch_exits.get(cur, ()))
            for node, idx in self.consumers.get(cur, ()):
                yield node, idx, shift
                standard = node.domain in _DEFAULT_DOMAINS
                if standard and node.op_type in through and (idx == 0 or node.op_type == "Concat"):
                    stack.extend((o, shift) for o in node.output if o)
                elif shifts and standard and node.op_type in ("Add", "Sub") and len(node.input) == 2:
                    other = self.const_array(node.input[1 - idx])
                    if other is not None and other.size == 1 and other.dtype.kind in "iu":
                        c = float(other.ravel()[0])
                        step = c if node.op_type == "Add" else (-c if idx == 0 else None)
                        if step is not None:
                            stack.append((node.output[0], shift + step))

    def index_bound(self, name: str) -> tuple[int, str] | None:
        """The smallest table an integer input indexes: (exclusive bound, words)."""
        best = None
        for node, idx, shift in self._forward(name, LAYOUT, shifts=True):
            rows = None
            if node.op_type == "Gather" and node.domain in _DEFAULT_DOMAINS and idx == 1:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                rows, what = self.table_rows(node.input[0], axis), "Gather"
            elif node.op_type == "EmbedLayerNormalization" and idx in _EMBED_TABLES:
                table = _EMBED_TABLES[idx]
                rows = self.table_rows(node.input[table]) if len(node.input) > table else None
                what = "EmbedLayerNormalization"
            if rows is None:
                continue
            high = int(rows - max(shift, 0.0))
            if high >= 1 and (best is None or high < best[0]):
                best = (high, f"the {rows}-row table of {what} {node.name or node.output[0]!r}")
        return best

    def is_mask(self, name: str) -> bool:
        return any(n.op_type == "EmbedLayerNormalization" and idx == _EMBED_MASK
                   for n, idx, _ in self._forward(name, LAYOUT))

    def is_trip_count(self, name: str, axis: int) -> bool:
        """`name`'s dim `axis` is a Loop's trip count: Shape of it (or of what elementwise ops and
        MatMuls make of it, keeping its leading axes) -> Gather (or Slice) of that axis -> views
        (Squeeze, Unsqueeze, Cast, Identity, Reshape) -> the Loop's M (TorchScript's
        `for t in range(x.shape[0])`). A guess for a candidate order only: ONNX Runtime has the last word."""
        shapes, seen, frontier = [], {name}, [name]
        for _ in range(8):  # what keeps the leading axes of `name` (a Linear + Relu before the loop)
            nxt = []
            for t in frontier:
                for node, i in self.consumers.get(t, []):
                    if node.domain not in _DEFAULT_DOMAINS:
                        continue
                    if node.op_type == "Scan" and self._scan_axis(node, i) == axis:
                        return True  # a Scan runs one step per position of its scan axis
                    if node.op_type == "Shape":
                        shapes.append(node)
                    elif node.op_type in _KEEPS_LEADING and node.output and node.output[0] not in seen:
                        seen.add(node.output[0])
                        nxt.append(node.output[0])
            frontier = nxt
        for shape in shapes:
            if any(a.name in ("start", "end") for a in shape.attribute):
                continue
            for pick, idx in self.consumers.get(shape.output[0], []):
                if idx != 0 or pick.domain not in _DEFAULT_DOMAINS:
                    continue
                if pick.op_type == "Gather":
                    index = self.const_array(pick.input[1]) if len(pick.input) > 1 else None
                    if index is None or index.size != 1 or int(index.reshape(-1)[0]) != axis:
                        continue
                elif pick.op_type == "Slice":
                    starts, ends = (self.const_array(i) if len(pick.input) > k else None
                                    for k, i in ((1, pick.input[1]), (2, pick.input[2])))
                    if starts is None or ends is None or starts.tolist() != [axis] or ends.tolist() != [axis + 1]:
                        continue
                else:
                    continue
                frontier = [pick.output[0]]
                for _ in range(6):
                    nxt = []
                    for t in frontier:
                        for node, i in self.consumers.get(t, []):
                            if node.op_type == "Loop" and node.domain in _DEFAULT_DOMAINS and i == 0:
                                return True
                            if node.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape") and i == 0:
                                nxt.extend(o for o in node.output if o)
                    frontier = nxt
        return False

    @staticmethod
    def _scan_axis(node: onnx.NodeProto, index: int) -> int | None:
        """The axis a Scan iterates over in its input `index` (None: a carried state, not scanned)."""
        m = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        first = len(node.input) - m
        if index < first:
            return None
        axes = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), [])
        return axes[index - first] if index - first < len(axes) else 0

    def is_state(self, name: str) -> bool:
        return any(n.op_type in RECURRENT and idx in STATE_INPUTS for n, idx, _ in self._forward(name, LAYOUT))

    # constraints on dims ----------------------------------------------------------------------------

    def fixed_dims(self, name: str, decl: list) -> dict[int, tuple[int, str]]:
        """Axes of an input whose size the graph fixes: a Reshape target (one symbolic dim), a Concat
        partner (the other axes), a constant operand of an elementwise op (broadcast axes > 1)."""
        out: dict[int, tuple[int, str]] = {}
        symbolic = [a for a, d in enumerate(decl) if not isinstance(d, int)]
        if not symbolic:
            return out
        out.update(self.required_dims(name, decl))
        for node, idx, _ in self._forward(name, frozenset({"Cast", "Identity"})):
            if node.domain not in _DEFAULT_DOMAINS:
                continue
            label = node.name or node.output[0]
            if node.op_type == "Reshape" and idx == 0 and len(node.input) > 1 and len(symbolic) == 1:
                target = self.const_array(node.input[1])
                if target is not None and target.size and (target > 0).all():
                    known = math.prod(d for d in decl if isinstance(d, int))
                    total = int(np.prod(target.astype(np.int64)))
                    if known and total % known == 0:
                        out.setdefault(symbolic[0], (total // known, f"the Reshape {label!r} target fixes it"))
            elif node.op_type == "Concat":
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                axis = axis + len(decl) if axis < 0 else axis
                for other in node.input:
                    shape = self.const_shape(other) if other and other != node.input[idx] else None
                    if shape is not None and len(shape) == len(decl):
                        for a in symbolic:
                            if a != axis:
                                out.setdefault(a, (int(shape[a]), f"its Concat {label!r} partner fixes it"))
            elif node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
                shape = self.const_shape(node.input[1 - idx])
                if shape is not None and 0 < len(shape) <= len(decl):
                    offset = len(decl) - len(shape)
                    for a in symbolic:
                        if a >= offset and shape[a - offset] > 1:
                            out.setdefault(a, (int(shape[a - offset]),
                                               f"the constant it meets in {node.op_type} {label!r} fixes it"))
        return out

    def required_dims(self, name: str, decl: list) -> dict[int, tuple[int, str]]:
        """Axes whose size the op reading `name` (through Cast/Identity) requires: its registry
        entry's `input_dims` (walk/registry.py), read with the inferred shapes of its other inputs."""
        out: dict[int, tuple[int, str]] = {}
        for node, idx, _ in self._forward(name, frozenset({"Cast", "Identity"})):
            spec = registry.spec_of(node, self.opsets)
            if spec is None or spec.input_dims is None:
                continue
            wanted = spec.input_dims(node, lambda i: self.inferred_shape(node.input[i])
                                     if i < len(node.input) and node.input[i] else None).get(idx, {})
            label = node.name or node.output[0]
            for axis, (size, words) in sorted(wanted.items()):
                if 0 <= axis < len(decl) and not isinstance(decl[axis], int):
                    out.setdefault(axis, (int(size), f"{node.op_type} {label!r} {words}"))
        return out

    def inferred_shape(self, name: str) -> list | None:
        """The dims of any tensor by ONNX shape inference and the registry's output shapes (walk's
        GraphView, built on first use: most inputs never need it); None when unknown."""
        if self._view is None:
            try:
                self._view = GraphView(self.model)
            except UnsupportedError:
                self._view = False  # a graph the walker refuses: no inferred shapes, ORT judges
        return self._view.shape(name) if self._view else None

    def length_floors(self, declared: dict[str, list]) -> dict[str, tuple[int, str]]:
        """The least size some op needs of a symbolic input dim, keyed like the plan's dims (the dim's
        name, or 'input#axis'): a reflect Pad reads more samples than it adds (ORT refuses a 16-long
        signal padded by 64), a Conv or pool window must fit the padded axis. Read from the inferred
        shape of the op's input wherever that axis still is the input's own dim."""
        if getattr(self, "_floors", None) is not None:
            return self._floors
        keys = {}  # a dim as shape inference writes it -> the plan's key
        for name, decl in declared.items():
            for axis, d in enumerate(decl):
                key = d if isinstance(d, str) and d not in ("?", "") else f"{name}#{axis}"
                if not isinstance(d, int):
                    keys[f"?{name}:{axis}"] = key  # an outer input's dim as seen inside a subgraph
                    if key == d:
                        keys[d] = key
        floors: dict[str, tuple[int, str]] = {}
        for node in self.nodes:
            if node.domain not in _DEFAULT_DOMAINS or node.op_type not in _WINDOWED and node.op_type != "Pad":
                continue
            for axis, least, words in self._needs(node):
                shape = self.inferred_shape(node.input[0]) if node.input else None
                d = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
                key = keys.get(d) if isinstance(d, str) else None
                if key is not None and least > floors.get(key, (1, ""))[0]:
                    floors[key] = (least, f"{node.op_type} {node.name or node.output[0]!r} {words}")
        self._floors = floors
        return floors

    def computed_ints(self, names) -> list | None:
        """A small integer tensor's values, constant or computed from constants and shapes (torch
        writes a Pad's pads through Reshape/Slice/Transpose/Cast): walk's shape evaluator."""
        if not names or not names[0]:
            return None
        if self.inferred_shape(names[0]) is None and not self._view:
            return None
        return self._view.values.integers(names[0]) if self._view else None

    def _needs(self, node: onnx.NodeProto) -> list[tuple[int, int, str]]:
        """(axis of input 0, least size, why) that `node` needs."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Pad":
            mode = attrs.get("mode", b"constant")
            if (mode.decode() if isinstance(mode, bytes) else mode) != "reflect":
                return []
            pads = attrs.get("pads")
            pads = list(pads) if pads is not None else self.computed_ints(node.input[1:2])
            axes = self.computed_ints(node.input[3:4])
            if pads is None or not all(isinstance(p, int) for p in pads):
                return []
            axes = axes if axes is not None else list(range(len(pads) // 2))
            if len(pads) != 2 * len(axes):
                return []
            return [(a, max(pads[k], pads[k + len(axes)]) + 1, f"reflects {max(pads[k], pads[k + len(axes)])} along it")
                    for k, a in enumerate(axes) if a >= 0 and max(pads[k], pads[k + len(axes)]) > 0]
        kernel = attrs.get("kernel_shape")
        if kernel is None and node.op_type == "Conv" and len(node.input) > 1:
            w = self.const_shape(node.input[1])
            kernel = list(w[2:]) if w is not None else None
        if not kernel or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return []
        pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
        dil = list(attrs.get("dilations", [1] * len(kernel)))
        out = []
        for i, k in enumerate(kernel):
            span = (int(k) - 1) * int(dil[i]) + 1
            least = span - int(pads[i]) - int(pads[i + len(kernel)])
            if least > 1:
                out.append((2 + i, least, f"has a window of {span} along it"))
        return out

    def length_cap(self) -> int | None:
        """Rows of the smallest positional table: a constant Gather table indexed by a Range or a
        constant index list (through layout ops and Slice)."""
        if self._cap is not False:
            return self._cap
        cap = None
        for node in self.nodes:
            if node.op_type != "Gather" or node.domain not in _DEFAULT_DOMAINS or len(node.input) < 2:
                continue
            rows = self.table_rows(node.input[0])
            if rows is None or len(self.const_shape(node.input[0]) or ()) < 2:
                continue
            if self._positions(node.input[1]):
                cap = rows if cap is None else min(cap, rows)
        self._cap = cap
        return cap

    def _positions(self, name: str) -> bool:
        """Indices that count positions: a Range, or a constant 0, 1, 2, ... (a position_ids buffer)."""
        for _ in range(32):
            if name in self.inputs:
                return False
            if name in self.const:
                arr = self.const_array(name, limit=1 << 16)
                if arr is None or arr.size < 2 or arr.dtype.kind not in "iu":
                    return False
                flat = arr.reshape(-1, arr.shape[-1])[0] if arr.ndim else arr
                return bool(np.array_equal(flat, np.arange(flat.size)))
            node = self.producer.get(name)
            if node is None or node.domain not in _DEFAULT_DOMAINS:
                return False
            if node.op_type == "Range":
                return True
            if node.op_type not in LAYOUT or not node.input:
                return False
            name = node.input[0]
        return False

    # scalars compared with constants ------------------------------------------------------------------

    def compared_constants(self, name: str) -> list[float]:
        """Constants that `name` (through value-keeping ops) is compared with, in graph order."""
        found: list[float] = []
        for node in self.nodes:
            if node.op_type not in COMPARISONS or node.domain not in _DEFAULT_DOMAINS or len(node.input) != 2:
                continue
            a, b = self._source(node.input[0]), self._source(node.input[1])
            for x, y in ((a, b), (b, a)):
                if x == name and y not in self.inputs:
                    for v in self._const_values(y) or ():
                        if v not in found:
                            found.append(v)
        return found
