"""The rewrite workspace: one graph that canonicalization's passes (audit/passes/) edit in place.

- A *node* is an onnx.NodeProto the workspace owns: a copy of one of the file's nodes (given a
  unique name), or one a pass made. The workspace keeps its nodes in topological order; a pass puts
  the nodes that stand for an old one where the old one was.
- A *tensor* is a name. A *constant* is a tensor whose value is known: the file's initializers and
  Constant nodes (read as constants, not kept as nodes) and what passes compute. Its value is an
  array, or a *lazy tensor* (a TensorProto whose payload is memory-mapped from its file or computed
  on demand: onnx_resync.io), read only when a pass asks for it (`const`).
- The *origin* of a constant (WeightOrigin) is what it was computed from in the file: the stored
  tensors, their storage type and the steps applied, so that reports speak of the file's names.
- The *producer* of a tensor is the node that writes it, its *consumers* the nodes that read it (a
  subgraph's reads of outer names included, once per read). Both are always current: every change
  goes through the workspace (`add`, `replace`, `remove`, `rewire`, `set_input`, `set_output`);
  a pass never writes a node's inputs or outputs itself.
- A *protected* tensor keeps its name: a graph output, a name that a subgraph reads.
- Each node is *shown as* one of the file's nodes (`shown`): a node a pass made is shown as the one
  it stands for, so that reports name the file's layers.
- A pass *records* what it did ("BatchNormalization folded into Conv"); the counts go to the report.
- An *expansion* (Expansion) is the list of nodes that stand for one node of the file (a contrib op
  written out in standard ops), shown as that node and put in its place in one `commit`.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedError
from ..io import is_lazy_tensor, tensor_values
from ..walk import registry
from ..walk.registry import attr  # noqa: F401  (the one attribute reader; passes import it from here)
from ..walk.graph import constant_node_value, node_inputs, outer_scope_names, subgraphs

STANDARD = ("", "ai.onnx")


@dataclass
class WeightOrigin:
    """Where a canonical weight came from in the input model."""

    sources: list[str]  # stored tensors (initializers / Constant outputs) it was computed from; [] if synthetic
    dtype: str  # storage type of its main source: 'float32', 'float16', 'int8', ...
    steps: list[str] = field(default_factory=list)  # what canonicalization did to it
    layer: str = ""  # the input model's node that reads it (filled in at the end)

    @property
    def quantized(self) -> bool:
        return self.dtype.startswith(("int", "uint")) or any(s.startswith("dequantized") for s in self.steps)

    @property
    def computed(self) -> bool:
        """Arithmetic beyond a cast (folding, dequantization): rounding differs from the source's."""
        return any(not s.startswith(("cast", "view")) for s in self.steps)

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "dtype": self.dtype, "steps": list(self.steps), "layer": self.layer}


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def display_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<unnamed {node.op_type} #{index}>"


def topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's order, ties kept in list order; refuses cycles."""
    produced = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                produced[o] = i
    users = defaultdict(list)
    remaining = []
    for i, n in enumerate(nodes):
        deps = {produced[x] for x in node_inputs(n) if x in produced and produced[x] != i}
        remaining.append(len(deps))
        for d in deps:
            users[d].append(i)
    ready = deque(i for i, r in enumerate(remaining) if r == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, r in enumerate(remaining) if r > 0)
        raise UnsupportedError(f"graph has a cycle (node {stuck.name or stuck.op_type!r} never becomes ready)")
    return order


