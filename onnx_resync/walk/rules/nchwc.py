"""ONNX Runtime's NCHWc ops (com.microsoft.nchwc): convolutions and pools on channels in blocks.

A blocked tensor is [N, P, H, W] as the file declares it, its P channels stored in blocks of B
(walk/layouts.py): a channel keeps one position, so labels sit on axis 1 as in NCHW; only the
filters are stored blocked, and their slots lie in the logical (plain OIHW) array of their layout.
P is the real channel count C padded to a multiple of B: the *padding* channels are zero and stay in
place (pinned), only the real channels move:

- ReorderInput: NCHW (or NHWC, channels_last) -> blocked; its padding positions are fresh elements,
  pinned;
- ReorderOutput: blocked -> NCHW (or NHWC); `channels` = C keeps the first C positions, so the
  positions it drops are padding (pinned);
- Conv: a Conv (group 1, depthwise or grouped, as producers.py) with its filter slotted through its
  layout, its activation (per channel) and a Sum input added channel for channel (as FusedConv). A
  convolution's trailing output rows in the last block that are zero, weight and bias, are padding
  where no edge says C (a class of tensors read only by convolutions), pinned;
- MaxPool, AveragePool, GlobalMaxPool, GlobalAveragePool, Upsample: per channel.

Where no block size fits the file (layouts.py), the filters' layout is not known: the convolutions pin.
"""

from __future__ import annotations

import numpy as np

from ...io import tensor_values
from ..channels import Label
from ..layouts import NCHWC, blocked_tensors, nchwc_layouts
from ..registry import declare
from .base import _inputs, attr
from .contrib import _add_into
from .producers import _conv
from .quantized import conv_dims

PADDING = "NCHWc padding channel (zero, kept in place)"


