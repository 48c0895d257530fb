"""A read-only view of an ONNX graph for the walker: topological order, shapes, constants, weights.

Shapes come from ONNX shape inference run on a *skeleton* of the model (large weights replaced by
typed inputs), so walking a big model never copies or parses its weight bytes.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from typing import Iterable, Iterator

import numpy as np
import onnx

from ..errors import UnsupportedError
from . import branches, registry
from . import shapes as shapes_module
from ..io import is_lazy_tensor, tensor_values

# Initializers up to this many elements keep their data in the skeleton: shape inference needs
# the values of Reshape shapes, Slice starts, Split sizes, and those are small.
SMALL_CONSTANT_ELEMENTS = 64



class GraphView:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        # stored tensors of the graph and of every subgraph (names are unique across scopes)
        self.initializers = {t.name: t for g in nested_graphs(graph) for t in g.initializer}
        self.constant_nodes = {
            n.output[0]: n for g in nested_graphs(graph) for n in g.node
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output
        }
        init_names = {t.name for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in init_names]
        # initializers listed as graph inputs too (IR < 4 style): a caller may feed other values
        self.overridable = [i.name for i in graph.input if i.name in init_names]
        self.graph_outputs = [o.name for o in graph.output]
        self.nodes = _topological_order(graph)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node_inputs(node):
                self.consumers[name].append(node)
        # runs: the If branches that only one rank lets run (branches.py), by the If's first output
        self.shapes, self.runs = _infer_shapes(model)
        _loop_output_shapes(graph, self.shapes)
        self._const_cache: dict[str, np.ndarray | None] = {}
        # values computed from constants and shapes (shapes.py): computed Reshape/Pad/Slice arguments
        self.values = shapes_module.ShapeValues(self.producer, self.shape, self._stored_constant, registry.attr)
        # If nodes are walked through their branches: the branch a constant condition selects, else
        # both; their nodes come right before the If (branches: If node -> the branch graphs walked)
        self.branches: dict[int, list[onnx.GraphProto]] = {}
        # Loop/Scan bodies followed (walker._enter_body/_join_body): the node -> its body, whose nodes
        # come right before it; body_owner: id of each body node -> the innermost Loop/Scan that runs
        # it (a nested Loop/Scan node -> the one around it)
        self.bodies: dict[int, onnx.GraphProto] = {}
        self.body_owner: dict[int, onnx.NodeProto] = {}
        self.nodes = self._with_branches(self.nodes)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer.setdefault(out, node)
        self.consumers = defaultdict(list)
        for node in self.nodes:
            for name in node_inputs(node):
                self.consumers[name].append(node)
        self.weight_names = self._find_weights()

    def _with_branches(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        out = []
        for node in nodes:
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input:
                cond = self.constant(node.input[0])
                if cond is None and node.output and node.output[0] in self.runs:
                    cond = np.array(self.runs[node.output[0]])
                then_g = next((a.g for a in node.attribute if a.name == "then_branch"), None)
                else_g = next((a.g for a in node.attribute if a.name == "else_branch"), None)
                if then_g is not None and else_g is not None:
                    chosen = [then_g, else_g] if cond is None or cond.size != 1 else [
                        then_g if bool(cond.reshape(-1)[0]) else else_g]
                    self.branches[id(node)] = chosen
                    for g in chosen:
                        # known before an If inside it reads its condition (computed from the
                        # branch's shapes: a None evaluated too early would be kept)
                        for n in g.node:
                            for o in n.output:
                                if o:
                                    self.producer.setdefault(o, n)
                        out.extend(self._with_branches(_topological_order(g)))
            elif self._followed_body(node) is not None:
                body = self._followed_body(node)
                self.bodies[id(node)] = body
                inner = self._with_branches(_topological_order(body))
                for n in inner:
                    self.body_owner.setdefault(id(n), node)
                out.extend(inner)
            out.append(node)
        return out

    def _followed_body(self, node: onnx.NodeProto) -> onnx.GraphProto | None:
        """The body of a Loop, or of a Scan of opset 9+ (no batch axis), that the walker follows (at any
        depth: a Loop in a Loop's body or an If's branch is followed inside it)."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Loop", "Scan"):
            return None
        if node.op_type == "Scan" and self.opsets.get("", 0) < 9:
            return None
        return next((a.g for a in node.attribute if a.name == "body"), None)

    # ---- constants and weights -------------------------------------------------------------
    def is_weight(self, name: str) -> bool:
        return name in self.weight_names

    def stored_tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        node = self.constant_nodes.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return attr.t
        return None

    def constant(self, name: str, max_elements: int = 1 << 16) -> np.ndarray | None:
        """The value of a small constant input (shape, axes, sizes), or None if not constant: a stored
        one, or one the graph computes from constants and shapes that no symbolic dim leaves open."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        value = self._stored_constant(name, max_elements)
        if value is None and self.stored_tensor(name) is None and name not in self.constant_nodes:
            value = self.values.numeric(name)
        self._const_cache[name] = value
        return value

    def _stored_constant(self, name: str, max_elements: int = 1 << 16) -> np.ndarray | None:
        tensor = self.stored_tensor(name)
        if tensor is not None:
            count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
            return tensor_values(tensor) if count <= max_elements else None
        node = self.constant_nodes.get(name)
        return constant_node_value(node) if node is not None else None

    def _find_weights(self) -> set[str]:
        """Initializers, Constant outputs, and weight views (Identity/Cast/Dequantize... of weights)."""
        weights = set(self.initializers) | {
            name for name in self.constant_nodes if self.stored_tensor(name) is not None
        }
        for node in self.nodes:
            spec = registry.spec_of(node, self.opsets)
            if spec is not None and spec.weight_view:  # a weight passed through it is still that weight
                data_inputs = [i for i in node.input if i]
                if data_inputs and all(i in weights for i in data_inputs):
                    weights.update(o for o in node.output if o)
        return weights

    def index_sources(self, name: str, axis: int, depth: int = 0) -> list[tuple[str, int, np.ndarray]] | None:
        """Where each position of `axis` of a weight view lives in the stored tensors: [(stored, axis,
        positions)], positions[p] the stored index of position p (-1: not from that tensor). Follows
        index-mapping chains (Slice, Concat, Split, Transpose, Squeeze/Unsqueeze, size-1 Reshape,
        Identity/Cast) the way an exporter reorders LSTM gates; None where a step is not such a map."""
        shape = self.shape(name)
        if shape is None or axis >= len(shape) or not isinstance(shape[axis], int) or depth > 64:
            return None
        if self.stored_tensor(name) is not None:
            return [(name, axis, np.arange(shape[axis]))]
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or not node.input:
            return None
        op, src = node.op_type, node.input[0]
        if op in ("Identity", "Cast") or (op == "DynamicQuantizeLinear" and name == node.output[0]):
            # (DynamicQuantizeLinear: one scale from the whole tensor's min and max, element by element)
            return self.index_sources(src, axis, depth + 1)
        if op == "Transpose":
            perm = registry.attr(node, "perm", None)
            perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
            return self.index_sources(src, perm[axis], depth + 1)
        if op in ("Squeeze", "Unsqueeze", "Reshape"):
            in_shape = self.shape(src)
            if in_shape is None:
                return None
            in_real = [i for i, d in enumerate(in_shape) if d != 1]
            out_real = [i for i, d in enumerate(shape) if d != 1]
            if [in_shape[i] for i in in_real] != [shape[i] for i in out_real] or axis not in out_real:
                return None
            return self.index_sources(src, in_real[out_real.index(axis)], depth + 1)
        if op in ("Slice", "Split"):
            in_shape = self.shape(src)
            kept = self._selected(node, axis, in_shape, name)
            if kept is None:
                return None
            found = self.index_sources(src, axis, depth + 1)
            return None if found is None else [(b, a, pos[kept]) for b, a, pos in found]
        if op == "Concat":
            cat = int(registry.attr(node, "axis", 0)) % len(shape)
            parts = []
            for i in node.input:
                found = self.index_sources(i, axis, depth + 1) if i else None
                if found is None:
                    return None
                parts.append((found, (self.shape(i) or [0] * len(shape))[axis]))
            if cat != axis:  # every piece spans the whole axis
                return [entry for found, _ in parts for entry in found]
            out, offset, total = [], 0, shape[axis]
            for found, length in parts:
                for b, a, pos in found:
                    full = np.full(total, -1, dtype=np.int64)
                    full[offset:offset + length] = pos
                    out.append((b, a, full))
                offset += length
            return _merge_positions(out)
        return None

    def _selected(self, node, axis: int, in_shape, name: str) -> np.ndarray | None:
        """The input positions a Slice or one Split output keeps along `axis` (all when not cut)."""
        if in_shape is None or not isinstance(in_shape[axis], int):
            return None
        n = in_shape[axis]
        if node.op_type == "Slice":
            if registry.attr(node, "starts", None) is not None:
                starts, ends = list(registry.attr(node, "starts")), list(registry.attr(node, "ends"))
                axes, steps = registry.attr(node, "axes", None), None
            else:
                starts, ends = self.constant(node.input[1]), self.constant(node.input[2])
                axes = self.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
                steps = self.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
                if starts is None or ends is None:
                    return None
                if any(v is not None and (np.ndim(v) != 1 or v.dtype.kind not in "iu") for v in (starts, ends, axes, steps)):
                    return None  # bounds ONNX refuses (another type, 2-D)
            axes = list(range(len(starts))) if axes is None else list(axes)
            steps = [1] * len(starts) if steps is None else list(steps)
            if not all(-len(in_shape) <= int(a) < len(in_shape) for a in axes) or 0 in steps:
                return None
            axes = [int(a) % len(in_shape) for a in axes]
            for a, s, e, st in zip(axes, starts, ends, steps):
                if a == axis:
                    return np.arange(n)[slice(int(s), int(e), int(st))]
            return np.arange(n)
        split_axis = int(registry.attr(node, "axis", 0)) % len(in_shape)
        if split_axis != axis:
            return np.arange(n)
        sizes = registry.attr(node, "split", None)
        if sizes is None and len(node.input) > 1 and node.input[1]:
            sizes = self.constant(node.input[1])
            if sizes is None or sizes.ndim != 1 or sizes.dtype.kind not in "iu":
                return None
        if sizes is None:
            sizes = [-(-n // len(node.output))] * len(node.output)
        bounds = np.cumsum([0] + [int(v) for v in sizes])
        k = list(node.output).index(name)
        return np.arange(n)[bounds[k]:bounds[k + 1]]

    # ---- shapes -----------------------------------------------------------------------------
    def shape(self, name: str) -> list | None:
        """Dims as ints (known) or str/None (symbolic/unknown); None if the rank is unknown."""
        if name in self.shapes:
            return self.shapes[name]
        tensor = self.stored_tensor(name)
        if tensor is not None:
            return [int(d) for d in tensor.dims]
        return None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def producer_op_count(self) -> int:
        return len(self.nodes)


def _merge_positions(entries):
    """One entry per (stored tensor, axis): positions from several pieces combined (a stored position
    that two pieces both read makes the map not one to one: None)."""
    merged: dict[tuple[str, int], np.ndarray] = {}
    for b, a, pos in entries:
        if (b, a) in merged:
            prev = merged[(b, a)]
            if ((prev >= 0) & (pos >= 0)).any():
                return None
            merged[(b, a)] = np.where(pos >= 0, pos, prev)
        else:
            merged[(b, a)] = pos
    return [(b, a, pos) for (b, a), pos in merged.items()]


def loop_layout(node: onnx.NodeProto, body: onnx.GraphProto):
    """(carried pairs [(outer initial, body input, body output, node output)], scan inputs [(outer,
    body input, axis)], scan outputs [(body output, node output, axis)]) of a Loop or Scan."""
    if node.op_type == "Loop":
        n = len(node.input) - 2
        carried = [(node.input[2 + i], body.input[2 + i].name, body.output[1 + i].name,
                    node.output[i] if i < len(node.output) else "") for i in range(n)]
        scans = [(body.output[1 + n + k].name, node.output[n + k], 0) for k in range(len(node.output) - n)]
        return carried, [], scans
    m = int(next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0))
    n = len(node.input) - m
    in_axes = list(next((a.ints for a in node.attribute if a.name == "scan_input_axes"), [])) or [0] * m
    out_axes = list(next((a.ints for a in node.attribute if a.name == "scan_output_axes"), [])) or [0] * (
        len(node.output) - n)
    carried = [(node.input[i], body.input[i].name, body.output[i].name, node.output[i]) for i in range(n)]
    ins = [(node.input[n + j], body.input[n + j].name, in_axes[j]) for j in range(m)]
    scans = [(body.output[n + k].name, node.output[n + k], out_axes[k]) for k in range(len(node.output) - n)]
    return carried, ins, scans


def _loop_output_shapes(graph: onnx.GraphProto, shapes: dict) -> None:
    """Loop/Scan outputs that shape inference left without a shape (a body whose outputs it could not
    relate to the node's: an If or another Loop inside) get their body outputs' ranks: a carried
    state its body output's dims (the initial's where they agree, else a dim of its own), a scan
    output those with the iteration axis added. Inner bodies first, so a Loop in a body is known
    before the body's own outputs are read."""
    for node in graph.node:
        for g in subgraphs(node):
            _loop_output_shapes(g, shapes)
        if node.op_type not in ("Loop", "Scan") or node.domain not in ("", "ai.onnx"):
            continue
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None:
            continue
        carried, _, scans = loop_layout(node, body)
        for outer, _, body_out, out in carried:
            dims, start = shapes.get(body_out), shapes.get(outer)
            if not out or shapes.get(out) is not None or dims is None:
                continue
            shapes[out] = [d if isinstance(d, int) or (start is not None and len(start) == len(dims)
                                                        and start[a] == d) else f"?{out}:{a}"
                           for a, d in enumerate(dims)]
        for body_out, out, axis in scans:
            dims = shapes.get(body_out)
            if not out or shapes.get(out) is not None or dims is None:
                continue
            dims = [d if isinstance(d, int) else f"?{out}:{a}" for a, d in enumerate(dims)]
            axis = axis % (len(dims) + 1)
            shapes[out] = dims[:axis] + [f"?{out}:steps"] + dims[axis:]


def nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph inside it, at any depth."""
    yield graph
    for node in graph.node:
        for g in subgraphs(node):
            yield from nested_graphs(g)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of If/Loop/Scan and any other graph-valued attribute."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs (empty optional ones left out: the implicit names start after
    sum(1 for i in node.input if i)) plus outer-scope names that the node's subgraphs read."""
    names = [i for i in node.input if i]
    for g in subgraphs(node):
        names.extend(sorted(outer_scope_names(g)))
    return names


def outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        for name in node_inputs(node):
            if name not in defined:
                used.add(name)
        defined.update(o for o in node.output if o)
    return used - defined


def _topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    produced_by: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if out:
                if out in produced_by:
                    raise UnsupportedError(f"tensor {out!r} is produced by two nodes")
                produced_by[out] = idx
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for idx, node in enumerate(graph.node):
        d = {produced_by[n] for n in node_inputs(node) if n in produced_by}
        deps.append(d)
        for p in d:
            users[p].append(idx)
    remaining = [len(d) for d in deps]
    ready = deque(i for i, r in enumerate(remaining) if r == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(graph.node[i])
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        stuck = next(graph.node[i] for i, r in enumerate(remaining) if r > 0)
        raise UnsupportedError(f"graph has a cycle (node {stuck.name or stuck.op_type!r} never becomes ready)")
    return order


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, whichever attribute holds it (None for sparse/string forms)."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return tensor_values(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without large initializer data: those become typed graph inputs."""
    graph = model.graph
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    g = skel.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    declared = {i.name for i in graph.input}
    g.input.extend(graph.input)
    for init in graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        if count <= SMALL_CONSTANT_ELEMENTS and init.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
        elif count <= SMALL_CONSTANT_ELEMENTS and is_lazy_tensor(init):  # mapped: its values inline
            g.initializer.append(onnx.numpy_helper.from_array(tensor_values(init), init.name))
        elif init.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return skel


def _infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, bool]]:
    """ONNX shape inference, helped where it stops: the outputs of ops whose shape the graph computes
    (Reshape targets, Expand/Tile/ConstantOfShape/Range/Pad/Slice arguments built from Shape ->
    Gather -> Concat chains) are evaluated by shapes.py (symbolic dims kept symbolic) and fed back as
    declared shapes, and so are the outputs of an If whose branch the graph decides (branches.py).
    Returns the shapes and the Ifs decided by rank (branches.by_rank)."""
    skeleton, own = _own_placeholders(_skeleton(model))
    skeleton, shapes = _run_inference(skeleton)
    declared: dict[str, onnx.ValueInfoProto] = {}
    runs: dict[str, bool] = {}
    skeleton, shapes = _settle(skeleton, shapes, declared, runs)
    found = branches.by_rank(skeleton, shapes, _skeleton_values, _run_inference)
    if found:
        runs.update(found)
        skeleton, shapes = _settle(skeleton, shapes, declared, runs)
    if declared:
        _sharpen_downstream(skeleton, declared, shapes)
    return _placeholders_back(shapes, own), runs


