"""Align a suspect's canonical layers with the reference's, structurally (never by name).

Both models are first put in canonical form (canonical.py). A *weighted layer* is a node that reads
a float weight of two or more elements: producers (Conv, ConvTranspose, MatMul with a weight, GRU,
LSTM, RNN, embedding Gather) and the nodes that carry parameters next to them (bias Add, LayerNorm,
PRelu, a BatchNorm that had no conv to fold into, ...). Layers are taken in topological order; each
reference layer is paired with the first unpaired suspect layer of the same kind (op type, and the
group count of a conv) whose weights have the same shapes (leading 1s ignored for broadcast
operands). Where several suspect layers fit (the q, k and v projections of attention), the one with
the same *role* wins: the first ops with a structural meaning found downstream (a MatMul of two
activations and which input it feeds, Softmax, a residual Add, Concat...), skipping views,
activations and constant arithmetic.

The result is the reference's canonical graph carrying the suspect's weights (same names and
shapes as the reference), which walk, match and resync take as they are. A reference layer without
a counterpart, or a suspect layer left over, is a ModelMismatchError naming it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from .canonical import CanonicalModel, topological
from ..errors import ModelMismatchError
from ..io import WeightStore
from ..walk import registry

COMMUTATIVE = registry.having("commutative")
# ops that do not change what a tensor *is* (for roles): views, pointwise activations, pooling
TRIVIAL = registry.having("trivial")
ROLE_DEPTH = 3
ROLE_FANOUT = 16


@dataclass
class Layer:
    node: onnx.NodeProto
    index: int  # position in topological order
    kind: str
    weights: list[tuple[int, str, tuple[int, ...]]]  # (input slot, weight name, normalized shape)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s for _, _, s in self.weights]


@dataclass
class LayerPair:
    reference: str  # canonical reference node
    suspect: str  # canonical suspect node
    kind: str
    weights: list[tuple[str, str]]  # (reference canonical weight, suspect canonical weight)


@dataclass
class Alignment:
    model: onnx.ModelProto  # the reference's canonical graph with the suspect's weights
    pairs: list[LayerPair]
    weight_map: dict[str, str]  # reference canonical weight -> suspect canonical weight
    node_map: dict[str, str]  # reference canonical node -> suspect canonical node
    kept: list[str] = field(default_factory=list)  # reference constants kept (structure, not weights)

    def to_dict(self) -> dict:
        return {"layers": len(self.pairs), "weights": len(self.weight_map), "kept_constants": len(self.kept)}


def align(reference: CanonicalModel, suspect: CanonicalModel) -> Alignment:
    """Pair the layers and rebuild the suspect's weights into the reference's canonical structure."""
    ref_layers = weighted_layers(reference.model)
    sus_layers = weighted_layers(suspect.model)
    ref_roles = _Roles(reference.model)
    sus_roles = _Roles(suspect.model)
    free = list(sus_layers)
    pairs: list[tuple[Layer, Layer]] = []
    for r in ref_layers:
        fits = [s for s in free if _compatible(r, s)]
        if not fits:
            raise ModelMismatchError(_no_match_message(r, reference, free, suspect))
        role = ref_roles.of(r.node)
        best = min(fits, key=lambda s: (sus_roles.of(s.node) != role, s.index))
        free.remove(best)
        pairs.append((r, best))
    if free:
        s = free[0]
        raise ModelMismatchError(
            f"cannot align the suspect's layer {suspect.layer_of(s.node.name)!r} ({_describe(s)}): "
            f"the reference has no layer left of that kind and shape"
            + (f" ({len(free) - 1} more suspect layers unmatched)" if len(free) > 1 else ""))
    model = onnx.ModelProto()
    model.CopyFrom(reference.model)
    out = WeightStore(model)
    sus_store = WeightStore(suspect.model)
    weight_map, node_map, result_pairs = {}, {}, []
    for r, s in pairs:
        node_map[r.node.name] = s.node.name
        ws = []
        for (_, rw, _), (_, sw, _) in zip(r.weights, s.weights):
            value = sus_store.get(sw).astype(np.float32, copy=False).reshape(out.shape(rw))
            out.set(rw, value)
            weight_map[rw] = sw
            ws.append((rw, sw))
        result_pairs.append(LayerPair(r.node.name, s.node.name, r.kind, ws))
    kept = [n for n in out.names() if n not in weight_map]
    return Alignment(model, result_pairs, weight_map, node_map, kept)


def weighted_layers(model: onnx.ModelProto) -> list[Layer]:
    weights = {t.name: t for t in model.graph.initializer}
    layers = []
    for index, node in enumerate(topological(list(model.graph.node))):
        found = []
        for slot, name in enumerate(node.input):
            t = weights.get(name)
            if t is None or t.data_type not in _FLOAT or _size(t.dims) < 2:
                continue
            shape = tuple(int(d) for d in t.dims)
            if node.op_type in COMMUTATIVE or node.op_type in ("Sub", "Div", "Pow", "Where"):
                shape = _strip_ones(shape)
            found.append((slot, name, shape))
        if found:
            if node.op_type in COMMUTATIVE:
                found = [(0, n, s) for _, n, s in found]
            layers.append(Layer(node, index, _kind(node), found))
    return layers


_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _size(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    k = 0
    while k < len(shape) - 1 and shape[k] == 1:
        k += 1
    return shape[k:]


def _kind(node: onnx.NodeProto) -> str:
    kind = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    if node.op_type in ("Conv", "ConvTranspose"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group != 1:
            kind += f"(group={group})"
    if node.op_type in ("GRU", "LSTM", "RNN"):
        direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "forward")
        kind += f"({direction})"
    return kind


def _compatible(r: Layer, s: Layer) -> bool:
    return r.kind == s.kind and [(k, sh) for k, _, sh in r.weights] == [(k, sh) for k, _, sh in s.weights]


def _describe(layer: Layer) -> str:
    return f"{layer.kind} with weights " + ", ".join("x".join(map(str, s)) or "scalar" for s in layer.shapes)


def _no_match_message(r: Layer, reference: CanonicalModel, free: list[Layer], suspect: CanonicalModel) -> str:
    msg = (f"cannot align the reference's layer {reference.layer_of(r.node.name)!r} ({_describe(r)}): "
           f"the suspect has no unmatched layer of that kind and shape")
    same_kind = [s for s in free if s.kind == r.kind]
    nxt = same_kind[0] if same_kind else (free[0] if free else None)
    if nxt is not None:
        msg += f"; next suspect candidate: {suspect.layer_of(nxt.node.name)!r} ({_describe(nxt)})"
    else:
        msg += "; every suspect layer is already paired"
    foreign = Counter(f"{n.domain}.{n.op_type}" for n in suspect.model.graph.node
                      if n.domain not in ("", "ai.onnx") and any(i in _initializers(suspect.model) for i in n.input))
    if foreign:
        ops = ", ".join(f"{op} x{c}" for op, c in sorted(foreign.items()))
        msg += f" (the suspect's weights are read by operators outside the ONNX standard: {ops})"
    return msg


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


class _Roles:
    """What a layer's output is used for, seen through views and pointwise ops (see the docstring)."""

    def __init__(self, model: onnx.ModelProto):
        self.weights = {t.name for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        self.users: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name:
                    self.users[name].append((node, k))
        self.cache: dict[str, tuple] = {}

    def _trivial(self, node: onnx.NodeProto) -> bool:
        if node.op_type in TRIVIAL:
            return True
        data = [i for i in node.input if i and i not in self.weights]
        return len(data) <= 1 and node.op_type in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")

    def _weighted(self, node: onnx.NodeProto) -> bool:
        return any(i in self.weights for i in node.input) and node.op_type not in ("Reshape", "Expand", "Tile")

    def of(self, node: onnx.NodeProto) -> tuple:
        key = node.name
        if key not in self.cache:
            self.cache[key] = self._role([o for o in node.output if o], ROLE_DEPTH)
        return self.cache[key]

    def _role(self, tensors: list[str], depth: int) -> tuple:
        found, seen = set(), set()
        stack = list(tensors)
        while stack and len(found) < ROLE_FANOUT:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.outputs:
                found.add(("output",))
            for user, k in self.users.get(t, []):
                if self._trivial(user):
                    stack.extend(o for o in user.output if o)
                elif self._weighted(user) and user.op_type not in ("Concat", "Split"):
                    found.add(("layer", user.op_type))
                else:
                    sub = self._role([o for o in user.output if o], depth - 1) if depth > 1 else ()
                    found.add((user.op_type, 0 if user.op_type in COMMUTATIVE else k, sub))
        return tuple(sorted(found, key=repr))