def reorder_input(ctx, node) -> None:
    x, out = node.input[0], node.output[0]
    c_axis = 3 if int(attr(node, "channels_last")) else 1
    labels = ctx.get(x)
    for axis, label in labels.items():
        if axis != c_axis:
            ctx.pin(label, "ReorderInput of a channel-carrying spatial axis")
    block, _ = nchwc_layouts(ctx.view)
    channels = ctx.dim(x, c_axis)
    label = labels.get(c_axis)
    if label is None:
        return
    if block is None or not isinstance(channels, int) or channels != len(label):
        ctx.pin(label, "ReorderInput with an NCHWc block size the file does not decide")
        return
    padding = -(-channels // block) * block - channels
    if padding:
        fresh = ctx.new(padding, node, out, kind="padding")
        ctx.pin(fresh, PADDING)
        label = Label.of(np.concatenate([label.elem, fresh.elem]), np.concatenate([label.sub, fresh.sub]))
    ctx.set(out, {1: label})


def reorder_output(ctx, node) -> None:
    x, out = node.input[0], node.output[0]
    channels = int(attr(node, "channels") or 0)
    labels = ctx.get(x)
    for axis, label in labels.items():
        if axis != 1:
            ctx.pin(label, "ReorderOutput of a channel-carrying spatial axis")
    label = labels.get(1)
    if label is None:
        return
    if channels and channels < len(label):
        ctx.pin(label.take(np.arange(channels, len(label))), PADDING)
        label = label.take(np.arange(channels))
    ctx.set(out, {3 if int(attr(node, "channels_last")) else 1: label})


def conv(ctx, node) -> None:
    x, w, b, z = node.input[0], node.input[1], _inputs(node, 2), _inputs(node, 3)
    block, layouts = nchwc_layouts(ctx.view)
    if w not in layouts:
        for n in (x, w, z):
            ctx.pin_all(n, "NCHWc Conv whose filter layout the file does not decide")
        return
    _conv(ctx, node, x, w, b)
    out_label = ctx.get(node.output[0]).get(1)
    if z:
        _add_into(ctx, node, node.output[0], z)
    if out_label is not None:
        rows = _zero_rows(ctx, w, b, layouts[w], block)
        if rows:
            ctx.pin(out_label.take(np.arange(len(out_label) - rows, len(out_label))), PADDING)


def _zero_rows(ctx, w: str, b: str, layout, block: int) -> int:
    """Trailing output rows (fewer than a block) whose weights and bias are all zero: NCHWc padding."""
    stored = [ctx.view.stored_tensor(n) for n in (w, b) if n]
    if any(t is None for t in stored):  # (a computed bias: not known to be zero)
        return 0
    W, B = tensor_values(stored[0]), tensor_values(stored[1]) if b else None
    rows = layout.logical(np.asarray(W)).reshape(W.shape[0], -1)
    k = 0
    while k < min(block - 1, len(rows) - 1) and not rows[-1 - k].any() and (B is None or B[-1 - k] == 0):
        k += 1
    return k


def block_view(ctx, node) -> bool:
    """A Reshape of a blocked tensor [N, P, H, W] into its blocks [N, P/B, H, W, B], or back (ONNX
    Runtime's view around an Add whose operands' shapes it could not prove equal): the Reshape acts on
    the blocks as stored, so channel c sits at (c // B, c % B): a stacked label on axes (1, 4) (the
    blocks' labels one after another: the channel label itself). True when handled (layout.reshape
    calls this first)."""
    x, out = node.input[0], node.output[0]
    if x not in _blocked(ctx.view):
        return False
    block, _ = nchwc_layouts(ctx.view)
    in_shape, out_shape = ctx.shape(x), ctx.shape(out)
    if block is None or in_shape is None or out_shape is None:
        return False
    labels, stacked = ctx.get(x), ctx.stacked(x)
    if len(in_shape) == 4 and len(out_shape) == 5 and out_shape[4] == block and not stacked and set(labels) <= {1}:
        if 1 in labels:
            ctx.set(out, {(1, 4): labels[1]})
        return True
    if len(in_shape) == 5 and len(out_shape) == 4 and in_shape[4] == block and set(labels) <= {4} \
            and set(stacked) <= {(1, 4)}:
        if (1, 4) in stacked:
            ctx.set(out, {1: stacked[(1, 4)]})
        elif 4 in labels and in_shape[1] == 1:  # one block: a plain label on the lanes
            ctx.set(out, {1: labels[4]})
        elif 4 in labels:
            ctx.pin(labels[4], "NCHWc blocks merged by a reader that ties them")
        return True
    return False


def _blocked(view) -> set[str]:
    cached = view.__dict__.get("_nchwc_blocked")
    if cached is None:
        cached = view.__dict__["_nchwc_blocked"] = blocked_tensors(view)
    return cached


def pool(ctx, node) -> None:
    """Per channel (MaxPool, AveragePool, their global forms, Upsample): the channel label stays."""
    labels = ctx.get(node.input[0])
    for axis, label in labels.items():
        if axis != 1:
            ctx.pin(label, f"NCHWc {node.op_type} over a channel-carrying axis")
    ctx.set(node.output[0], {1: labels[1]} if 1 in labels else {})


# ---- shapes (ONNX shape inference does not know the nchwc domain) ----------------------------
def _reorder_input_dims(node, shape_of):
    x = shape_of(0)
    if x is None or len(x) != 4:
        return [None]
    if int(attr(node, "channels_last")):
        x = [x[0], x[3], x[1], x[2]]
    return [[x[0], f"{node.output[0]}:1", x[2], x[3]]]  # P: the block size decides


def _reorder_output_dims(node, shape_of):
    x = shape_of(0)
    channels = int(attr(node, "channels") or 0)
    if x is None or len(x) != 4:
        return [None]
    c = channels or x[1]
    return [[x[0], x[2], x[3], c] if int(attr(node, "channels_last")) else [x[0], c, x[2], x[3]]]


def _conv_dims(node, shape_of):
    return [conv_dims(node, shape_of(0), shape_of(1))]


def _pool_dims(node, shape_of):
    return [conv_dims(node, shape_of(0), None)]


def _global_dims(node, shape_of):
    x = shape_of(0)
    return [None if x is None else list(x[:2]) + [1] * (len(x) - 2)]


def _upsample_dims(node, shape_of):
    x, scales = shape_of(0), list(attr(node, "scales") or [])
    if x is None or len(scales) != len(x):
        return [None]
    return [[d * int(s) if isinstance(d, int) and float(s).is_integer() else f"{node.output[0]}:{k}"
             for k, (d, s) in enumerate(zip(x, scales))]]


# ---- declarations ---------------------------------------------------------------------------
_POOL = {"kernel_shape": None, "strides": None, "dilations": None, "pads": None, "auto_pad": "NOTSET",
         "ceil_mode": 0, "storage_order": 0, "count_include_pad": 0}
declare("ReorderInput", reorder_input, domain=NCHWC, attributes={"channels_last": 0}, layout=True,
        homogeneous=True, trivial=True, output_shapes=_reorder_input_dims)
declare("ReorderOutput", reorder_output, domain=NCHWC, attributes={"channels": 0, "channels_last": 0},
        layout=True, homogeneous=True, trivial=True, output_shapes=_reorder_output_dims)
# (its activation may be any: a row rescale is not neutral, as FusedConv's)
declare("Conv", conv, domain=NCHWC, attributes={"group": 1, "kernel_shape": None, "strides": None, "dilations": None,
                                                "pads": None, "auto_pad": "NOTSET", "activation": None,
                                                "activation_params": None}, output_shapes=_conv_dims)
for _op in ("MaxPool", "AveragePool"):
    declare(_op, pool, domain=NCHWC, attributes=_POOL, homogeneous=True, trivial=True, output_shapes=_pool_dims)
for _op in ("GlobalMaxPool", "GlobalAveragePool"):
    declare(_op, pool, domain=NCHWC, homogeneous=True, trivial=True, output_shapes=_global_dims)
declare("Upsample", pool, domain=NCHWC, attributes={"scales": None, "mode": "nearest"}, homogeneous=True,
        trivial=True, output_shapes=_upsample_dims)
