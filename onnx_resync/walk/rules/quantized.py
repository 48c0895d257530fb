"""Quantized forms: QuantizeLinear/DequantizeLinear pass labels (per-channel scales are slots),
integer and QLinear producers are their float producers with per-channel scale slots, and ONNX
Runtime's QLinear contrib ops are their float ops."""

from __future__ import annotations

import numpy as np
import onnx

from .base import _inputs, _norm_axis, attr
from .elementwise import broadcast
from .producers import _conv, _gemm, _matmul
from .selection import concat
from ..registry import MICROSOFT, declare


def quantize_linear(ctx, node) -> None:
    x, scale, zp = node.input[0], _inputs(node, 1), _inputs(node, 2)
    labels = ctx.get(x)
    r = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis")), r)
    sshape = ctx.shape(scale) if scale else None
    per_channel = sshape is not None and len(sshape) == 1 and sshape[0] > 1
    if int(attr(node, "block_size")):  # one scale per block of channels: channels may not leave their block
        for l in labels.values():
            ctx.pin(l, f"{node.op_type} with blocked scales")
        ctx.set(node.output[0], {})
        return
    for a, l in labels.items():
        if per_channel and a == axis:
            ctx.slot(scale, 0, l)
            if zp:
                ctx.slot(zp, 0, l)
    ctx.set(node.output[0], labels)


def dynamic_quantize_linear(ctx, node) -> None:
    # scale and zero point come from the tensor's min/max: order-invariant
    ctx.set(node.output[0], ctx.get(node.input[0]))


def matmul_integer(ctx, node) -> None:
    """Like MatMul with a weight B; B's zero point may be per column."""
    _matmul(ctx, node, node.input[0], node.input[1])
    _per_channel_slots(ctx, node, [_inputs(node, 3)], axis=-1)


def conv_integer(ctx, node) -> None:
    # inputs: x, w, x_zero_point (a scalar), w_zero_point (scalar or per output channel)
    _conv(ctx, node, node.input[0], node.input[1], "")
    _per_channel_slots(ctx, node, [_inputs(node, 3)], axis=1)


def qlinear_conv(ctx, node) -> None:
    # inputs: x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B (int32 bias)
    _conv(ctx, node, node.input[0], node.input[3], _inputs(node, 8))
    _per_channel_slots(ctx, node, [_inputs(node, 4), _inputs(node, 5)], axis=1)


def qlinear_matmul(ctx, node) -> None:
    # inputs: a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp; b's scale/zp may be per column
    _matmul(ctx, node, node.input[0], node.input[3])
    _per_channel_slots(ctx, node, [_inputs(node, 4), _inputs(node, 5)], axis=-1)


def _per_channel_slots(ctx, node, params, axis) -> None:
    """Per-output-channel quantization parameters follow the output channels.

    A parameter with one entry per channel whose channels we cannot find pins them: leaving it
    in place while its rows move would change the function.
    """
    labels = ctx.get(node.output[0])
    if axis < 0:
        ro = ctx.rank(node.output[0])
        axis = None if ro is None else axis + ro
    label = labels.get(axis) if axis is not None else None
    for p in params:
        shape = ctx.shape(p) if p else None
        if shape is None and p:
            for l in labels.values():
                ctx.pin(l, f"{node.op_type} quantization parameter {p!r} of unknown shape")
            continue
        if not shape or int(np.prod(shape)) <= 1:
            continue
        if label is not None and shape[-1] == len(label):
            ctx.slot(p, len(shape) - 1, label)
        else:
            for l in labels.values():
                ctx.pin(l, f"{node.op_type} quantization parameter {p!r} does not follow the channels")


def qgemm(ctx, node) -> None:
    # inputs: A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp; b's scale/zp may be per column
    _gemm(ctx, node, node.input[0], node.input[3], _inputs(node, 6))
    _per_channel_slots(ctx, node, [_inputs(node, 4), _inputs(node, 5)], axis=1)


def qlinear_binary(ctx, node) -> None:
    # inputs: a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp (per-tensor scales)
    broadcast(ctx, node, [node.input[0], _inputs(node, 3)])


def qlinear_unary(ctx, node) -> None:
    ctx.set(node.output[0], ctx.get(node.input[0]))


def qlinear_pool(ctx, node) -> None:
    if int(attr(node, "channels_last")):
        for l in ctx.get(node.input[0]).values():
            ctx.pin(l, f"{node.op_type} with channels_last")
        return
    labels = ctx.get(node.input[0])
    ctx.set(node.output[0], {1: labels[1]} if 1 in labels else {})
    for a, l in labels.items():
        if a != 1:
            ctx.pin(l, f"{node.op_type} over a channel-carrying axis")


def qlinear_concat(ctx, node) -> None:
    # inputs: y_scale, y_zp, then (x, x_scale, x_zp) for every piece
    pieces = [node.input[i] for i in range(2, len(node.input), 3)]
    proxy = onnx.helper.make_node("Concat", pieces, list(node.output), axis=int(attr(node, "axis")),
                                  name=node.name)
    concat(ctx, proxy)


# ---- declarations ---------------------------------------------------------------------------
declare("QuantizeLinear", quantize_linear, attributes={"axis": 1, "block_size": 0}, trivial=True, foldable=True)
declare("DequantizeLinear", quantize_linear, attributes={"axis": 1, "block_size": 0}, trivial=True, foldable=True,
        weight_view=True)
declare("DynamicQuantizeLinear", dynamic_quantize_linear)
declare("ConvInteger", conv_integer, attributes={"group": 1})
declare("QLinearConv", qlinear_conv, attributes={"group": 1})
declare("MatMulInteger", matmul_integer)
declare("QLinearMatMul", qlinear_matmul)
declare("QGemm", qgemm, domain=MICROSOFT, attributes={"transA": 0, "transB": 0})
for _op in ("QLinearAdd", "QLinearMul"):
    declare(_op, qlinear_binary, domain=MICROSOFT)
for _op, _float in (("QLinearSigmoid", "Sigmoid"), ("QLinearLeakyRelu", "LeakyRelu"),
                    ("QLinearSoftmax", "Softmax")):  # Softmax: equivariant along its axis
    declare(_op, qlinear_unary, domain=MICROSOFT, float_form=_float)
for _op, _float in (("QLinearGlobalAveragePool", "GlobalAveragePool"), ("QLinearAveragePool", "AveragePool")):
    declare(_op, qlinear_pool, domain=MICROSOFT, attributes={"channels_last": 0}, float_form=_float)
declare("QLinearReduceMean", None, domain=MICROSOFT, float_form="ReduceMean")
declare("QLinearConcat", qlinear_concat, domain=MICROSOFT, attributes={"axis": 0})
