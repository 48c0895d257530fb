"""Layers inside If/Loop/Scan bodies: their weights folded, and one flat view of every layer.

Exporters put a model's layers inside bodies more often than one would think: torch.onnx writes
an LSTM inside an If on whether a state was given (its weights sliced into ONNX's gate order
inside the branch), a model that serves two sample rates holds each rate's weights in a branch,
as Constant nodes or as outer-scope initializers. Another exporter writes the same network
without the If. For the audit, a layer is a layer wherever it sits.

- `fold_bodies` (a canonical pass, canonical.py): inside every body, at any depth, a node that
  canonical's `fold_constants` would fold (registry `foldable`, standard domain) whose inputs are
  all constants (the body's initializers and Constant nodes, the enclosing scopes' constants,
  the main graph's) is evaluated by ONNX's reference implementation; what the remaining nodes
  still read of it becomes a Constant node at the head of the body (named by the output, so a
  weight keeps one name), and constants nothing reads any more are dropped. A body's outputs are
  never folded (the node that writes them stays).
  A Conv or ConvTranspose without a bias gets a zero one there too (affine.zero_biases), and a
  Gemm with constant weights is written as MatMul (+ Add) (affine.gemm_as_matmul).
- `flattened` (align.py's view): the main graph's nodes in topological order with each
  If/Loop/Scan node replaced by its bodies' nodes (recursively), framed by two *links*: an
  `enter` node from the control node's explicit inputs to the body's inputs, and an `exit` node
  from every body's outputs to the control node's outputs, so that "which layer feeds which"
  crosses the body's boundary. *Weights* are every initializer and every Constant node's value,
  in any scope (names are unique across scopes in a valid model). `inside` holds the ids of the
  nodes that sit in a body: their layers may stay unpaired (a branch the other file does not
  have, or writes with other ops): align leaves them out, and their weights count as not
  compared (report._compared).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .passes.affine import _CHANNELS
from .passes.constants import run_node, step_name
from .rewrite import STANDARD, WeightOrigin, Workspace, topological
from ..walk import registry
from ..walk.graph import constant_node_value, node_inputs, subgraphs

LINK_DOMAIN = "onnx_resync.body"  # the domain of flattened's link nodes (never written to a file)


def fold_bodies(ws: Workspace) -> bool:
    """Fold the constant chains inside every body of the workspace's nodes (module docstring)."""
    scope: dict[str, np.ndarray] = {}
    for name in ws.constants:
        scope[name] = None  # read when a body needs it (ws.const), never all at once
    for node in ws.nodes:
        if node.op_type == "Constant" and node.domain in STANDARD and node.output:
            value = constant_node_value(node)
            if value is not None:
                scope[node.output[0]] = value
    folded = 0
    for node in ws.nodes:
        bodies = list(subgraphs(node))
        if not bodies:
            continue
        before = node_inputs(node)
        for g in bodies:
            folded += _fold_graph(g, _Scope(ws, scope), ws)
        # a body that no longer reads an outer name (a Gemm's B now a body constant): the
        # workspace's consumer map follows
        for name in before:
            ws._consumers[name].remove(node)
        for name in node_inputs(node):
            ws._consumers[name].append(node)
    if folded:
        ws.record("constants folded inside If/Loop/Scan bodies", folded)
    return bool(folded)


class _Scope:
    """The constants a body sees: its own, then its enclosing bodies', then the main graph's."""

    def __init__(self, ws: Workspace | None, values: dict, parent: "_Scope | None" = None):
        self.ws, self.values, self.parent = ws, values, parent

    def get(self, name: str):
        s = self
        while s is not None:
            if name in s.values:
                v = s.values[name]
                if v is None and s.ws is not None:
                    v = s.ws.const(name)
                    s.values[name] = v
                return v
            s = s.parent
        return None

    def __contains__(self, name: str) -> bool:
        s = self
        while s is not None:
            if name in s.values:
                return True
            s = s.parent
        return False


