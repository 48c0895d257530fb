"""Producers: ops that create fresh channels (Conv, ConvTranspose, Gemm, MatMul with a weight).

Each makes elements for its output channels, slots its weight's output axis (and bias) with them,
and slots its weight's input axis with the label of its input, so both sides of a layer move together.
"""

from __future__ import annotations


from ..channels import Label
from ..registry import declare
from ...errors import UnsupportedError
from .base import _inputs, attr, zero_product


# ---- producers ------------------------------------------------------------------------------
def conv(ctx, node) -> None:
    _conv(ctx, node, node.input[0], node.input[1], _inputs(node, 2))


def _conv(ctx, node, x: str, w: str, b: str, per_channel: tuple[str, ...] = (), channels_last: bool = False) -> None:
    """Conv and its quantized forms; per_channel: weight scales/zero points along output channels;
    channels_last: x and the output are NHWC (ONNX Runtime's NHWC QLinearConv), the weight OIHW."""
    out = node.output[0]
    group = int(attr(node, "group"))
    wshape = ctx.shape(w)
    x_labels = ctx.get(x)
    rank = ctx.rank(x)
    if wshape is None or not ctx.is_weightlike(w) or (channels_last and rank is None):
        for n in (x, w):
            ctx.pin_all(n, "Conv with a computed weight")
        return
    c_axis = rank - 1 if channels_last else 1
    for axis, label in x_labels.items():
        if axis != c_axis:
            ctx.pin(label, "Conv over a channel-carrying spatial axis")
    in_label = x_labels.get(c_axis)
    m, c_per_group = wshape[0], wshape[1]
    if group < 1 or not isinstance(m, int) or m % group:
        raise UnsupportedError(f"node {node.name or node.op_type!r} ({node.op_type}) is malformed: group={group} "
                               f"does not divide its {m} output channels")
    if group == 1:
        if in_label is not None:
            ctx.slot(w, 1, in_label)
        fresh = ctx.new(m, node, out)
        ctx.slot(w, 0, fresh)
        ctx.slot(b, 0, fresh)
        ctx.set(out, {c_axis: fresh})
        return
    m_per_group = m // group
    if c_per_group == 1 and in_label is not None:
        # depthwise (with channel multiplier): output k*mult+j belongs to input channel k
        out_label = in_label.repeat_blocks(m_per_group)
        ctx.slot(w, 0, out_label)
        ctx.slot(b, 0, out_label)
        ctx.set(out, {c_axis: out_label})
        return
    if in_label is not None:
        ctx.pin(in_label, f"input of a grouped Conv (group={group}): cross-group layout not modelled")
    fresh = ctx.new(m, node, out)
    # a grouped conv's output channel reads its own input group: moves stay inside a group
    ctx.elements.tag(fresh.elem, [("conv-group", node.name, k // m_per_group) for k in range(m)])
    ctx.slot(w, 0, fresh)
    ctx.slot(b, 0, fresh)
    ctx.set(out, {c_axis: fresh})


def conv_transpose(ctx, node) -> None:
    x, w, b = node.input[0], node.input[1], _inputs(node, 2)
    out = node.output[0]
    group = int(attr(node, "group"))
    wshape = ctx.shape(w)
    x_labels = ctx.get(x)
    if wshape is None or not ctx.is_weightlike(w) or group != 1:
        for n in (x, w):
            ctx.pin_all(n, f"ConvTranspose with group={group} or computed weight")
        if wshape is not None:
            ctx.pin(ctx.new(wshape[1] * group, node, out), "output of a grouped ConvTranspose")
        return
    for axis, label in x_labels.items():
        if axis == 1:
            ctx.slot(w, 0, label)
        else:
            ctx.pin(label, "ConvTranspose over a channel-carrying spatial axis")
    fresh = ctx.new(wshape[1], node, out)
    ctx.slot(w, 1, fresh)
    ctx.slot(b, 0, fresh)
    ctx.set(out, {1: fresh})


def gemm(ctx, node) -> None:
    _gemm(ctx, node, node.input[0], node.input[1], _inputs(node, 2))


def _gemm(ctx, node, a: str, b: str, c: str) -> None:
    out = node.output[0]
    trans_a, trans_b = int(attr(node, "transA")), int(attr(node, "transB"))
    if zero_product(ctx, node, [a, b], c):  # times an all-zero state: the bias alone, no weight read
        return
    if not ctx.is_weightlike(b) or ctx.is_weightlike(a):
        for n in (a, b, c):
            ctx.pin_all(n, "Gemm without a weight as its second input")
        return
    bshape = ctx.shape(b)
    k_axis_b, n_axis_b = (1, 0) if trans_b else (0, 1)
    for axis, label in ctx.get(a).items():
        if axis == (0 if trans_a else 1):
            ctx.slot(b, k_axis_b, label)
        else:
            ctx.pin(label, "Gemm over a channel-carrying batch axis")
    fresh = ctx.new(bshape[n_axis_b], node, out)
    ctx.slot(b, n_axis_b, fresh)
    if c:
        _bias_slot(ctx, node, c, fresh, out_rank=2)
    ctx.set(out, {1: fresh})


def _bias_slot(ctx, node, bias, label, out_rank) -> None:
    """A bias broadcast onto the last output axis."""
    if ctx.get(bias):
        ctx.pin_all(bias, f"{node.op_type} bias computed from activations")
        ctx.pin(label, f"{node.op_type} bias computed from activations")
        return
    shape = ctx.shape(bias)
    if shape is None:
        ctx.pin(label, f"{node.op_type} bias of unknown shape")
        return
    if len(shape) >= 1 and shape[-1] != 1:
        if len(shape) >= 2 and any(d != 1 for d in shape[:-1]):
            ctx.pin(label, f"{node.op_type} bias varies along rows")
            return
        ctx.slot(bias, len(shape) - 1, label)


def matmul(ctx, node) -> None:
    _matmul(ctx, node, node.input[0], node.input[1])


def _matmul(ctx, node, a: str, b: str, trans_a: bool = False, trans_b: bool = False) -> None:
    """MatMul of a and b (each transposed in its last two axes where trans_*: FusedMatMul)."""
    out = node.output[0]
    if zero_product(ctx, node, [a, b]):
        return
    ra, rb, ro = ctx.rank(a), ctx.rank(b), ctx.rank(out)
    if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
        for n in (a, b):
            ctx.pin_all(n, "MatMul with unknown or vector ranks")
        return
    # (rows, contracted) axes of a and (contracted, columns) axes of b
    a_rows, a_k = (ra - 1, ra - 2) if trans_a else (ra - 2, ra - 1)
    b_k, b_cols = (rb - 1, rb - 2) if trans_b else (rb - 2, rb - 1)
    la, lb = ctx.get(a), ctx.get(b)
    out_labels: dict[int, Label] = {}
    # batch axes broadcast like elementwise ops
    for name, labels, r in ((a, la, ra), (b, lb, rb)):
        for axis, label in labels.items():
            if axis < r - 2:
                oa = axis + ro - r
                if oa in out_labels:
                    ctx.union(out_labels[oa], label)
                else:
                    out_labels[oa] = label
    for oa, label in list(out_labels.items()):
        for name, labels, r in ((a, la, ra), (b, lb, rb)):
            ia = oa - (ro - r)
            if ia >= 0 and ia not in labels and ctx.dim(name, ia) not in (1, None):
                if ctx.is_weightlike(name):
                    ctx.slot(name, ia, label)
                else:
                    ctx.pin(label, "MatMul batch axis meets an unlabelled tensor")
    # contracted axis: a's columns with b's rows
    ka, kb = la.get(a_k), lb.get(b_k)
    if ka is not None and kb is not None:
        ctx.union(ka, kb)
    elif ka is not None:
        _contract_with(ctx, b, b_k, ka, node)
    elif kb is not None:
        _contract_with(ctx, a, a_k, kb, node)
    # free axes: a's rows and b's columns
    rows, cols = la.get(a_rows), lb.get(b_cols)
    if rows is not None:
        out_labels[ro - 2] = rows
    elif ctx.is_weightlike(a) and not ctx.is_weightlike(b) and isinstance(ctx.dim(a, a_rows), int):
        fresh = ctx.new(ctx.dim(a, a_rows), node, out)
        ctx.slot(a, a_rows, fresh)
        out_labels[ro - 2] = fresh
    if cols is not None:
        out_labels[ro - 1] = cols
    elif ctx.is_weightlike(b) and not ctx.is_weightlike(a) and isinstance(ctx.dim(b, b_cols), int):
        fresh = ctx.new(ctx.dim(b, b_cols), node, out)
        ctx.slot(b, b_cols, fresh)
        out_labels[ro - 1] = fresh
    ctx.set(out, out_labels)


def _contract_with(ctx, other, axis, label, node) -> None:
    if ctx.is_weightlike(other):
        ctx.slot(other, axis, label)
    else:
        ctx.pin(label, f"{node.op_type} contracts channels with an unlabelled tensor")


# ---- declarations ---------------------------------------------------------------------------
declare("Conv", conv, attributes={"group": 1}, linear_producer=True, homogeneous=True)
declare("ConvTranspose", conv_transpose, attributes={"group": 1}, linear_producer=True, homogeneous=True)
declare("Gemm", gemm, attributes={"transA": 0, "transB": 0}, linear_producer=True, homogeneous=True)
declare("MatMul", matmul, linear_producer=True, homogeneous=True)
