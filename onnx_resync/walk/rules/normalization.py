"""Normalizations: per-channel parameters become slots of the channel label (BatchNorm,
InstanceNorm), or the normalized axis keeps its label (LayerNorm, GroupNorm, Softmax)."""

from __future__ import annotations

import onnx

from .base import _inputs, _norm_axis, attr, passthrough
from ..registry import declare


# ---- normalization --------------------------------------------------------------------------
def batch_norm(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    label = labels.get(1)
    for a, l in labels.items():
        if a != 1:
            ctx.pin(l, "BatchNormalization over a channel-carrying spatial axis")
    if label is not None:
        for p in node.input[1:]:
            _param_slot(ctx, node, p, 0, label)
    ctx.set(node.output[0], labels)
    for extra in node.output[1:]:
        ctx.set(extra, {0: label} if label is not None else {})


def _param_slot(ctx, node, param, axis, label) -> None:
    if not param:
        return
    if ctx.is_weightlike(param):
        ctx.slot(param, axis, label)
    elif ctx.get(param):
        ctx.union(ctx.get(param).get(axis, label), label) if axis in ctx.get(param) else ctx.pin(label, "bad param")
    else:
        ctx.pin(label, f"{node.op_type} parameter {param!r} is computed from unlabelled data")


def instance_norm(ctx, node) -> None:
    labels = ctx.get(node.input[0])
    label = labels.get(1)
    for a, l in labels.items():
        if a != 1:
            ctx.pin(l, "InstanceNormalization over a channel-carrying axis")
    if label is not None:
        _param_slot(ctx, node, node.input[1], 0, label)
        _param_slot(ctx, node, _inputs(node, 2), 0, label)
    ctx.set(node.output[0], labels)


def layer_norm(ctx, node) -> None:
    x = node.input[0]
    r = ctx.rank(x)
    labels = ctx.get(x)
    axis = _norm_axis(int(attr(node, "axis")), r)
    if labels and axis is None:
        for l in labels.values():
            ctx.pin(l, "LayerNormalization with unknown rank")
        return
    for a, label in labels.items():
        if a >= axis:
            # statistics over these axes are order-invariant; scale/bias follow the channels
            for p in node.input[1:3]:
                if p:
                    pr = ctx.rank(p)
                    pa = a - (r - pr) if pr is not None else None
                    if pa is not None and pa >= 0:
                        _param_slot(ctx, node, p, pa, label)
    ctx.set(node.output[0], labels)
    for extra in node.output[1:]:
        for label in labels.values():
            if extra and ctx.view.consumers.get(extra):
                ctx.pin(label, "LayerNormalization statistics output is used")


def group_norm(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    label = labels.get(1)
    groups = int(attr(node, "num_groups"))
    for a, l in labels.items():
        if a != 1:
            ctx.pin(l, "GroupNormalization over a channel-carrying axis")
    if label is not None:
        per = len(label) // groups
        # statistics are per channel group: moves stay inside a group
        ctx.elements.tag(label.elem, [("norm-group", node.name, k // per) for k in range(len(label))])
        for p in node.input[1:3]:
            shape = ctx.shape(p) if p else None
            if shape and shape[0] == len(label):
                _param_slot(ctx, node, p, 0, label)
            elif shape and shape[0] == groups and groups > 1:
                ctx.pin(label, "GroupNormalization with per-group parameters")
    ctx.set(node.output[0], labels)


def softmax(ctx, node) -> None:
    passthrough(ctx, node)  # equivariant along its axis, elementwise along the others


def _layer_norm_dims(node, shape_of):
    """Y as X, mean and inverse std with the normalized axes kept as 1 (float): for ONNX Runtime's
    LayerNormalization below opset 17, which ONNX shape inference does not know."""
    x = shape_of(0)
    if x is None:
        return [None, None, None]
    axis = int(attr(node, "axis")) % len(x)
    stats = (list(x[:axis]) + [1] * (len(x) - axis), onnx.TensorProto.FLOAT)
    return [x, stats, stats]


# ---- declarations ---------------------------------------------------------------------------
declare("BatchNormalization", batch_norm, trivial=True)
declare("InstanceNormalization", instance_norm, trivial=True)
declare("LayerNormalization", layer_norm, attributes={"axis": -1}, trivial=True, output_shapes=_layer_norm_dims)
declare("GroupNormalization", group_norm, attributes={"num_groups": 1})
declare("Softmax", softmax)
declare("LogSoftmax", softmax)