class Workspace:
    """Nodes, constants and their origins, with current producer and consumer maps (module docstring)."""

    def __init__(self, model: onnx.ModelProto):
        self.source = model
        self.graph = model.graph
        self.constants: dict[str, np.ndarray | onnx.TensorProto] = {}
        self.origins: dict[str, WeightOrigin] = {}
        self.shown: dict[str, str] = {}  # node name -> the file's node it is shown as
        self.changes: Counter = Counter()
        self.inputs = {vi.name for vi in self.graph.input}
        self.protected: set[str] = {vi.name for vi in self.graph.output}
        self._taken: set[str] = set(self.inputs) | self.protected
        self._order: list[onnx.NodeProto] = []  # may still hold removed nodes; see `nodes`
        self._alive: set[int] = set()
        self._gone: set[int] = set()  # removed since `nodes` last tidied the order: may still anchor
        self._after: dict[int, list[onnx.NodeProto]] = {}  # id(anchor) -> nodes placed right after it
        self._tidy = True
        self._producer: dict[str, onnx.NodeProto] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self._read()

    def _read(self) -> None:
        for t in self.graph.initializer:
            value = t if is_lazy_tensor(t) else tensor_values(t)
            self.constants[t.name] = value
            self.origins[t.name] = WeightOrigin([t.name], str(self.dtype(t.name)))
            self._taken.add(t.name)
        copies, used = [], set()
        for i, node in enumerate(self.graph.node):
            n = onnx.NodeProto()
            n.CopyFrom(node)
            name = n.name if n.name and n.name not in used else f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)
            self._taken.update(o for o in n.output if o)
            self.shown[name] = display_name(node, i)
            for g in subgraphs(n):
                self.protected |= outer_scope_names(g)
            copies.append(n)
        self._taken |= used
        kept = []
        for n in copies:
            if n.op_type == "Constant" and n.domain in STANDARD and len(n.output) == 1 \
                    and n.output[0] not in self.protected:
                value = constant_node_value(n)
                if value is not None:
                    self.constants[n.output[0]] = value
                    self.origins[n.output[0]] = WeightOrigin([n.output[0]], str(value.dtype))
                    self.record("Constant node made an initializer")
                    continue
            kept.append(n)
        self.add(topological(kept))

    # ---- nodes -------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """The nodes in order (a new list: a pass may change the workspace while it walks it)."""
        if not self._tidy:
            order = []
            for anchor in self._order:
                stack = [anchor]
                while stack:
                    n = stack.pop()
                    if id(n) in self._alive:
                        order.append(n)
                    stack.extend(reversed(self._after.pop(id(n), [])))
            self._order, self._tidy = order, True
            self._gone.clear()
        return list(self._order)

    def __contains__(self, node: onnx.NodeProto) -> bool:
        return id(node) in self._alive

    def add(self, nodes: list[onnx.NodeProto], after: onnx.NodeProto | None = None) -> None:
        """Take in new nodes, at the end or right after `after` (after those already put there)."""
        if after is not None and id(after) not in self._alive and id(after) not in self._gone:
            raise ValueError(f"node {after.name!r} is no longer in the workspace: nothing can go after it")
        for n in nodes:
            self._alive.add(id(n))
            self._taken.add(n.name)
            for name in node_inputs(n):
                self._consumers[name].append(n)
            for o in n.output:
                if o:
                    self._producer[o] = n
                    self._taken.add(o)
        if after is None:
            self._order.extend(nodes)
        else:
            self._after.setdefault(id(after), []).extend(nodes)
            self._tidy = False

    def remove(self, node: onnx.NodeProto) -> None:
        self._alive.discard(id(node))
        self._gone.add(id(node))
        self._tidy = False
        for name in node_inputs(node):
            self._consumers[name].remove(node)
        for o in node.output:
            if o and self._producer.get(o) is node:
                del self._producer[o]

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        """`new` takes the place of `old` (which may have written the same tensors)."""
        self.remove(old)
        self.add(new, after=old)

    def set_input(self, node: onnx.NodeProto, k: int, name: str) -> None:
        """Input k of `node` becomes `name` (k == its input count appends one)."""
        if k < len(node.input):
            old = node.input[k]
            if old:
                self._consumers[old].remove(node)
            node.input[k] = name
        else:
            node.input.append(name)
        if name:
            self._consumers[name].append(node)

    def set_output(self, node: onnx.NodeProto, k: int, name: str) -> None:
        old = node.output[k]
        if old and self._producer.get(old) is node:
            del self._producer[old]
        node.output[k] = name
        if name:
            self._producer[name] = node
            self._taken.add(name)

    def rewire(self, old: str, new: str) -> None:
        """Every node that reads `old` as an input reads `new` instead."""
        for n in list(self._consumers.get(old, ())):
            for k, name in enumerate(n.input):
                if name == old:
                    self.set_input(n, k, new)

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return list(self._consumers.get(name, ()))

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node that reads `name` once, if nothing else needs it (not protected)."""
        users = self._consumers.get(name, ())
        return users[0] if len(users) == 1 and name not in self.protected else None

    # ---- names -------------------------------------------------------------------------------
    def new_name(self, hint: str) -> str:
        """A name no tensor or node has had, `hint` itself if free."""
        name, k = hint, 1
        while name in self._taken:
            k += 1
            name = f"{hint}_{k}"
        self._taken.add(name)
        return name

    def name_node(self, node: onnx.NodeProto, hint: str, shown_as: onnx.NodeProto | str) -> onnx.NodeProto:
        """Give `node` a new name from `hint`, shown as `shown_as` (a node, or a node name)."""
        node.name = self.new_name(hint)
        self.show_as(node, shown_as)
        return node

    def show_as(self, node: onnx.NodeProto, shown_as: onnx.NodeProto | str) -> None:
        key = shown_as if isinstance(shown_as, str) else shown_as.name
        self.shown[node.name] = self.shown.get(key, key)

    def record(self, what: str, count: int = 1) -> None:
        if count:
            self.changes[what] += count

    # ---- constants ---------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of constant `name` (a lazy tensor is read now); None if it is not a constant."""
        value = self.constants.get(name) if name else None
        if isinstance(value, onnx.TensorProto):
            value = self.constants[name] = tensor_values(value)
        return value

    def dtype(self, name: str) -> np.dtype:
        """A constant's element type, without reading a lazy tensor."""
        value = self.constants[name]
        if isinstance(value, onnx.TensorProto):
            return np.dtype(helper.tensor_dtype_to_np_dtype(value.data_type))
        return value.dtype

    def set_constant(self, name: str, value: np.ndarray, origin: WeightOrigin | None = None) -> None:
        self.constants[name] = value
        self._taken.add(name)
        if origin is not None:
            self.origins[name] = origin

    def add_constant(self, hint: str, value: np.ndarray, origin: WeightOrigin) -> str:
        name = self.new_name(hint)
        self.set_constant(name, value, origin)
        return name

    def origin_of(self, inputs: list[str], step: str) -> WeightOrigin:
        """The origin of a constant computed from `inputs` by `step`: their sources, in order."""
        sources, dtype, steps = [], None, []
        for name in inputs:
            o = self.origins.get(name)
            if o is None:
                continue
            sources.extend(s for s in o.sources if s not in sources)
            if dtype is None and (o.sources or o.dtype):
                dtype = o.dtype
            steps.extend(s for s in o.steps if s not in steps)
        steps.append(step)
        return WeightOrigin(sources, dtype or "float32", steps)