def _fold_graph(g: onnx.GraphProto, outer: _Scope, ws: Workspace) -> int:
    """Fold `g` in place; every stored body weight and folded constant gets its origin in
    ws.origins (its sources and storage type: the audit's storage check reads them)."""
    foldable = registry.having("foldable")
    own: dict[str, np.ndarray] = {}
    scope = _Scope(None, own, outer)
    for t in g.initializer:
        own[t.name] = numpy_helper.to_array(t)
        ws.origins.setdefault(t.name, WeightOrigin([t.name], str(own[t.name].dtype)))
    protected = {o.name for o in g.output}
    kept, removed, count = [], [], 0
    for node in topological(list(g.node)):
        if node.op_type == "Constant" and node.domain in STANDARD and node.output:
            value = constant_node_value(node)
            if value is not None:
                own[node.output[0]] = value
                ws.origins.setdefault(node.output[0], WeightOrigin([node.output[0]], str(value.dtype)))
            kept.append(node)
            continue
        inputs = [i for i in node.input if i]
        if (node.op_type in foldable and node.domain in STANDARD and inputs
                and not any(o in protected for o in node.output) and not list(subgraphs(node))
                and all(i in scope for i in inputs)):
            values = _evaluate(node, {i: scope.get(i) for i in inputs})
            if values is not None:
                step = step_name(node, np.asarray(scope.get(inputs[0])).dtype, values[0].dtype)
                origin = ws.origin_of(inputs, step)
                for name, value in zip(node.output, values):
                    if name:
                        own[name] = value
                        ws.origins[name] = origin
                removed.append(node)
                count += 1
                continue
        for sub in subgraphs(node):
            count += _fold_graph(sub, scope, ws)
        count += _zero_bias(node, scope, own, ws)
        matmul = _gemm_as_matmul(node, scope, own, ws)
        if matmul:
            kept += matmul
            count += 1
            continue
        kept.append(node)
    if not count:
        return 0
    used = set(protected)
    for node in kept:
        if node.op_type != "Constant":
            used.update(node_inputs(node))
    written = {o for node in removed for o in node.output if o} | {n for n in own if any(m in n for m in _MADE)}
    heads = [onnx.helper.make_node("Constant", [], [name], name=f"{name}/folded",
                                   value=numpy_helper.from_array(np.asarray(own[name]), name))
             for name in sorted(written & used)]
    kept = [n for n in kept if not (n.op_type == "Constant" and n.output and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(heads + kept)
    return count


def _zero_bias(node: onnx.NodeProto, scope: _Scope, own: dict, ws: Workspace) -> int:
    """A Conv/ConvTranspose without a bias gets a zero one, as canonical's zero_biases gives the
    main graph's (a layer has the same weights wherever it sits); 1 if added."""
    if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in STANDARD or len(node.input) < 2 \
            or (len(node.input) > 2 and node.input[2]) or scope.get(node.input[1]) is None:
        return 0
    name = node.input[1] + "/zero_bias"
    own[name] = np.zeros(_CHANNELS[node.op_type](node, scope.get(node.input[1])), dtype=np.float32)
    ws.origins[name] = WeightOrigin([], "float32", ["synthetic zero bias"])
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    ws.record("zero bias added")
    return 1


# constants made here (written as Constant nodes; new_name may add a suffix)
_MADE = ("/zero_bias", "/gemm_matmul", "/gemm_bias")


def _gemm_as_matmul(node: onnx.NodeProto, scope: _Scope, own: dict, ws: Workspace) -> list[onnx.NodeProto]:
    """A Gemm with constant B (and C) as MatMul (+ Add), as canonical's gemm_as_matmul writes the
    main graph's (ONNX Runtime's quantization pre-processing writes a body's Gemm so); [] if not."""
    if node.op_type != "Gemm" or node.domain not in STANDARD or _attr(node, "transA", 0) or len(node.input) < 2:
        return []
    b_name = node.input[1]
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    B = scope.get(b_name)
    C = scope.get(c_name) if c_name else None
    if B is None or B.ndim != 2 or (c_name and C is None):
        return []
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    trans_b = _attr(node, "transB", 0)
    Bn = np.asarray(B).T if trans_b else np.asarray(B)
    origin = ws.origin_of([b_name], "view Gemm transB" if trans_b else "view Gemm")
    if alpha != 1.0:
        Bn = (Bn.astype(np.float64) * alpha).astype(B.dtype)
        origin.steps.append("computed Gemm alpha")
    w = ws.new_name(b_name + "/gemm_matmul")
    own[w], ws.origins[w] = np.ascontiguousarray(Bn), origin
    out = node.output[0]
    if not c_name:
        return [onnx.helper.make_node("MatMul", [node.input[0], w], [out], name=node.name)]
    C = np.asarray(C)
    if C.ndim == 2 and C.shape[0] == 1:
        C = C.reshape(-1)
    if beta != 1.0:
        C = (C.astype(np.float64) * beta).astype(np.float32)
    c = ws.new_name(c_name + "/gemm_bias")
    own[c], ws.origins[c] = C, ws.origin_of([c_name], "view Gemm bias")
    mid = ws.new_name(out + "/matmul")
    ws.record("Gemm written as MatMul + Add")
    return [onnx.helper.make_node("MatMul", [node.input[0], w], [mid], name=node.name),
            onnx.helper.make_node("Add", [mid, c], [out], name=ws.new_name(node.name + "/bias"))]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _evaluate(node: onnx.NodeProto, feeds: dict) -> list[np.ndarray] | None:
    if any(v is None for v in feeds.values()):
        return None
    if node.op_type == "Identity":
        return [np.asarray(feeds[node.input[0]])]
    if node.op_type in ("Expand", "Tile", "ConstantOfShape", "Range"):
        return None  # a body's shapes are its own business; weights are never built this way here
    return run_node(node, {k: np.asarray(v) for k, v in feeds.items()})


def flattened(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto], set[int]]:
    """(nodes, weights, ids of the nodes inside bodies): the module docstring's flat view."""
    weights = {t.name: t for t in model.graph.initializer}
    out: list[onnx.NodeProto] = []
    inside: set[int] = set()

    def visit(nodes: list[onnx.NodeProto], depth: int) -> None:
        for node in nodes:
            if node.op_type == "Constant" and node.domain in STANDARD and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        weights.setdefault(node.output[0], a.t)
            bodies = list(subgraphs(node))
            if not bodies:
                out.append(node)
                if depth:
                    inside.add(id(node))
                continue
            ends = []
            for g in bodies:
                for t in g.initializer:
                    weights.setdefault(t.name, t)
                if g.input:
                    out.append(_link("enter", [i for i in node.input if i], [i.name for i in g.input]))
                visit(topological(list(g.node)), depth + 1)
                ends += [o.name for o in g.output]
            out.append(_link("exit", ends, [o for o in node.output if o]))

    visit(topological(list(model.graph.node)), 0)
    return out, weights, inside


def has_bodies(model: onnx.ModelProto) -> bool:
    return any(True for node in model.graph.node for _ in subgraphs(node))


def _link(kind: str, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    return onnx.helper.make_node(kind, inputs, outputs, domain=LINK_DOMAIN)


def body_names(model: onnx.ModelProto) -> set[str]:
    """Names of the weights that sit inside bodies (initializers and Constant nodes at any depth)."""
    names: set[str] = set()
    stack = [g for node in model.graph.node for g in subgraphs(node)]
    while stack:
        g = stack.pop()
        names.update(t.name for t in g.initializer)
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                names.add(node.output[0])
            stack.extend(subgraphs(node))
    return names

