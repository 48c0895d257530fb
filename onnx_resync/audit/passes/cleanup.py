"""Clean-up: nodes that compute nothing, and nodes whose results nothing reads, are removed.

Canonical form: no Identity, no inference-mode Dropout, no Cast or CastLike to the type the tensor
already has (after floats.py, a Cast between float types is one); their readers read the input
instead. No node whose outputs nothing reads (a graph output or a subgraph's outer name is read).
Exporters add the former freely and simplifiers drop the latter; neither changes what the graph
computes.
"""

from __future__ import annotations

from ..rewrite import STANDARD, Workspace, attr
from .floats import tensor_types
from ...walk.graph import subgraphs


def drop_noops(ws: Workspace) -> bool:
    types = tensor_types(ws)
    changed = False
    for node in ws.nodes:
        src = node.input[0] if node.input else ""
        out = node.output[0] if node.output else ""
        if node.domain not in STANDARD or not src or not out or out in ws.protected:
            continue
        op = node.op_type
        if op == "Identity":
            noop = True
        elif op == "Dropout":
            training = node.input[2] if len(node.input) > 2 else ""
            noop = not training or (training in ws.constants and not bool(ws.const(training)))
            noop = noop and (len(node.output) < 2 or not node.output[1])
        elif op == "Cast":
            noop = types.get(src) is not None and types.get(src) == attr(node, "to", None)
        elif op == "CastLike":
            noop = types.get(src) is not None and types.get(src) == types.get(node.input[1])
        else:
            continue
        if noop:
            ws.remove(node)
            ws.rewire(out, src)
            ws.record(f"{op} removed")
            changed = True
    return changed


def drop_unused(ws: Workspace) -> bool:
    """The file's own unused nodes (recorded: a simplifier would have removed them)."""
    count = remove_unused(ws)
    ws.record("unused node removed", count)
    return count > 0


def remove_unused(ws: Workspace) -> int:
    """Remove every node none of whose outputs is read or protected (not one holding a subgraph:
    it is kept whole); returns how many."""
    removed = 0
    for node in reversed(ws.nodes):  # readers before the nodes they read
        if any(o and (ws.consumers(o) or o in ws.protected) for o in node.output):
            continue
        if any(True for _ in subgraphs(node)):
            continue
        ws.remove(node)
        removed += 1
    return removed

