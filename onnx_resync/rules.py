"""One rule per ONNX op: how channel labels flow from a node's inputs to its outputs.

A rule reads `ctx.get(tensor)` (axis -> Label), writes `ctx.set(output, labels)`, declares weight
slots with `ctx.slot(weight, axis, label)`, creates elements with `ctx.new(...)` (producers), unions
elements that must move together, and pins what it cannot follow. Anything not handled exactly pins:
nothing is guessed. The table at the bottom reads like the ONNX operator list.
"""

from __future__ import annotations

import numpy as np
import onnx

from .channels import Label


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _norm_axis(axis: int, rank: int | None) -> int | None:
    if axis < 0:
        return None if rank is None else axis + rank
    return axis


def _inputs(node, idx):
    return node.input[idx] if len(node.input) > idx and node.input[idx] else ""


# ---- fallbacks ------------------------------------------------------------------------------
def unknown_op(ctx, node) -> None:
    """No rule: every labelled input pins; outputs carry no label."""
    for name in node.input:
        ctx.pin_all(name, f"consumed by {node.op_type} (no rule)")
    from .graph import node_inputs

    for name in node_inputs(node)[len(node.input):]:
        ctx.pin_all(name, f"read inside a {node.op_type} subgraph")


def pin_op(reason: str):
    def rule(ctx, node):
        for name in node.input:
            ctx.pin_all(name, reason.format(op=node.op_type))

    return rule


def passthrough(ctx, node) -> None:
    """Elementwise on one data input: every output carries the input's labels (stacked ones too)."""
    labels = ctx.labels.get(node.input[0], {}) if node.input else {}
    uniform = ctx.uniform.get(node.input[0]) if node.input else None
    for out in node.output:
        ctx.set(out, labels)
        if uniform:
            ctx.uniform[out] = set(uniform)
    if node.input and ctx.is_weightlike(node.input[0]) and node.output:
        _derive_mapped(ctx, node, {a: a for a in range(ctx.rank(node.input[0]) or 0)})


def _derive_reshaped(ctx, node) -> None:
    """Reshape/Squeeze/Unsqueeze of a weight-like tensor that only adds or drops size-1 axes."""
    src, out = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(src), ctx.shape(out)
    if not ctx.is_weightlike(src) or in_shape is None or out_shape is None:
        return
    in_real = [i for i, d in enumerate(in_shape) if d != 1]
    out_real = [i for i, d in enumerate(out_shape) if d != 1]
    if [in_shape[i] for i in in_real] == [out_shape[i] for i in out_real]:
        _derive_mapped(ctx, node, dict(zip(in_real, out_real)))


def _derive_mapped(ctx, node, axis_map: dict[int, int]) -> None:
    """A weight-like tensor moved by a layout op: its indexed axes move with it."""
    src = node.input[0]
    axis_sources = {}
    for ia, oa in axis_map.items():
        found = ctx.sources(src, ia)
        if found is not None:
            axis_sources[oa] = found
            ctx.mark_read(src, ia)
    ctx.derive(node.output[0], axis_sources, [src])


def constant_of_shape(ctx, node) -> None:
    """A filled tensor is the same along every axis."""
    rank = ctx.rank(node.output[0])
    if rank is not None:
        ctx.uniform[node.output[0]] = set(range(rank))


def _is_uniform(ctx, name, axis) -> bool:
    return axis in ctx.uniform.get(name, ())


def shape_only(ctx, node) -> None:
    """Reads shapes, not data: no constraint."""


# ---- elementwise with broadcasting ----------------------------------------------------------
def broadcast(ctx, node, data_inputs=None) -> None:
    """Numpy broadcasting: labels on the same output axis are unioned; weights become slots."""
    names = [n for n in (data_inputs if data_inputs is not None else node.input) if n]
    out = node.output[0]
    out_rank = ctx.rank(out)
    ranks = [ctx.rank(n) for n in names]
    labelled = [n for n in names if ctx.get(n)]
    if out_rank is not None and all(r is not None for r in ranks):
        uniform = {
            oa for oa in range(out_rank)
            if all(oa - (out_rank - r) < 0 or ctx.dim(n, oa - (out_rank - r)) == 1
                   or _is_uniform(ctx, n, oa - (out_rank - r)) for n, r in zip(names, ranks))
        }
        if uniform:
            ctx.uniform[out] = uniform
    if not labelled:
        _derive_elementwise(ctx, node, names, ranks, out_rank)
        return
    if out_rank is None or any(r is None for r in ranks):
        for n in labelled:
            ctx.pin_all(n, f"{node.op_type} with unknown ranks")
        return
    out_labels: dict[int, Label] = {}
    for n, r in zip(names, ranks):
        for axis, label in ctx.get(n).items():
            oa = axis + out_rank - r
            if oa in out_labels:
                ctx.union(out_labels[oa], label)
            else:
                out_labels[oa] = label
    for oa, label in out_labels.items():
        for n, r in zip(names, ranks):
            ia = oa - (out_rank - r)
            if ia < 0 or ia in ctx.get(n):
                continue
            dim = ctx.dim(n, ia)
            if dim == 1 or _is_uniform(ctx, n, ia):
                continue
            if ctx.is_weightlike(n):
                ctx.slot(n, ia, label)
            else:
                ctx.pin(label, f"{node.op_type} mixes channels with an unlabelled tensor {n!r}")
    # outputs beyond the first (rare) carry the same labels
    for o in node.output:
        ctx.set(o, out_labels)


