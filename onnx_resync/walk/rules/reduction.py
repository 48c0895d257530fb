"""Reductions: an axis reduced away takes its label with it; kept axes keep theirs."""

from __future__ import annotations


from .base import _norm_axis, attr, norm_axes
from .layout import _axes_at_run_time, _axes_input
from ..registry import declare


def reduce(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    if not labels and not ctx.uniform.get(x):
        return
    r = ctx.rank(x)
    keepdims = int(attr(node, "keepdims"))
    if _axes_at_run_time(ctx, node):  # ReduceSum from opset 13, the others from 18
        for l in labels.values():
            ctx.pin(l, f"{node.op_type} with axes computed at run time")
        return
    axes = _axes_input(ctx, node)
    if r is None:
        for l in labels.values():
            ctx.pin(l, f"{node.op_type} with unknown rank")
        return
    if axes is None or len(axes) == 0:
        noop = int(attr(node, "noop_with_empty_axes"))
        axes = [] if noop else list(range(r))
    axes = norm_axes(axes, r)
    if axes is None:
        for l in labels.values():
            ctx.pin(l, f"{node.op_type} with axes out of range")
        return

    def moved(a):
        return a if keepdims else a - sum(1 for s in axes if s < a)

    out = {moved(a): l for a, l in labels.items() if a not in axes}  # reducing channels: order-invariant
    ctx.set(node.output[0], out)
    uniform = {moved(a) for a in ctx.uniform.get(x, ()) if a not in axes}
    if uniform:
        ctx.uniform[node.output[0]] = uniform


def arg_reduce(ctx, node) -> None:
    x = node.input[0]
    r = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis")), r)
    keepdims = int(attr(node, "keepdims"))
    out = {}
    for a, l in ctx.get(x).items():
        if a == axis or axis is None:
            ctx.pin(l, f"{node.op_type} returns channel indices")
        else:
            out[a if keepdims or a < axis else a - 1] = l
    ctx.set(node.output[0], out)


# ---- declarations ---------------------------------------------------------------------------
_REDUCE = {"axes": None, "keepdims": 1}
for _op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSumExp", "ReduceSumSquare"):
    # axes: an attribute, then an input (ReduceSum from opset 13, the others from 18)
    homogeneous = _op in ("ReduceMean", "ReduceSum", "ReduceMax")
    declare(_op, reduce, attributes=_REDUCE, homogeneous=homogeneous)
    declare(_op, reduce, since=13 if _op == "ReduceSum" else 18,
            attributes={"keepdims": 1, "noop_with_empty_axes": 0}, homogeneous=homogeneous)
for _op in ("ArgMax", "ArgMin"):
    declare(_op, arg_reduce, attributes={"axis": 0, "keepdims": 1}, output_type="int64")
