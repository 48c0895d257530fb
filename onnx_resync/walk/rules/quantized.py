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
    per_channel = sshape is not None and len(sshape) == 1 and sshape[0] != 1  # (a symbolic length may be)
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


def qlinear_conv_nhwc(ctx, node) -> None:
    """ONNX Runtime's QLinearConv (com.microsoft): with channels_last, x and y are NHWC, w is OIHW."""
    last = bool(int(attr(node, "channels_last")))
    _conv(ctx, node, node.input[0], node.input[3], _inputs(node, 8), channels_last=last)
    _per_channel_slots(ctx, node, [_inputs(node, 4), _inputs(node, 5)], axis=-1 if last else 1)


def nhwc_pool(ctx, node) -> None:
    """A pool over the middle axes of an NHWC tensor: the last axis keeps its channels."""
    labels = ctx.get(node.input[0])
    r = ctx.rank(node.input[0])
    for a, l in labels.items():
        if r is None or a != r - 1:
            ctx.pin(l, f"{node.op_type} over a channel-carrying axis")
    ctx.set(node.output[0], {a: l for a, l in labels.items() if r is not None and a == r - 1})


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
        if p and (shape is None or not all(isinstance(d, int) for d in shape)):  # a symbolic dim: not known
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


# ---- output shapes (ONNX shape inference does not know the com.microsoft ops) -----------------
def _same_dims(node, shape_of):
    return [shape_of(0)]


def _binary_dims(node, shape_of):  # QLinearAdd/Mul: a and b broadcast, any rank
    a, b = shape_of(0), shape_of(3)
    if a is None or b is None:
        return [None]
    rank = max(len(a), len(b))
    a, b = [1] * (rank - len(a)) + list(a), [1] * (rank - len(b)) + list(b)
    return [[y if x == 1 else x for x, y in zip(a, b)]]


def _global_pool_dims(node, shape_of):
    x = shape_of(0)
    if x is None:
        return [None]
    if int(attr(node, "channels_last")):
        return [[x[0]] + [1] * (len(x) - 2) + [x[-1]]]
    return [list(x[:2]) + [1] * (len(x) - 2)]


def _pool_dims(node, shape_of):  # QLinearAveragePool
    return [conv_dims(node, shape_of(0), None, bool(int(attr(node, "channels_last"))))]