def _derive_elementwise(ctx, node, names, ranks, out_rank) -> None:
    """An unlabelled elementwise result of weights (and broadcast scalars) stays indexable."""
    if out_rank is None or any(r is None for r in ranks) or not any(ctx.is_weightlike(n) for n in names):
        return
    axis_sources = {}
    for oa in range(out_rank):
        sources = []
        for n, r in zip(names, ranks):
            ia = oa - (out_rank - r)
            if ia < 0 or ctx.dim(n, ia) == 1 or _is_uniform(ctx, n, ia):
                continue
            found = ctx.sources(n, ia)
            if found is None:
                sources = None
                break
            sources.extend(found)
            ctx.mark_read(n, ia)
        if sources:
            axis_sources[oa] = sources
    ctx.derive(node.output[0], axis_sources, names)


def variadic(ctx, node) -> None:
    broadcast(ctx, node)


def where(ctx, node) -> None:
    broadcast(ctx, node)


# ---- producers ------------------------------------------------------------------------------
def conv(ctx, node) -> None:
    _conv(ctx, node, node.input[0], node.input[1], _inputs(node, 2))


def _conv(ctx, node, x: str, w: str, b: str, per_channel: tuple[str, ...] = ()) -> None:
    """Conv and its quantized forms; per_channel: weight scales/zero points along output channels."""
    out = node.output[0]
    group = int(attr(node, "group", 1))
    wshape = ctx.shape(w)
    x_labels = ctx.get(x)
    if wshape is None or not ctx.is_weightlike(w):
        for n in (x, w):
            ctx.pin_all(n, "Conv with a computed weight")
        return
    for axis, label in x_labels.items():
        if axis != 1:
            ctx.pin(label, "Conv over a channel-carrying spatial axis")
    in_label = x_labels.get(1)
    m, c_per_group = wshape[0], wshape[1]
    if group == 1:
        if in_label is not None:
            ctx.slot(w, 1, in_label)
        fresh = ctx.new(m, node, out)
        ctx.slot(w, 0, fresh)
        ctx.slot(b, 0, fresh)
        ctx.set(out, {1: fresh})
        return
    m_per_group = m // group
    if c_per_group == 1 and in_label is not None:
        # depthwise (with channel multiplier): output k*mult+j belongs to input channel k
        out_label = in_label.repeat_blocks(m_per_group)
        ctx.slot(w, 0, out_label)
        ctx.slot(b, 0, out_label)
        ctx.set(out, {1: out_label})
        return
    if in_label is not None:
        ctx.pin(in_label, f"input of a grouped Conv (group={group}): cross-group layout not modelled")
    fresh = ctx.new(m, node, out)
    # a grouped conv's output channel reads its own input group: moves stay inside a group
    ctx.elements.tag(fresh.elem, [("conv-group", node.name, k // m_per_group) for k in range(m)])
    ctx.slot(w, 0, fresh)
    ctx.slot(b, 0, fresh)
    ctx.set(out, {1: fresh})


def conv_transpose(ctx, node) -> None:
    x, w, b = node.input[0], node.input[1], _inputs(node, 2)
    out = node.output[0]
    group = int(attr(node, "group", 1))
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
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
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


def _matmul(ctx, node, a: str, b: str) -> None:
    out = node.output[0]
    ra, rb, ro = ctx.rank(a), ctx.rank(b), ctx.rank(out)
    if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
        for n in (a, b):
            ctx.pin_all(n, "MatMul with unknown or vector ranks")
        return
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
    # contracted axis: a's last with b's second-to-last
    ka, kb = la.get(ra - 1), lb.get(rb - 2)
    if ka is not None and kb is not None:
        ctx.union(ka, kb)
    elif ka is not None:
        _contract_with(ctx, b, rb - 2, ka, node)
    elif kb is not None:
        _contract_with(ctx, a, ra - 1, kb, node)
    # free axes: a's rows and b's columns
    rows, cols = la.get(ra - 2), lb.get(rb - 1)
    if rows is not None:
        out_labels[ro - 2] = rows
    elif ctx.is_weightlike(a) and not ctx.is_weightlike(b) and isinstance(ctx.dim(a, ra - 2), int):
        fresh = ctx.new(ctx.dim(a, ra - 2), node, out)
        ctx.slot(a, ra - 2, fresh)
        out_labels[ro - 2] = fresh
    if cols is not None:
        out_labels[ro - 1] = cols
    elif ctx.is_weightlike(b) and not ctx.is_weightlike(a) and isinstance(ctx.dim(b, rb - 1), int):
        fresh = ctx.new(ctx.dim(b, rb - 1), node, out)
        ctx.slot(b, rb - 1, fresh)
        out_labels[ro - 1] = fresh
    ctx.set(out, out_labels)


def _contract_with(ctx, other, axis, label, node) -> None:
    if ctx.is_weightlike(other):
        ctx.slot(other, axis, label)
    else:
        ctx.pin(label, f"{node.op_type} contracts channels with an unlabelled tensor")


def gather(ctx, node) -> None:
    data, indices = node.input[0], node.input[1]
    out = node.output[0]
    axis = int(attr(node, "axis", 0))
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
    if idx is not None:
        picked = np.where(idx < 0, idx + (ctx.dim(data, axis) or 0), idx).reshape(-1)
        where = {a: a if a < axis else a + idx_rank - 1 for a in range(r) if a != axis or idx_rank == 1}
        out_labels.update(_cut_stacked(ctx, data, lambda a, n: picked if a == axis else None, where))
    ctx.set(out, out_labels)


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
    axis = _norm_axis(int(attr(node, "axis", -1)), r)
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
    groups = int(attr(node, "num_groups", 1))
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


# ---- layout ---------------------------------------------------------------------------------
def transpose(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    r = ctx.rank(x)
    perm = attr(node, "perm")
    if labels and r is None and perm is None:
        for l in labels.values():
            ctx.pin(l, "Transpose with unknown rank")
        return
    perm = list(perm) if perm is not None else list(reversed(range(r or 0)))
    out = {}
    for new_axis, old_axis in enumerate(perm):
        if old_axis in labels:
            out[new_axis] = labels[old_axis]
    out.update(_move_stacked(ctx, x, {old: new for new, old in enumerate(perm)}, node))
    ctx.set(node.output[0], out)
    uniform = ctx.uniform.get(x, set())
    if uniform:
        ctx.uniform[node.output[0]] = {new for new, old in enumerate(perm) if old in uniform}
    if ctx.is_weightlike(x):
        _derive_mapped(ctx, node, {old: new for new, old in enumerate(perm)})


def _axes_input(ctx, node, idx=1):
    axes = attr(node, "axes")
    if axes is None and len(node.input) > idx and node.input[idx]:
        value = ctx.const(node.input[idx])
        axes = None if value is None else [int(v) for v in np.atleast_1d(value)]
    return axes


def squeeze(ctx, node) -> None:
    _derive_reshaped(ctx, node)
    x = node.input[0]
    labels = ctx.get(x)
    if not ctx.labels.get(x):
        return
    r = ctx.rank(x)
    axes = _axes_input(ctx, node)
    shape = ctx.shape(x)
    if r is None or (axes is None and shape is None):
        ctx.pin_all(x, "Squeeze with unknown shape")
        return
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = sorted(a % r for a in axes)
    out = {}
    for a, l in labels.items():
        if a in axes:
            ctx.pin(l, "Squeeze of a channel axis")  # cannot happen for len > 1
            continue
        out[a - sum(1 for s in axes if s < a)] = l
    out.update(_move_stacked(ctx, x, {a: a - sum(1 for s in axes if s < a) for a in range(r) if a not in axes}, node))
    ctx.set(node.output[0], out)


def unsqueeze(ctx, node) -> None:
    _derive_reshaped(ctx, node)
    x = node.input[0]
    labels = ctx.get(x)
    axes = _axes_input(ctx, node)
    ro = ctx.rank(node.output[0])
    if ctx.uniform.get(x) and axes is not None and ro is not None:
        kept = [i for i in range(ro) if i not in sorted(a % ro for a in axes)]
        ctx.uniform[node.output[0]] = {kept[a] for a in ctx.uniform[x]}
    if not ctx.labels.get(x):
        return
    if axes is None or ro is None:
        ctx.pin_all(x, "Unsqueeze with unknown axes")
        return
    axes = sorted(a % ro for a in axes)
    kept = [i for i in range(ro) if i not in axes]
    out = {kept[a]: l for a, l in labels.items()}
    out.update(_move_stacked(ctx, x, dict(enumerate(kept)), node))
    ctx.set(node.output[0], out)


def flatten(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    if not labels:
        return
    shape = ctx.shape(x)
    r = len(shape) if shape is not None else None
    axis = _norm_axis(int(attr(node, "axis", 1)), r)
    if shape is None or axis is None:
        for l in labels.values():
            ctx.pin(l, "Flatten with unknown shape")
        return
    _merge_axes(ctx, node, labels, shape, [list(range(0, axis)), list(range(axis, r))])


def _merge_axes(ctx, node, labels, in_shape, groups_of_axes) -> None:
    """Each output axis i is the merge of input axes groups_of_axes[i] (row-major)."""
    out = {}
    for new_axis, axes in enumerate(groups_of_axes):
        inside = [a for a in axes if a in labels]
        if not inside:
            continue
        if len(inside) > 1:
            for a in inside:
                ctx.pin(labels[a], f"{node.op_type} merges two channel axes")
            continue
        a = inside[0]
        before = [in_shape[b] for b in axes if b < a]
        after = [in_shape[b] for b in axes if b > a]
        if not all(isinstance(d, int) for d in before + after):
            ctx.pin(labels[a], f"{node.op_type} merges the channel axis with a symbolic axis")
            continue
        out[new_axis] = labels[a].repeat_blocks(int(np.prod(after, dtype=np.int64))).tile(
            int(np.prod(before, dtype=np.int64))
        )
    ctx.set(node.output[0], out)


def reshape(ctx, node) -> None:
    _derive_reshaped(ctx, node)
    x = node.input[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    labels, in_shape = _merge_stacked(ctx, x, in_shape, out_shape)
    if not labels:
        return
    if in_shape is None or out_shape is None:
        for l in labels.values():
            ctx.pin(l, "Reshape with unknown shapes")
        return
    mapping = _reshape_groups(in_shape, out_shape)
    to_output = node.output[0] in ctx.view.graph_outputs  # the output's own layout is not ours to keep
    if mapping is None:
        for l in labels.values():
            ctx.pin(l, "reaches a graph output" if to_output else
                    "Reshape that mixes the channel axis in a way the walker cannot follow")
        return
    from .graph import dim_product

    out: dict[int, Label] = {}
    for in_axes, out_axes in mapping:
        inside = [a for a in in_axes if a in labels]
        if not inside:
            continue
        if dim_product([in_shape[b] for b in in_axes]) != dim_product([out_shape[o] for o in out_axes]) or not all(
                isinstance(in_shape[b], int) for b in in_axes):
            for a in inside:
                ctx.pin(labels[a], "reaches a graph output" if to_output else
                        "Reshape mixes the channel axis with axes of unknown size")
            continue
        real_out = [o for o in out_axes if out_shape[o] != 1]
        if len(inside) > 1:
            merged = _merge_pair(ctx, node, [labels[a] for a in inside], [in_shape[b] for b in in_axes])
            if merged is not None and len(real_out) == 1:
                out[real_out[0]] = merged
            else:
                for a in inside:
                    ctx.pin(labels[a], "Reshape merges channel axes in a way the walker cannot follow")
            continue
        a = inside[0]
        label = labels[a]
        if len(real_out) == 1:
            before = [in_shape[b] for b in in_axes if b < a]
            after = [in_shape[b] for b in in_axes if b > a]
            out[real_out[0]] = label.repeat_blocks(int(np.prod(after, dtype=np.int64))).tile(
                int(np.prod(before, dtype=np.int64))
            )
        elif len(real_out) == 0:
            continue  # cannot happen: a label has more than one position
        else:
            split = _split_label(label, [out_shape[o] for o in real_out], in_shape, in_axes, a)
            if split is not None:
                out[real_out[split[0]]] = split[1]
                continue
            factors = _split_product(ctx, node, label, [out_shape[o] for o in real_out])
            if factors is None:
                ctx.pin(label, "Reshape splits the channel axis in an irregular layout")
                continue
            out.update(zip(real_out, factors))
    ctx.set(node.output[0], out)


def _move_stacked(ctx, x, where: dict[int, int], node) -> dict:
    """`x`'s stacked labels with both axes moved (old axis -> new); one losing an axis pins."""
    out = {}
    for (o, i), label in ctx.stacked(x).items():
        if o in where and i in where:
            out[(where[o], where[i])] = label
        else:
            ctx.pin(label, f"{node.op_type} drops a channel axis")
    return out


def _cut_stacked(ctx, x, pick, where: dict[int, int] | None = None) -> dict:
    """`x`'s stacked labels cut by pick(axis, length) (the indices kept; None: all) on their outer
    and inner axes, then moved by `where` (old axis -> new; the outer axis may go when one index is
    kept). One outer index left: a plain label on the inner axis (one direction's units)."""
    out = {}
    for (o, i), label in ctx.stacked(x).items():
        count = ctx.dim(x, o)
        if not isinstance(count, int) or count < 1 or len(label) % count:
            ctx.pin(label, "a stacked channel axis of unknown size")
            continue
        inner = len(label) // count
        outer_kept, inner_kept = pick(o, count), pick(i, inner)
        outer_kept = np.arange(count) if outer_kept is None else np.asarray(outer_kept) % count
        inner_kept = np.arange(inner) if inner_kept is None else np.asarray(inner_kept) % inner
        cut = _distinct_copies(label.take((outer_kept[:, None] * inner + inner_kept[None, :]).reshape(-1)))
        where_o, where_i = (o, i) if where is None else (where.get(o), where.get(i))
        if where_i is None or (where_o is None and len(outer_kept) != 1):
            ctx.pin(label, "a stacked channel axis is cut in a way the walker cannot follow")
        elif len(outer_kept) == 1:
            out[where_i] = cut
        else:
            out[(where_o, where_i)] = cut
    return out


def _merge_stacked(ctx, x, in_shape, out_shape):
    """Before a Reshape: a stacked label whose (outer, inner) axes are adjacent, in that order, and
    merged into one output axis becomes a plain label of the merged axis (see channels.py). Returns
    the labels and the input shape with that pair merged; other stacked labels tie their directions."""
    stacked = ctx.stacked(x)
    if not stacked:
        return ctx.get(x), in_shape
    (o, i), label = next(iter(stacked.items()))
    merged = None
    if len(stacked) == 1 and i == o + 1 and in_shape is not None and out_shape is not None:
        if isinstance(in_shape[o], int) and isinstance(in_shape[i], int):
            merged = list(in_shape[:o]) + [in_shape[o] * in_shape[i]] + list(in_shape[i + 1:])
            groups = _reshape_groups(merged, out_shape) or []
            if not any(o in gi and sum(1 for b in go if out_shape[b] != 1) == 1 for gi, go in groups):
                merged = None  # the pair is split again or spread over several output axes
    if merged is None:
        ctx.tie_directions(x)
        return ctx.get(x), in_shape
    labels = {(a if a < o else a - 1): l for a, l in ctx.get(x).items()}
    labels[o] = label
    return labels, merged


def _plain(label) -> bool:
    return not label.sub.any() and len(np.unique(label.elem)) == len(label)


def _split_product(ctx, node, label, out_dims):
    """Channel axis -> (heads, dims), or (q/k/v, heads, dims): fresh factor elements per new axis.

    Each channel becomes a cell of the grid. Heads may then move as wholes, and dims inside every
    head the same way (DESIGN.md, structured axes); the walker rewrites every tensor holding the
    cells into their factors. More than two axes nest: (a, b, c) is (a, (b, c)).
    """
    if len(out_dims) < 2 or not all(isinstance(d, int) for d in out_dims) or not _plain(label):
        return None
    rows = ctx.new(out_dims[0], node, node.output[0], kind="factor")
    if len(out_dims) == 2:
        rest = [ctx.new(out_dims[1], node, node.output[0], kind="factor")]
        cols = rest[0]
    else:
        cols = ctx.new(int(np.prod(out_dims[1:], dtype=np.int64)), node, node.output[0], kind="product")
        rest = _split_product(ctx, node, cols, out_dims[1:])
        if rest is None:
            return None
    if not ctx.elements.product(label.elem, rows, cols):
        return None
    return [rows] + rest


def _merge_pair(ctx, node, labels, dims):
    """(heads, dims) -> one axis: fresh cell elements, each the product of a head and a dim."""
    if len(labels) != 2 or not all(_plain(l) for l in labels) or not all(isinstance(d, int) for d in dims):
        return None
    if int(np.prod([d for d in dims if d != 1], dtype=np.int64)) != len(labels[0]) * len(labels[1]):
        return None  # another non-trivial axis is merged in as well
    cells = ctx.new(len(labels[0]) * len(labels[1]), node, node.output[0], kind="product")
    return cells if ctx.elements.product(cells.elem, labels[0], labels[1]) else None


def _split_label(label, out_dims, in_shape, in_axes, a):
    """A split whose trailing pieces only cut an element's block (undoing a Flatten): keep the label."""
    if len(in_axes) != 1 or not all(isinstance(d, int) for d in out_dims):
        return None
    lead = out_dims[0]
    inner = int(np.prod(out_dims[1:], dtype=np.int64))
    elem = label.elem.reshape(lead, inner)
    sub = label.sub.reshape(lead, inner)
    if not (elem == elem[:, :1]).all():
        return None
    base = sub[:, :1]
    if not (sub - base == np.arange(inner)[None, :]).all() or (base % inner).any():
        return None
    return 0, Label(elem[:, 0].copy(), (base[:, 0] // inner).copy())


def _reshape_groups(in_shape, out_shape):
    """Pair up runs of input and output axes with equal products; symbolic dims count as factors.

    Equal leading and trailing dims pair one to one first, so a middle that symbolic algebra cannot
    untangle (H*W -> 1 x W when H is 1 at run time) stays one group without hiding the channels.
    """
    lead = 0
    while lead < min(len(in_shape), len(out_shape)) and in_shape[lead] == out_shape[lead]:
        lead += 1
    tail = 0
    while (tail < min(len(in_shape), len(out_shape)) - lead
           and in_shape[len(in_shape) - 1 - tail] == out_shape[len(out_shape) - 1 - tail]):
        tail += 1
    mid_in = list(range(lead, len(in_shape) - tail))
    mid_out = list(range(lead, len(out_shape) - tail))
    middle = _pair_runs([in_shape[k] for k in mid_in], [out_shape[k] for k in mid_out])
    if middle is None:
        if not (mid_in and mid_out):
            return None
        # one opaque group: its dim products differ symbolically, so a label inside it pins
        middle = [(list(range(len(mid_in))), list(range(len(mid_out))))]
    groups = [([k], [k]) for k in range(lead)]
    groups += [([mid_in[a] for a in gi], [mid_out[b] for b in gj]) for gi, gj in middle]
    groups += [([len(in_shape) - tail + k], [len(out_shape) - tail + k]) for k in range(tail)]
    return groups


def _pair_runs(in_shape, out_shape):
    from .graph import dim_divide, dim_product

    groups = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [], []
        if i < len(in_shape):
            gi.append(i)
            i += 1
        if j < len(out_shape):
            gj.append(j)
            j += 1
        while True:
            pi = dim_product([in_shape[k] for k in gi])
            pj = dim_product([out_shape[k] for k in gj])
            if pi == pj:
                break
            if dim_divide(pj, pi) is not None and i < len(in_shape):
                gi.append(i)
                i += 1
            elif dim_divide(pi, pj) is not None and j < len(out_shape):
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _distinct_copies(label: Label) -> Label:
    """Copies of one element at one sub-position (Concat of x with x, Gather with a repeated index)
    get distinct sub-positions, like the copies a Flatten makes.

    The copies are different tensors that move the same way. A later Slice that keeps one copy of
    some elements and another copy of others must not see them as one group: permuting would move
    values between the copies (Concat(x + f(x), x + g(x)) -> Slice across the seam was off by O(1)).
    """
    if len(label) < 2:
        return label
    order = np.lexsort((np.arange(len(label)), label.sub, label.elem))
    elem, sub = label.elem[order], label.sub[order]
    first = np.r_[True, (elem[1:] != elem[:-1]) | (sub[1:] != sub[:-1])]
    if first.all():
        return label
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(label)), 0))
    copy = np.empty(len(label), dtype=np.int64)
    copy[order] = np.arange(len(label)) - run_start  # k-th copy, in position order
    return Label(label.elem, label.sub + copy * (int(label.sub.max()) + 1))


def concat(ctx, node) -> None:
    out = node.output[0]
    names = [n for n in node.input if n]
    r = ctx.rank(out)
    axis = _norm_axis(int(attr(node, "axis", 0)), r)
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
    axis = _norm_axis(int(attr(node, "axis", 0)), r)
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


def pad(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    r = ctx.rank(x)
    pads = attr(node, "pads")
    if pads is None and len(node.input) > 1:
        value = ctx.const(node.input[1])
        pads = None if value is None else value.tolist()
    axes = ctx.const(_inputs(node, 3))
    if labels and (pads is None or r is None):
        for l in labels.values():
            ctx.pin(l, "Pad with non-constant pads")
        return
    if labels:
        axes = list(range(r)) if axes is None else [int(a) % r for a in axes]
        n = len(axes)
        for i, a in enumerate(axes):
            if a in labels and (pads[i] != 0 or pads[i + n] != 0):
                ctx.pin(labels[a], "Pad on the channel axis")
    passthrough(ctx, node)


def resize(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    for a, l in labels.items():
        if ctx.dim(node.output[0], a) != len(l):
            ctx.pin(l, "Resize along the channel axis")
    ctx.set(node.output[0], {a: l for a, l in labels.items() if ctx.dim(node.output[0], a) == len(l)})


def pool(ctx, node) -> None:
    labels = ctx.get(node.input[0])
    for a, l in labels.items():
        if a != 1:
            ctx.pin(l, f"{node.op_type} over a channel-carrying axis")
    ctx.set(node.output[0], {1: labels[1]} if 1 in labels else {})
    for extra in node.output[1:]:
        if extra and ctx.view.consumers.get(extra) and 1 in labels:
            ctx.pin(labels[1], f"{node.op_type} indices output is used")


def softmax(ctx, node) -> None:
    passthrough(ctx, node)  # equivariant along its axis, elementwise along the others


def reduce(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    if not labels and not ctx.uniform.get(x):
        return
    r = ctx.rank(x)
    keepdims = int(attr(node, "keepdims", 1))
    axes = _axes_input(ctx, node)
    if r is None:
        for l in labels.values():
            ctx.pin(l, f"{node.op_type} with unknown rank")
        return
    if axes is None or len(axes) == 0:
        noop = int(attr(node, "noop_with_empty_axes", 0))
        axes = [] if noop else list(range(r))
    axes = sorted(a % r for a in axes)

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
    axis = _norm_axis(int(attr(node, "axis", 0)), r)
    keepdims = int(attr(node, "keepdims", 1))
    out = {}
    for a, l in ctx.get(x).items():
        if a == axis or axis is None:
            ctx.pin(l, f"{node.op_type} returns channel indices")
        else:
            out[a if keepdims or a < axis else a - 1] = l
    ctx.set(node.output[0], out)


def expand(ctx, node) -> None:
    labels = ctx.get(node.input[0])
    r, ro = ctx.rank(node.input[0]), ctx.rank(node.output[0])
    if r is not None and ro is not None:
        ctx.uniform[node.output[0]] = {
            oa for oa in range(ro)
            if oa < ro - r or ctx.dim(node.input[0], oa - (ro - r)) == 1
            or _is_uniform(ctx, node.input[0], oa - (ro - r))
        }
    if labels and (r is None or ro is None):
        for l in labels.values():
            ctx.pin(l, "Expand with unknown ranks")
        return
    ctx.set(node.output[0], {a + ro - r: l for a, l in labels.items()} if labels else {})


def tile(ctx, node) -> None:
    labels = ctx.get(node.input[0])
    reps = ctx.const(_inputs(node, 1))
    out = {}
    for a, l in labels.items():
        if reps is not None and int(reps[a]) == 1:
            out[a] = l
        else:
            ctx.pin(l, "Tile along the channel axis")
    ctx.set(node.output[0], out)


def prelu(ctx, node) -> None:
    broadcast(ctx, node)


def clip(ctx, node) -> None:
    # min/max are scalars; a per-channel bound would be a weight slot (handled by broadcast)
    broadcast(ctx, node, [node.input[0]] + [n for n in node.input[1:] if n])


def quantize_linear(ctx, node) -> None:
    x, scale, zp = node.input[0], _inputs(node, 1), _inputs(node, 2)
    labels = ctx.get(x)
    r = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis", 1)), r)
    sshape = ctx.shape(scale) if scale else None
    per_channel = sshape is not None and len(sshape) == 1 and sshape[0] > 1
    for a, l in labels.items():
        if per_channel and a == axis:
            ctx.slot(scale, 0, l)
            if zp:
                ctx.slot(zp, 0, l)
    ctx.set(node.output[0], labels)


def dynamic_quantize_linear(ctx, node) -> None:
    # scale and zero point come from the tensor's min/max: order-invariant
    ctx.set(node.output[0], ctx.get(node.input[0]))


def rnn(ctx, node, *, transposed: bool = False) -> None:
    """LSTM/GRU/RNN: input features are a slot of W; hidden units are fresh elements, one set per
    direction.

    A direction's units sit in every gate block of its slice of W, R and B (gate g, unit k at
    g*H + k), on both axes of its recurrence R[d], in its initial states, peepholes and (for
    DynamicQuantizeLSTM) per-row scales: slots `at` (direction axis, d). Each direction is its own
    group, so Y, Y_h and Y_c carry a stacked label over (direction axis, unit axis) (channels.py):
    merging the two axes gives [fwd units | bwd units], picking one direction gives its units, and a
    reader that mixes directions ties them (one permutation for both, the old model; still exact).
    Units are on Y's axis 3 and on axis 2 of Y_h, Y_c and the initial states in both layouts; the
    direction axis is 1 of Y and 0 of the states with layout 0, 2 and 1 with layout 1.
    `transposed`: com.microsoft.DynamicQuantizeLSTM stores W as [dir, input, 4H] and R as
    [dir, H, 4H], with per-direction or per-row scales and zero points (inputs 8-11).
    """
    in_axis, gate_axis = (1, 2) if transposed else (2, 1)
    x, w, r_w = node.input[0], node.input[1], node.input[2]
    b = _inputs(node, 3)
    hidden = int(attr(node, "hidden_size", 0))
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}[node.op_type]
    dirs = 2 if attr(node, "direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    layout = int(attr(node, "layout", 0))
    for l in ctx.stacked(x).values():
        ctx.pin(l, f"{node.op_type} input on a non-feature axis")
    for a, l in ctx.get(x).items():
        if a == 2 and ctx.is_weightlike(w):
            ctx.slot(w, in_axis, l)  # the same features feed both directions
        else:
            ctx.pin(l, f"{node.op_type} input on a non-feature axis")
    weights_ok = all(ctx.is_weightlike(t) for t in (w, r_w)) and (not b or ctx.is_weightlike(b))
    if hidden <= 0 or not weights_ok:
        for t in node.input[4:]:
            ctx.pin_all(t, f"{node.op_type} state")
        units = ctx.new(max(hidden, 1), node, node.output[0] if node.output else "")
        ctx.pin(units, f"{node.op_type} with computed weights or unknown hidden_size")
        return
    units = [ctx.new(hidden, node, node.output[0] if node.output else "") for _ in range(dirs)]
    for d, u in enumerate(units):
        at = (0, d) if dirs > 1 else None  # a single direction keeps plain slots
        gate_label = u.tile(gates)
        ctx.slot(w, gate_axis, gate_label, at)
        ctx.slot(r_w, gate_axis, gate_label, at)
        ctx.slot(r_w, in_axis, u, at)
        if b:
            ctx.slot(b, 1, u.tile(2 * gates), at)
        _rnn_extras(ctx, node, d, u, gate_label, at, layout, gates * hidden)
    stacked = Label.concat(units)
    outs = list(node.output) + [""] * 3
    if dirs == 1:
        ctx.set(outs[0], {3: units[0]})
        ctx.set(outs[1], {2: units[0]})
        ctx.set(outs[2], {2: units[0]})
    else:
        ctx.set(outs[0], {(1 + layout, 3): stacked})
        ctx.set(outs[1], {(layout, 2): stacked})
        ctx.set(outs[2], {(layout, 2): stacked})


def _rnn_extras(ctx, node, d, units, gate_label, at, layout, rows) -> None:
    """Inputs 5 initial_h, 6 initial_c, 7 peepholes P (LSTM: 3 blocks); DynamicQuantizeLSTM: 8-11
    W/R scale and zero point, per direction or per gate row. `d`: the direction of `units`."""
    state_at = (layout, d) if at is not None else None
    for idx, name in enumerate(node.input):
        if idx < 5 or not name:
            continue
        if idx >= 8:
            shape = ctx.shape(name)
            if shape and len(shape) == 2 and shape[1] == rows:
                ctx.slot(name, 1, gate_label, at)
            continue
        stacked = ctx.stacked(name).get((layout, 2)) if at is not None else None
        stacked = stacked if stacked is not None and len(stacked) == 2 * len(units) else None
        if idx == 7:
            ctx.slot(name, 1, units.tile(3), at)
        elif ctx.is_weightlike(name):
            ctx.slot(name, 2, units, state_at)
        elif stacked is not None:
            ctx.union(stacked.take(np.arange(d * len(units), (d + 1) * len(units))), units)
        elif ctx.get(name).get(2) is not None:
            ctx.union(ctx.get(name)[2], units)  # the same state for every direction: they move together
        elif _is_uniform(ctx, name, 2):
            continue  # e.g. zeros from ConstantOfShape
        else:
            ctx.pin(units, f"{node.op_type} initial state from an unlabelled tensor")
    if d == 0:
        for name in node.input[5:7]:
            for key, label in ctx.stacked(name).items():
                if key != (layout, 2) or at is None or len(label) != 2 * len(units):
                    ctx.pin(label, f"{node.op_type} initial state with its units on another axis")


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


def resolve_weight_axes(view, name: str, axis: int):
    """Map an axis of a weight (or of a view of weights) to the stored tensors' axes it indexes.

    Returns [(stored_name, axis), ...], or None when the view scrambles axes (cannot index).
    """
    if view.stored_tensor(name) is not None:
        return [(name, axis)]
    node = view.producer.get(name)
    if node is None:
        return None
    op = node.op_type
    src = node.input[0]
    if op in ("Identity", "Cast"):
        return resolve_weight_axes(view, src, axis)
    if op == "DequantizeLinear":
        targets = resolve_weight_axes(view, src, axis)
        if targets is None:
            return None
        scale_shape = view.shape(node.input[1])
        q_axis = attr(node, "axis", 1)
        rank = view.rank(src)
        if scale_shape and len(scale_shape) == 1 and scale_shape[0] > 1 and rank and q_axis % rank == axis:
            for extra in node.input[1:3]:
                if extra:
                    more = resolve_weight_axes(view, extra, 0)
                    if more is None:
                        return None
                    targets = targets + more
        return targets
    if op == "Transpose":
        perm = attr(node, "perm")
        rank = view.rank(src)
        perm = list(perm) if perm is not None else list(reversed(range(rank or 0)))
        return resolve_weight_axes(view, src, perm[axis]) if axis < len(perm) else None
    if op in ("Unsqueeze", "Squeeze", "Reshape"):
        in_shape, out_shape = view.shape(src), view.shape(name)
        if in_shape is None or out_shape is None:
            return None
        in_real = [i for i, d in enumerate(in_shape) if d != 1]
        out_real = [i for i, d in enumerate(out_shape) if d != 1]
        if [in_shape[i] for i in in_real] != [out_shape[i] for i in out_real] or axis not in out_real:
            return None
        return resolve_weight_axes(view, src, in_real[out_real.index(axis)])
    return None


UNARY = (
    "Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Gelu Mish Erf Exp Log "
    "Abs Neg Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh "
    "ThresholdedRelu Shrink IsNaN IsInf Not Identity Cast CastLike Dropout Swish BitwiseNot"
).split()
BINARY = "Add Sub Mul Div Pow Max Min Mean Sum Mod Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor BitShift".split()

def dynamic_quantize_lstm(ctx, node) -> None:
    rnn(ctx, node, transposed=True)


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
    if int(attr(node, "channels_last", 0)):
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
    proxy = onnx.helper.make_node("Concat", pieces, list(node.output), axis=int(attr(node, "axis", 0)),
                                  name=node.name)
    concat(ctx, proxy)


RULES = {op: passthrough for op in UNARY}
RULES.update({op: broadcast for op in BINARY})
RULES.update(
    {
        "Conv": conv,
        "ConvTranspose": conv_transpose,
        "ConvInteger": conv_integer,
        "QLinearConv": qlinear_conv,
        "QLinearMatMul": qlinear_matmul,
        "Gemm": gemm,
        "MatMul": matmul,
        "MatMulInteger": matmul_integer,
        "Gather": gather,
        "BatchNormalization": batch_norm,
        "InstanceNormalization": instance_norm,
        "LayerNormalization": layer_norm,
        "GroupNormalization": group_norm,
        "PRelu": prelu,
        "Clip": clip,
        "Where": where,
        "MaxPool": pool,
        "AveragePool": pool,
        "LpPool": pool,
        "GlobalAveragePool": pool,
        "GlobalMaxPool": pool,
        "GlobalLpPool": pool,
        "Resize": resize,
        "Upsample": resize,
        "Pad": pad,
        "Concat": concat,
        "Split": split,
        "Slice": slice_,
        "Flatten": flatten,
        "Reshape": reshape,
        "Transpose": transpose,
        "Squeeze": squeeze,
        "Unsqueeze": unsqueeze,
        "Softmax": softmax,
        "LogSoftmax": softmax,
        "ReduceMean": reduce,
        "ReduceSum": reduce,
        "ReduceMax": reduce,
        "ReduceMin": reduce,
        "ReduceProd": reduce,
        "ReduceL1": reduce,
        "ReduceL2": reduce,
        "ReduceLogSumExp": reduce,
        "ReduceSumSquare": reduce,
        "ArgMax": arg_reduce,
        "ArgMin": arg_reduce,
        "Expand": expand,
        "Tile": tile,
        "Shape": shape_only,
        "ConstantOfShape": constant_of_shape,
        "Size": shape_only,
        "QuantizeLinear": quantize_linear,
        "DequantizeLinear": quantize_linear,
        "DynamicQuantizeLinear": dynamic_quantize_linear,
        "LSTM": rnn,
        "GRU": rnn,
        "RNN": rnn,
    }
)

# Microsoft contrib ops that ONNX Runtime's quantizer writes.
CONTRIB_RULES = {
    "DynamicQuantizeLSTM": dynamic_quantize_lstm,
    "QGemm": qgemm,
    "QLinearAdd": qlinear_binary,
    "QLinearMul": qlinear_binary,
    "QLinearSigmoid": qlinear_unary,
    "QLinearLeakyRelu": qlinear_unary,
    "QLinearSoftmax": qlinear_unary,  # equivariant along its axis, elementwise along the others
    "QLinearGlobalAveragePool": qlinear_pool,
    "QLinearAveragePool": qlinear_pool,
    "QLinearConcat": qlinear_concat,
}

# Rules that read stacked labels (channels.py) themselves; before any other, the walker ties the
# directions of its inputs (walk.py).
STACKED_RULES = {passthrough, transpose, squeeze, unsqueeze, reshape, gather, split, slice_, rnn,
                 dynamic_quantize_lstm, shape_only, constant_of_shape}