def _settle(skeleton: onnx.ModelProto, shapes: dict, declared: dict, runs: dict) -> tuple[onnx.ModelProto, dict]:
    """Rounds of computed shapes declared and inference run again, until nothing changes."""
    # each round can sharpen the computed shapes downstream of the last ones; a chain of ops ONNX does
    # not know (contrib ops between Convs) needs a round per op
    unknown_to_onnx = sum(1 for n in skeleton.graph.node if getattr(registry.spec_of(n), "output_shapes", None))
    for _ in range(8 + unknown_to_onnx):
        values = _skeleton_values(skeleton, shapes)
        changed = False
        for node in skeleton.graph.node:
            if not node.output or known(shapes.get(node.output[0]) or [None]):
                continue
            if node.domain in ("", "ai.onnx") and node.op_type in _COMPUTED_SHAPES:
                dims = _COMPUTED_SHAPES[node.op_type](node, shapes, values)
                if dims is not None and not _sharper(dims, shapes.get(node.output[0])):
                    dims = None
                found = [(node.output[0], dims, _computed_elem_type(skeleton, node))]
            elif node.op_type == "ConcatFromSequence" and node.domain in ("", "ai.onnx"):
                found = [(node.output[0], _concat_from_sequence_shape(skeleton, node, shapes), None)]
            elif node.output[0] not in shapes:
                found = _registry_shapes(node, shapes)  # ops ONNX does not know (contrib ops)
            else:
                continue
            for name, dims, elem_type in found:
                if not name or dims is None or dims == shapes.get(name):
                    continue
                # declare the input's element type (or the one the op's entry says): a wrong one would
                # make inference downstream fail
                elem_type = _elem_type(skeleton, node.input[0]) if elem_type is None else elem_type
                if isinstance(elem_type, str):  # the element type of that input
                    elem_type = _elem_type(skeleton, elem_type)
                info = onnx.helper.make_tensor_value_info(name, elem_type, dims)
                if name in declared:
                    declared[name].CopyFrom(info)
                else:
                    skeleton.graph.value_info.append(info)
                    declared[name] = skeleton.graph.value_info[-1]
                shapes[name] = dims  # (the next op of the same round may read it)
                changed = True
        for graph, name, dims, elem_type in branches.decided_shapes(skeleton, shapes, values, runs, _sharper):
            info = onnx.helper.make_tensor_value_info(name, elem_type, dims)
            if name in declared:
                declared[name].CopyFrom(info)
            else:
                graph.value_info.append(info)
                declared[name] = graph.value_info[-1]
            shapes[name] = dims
            changed = True
        if not changed:
            break
        # the previous pass's value_info stays in the skeleton, so symbolic dim names stay stable
        skeleton, shapes = _run_inference(skeleton)
        fresh = {vi.name: vi for g in nested_graphs(skeleton.graph) for vi in g.value_info if vi.name in declared}
        declared.clear()
        declared.update(fresh)
    return skeleton, shapes