class Expansion:
    """The nodes that stand for one node of the file (a contrib op written out in standard ops):
    each new node is shown as that node, intermediate tensors get fresh names, and `commit` puts
    them where the node was. Nothing touches the workspace before `commit`, so a pass may give up
    half way (new constants are only named: an unused one is never written)."""

    def __init__(self, ws: Workspace, node: onnx.NodeProto):
        self.ws, self.node, self.nodes = ws, node, []

    def op(self, op_type: str, inputs: list[str], output: str | None = None, outputs: int = 1,
           domain: str = "", **attrs) -> str:
        """Add a node; returns its (first) output: `output`, or a fresh name."""
        base = f"{self.node.name}/{op_type}"
        names = [output or self.ws.new_name(base)] + [self.ws.new_name(f"{base}_{k}") for k in range(1, outputs)]
        n = helper.make_node(op_type, list(inputs), names, domain=domain or None, **attrs)
        self.ws.name_node(n, base, self.node)
        self.nodes.append(n)
        return names[0]

    def scalar(self, hint: str, value, dtype=np.float32) -> str:
        """A synthetic constant (not a weight of the file: no sources)."""
        value = np.asarray(value, dtype=dtype)
        return self.ws.add_constant(f"{self.node.name}/{hint}", value,
                                    WeightOrigin([], str(value.dtype), [f"synthetic {hint}"]))

    def weight(self, hint: str, value: np.ndarray, sources: list[str], step: str) -> str:
        """A constant computed from the file's constants `sources` by `step`."""
        return self.ws.add_constant(f"{self.node.name}/{hint}", value, self.ws.origin_of(sources, step))

    def commit(self, what: str) -> None:
        self.ws.replace(self.node, self.nodes)
        self.ws.record(what)


def opset(ws: Workspace, domain: str = "") -> int:
    """The file's opset of `domain` (0 if it imports none)."""
    for o in ws.source.opset_import:
        if (o.domain or "") in ((domain,) if domain not in STANDARD else STANDARD):
            return int(o.version)
    return 0
