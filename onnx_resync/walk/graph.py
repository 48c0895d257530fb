"""A read-only view of an ONNX graph for the walker: topological order, shapes, constants, weights.

Shapes come from ONNX shape inference run on a *skeleton* of the model (large weights replaced by
typed inputs), so walking a big model never copies or parses its weight bytes.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Iterable, Iterator

import numpy as np
import onnx

from ..errors import UnsupportedError
from . import registry
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
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {
            n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output
        }
        init_names = set(self.initializers)
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
        self.shapes = _infer_shapes(model)
        self._const_cache: dict[str, np.ndarray | None] = {}
        self.weight_names = self._find_weights()

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
        """The value of a small constant input (shape, axes, sizes), or None if not constant."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        value = None
        tensor = self.stored_tensor(name)
        if tensor is not None:
            count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
            if count <= max_elements:
                value = tensor_values(tensor)
        else:
            node = self.constant_nodes.get(name)
            if node is not None:
                value = constant_node_value(node)
        self._const_cache[name] = value
        return value

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


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of If/Loop/Scan and any other graph-valued attribute."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus outer-scope names that the node's subgraphs read implicitly."""
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


def _infer_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """ONNX shape inference, helped where it stops: Reshape targets computed by Shape/Gather/Concat
    chains are evaluated here (symbolic dims kept symbolic) and fed back as declared shapes."""
    skeleton, shapes = _run_inference(_skeleton(model))
    declared: dict[str, onnx.ValueInfoProto] = {}
    for _ in range(8):  # each round can sharpen the Reshapes downstream of the last ones
        evaluator = _ShapeValues(skeleton, shapes)
        changed = False
        for node in skeleton.graph.node:
            if not node.output or known(shapes.get(node.output[0]) or [None]):
                continue
            if node.op_type == "Reshape":
                dims = _reshape_target(shapes.get(node.input[0]), evaluator.value(node.input[1]),
                                       int(registry.attr(node, "allowzero", 0)))
            elif node.domain == "com.microsoft" and node.output[0] not in shapes:
                dims = _contrib_shape(node, shapes)
            else:
                continue
            if dims is None or dims == shapes.get(node.output[0]):
                continue
            # declare the input's element type: a wrong one would make inference downstream fail
            info = onnx.helper.make_tensor_value_info(node.output[0], _elem_type(skeleton, node.input[0]), dims)
            if node.output[0] in declared:
                declared[node.output[0]].CopyFrom(info)
            else:
                skeleton.graph.value_info.append(info)
                declared[node.output[0]] = skeleton.graph.value_info[-1]
            changed = True
        if not changed:
            break
        # the previous pass's value_info stays in the skeleton, so symbolic dim names stay stable
        skeleton, shapes = _run_inference(skeleton)
        declared = {vi.name: vi for vi in skeleton.graph.value_info if vi.name in declared}
    return shapes


def _contrib_shape(node, shapes):
    """Output dims of ONNX Runtime's quantized contrib ops, which ONNX shape inference skips."""
    def shape(i):
        return shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None

    op = node.op_type
    if op in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"):
        return shape(0)
    if op in ("QLinearAdd", "QLinearMul"):
        a, b = shape(0), shape(3)
        if a is None or b is None:
            return None
        rank = max(len(a), len(b))
        a, b = [1] * (rank - len(a)) + list(a), [1] * (rank - len(b)) + list(b)
        return [y if x == 1 else x for x, y in zip(a, b)]
    if op == "QLinearGlobalAveragePool":
        x = shape(0)
        if x is None:
            return None
        return list(x[:2]) + [1] * (len(x) - 2) if not registry.attr(node, "channels_last", 0) else [x[0]] + [1] * (len(x) - 2) + [x[-1]]
    if op == "QGemm":
        a, b = shape(0), shape(3)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m = a[1] if registry.attr(node, "transA", 0) else a[0]
        n = b[0] if registry.attr(node, "transB", 0) else b[1]
        return [m, n]
    return None


def _reshape_target(in_shape, value, allowzero):
    """Output dims of a Reshape from its input dims and (possibly symbolic) target values."""
    if in_shape is None or value is None or any(v is None for v in value):
        return None
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


# A dim product is (integer part, sorted tuple of symbols); "a*b" strings are symbol products.
def dim_product(dims) -> tuple[int, tuple[str, ...]]:
    value, symbols = 1, []
    for d in dims:
        if isinstance(d, int):
            value *= d
        else:
            symbols.extend(str(d).split("*"))
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


class _ShapeValues:
    """Evaluates small integer tensors computed from shapes; a symbolic dim stays a string."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list]):
        self.shapes = shapes
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.memo: dict[str, list | None] = {}

    def value(self, name: str):
        if name not in self.memo:
            self.memo[name] = None  # guards against cycles
            try:
                self.memo[name] = self._compute(name)
            except Exception:
                self.memo[name] = None
        return self.memo[name]

    def _compute(self, name: str):
        if name in self.inits:
            return tensor_values(self.inits[name]).reshape(-1).tolist()
        node = self.producer.get(name)
        if node is None:
            return None
        op, ins = node.op_type, list(node.input)
        if op == "Constant":
            value = constant_node_value(node)
            return None if value is None else value.reshape(-1).tolist()
        if op == "Shape":
            dims = self.shapes.get(ins[0])
            if dims is None:
                return None
            start, end = registry.attr(node, "start", 0), registry.attr(node, "end", len(dims))
            return list(dims[slice(start, end)])
        if op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
            return self.value(ins[0])
        if op == "Gather":
            data, idx = self.value(ins[0]), self.value(ins[1])
            return None if data is None or idx is None else [data[int(i)] for i in idx]
        if op == "Concat":
            parts = [self.value(i) for i in ins]
            return None if any(p is None for p in parts) else [v for p in parts for v in p]
        if op == "Slice":
            data, starts, ends = self.value(ins[0]), self.value(ins[1]), self.value(ins[2])
            steps = self.value(ins[4]) if len(ins) > 4 and ins[4] else [1]
            if data is None or starts is None or ends is None or steps is None:
                return None
            return data[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
        if op in ("Mul", "Add", "Sub", "Div"):
            a, b = self.value(ins[0]), self.value(ins[1])
            if a is None or b is None:
                return None
            if len(a) == 1 and len(b) > 1:
                a = a * len(b)
            if len(b) == 1 and len(a) > 1:
                b = b * len(a)
            fn = {"Mul": lambda x, y: x * y, "Add": lambda x, y: x + y,
                  "Sub": lambda x, y: x - y, "Div": lambda x, y: x // y}[op]
            out = []
            for x, y in zip(a, b):
                if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                    out.append(fn(int(x), int(y)))
                elif op == "Mul" and x is not None and y is not None:
                    out.append(dim_format(dim_product([x, y])))  # symbolic product, e.g. batch*1
                else:
                    out.append(None)
            return out
        return None


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name == name and vi.type.HasField("tensor_type"):
            return vi.type.tensor_type.elem_type
    for t in g.initializer:
        if t.name == name:
            return t.data_type
    return onnx.TensorProto.FLOAT


def _run_inference(skeleton: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:
        inferred = skeleton  # shape inference failed: fall back to what the file declares
    g = inferred.graph
    shapes: dict[str, list] = {t.name: [int(d) for d in t.dims] for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
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
        shapes[vi.name] = dims
    return inferred, shapes


def known(dims: Iterable) -> bool:
    return all(isinstance(d, int) for d in dims)