# tf2onnx names a graph input's dynamic dims 'unk__N' itself: the file's own symbols, which `_named`
# would take for inference's placeholders (a computed shape carrying the input's batch never replaces
# an inferred placeholder, so a Reshape merging channels after a BroadcastTo pins). While shapes are
# inferred they carry this prefix.
_OWN = "own:"
_PLACEHOLDER = re.compile(r"(own:)?(unk__\w+)")


def _own_placeholders(skeleton: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """The skeleton with the 'unk__N' dim names of the graph's inputs prefixed wherever they occur (it
    is a copy), and those names. Only the inputs' (the caller feeds them): a value_info's 'unk__N' is
    a placeholder a previous inference wrote into the file."""
    own = {d.dim_param for vi in skeleton.graph.input if vi.type.HasField("tensor_type")
           for d in vi.type.tensor_type.shape.dim if d.HasField("dim_param") and _PLACEHOLDER.fullmatch(d.dim_param)}
    for g in nested_graphs(skeleton.graph) if own else []:
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            for d in vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []:
                if d.HasField("dim_param") and d.dim_param in own:
                    d.dim_param = _OWN + d.dim_param
    return skeleton, own


def _placeholders_back(shapes: dict[str, list], own: set[str]) -> dict[str, list]:
    """The file's own names again; a placeholder that inference named like one of them (it no longer
    saw the file's) gets a '?' so that two different dims never share a name."""
    if not own:
        return shapes

    def back(match):
        return match.group(2) if match.group(1) else ("?" + match.group(2) if match.group(2) in own else match.group(0))

    return {name: [_PLACEHOLDER.sub(back, d) if isinstance(d, str) else d for d in dims]
            for name, dims in shapes.items()}


def _sharpen_downstream(skeleton: onnx.ModelProto, declared: dict, shapes: dict) -> None:
    """Inference keeps a dim it once left unknown (a Transpose of [4*batch, S, d] stayed [unk__7, d, S]
    after the Reshape before it was declared [4*batch, S, d]). Run it once more without those entries
    and take only the dims it now names, as a renaming of the unknown dim everywhere: an unknown dim's
    own name ('unk__k') ties equal dims together (a residual Add, a Reshape computed from it), and a
    fresh run would give them other names. An unknown dim named two ways is left as it is."""
    again = onnx.ModelProto()
    again.CopyFrom(skeleton)
    _forget_unknown_readers(again, declared)
    _, fresh = _run_inference(again)
    names: dict[str, set] = defaultdict(set)
    for name, dims in fresh.items():
        old = shapes.get(name)
        if old is not None and len(old) == len(dims):
            for o, n in zip(old, dims):
                if isinstance(o, str) and not _named(o) and _named(n):
                    names[o].add(n)
    rename = {o: next(iter(n)) for o, n in names.items() if len(n) == 1}
    if not rename:
        return
    for name, dims in shapes.items():
        if any(isinstance(d, str) for d in dims):
            shapes[name] = [_renamed(d, rename) for d in dims]


def _renamed(d, rename: dict):
    """A dim with its unknown factors renamed ('2*unk__3' -> '2*batch'; a number stays one)."""
    if not isinstance(d, str):
        return d
    if d in rename:
        return rename[d]
    parts = d.split("*")
    if len(parts) == 1 or not any(p in rename for p in parts):
        return d
    return dim_format(dim_product([rename.get(p, p) for p in parts]))


def _forget_unknown_readers(skeleton: onnx.ModelProto, declared: dict) -> None:
    """Remove the value_info of tensors downstream of a declared (computed) shape that hold a dim
    inference could not name, so the next inference computes them from the declared shapes."""
    graph = skeleton.graph
    readers, grew = set(declared), True
    while grew:  # every tensor computed from a declared one, at any distance
        before = len(readers)
        readers |= {o for n in graph.node if any(i in readers for i in n.input) for o in n.output if o}
        grew = len(readers) != before
    readers -= set(declared)
    keep = [vi for vi in graph.value_info if vi.name not in readers or _named_shape(vi)]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def _named_shape(vi: onnx.ValueInfoProto) -> bool:
    """Every dim of `vi` says something (see _named)."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return False
    return all(d.HasField("dim_value") or (d.HasField("dim_param") and _named(d.dim_param))
               for d in vi.type.tensor_type.shape.dim)


def _sharper(new: list, old: list | None) -> bool:
    """A computed shape replaces an inferred one where it knows as much or more: the rank kept, and
    every dim it changes was unknown to inference (a dim of its own, now the input's symbol or a
    product) or becomes a number."""
    if old is None:
        return True
    if len(new) != len(old) or list(new) == list(old):
        return False
    return all(n == o or not _named(o) or isinstance(n, int) for n, o in zip(new, old))


def _named(d) -> bool:
    """A dim that says something: an int, a dim_param or a product (not '?tensor:axis', nor the
    'unk__k' that ONNX shape inference names a dim it could not compute)."""
    return isinstance(d, int) or (isinstance(d, str) and not d.startswith(("?", "unk__")))


def _skeleton_values(skeleton: onnx.ModelProto, shapes: dict) -> shapes_module.ShapeValues:
    # every scope's (names are unique across scopes): an If inside a branch tests that branch's shapes
    inits = {t.name: t for g in nested_graphs(skeleton.graph) for t in g.initializer}
    producer = {o: n for g in nested_graphs(skeleton.graph) for n in g.node for o in n.output if o}

    def constant(name):
        t = inits.get(name)
        if t is not None:
            count = int(np.prod(t.dims)) if len(t.dims) else 1
            return tensor_values(t) if count <= shapes_module.MAX_ELEMENTS else None
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return constant_node_value(node)
        return None

    return shapes_module.ShapeValues(producer, shapes.get, constant, registry.attr)


def _computed_elem_type(skeleton: onnx.ModelProto, node) -> int:
    if node.op_type == "ConstantOfShape":
        value = registry.attr(node, "value", None)
        return value.data_type if value is not None else onnx.TensorProto.FLOAT
    return _elem_type(skeleton, node.input[0])


def _reshape_shape(node, shapes, values):
    return _reshape_target(shapes.get(node.input[0]), values.dims(node.input[1]),
                           int(registry.attr(node, "allowzero", 0)))


def _broadcast_dims(a: list, b: list) -> list | None:
    rank = max(len(a), len(b))
    a, b = [1] * (rank - len(a)) + list(a), [1] * (rank - len(b)) + list(b)
    out = []
    for x, y in zip(a, b):
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        else:
            return None  # a symbolic dim against another: which one wins is known only at run time
    return out


def _expand_shape(node, shapes, values):
    x, target = shapes.get(node.input[0]), values.dims(node.input[1])
    return None if x is None or target is None else _broadcast_dims(x, target)


def _scaled_dims(elements) -> list | None:
    dims = [shapes_module.to_dim(e) for e in elements]
    return None if any(d is None for d in dims) else dims


def _tile_shape(node, shapes, values):
    x, reps = shapes.get(node.input[0]), values.integers(node.input[1])
    if x is None or reps is None or len(reps) != len(x):
        return None
    return _scaled_dims([shapes_module.from_dim(d) * r for d, r in zip(x, reps)])


def _constant_of_shape_shape(node, shapes, values):
    return values.dims(node.input[0])


def _range_shape(node, shapes, values):
    out = values.value(node.output[0])
    return None if out is None else [int(out.array.shape[0])]


def _pad_shape(node, shapes, values):
    x = shapes.get(node.input[0])
    pads = registry.attr(node, "pads", None)
    pads = list(pads) if pads is not None else (values.integers(node.input[1]) if len(node.input) > 1 else None)
    if x is None or pads is None:
        return None
    axes = values.integers(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(x)))
    if axes is None or len(pads) != 2 * len(axes):
        return None
    out = [shapes_module.from_dim(d) for d in x]
    for k, a in enumerate(axes):
        if not isinstance(a, int) or not -len(x) <= a < len(x):  # ONNX refuses an axis out of range
            return None
        out[a % len(x)] = out[a % len(x)] + pads[k] + pads[k + len(axes)]
    return _scaled_dims(out)


def _slice_shape(node, shapes, values):
    """Slice with bounds computed from shapes: exact on axes of known size; a symbolic axis only
    when the bounds keep it whole."""
    x = shapes.get(node.input[0])
    if x is None or len(node.input) < 3:
        return None
    starts, ends = values.integers(node.input[1]), values.integers(node.input[2])
    axes = values.integers(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = values.integers(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    out = list(x)
    for a, s, e, st in zip(axes, starts, ends, steps):
        if not all(isinstance(v, int) for v in (a, s, e, st)) or st == 0 or not -len(x) <= a < len(x):
            return None
        a = a % len(x)
        if isinstance(x[a], int):
            out[a] = len(range(x[a])[slice(s, e, st)])
        elif not (s == 0 and st == 1 and e >= 2 ** 31 - 1):
            return None
    return out


def _concat_from_sequence_shape(skeleton: onnx.ModelProto, node, shapes) -> list | None:
    """ConcatFromSequence of a sequence whose tensors' shape is known where they are put in (a list
    built in a Loop body by SequenceInsert: inference gives the Loop's sequence output none): their
    dims, the joined axis (new or not) of unknown length."""
    producers = {o: n for g in nested_graphs(skeleton.graph) for n in g.node for o in n.output if o}
    name, element = node.input[0], None
    for _ in range(16):
        src = producers.get(name)
        if src is None or src.domain not in ("", "ai.onnx"):
            return None
        if src.op_type in ("SequenceInsert", "SequenceConstruct"):
            element = shapes.get(src.input[1] if src.op_type == "SequenceInsert" else src.input[0])
            break
        if src.op_type in ("SequenceErase", "Identity"):
            name = src.input[0]
        elif src.op_type in ("Loop", "Scan"):
            body = next((a.g for a in src.attribute if a.name == "body"), None)
            carried = loop_layout(src, body)[0] if body is not None else []
            name = next((b for _, _, b, out in carried if out == name), None)
            if name is None:
                return None
        else:
            return None
    if element is None:
        return None
    new = int(registry.attr(node, "new_axis", 0))
    rank = len(element) + (1 if new else 0)
    axis = int(registry.attr(node, "axis", 0))
    if not -rank <= axis < rank:
        return None
    axis %= rank
    out = [d if isinstance(d, int) else f"?{node.output[0]}:{a}" for a, d in enumerate(element)]
    if new:
        out.insert(axis, f"?{node.output[0]}:{axis}")
    else:
        out[axis] = f"?{node.output[0]}:{axis}"
    return out


# ops whose output shape is computed from a value (shapes.py evaluates it)
_COMPUTED_SHAPES = {"Reshape": _reshape_shape, "Expand": _expand_shape, "Tile": _tile_shape,
                    "ConstantOfShape": _constant_of_shape_shape, "Range": _range_shape, "Pad": _pad_shape,
                    "Slice": _slice_shape}


def _registry_shapes(node, shapes) -> list[tuple[str, list | None, int | None]]:
    """(output, dims, element type or None: the first input's) from the op's registry entry
    (`output_shapes`: dims, or (dims, element type or the name of the input whose type it has), per
    output), for ops ONNX shape inference skips."""
    spec = registry.spec_of(node)
    if spec is None or spec.output_shapes is None:
        return []

    def shape_of(i):
        return shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None

    try:
        dims = spec.output_shapes(node, shape_of)
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return []  # inputs that disagree with the op: unknown, and the walker pins what it cannot follow
    return [(name, *(d if isinstance(d, tuple) else (d, None))) for name, d in zip(node.output, dims or [])]


def _reshape_target(in_shape, value, allowzero):
    """Output dims of a Reshape from its input dims and (possibly symbolic) target values."""
    if in_shape is None or value is None or any(v is None for v in value):
        return None
    if not allowzero and any(v == 0 for v in value[len(in_shape):]):
        return None  # a 0 beyond the input's rank: an invalid target
    out = []
    for i, v in enumerate(value):
        out.append(in_shape[i] if (v == 0 and not allowzero and i < len(in_shape)) else v)
    if sum(1 for v in out if v == -1) > 1:
        return None
    if -1 in out:
        total = dim_product(in_shape)
        rest = dim_product([d for d in out if d != -1])
        missing = dim_divide(total, rest)
        if missing is None:
            return None
        out[out.index(-1)] = dim_format(missing)
    return [d if isinstance(d, int) else str(d) for d in out]


# A dim product is (integer part, sorted tuple of symbols); "4*a*b" strings are products (shapes.py).
def dim_product(dims) -> tuple[int, tuple[str, ...]]:
    value, symbols = 1, []
    for d in dims:
        if isinstance(d, int):
            value *= d
            continue
        for part in str(d).split("*"):
            if part.isdigit():
                value *= int(part)
            else:
                symbols.append(part)
    return value, tuple(sorted(symbols))


def dim_divide(a, b):
    """a / b when b divides a exactly (symbols as a multiset), else None."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    left = list(a[1])
    for s in b[1]:
        if s not in left:
            return None
        left.remove(s)
    return a[0] // b[0], tuple(left)


def dim_format(p):
    if not p[1]:
        return p[0]
    return "*".join(([str(p[0])] if p[0] != 1 else []) + list(p[1]))


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name == name and vi.type.HasField("tensor_type"):
            return vi.type.tensor_type.elem_type
    for t in g.initializer:
        if t.name == name:
            return t.data_type
    return onnx.TensorProto.FLOAT


def _run_inference(skeleton: onnx.ModelProto, strict: bool = False) -> tuple[onnx.ModelProto, dict[str, list]]:
    """(inferred model, shapes); strict: inference's refusal of a node is raised (branches.py)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=strict, data_prop=True)
    except Exception:
        if strict:
            raise
        inferred = skeleton  # shape inference failed: fall back to what the file declares
    shapes: dict[str, list] = {}
    infos = []
    for g in nested_graphs(inferred.graph):  # subgraphs' tensors too (If branches are walked)
        shapes.update({t.name: [int(d) for d in t.dims] for t in g.initializer})
        infos += list(g.input) + list(g.value_info) + list(g.output)
    for vi in infos:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value >= 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(f"?{vi.name}:{len(dims)}")  # unknown: a symbol of its own
        if vi.name not in shapes or _sharper(dims, shapes[vi.name]):  # (a graph output's own entry
            shapes[vi.name] = dims  # may know less than the value_info computed for it)
    return inferred, shapes


def known(dims: Iterable) -> bool:
    return all(isinstance(d, int) for d in dims)
