"""Selection: ops that cut, gather or join an axis (Gather, Concat, Split, Slice)."""

from __future__ import annotations

import numpy as np

from ..channels import Label
from .base import _inputs, _norm_axis, attr
from .layout import _cut_stacked, _distinct_copies
from ..registry import declare


def gather(ctx, node) -> None:
    data, indices = node.input[0], node.input[1]
    out = node.output[0]
    axis = int(attr(node, "axis"))
    r = ctx.rank(data)
    axis = _norm_axis(axis, r)
    if ctx.is_weight(data) and not ctx.get(data):
        # embedding lookup: rows are picked by index, the remaining axes are weight axes
        shape = ctx.shape(data)
        if axis == 0 and shape is not None and len(shape) == 2:
            fresh = ctx.new(shape[1], node, out)
            ctx.slot(data, 1, fresh)
            ro = ctx.rank(out)
            if ro is not None:
                ctx.set(out, {ro - 1: fresh})
            else:
                ctx.pin(fresh, "embedding output of unknown rank")
            ctx.pin_all(indices, "used as Gather indices")
        return
    idx = ctx.const(indices)
    ctx.pin_all(indices, "used as Gather indices")
    if axis is None or idx is None or idx.ndim > 1 or any(axis == i for _, i in ctx.stacked(data)):
        ctx.tie_directions(data)  # directions are picked whole, along the outer axis
    labels = ctx.get(data)
    if not ctx.labels.get(data):
        return
    if axis is None:
        ctx.pin_all(data, "Gather with unknown rank")
        return
    idx_rank = 0 if idx is None else idx.ndim
    out_labels = {}
    for a, label in labels.items():
        if a < axis:
            out_labels[a] = label
        elif a > axis:
            out_labels[a + idx_rank - 1] = label
        elif idx is not None and idx.ndim == 1:
            out_labels[a] = _distinct_copies(label.take(np.where(idx < 0, idx + len(label), idx)))
        else:
            ctx.pin(label, "Gather on the channel axis with non-constant or multi-dim indices")
    if idx is not None and ctx.stacked(data):
        # the cut counts negative indices from the axis's end: its length is the label's (n), so a
        # symbolic dim (a name, not a number) is never added to the indices
        flat = idx.reshape(-1).astype(np.int64)
        where = {a: a if a < axis else a + idx_rank - 1 for a in range(r) if a != axis or idx_rank == 1}
        out_labels.update(_cut_stacked(ctx, data, lambda a, n: np.where(flat < 0, flat + n, flat) if a == axis
                                       else None, where))
    ctx.set(out, out_labels)


def concat(ctx, node) -> None:
    out = node.output[0]
    names = [n for n in node.input if n]
    r = ctx.rank(out)
    axis = _norm_axis(int(attr(node, "axis")), r)
    if not any(ctx.get(n) for n in names):
        return
    if axis is None:
        for n in names:
            ctx.pin_all(n, "Concat with unknown rank")
        return
    pieces = []
    for n in names:
        label = ctx.get(n).get(axis)
        if label is None:
            dim = ctx.dim(n, axis)
            if not isinstance(dim, int):
                for m in names:
                    ctx.pin_all(m, "Concat with an unlabelled piece of unknown size")
                return
            if dim == 0:
                continue
            label = ctx.new(dim, node, n, kind="fixed")
            ctx.pin(label, "concatenated with an unlabelled tensor")
        pieces.append(label)
    has = any(ctx.get(n).get(axis) is not None for n in names)
    out_labels = {axis: _distinct_copies(Label.concat(pieces))} if has else {}
    # other axes behave like an elementwise op
    other: dict[int, Label] = {}
    for n in names:
        for a, label in ctx.get(n).items():
            if a == axis:
                continue
            if a in other:
                ctx.union(other[a], label)
            else:
                other[a] = label
    for a, label in other.items():
        for n in names:
            if a not in ctx.get(n) and ctx.dim(n, a) != 1:
                ctx.pin(label, "Concat along another axis with an unlabelled tensor")
    out_labels.update(other)
    ctx.set(out, out_labels)


def split(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    if not ctx.labels.get(x):
        return
    r = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis")), r)
    sizes = attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.const(node.input[1])
        sizes = None if value is None else [int(v) for v in np.atleast_1d(value)]
    if sizes is None and axis is not None:
        dims = [ctx.dim(o, axis) for o in node.output]
        sizes = dims if all(isinstance(d, int) for d in dims) else None
    if axis is None or sizes is None:
        ctx.pin_all(x, "Split with unknown sizes")
        return
    start = 0
    for out, size in zip(node.output, sizes):
        out_labels = dict(labels)
        kept = np.arange(start, start + size)
        if axis in labels:
            out_labels[axis] = labels[axis].take(kept)
        out_labels.update(_cut_stacked(ctx, x, lambda a, n: kept if a == axis else None))
        start += size
        ctx.set(out, out_labels)


def slice_(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    if not ctx.labels.get(x):
        return
    r = ctx.rank(x)
    starts, ends = ctx.const(_inputs(node, 1)), ctx.const(_inputs(node, 2))
    axes, steps = ctx.const(_inputs(node, 3)), ctx.const(_inputs(node, 4))
    if starts is None and attr(node, "starts") is not None:  # opset < 10
        starts, ends, axes = attr(node, "starts"), attr(node, "ends"), attr(node, "axes")
    if starts is None or ends is None or r is None:
        ctx.pin_all(x, "Slice with non-constant bounds")
        return
    starts, ends = np.atleast_1d(starts).tolist(), np.atleast_1d(ends).tolist()
    axes = list(range(len(starts))) if axes is None else [int(a) % r for a in np.atleast_1d(axes)]
    steps = [1] * len(starts) if steps is None else np.atleast_1d(steps).tolist()
    out = dict(labels)
    for a, s, e, st in zip(axes, starts, ends, steps):
        if a in labels:
            out[a] = labels[a].take(np.arange(len(labels[a]))[slice(*_clamp(s, e, st, len(labels[a])))])
    cuts = {a: slice(*_clamp(s, e, st, 0)) for a, s, e, st in zip(axes, starts, ends, steps)}
    out.update(_cut_stacked(ctx, x, lambda a, n: np.arange(n)[cuts[a]] if a in cuts else None))
    ctx.set(node.output[0], out)


def _clamp(start, end, step, n):
    # numpy slicing already clamps; only the INT64 sentinels need taming
    big = 1 << 62
    start = max(min(start, big), -big)
    end = max(min(end, big), -big)
    return int(start), int(end), int(step)


# ---- declarations ---------------------------------------------------------------------------
declare("Gather", gather, attributes={"axis": 0}, stacked=True, layout=True, homogeneous=True, foldable=True,
        quantized_view=True)
declare("Concat", concat, attributes={"axis": 0}, layout=True, homogeneous=True, homogeneous_joint=True,
        foldable=True, weight_view=True)  # weight views: graph.GraphView.index_sources maps their positions
_SPLIT = dict(stacked=True, layout=True, homogeneous=True, quantized_view=True, weight_view=True)
declare("Split", split, attributes={"axis": 0, "split": None}, **_SPLIT)  # sizes: an attribute,
declare("Split", split, since=13, attributes={"axis": 0}, **_SPLIT)  # then an input
_SLICE = dict(stacked=True, layout=True, homogeneous=True, foldable=True, quantized_view=True, weight_view=True)
declare("Slice", slice_, attributes={"starts": None, "ends": None, "axes": None}, **_SLICE)  # attributes,
declare("Slice", slice_, since=10, **_SLICE)  # then inputs