def conv_dims(node, x, w, channels_last: bool = False):
    """A convolution's output dims from x's and w's (OIHW); w None: a pool (channels kept, kernel from
    kernel_shape). Spatial sizes it cannot compute are symbols of their own."""
    if x is None or len(x) < 3 or (w is not None and len(w) != len(x)):
        return None
    if channels_last:
        x = [x[0], x[-1]] + list(x[1:-1])
    spatial = len(x) - 2
    kernel = list(attr(node, "kernel_shape") or (w[2:] if w is not None else []))
    if len(kernel) != spatial:
        return None
    strides = list(attr(node, "strides") or [1] * spatial)
    dilations = list(attr(node, "dilations") or [1] * spatial)
    pads = list(attr(node, "pads") or [0] * (2 * spatial))
    ceil = w is None and int(attr(node, "ceil_mode"))
    auto_pad = attr(node, "auto_pad")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out = [x[0], x[1] if w is None else w[0]]
    for i in range(spatial):
        d = x[2 + i]
        if not isinstance(d, int) or not isinstance(kernel[i], int):
            out.append(f"{node.output[0]}:{2 + i}")
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-d // strides[i]))
        else:
            span = dilations[i] * (kernel[i] - 1) + 1
            extra = 0 if auto_pad == "VALID" else pads[i] + pads[i + spatial]
            room = d + extra - span
            out.append((-(-room // strides[i]) if ceil else room // strides[i]) + 1)
    return [out[0]] + out[2:] + [out[1]] if channels_last else out


def _qlinear_conv_dims(node, shape_of):
    return [conv_dims(node, shape_of(0), shape_of(3), bool(int(attr(node, "channels_last"))))]


def _nhwc_pool_dims(node, shape_of):
    return [conv_dims(node, shape_of(0), None, channels_last=True)]


def _qgemm_dims(node, shape_of):
    a, b = shape_of(0), shape_of(3)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return [None]
    return [[a[1] if attr(node, "transA") else a[0], b[0] if attr(node, "transB") else b[1]]]


def _concat_dims(node, shape_of):  # QLinearConcat: pieces are inputs 2, 5, 8, ...
    pieces = [shape_of(i) for i in range(2, len(node.input), 3)]
    if not pieces or any(p is None for p in pieces) or len({len(p) for p in pieces}) != 1:
        return [None]
    axis = int(attr(node, "axis")) % len(pieces[0])
    sizes = [p[axis] for p in pieces]
    out = list(pieces[0])
    out[axis] = sum(sizes) if all(isinstance(d, int) for d in sizes) else f"{node.output[0]}:{axis}"
    return [out]


# ---- declarations ---------------------------------------------------------------------------
# (QuantizeLinear of a float weight is still that weight, indexed the same way: the Q -> DQ pair that
# quantization tools put on weights kept in float, AddQDQPairToWeight, TensorRT's QDQ exports)
declare("QuantizeLinear", quantize_linear, attributes={"axis": 1, "block_size": 0}, trivial=True, foldable=True,
        weight_view=True)
declare("DequantizeLinear", quantize_linear, attributes={"axis": 1, "block_size": 0}, trivial=True, foldable=True,
        weight_view=True)
# (a float weight quantized at run time, quantize_dynamic's form for weights in Constant nodes, is still
# that weight: one scale and zero point from its min and max, which no permutation changes)
declare("DynamicQuantizeLinear", dynamic_quantize_linear, weight_view=True)
declare("ConvInteger", conv_integer, attributes={"group": 1})
declare("QLinearConv", qlinear_conv, attributes={"group": 1})
declare("MatMulInteger", matmul_integer)
declare("QLinearMatMul", qlinear_matmul)
_POOL_ATTRS = {"kernel_shape": None, "strides": None, "dilations": None, "pads": None, "auto_pad": "NOTSET",
               "ceil_mode": 0}
declare("QGemm", qgemm, domain=MICROSOFT, attributes={"transA": 0, "transB": 0}, output_shapes=_qgemm_dims)
for _op in ("QLinearAdd", "QLinearMul"):
    declare(_op, qlinear_binary, domain=MICROSOFT, output_shapes=_binary_dims)
for _op, _float in (("QLinearSigmoid", "Sigmoid"), ("QLinearLeakyRelu", "LeakyRelu"),
                    ("QLinearSoftmax", "Softmax")):  # Softmax: equivariant along its axis
    declare(_op, qlinear_unary, domain=MICROSOFT, float_form=_float, output_shapes=_same_dims)
declare("QLinearGlobalAveragePool", qlinear_pool, domain=MICROSOFT, attributes={"channels_last": 0},
        float_form="GlobalAveragePool", output_shapes=_global_pool_dims)
declare("QLinearAveragePool", qlinear_pool, domain=MICROSOFT, attributes={**_POOL_ATTRS, "channels_last": 0},
        float_form="AveragePool", output_shapes=_pool_dims)
_CONV_ATTRS = {"group": 1, "kernel_shape": None, "strides": None, "dilations": None, "pads": None,
               "auto_pad": "NOTSET"}
declare("QLinearConv", qlinear_conv_nhwc, domain=MICROSOFT, attributes={**_CONV_ATTRS, "channels_last": 0},
        output_shapes=_qlinear_conv_dims)
declare("NhwcMaxPool", nhwc_pool, domain=MICROSOFT, attributes=_POOL_ATTRS, output_shapes=_nhwc_pool_dims)
declare("QLinearReduceMean", None, domain=MICROSOFT, float_form="ReduceMean")
declare("QLinearConcat", qlinear_concat, domain=MICROSOFT, attributes={"axis": 0}, output_shapes=_concat_dims)
