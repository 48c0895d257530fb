"""Constants: a node whose inputs are all constant, and that only re-views, converts or does simple
arithmetic on them, is evaluated into a constant.

Canonical form: dequantized, cast, transposed or reshaped weights are plain weights, so that a file
that stores a weight behind DequantizeLinear / Cast / Transpose (or computes it from constants)
has the same layers as one that stores it as it is. Which ops count is the op registry's
`foldable` property; evaluation is ONNX's reference implementation, so the constant is exactly what
the node computes. Anything that fails to evaluate, or would be too large, stays a node.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..rewrite import STANDARD, Workspace
from ...walk import registry

MAX_FOLD_ELEMENTS = 1 << 27
# steps that only re-view a weight (its origin's rounding is the source's); others are "computed"
_VIEW_STEPS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def fold_constants(ws: Workspace) -> bool:
    """Evaluate every foldable node whose inputs are all constants (in order, so chains fold)."""
    foldable = registry.having("foldable")
    changed = False
    for node in ws.nodes:
        inputs = [i for i in node.input if i]
        if not (node.op_type in foldable and node.domain in STANDARD and inputs
                and all(i in ws.constants for i in inputs)
                and not any(o in ws.protected for o in node.output)):
            continue
        outputs = _evaluate(ws, node)
        if outputs is None:
            continue
        step = _step_name(ws, node, outputs)
        ws.remove(node)
        for name, value in zip(node.output, outputs):
            if name:
                ws.set_constant(name, value, ws.origin_of(inputs, step))
        ws.record(f"{node.op_type} of constants folded")
        changed = True
    return changed


def _step_name(ws: Workspace, node: onnx.NodeProto, outputs) -> str:
    return step_name(node, ws.dtype(node.input[0]), outputs[0].dtype)


def step_name(node: onnx.NodeProto, first: np.dtype, out: np.dtype) -> str:
    """What folding `node` did to a weight (its origin's step), from its first input's and its
    output's element types."""
    if node.op_type == "Cast":
        return f"cast {first} -> {out}"
    if node.op_type == "DequantizeLinear":
        return f"dequantized {first}"
    if node.op_type in _VIEW_STEPS:
        return f"view {node.op_type}"
    return f"computed {node.op_type}"


def _evaluate(ws: Workspace, node: onnx.NodeProto) -> list[np.ndarray] | None:
    feeds = {i: ws.const(i) for i in node.input if i}
    if node.op_type == "Identity":
        return [feeds[node.input[0]]]
    if node.op_type in ("Expand", "Tile"):
        shape = feeds.get(node.input[1])
        if shape is None or np.prod(np.maximum(shape, 1)) * max(feeds[node.input[0]].size, 1) > MAX_FOLD_ELEMENTS:
            return None
    return run_node(node, feeds)


def run_node(node: onnx.NodeProto, feeds: dict) -> list[np.ndarray] | None:
    """`node`'s outputs on constant `feeds` by ONNX's reference evaluator; None where it cannot run
    them or an output is past MAX_FOLD_ELEMENTS (left to the graph)."""
    try:
        from onnx.reference import ReferenceEvaluator

        out = ReferenceEvaluator(node).run(None, feeds)
    except Exception:
        return None  # leave it to the graph
    if any(not isinstance(o, np.ndarray) or o.size > MAX_FOLD_ELEMENTS for o in out):
        return None
    return [np.asarray(o) for o in out]
