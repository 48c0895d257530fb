"""Node order: a graph written out of topological order is put in order on load, as ONNX Runtime
does when it loads one (onnxruntime.transformers' float16 converter with keep_io_types appends the
input Cast after its readers: onnx.checker refuses such a graph, and later stages read nodes in
order)."""

from __future__ import annotations

from typing import Callable

import onnx

# The file's own order of a graph the loader sorted: metadata under this key (positions in the file
# of the nodes in sorted order), never written: a save puts the nodes back, so an undo gives the
# file's bytes.
ORDER_KEY = "onnx-resync:node-order"


def sort_model(model: onnx.ModelProto) -> None:
    """Sort the main graph (and its subgraphs) as sort_nodes does; remember the main graph's order."""
    order: list[int] = []
    sort_nodes(model.graph, record=order)
    if order:
        model.metadata_props.add(key=ORDER_KEY, value=",".join(map(str, order)))


def put_back_file_order(model: onnx.ModelProto) -> Callable[[], None] | None:
    """Before a save: the main graph's nodes in the file's order again, the key dropped; returns
    what restores the model as it was (None when nothing was sorted or the nodes changed since)."""
    entry = next((k for k, p in enumerate(model.metadata_props) if p.key == ORDER_KEY), None)
    if entry is None:
        return None
    props = [onnx.StringStringEntryProto(key=p.key, value=p.value) for p in model.metadata_props]
    del model.metadata_props[entry]

    def restore_props() -> None:
        del model.metadata_props[:]
        model.metadata_props.extend(props)

    try:
        order = [int(k) for k in props[entry].value.split(",")]
    except ValueError:
        return restore_props
    nodes = model.graph.node
    if sorted(order) != list(range(len(nodes))):
        return restore_props  # nodes added or removed since: the sorted order is the one to write
    sorted_copy = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        sorted_copy.append(c)
    in_file = [None] * len(order)
    for position, k in enumerate(order):
        in_file[k] = sorted_copy[position]
    del nodes[:]
    nodes.extend(in_file)

    def restore() -> None:
        del model.graph.node[:]
        model.graph.node.extend(sorted_copy)
        restore_props()

    return restore


def sort_nodes(graph: onnx.GraphProto, outer: frozenset = frozenset(), record: list | None = None) -> bool:
    """Put `graph`'s nodes (and its subgraphs') in topological order. Stable: nodes keep the file's
    order, except that the writers of a node's inputs are put before it (depth first, in the file's
    order), so a sorted graph keeps its order exactly (its bytes do not change) and an unsorted one
    changes only where it must. A graph with a cycle keeps its order (the checker then names the
    problem); a name that nothing writes is not waited for (idem).
    `outer`: the names an enclosing graph defines; `record`: gets the file positions of the nodes in
    their new order when this graph's order changes. Returns True if some order changed."""
    nodes = list(graph.node)
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {t.values.name for t in graph.sparse_initializer} | {""}
    written = {o for n in nodes for o in n.output if o}
    changed = False
    reads: list[set[str]] = []
    for node in nodes:
        names = set(node.input)
        for g in _subgraphs(node):  # a subgraph sees every name of this graph, in any order
            changed |= sort_nodes(g, frozenset(known | written))
            names |= _outer_reads(g)  # ... and what it reads must be written before its node runs
        reads.append(names)
    writer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for o in node.output:
            if o and o not in known:
                writer.setdefault(o, k)
    needs = [{writer[r] for r in names if r in writer} - {k} for k, names in enumerate(reads)]
    if all(d < k for k, deps in enumerate(needs) for d in deps):
        return changed
    order: list[int] = []
    state = [0] * len(nodes)  # 0: not placed, 1: placing its inputs' writers, 2: placed
    for first in range(len(nodes)):
        if state[first]:
            continue
        state[first] = 1
        stack = [(first, iter(sorted(needs[first])))]
        while stack:
            k, pending = stack[-1]
            d = next(pending, None)
            if d is None:
                stack.pop()
                state[k] = 2
                order.append(k)
            elif state[d] == 0:
                state[d] = 1
                stack.append((d, iter(sorted(needs[d]))))
            elif state[d] == 1:
                return changed  # a cycle
    copies = []
    for k in order:
        copy = onnx.NodeProto()
        copy.CopyFrom(nodes[k])
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)
    if record is not None:
        record.extend(order)
    return True


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            found.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            found.extend(a.graphs)
    return found


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (with its own subgraphs) reads without defining them."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {o for n in graph.node for o in n.output}
    reads: set[str] = set()
    for n in graph.node:
        reads.update(n.input)
        for g in _subgraphs(n):
            reads |= _outer_reads(g)
    return reads - defined - {""}
