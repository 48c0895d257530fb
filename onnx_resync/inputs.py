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

Pure graph reading (onnx and numpy): no ONNX Runtime here, so the CLI can import the limits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import onnx
from onnx import helper, numpy_helper

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

    def _const_values(self, name: str) -> list[float] | None:
        item = self.const.get(name)
        if item is None:
            return None
        try:
            if isinstance(item, onnx.NodeProto):
                attr = next((a for a in item.attribute if a.name.startswith("value")), None)
                if attr is None:
                    return None
                value = helper.get_attribute_value(attr)
                arr = _small_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
            else:
                arr = _small_array(item)
            if arr is None or arr.dtype.kind not in "biuf" or arr.size > 64:
                return None
            flat = arr.astype(np.float64).ravel()
            return sorted({float(v) for v in flat if math.isfinite(v)})
        except Exception:  # an odd constant is simply not used
            return None


def _small_array(t: onnx.TensorProto) -> np.ndarray | None:
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) or math.prod(t.dims) > 64:
        return None
    return numpy_helper.to_array(t)
