"""Layout: ops that move axes (Transpose, Squeeze, Unsqueeze), merge or split them (Flatten,
Reshape), or resample along other axes (Pad, Resize, pooling, Expand, Tile). Labels move with
their axis; merged axes repeat each element as a block (channels.py)."""

from __future__ import annotations

import numpy as np

from ..channels import Label
from .base import (_derive_mapped, _derive_reshaped, _inputs, _is_uniform, _norm_axis, attr, const_ints,
                   constant_of_shape, norm_axes, passthrough, shape_only)
from ..registry import declare


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
    """The axes from the attribute (older opsets) or the constant input; None when neither is given."""
    axes = attr(node, "axes")
    if axes is None:
        axes = const_ints(ctx, _inputs(node, idx))
    return axes


def _axes_at_run_time(ctx, node, idx=1) -> bool:
    """An axes input that is not a constant (or not integers): which axes the op touches is known
    only at run time."""
    return bool(_inputs(node, idx)) and const_ints(ctx, node.input[idx]) is None


def squeeze(ctx, node) -> None:
    _derive_reshaped(ctx, node)
    x = node.input[0]
    labels = ctx.get(x)
    if not ctx.labels.get(x):
        return
    r = ctx.rank(x)
    if _axes_at_run_time(ctx, node):
        ctx.pin_all(x, "Squeeze with axes computed at run time")
        return
    axes = _axes_input(ctx, node)
    shape = ctx.shape(x)
    if r is None or (axes is None and shape is None):
        ctx.pin_all(x, "Squeeze with unknown shape")
        return
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = norm_axes(axes, r)
    if axes is None:
        ctx.pin_all(x, "Squeeze with axes out of range")
        return
    out = {}
    for a, l in labels.items():
        if a in axes:
            ctx.pin(l, "Squeeze of a channel axis")  # cannot happen for len > 1
            continue
        out[a - sum(1 for s in axes if s < a)] = l
    out.update(_move_stacked(ctx, x, {a: a - sum(1 for s in axes if s < a) for a in range(r) if a not in axes}, node))
    ctx.set(node.output[0], out)


def _unsqueezed(ctx, node) -> list[int] | None:
    """Where Unsqueeze puts each input axis; None when its axes are unknown or do not fit an output
    of the input's rank plus one per axis (ONNX's inference of Unsqueeze-1 drops a negative axis
    that ONNX Runtime inserts: the graph's rank of the output is then wrong)."""
    axes, r, ro = _axes_input(ctx, node), ctx.rank(node.input[0]), ctx.rank(node.output[0])
    if axes is None or r is None or ro != r + len(axes):
        return None
    axes = norm_axes(axes, ro)
    return None if axes is None else [i for i in range(ro) if i not in axes]


def unsqueeze(ctx, node) -> None:
    _derive_reshaped(ctx, node)
    x = node.input[0]
    labels = ctx.get(x)
    kept = _unsqueezed(ctx, node)
    if ctx.uniform.get(x) and kept is not None:
        ctx.uniform[node.output[0]] = {kept[a] for a in ctx.uniform[x]}
    if not ctx.labels.get(x):
        return
    if kept is None:
        ctx.pin_all(x, "Unsqueeze with unknown axes or an output rank they do not fit")
        return
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
    axis = _norm_axis(int(attr(node, "axis")), r)
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
    from .nchwc import block_view  # (nchwc.py builds on this family)

    if block_view(ctx, node):  # ONNX Runtime's view of NCHWc blocks
        return
    x = node.input[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(node.output[0])
    kept = _keep_stacked(ctx, x, in_shape, out_shape)
    labels, in_shape = (ctx.get(x), in_shape) if kept else _merge_stacked(ctx, x, in_shape, out_shape)
    in_batch = ctx.batch_merged.get(x)  # a labelled axis merged into a symbolic batch (below)
    if not labels and in_batch is None:
        if kept:
            ctx.set(node.output[0], kept)
        return
    if in_shape is None or out_shape is None:
        for l in list(labels.values()) + ([in_batch[1]] if in_batch else []):
            ctx.pin(l, "Reshape with unknown shapes")
        return
    mapping = _reshape_groups(in_shape, out_shape)
    to_output = node.output[0] in ctx.view.graph_outputs  # the output's own layout is not ours to keep
    if mapping is None:
        for l in list(labels.values()) + ([in_batch[1]] if in_batch else []):
            ctx.pin(l, "reaches a graph output" if to_output else
                    "Reshape that mixes the channel axis in a way the walker cannot follow")
        return
    from ..graph import dim_product

    out: dict[int, Label] = {}
    for in_axes, out_axes in mapping:
        inside = [a for a in in_axes if a in labels]
        if in_batch is not None and in_batch[0] in in_axes:
            _unmerge_batch(ctx, node, in_batch, in_shape, out_shape, in_axes, out_axes, bool(inside), out)
        if not inside:
            continue
        dims = (_heads_into_batch(ctx, node, labels, in_shape, out_shape, in_axes, out_axes)
                or _heads_out_of_batch(ctx, node, labels, in_shape, out_shape, in_axes, out_axes))
        if dims is not None:
            out.update(dims)
            continue
        if dim_product([in_shape[b] for b in in_axes]) != dim_product([out_shape[o] for o in out_axes]) or not all(
                isinstance(in_shape[b], int) for b in in_axes):
            symbolic_merge = (len(inside) == 1 and sum(1 for o in out_axes if out_shape[o] != 1) == 1 and dim_product(
                [in_shape[b] for b in in_axes]) == dim_product([out_shape[o] for o in out_axes]))
            if symbolic_merge and not to_output and _merge_into_batch(ctx, node, labels, in_shape, out_shape, in_axes,
                                                                      out_axes):
                continue
            for a in inside:
                ctx.pin(labels[a], "reaches a graph output" if to_output else SYMBOLIC_MERGE if symbolic_merge else
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
            repeats = _repeated_heads(ctx, node, label, x, in_shape, [b for b in in_axes if b > a], before)
            if repeats is not None:
                out[real_out[0]] = repeats
                continue
            out[real_out[0]] = label.repeat_blocks(int(np.prod(after, dtype=np.int64))).tile(
                int(np.prod(before, dtype=np.int64))
            )
        elif len(real_out) == 0:
            continue  # cannot happen: a label has more than one position
        else:
            split = (_split_label(label, [out_shape[o] for o in real_out], in_shape, in_axes, a)
                     or _untile(label, [out_shape[o] for o in real_out]))
            if split is not None:
                out[real_out[split[0]]] = split[1]
                continue
            factors = _split_product(ctx, node, label, [out_shape[o] for o in real_out])
            if factors is None:
                ctx.pin(label, "Reshape splits the channel axis in an irregular layout")
                continue
            out.update(zip(real_out, factors))
    out.update(kept)
    ctx.set(node.output[0], out)


# A label lists the element at every position of its axis, so an axis of symbolic length holding
# channels once per batch index (torch dynamo's K as [batch * heads, S, d]) cannot carry one: it would
# be the heads label repeated `batch` times, a count unknown until run time (and every later rule --
# Reshape back, batched MatMul, Slice -- would have to read labels as (symbolic count x block)).
SYMBOLIC_MERGE = "Reshape merges the channel axis with an axis of symbolic length (per-position labels cannot repeat)"
HEADS_INTO_BATCH = "Reshape merges attention heads into the batch axis (per-position labels cannot tile a batch)"


def _heads_into_batch(ctx, node, labels, in_shape, out_shape, in_axes, out_axes):
    """(batch.., C) -> (batch * H, D) with C = H * D (torch's MultiheadAttention: [S, B, E] ->
    [S, B * heads, head_dim]): the channels become (head, dim) cells; the dims keep an axis of their
    own, the heads are merged into the batch. A label lists the element at every position, so an
    axis of (batch x heads) positions would hold the heads label once per batch index: unknown for
    a symbolic batch, and a tiled label that later reshapes and batched MatMuls must split back. So
    the heads keep their places (pinned with that reason) while the dims move inside every head,
    the same way. A static batch instead tiles the heads label over the merged axis (Label.tile; a
    later Reshape splits it back, _untile), so the heads move too. Returns output axis -> label, or
    None where this is not such a Reshape."""
    from ..graph import dim_product

    a = in_axes[-1]
    real_out = [o for o in out_axes if out_shape[o] != 1]
    if len(real_out) < 2 or a not in labels or any(b in labels for b in in_axes[:-1]) or ctx.stacked(node.input[0]):
        return None
    label, d = labels[a], out_shape[real_out[-1]]
    if not isinstance(d, int) or d < 1 or len(label) % d or len(label) == d or in_shape[a] != len(label):
        return None
    heads = len(label) // d
    if dim_product([in_shape[b] for b in in_axes[:-1]] + [heads]) != dim_product([out_shape[o] for o in real_out[:-1]]):
        return None
    if not any(dim_product([out_shape[o]]) != dim_product([heads]) for o in real_out[:-1]):
        return None  # the heads get an axis of their own: a plain split (_split_product)
    from .selection import _grid

    products = ctx.elements.products
    if any(int(e) in products for e in label.elem.tolist()):
        dims = _grid(ctx, node, label, heads, d)  # q, k and v cut from one packed grid share its cells
    else:  # fresh (head, dim) cells: heads untagged, free to move as wholes
        factors = _split_product(ctx, node, label, [heads, d])
        dims = None if factors is None else factors[1]
    if dims is None:
        return None
    heads_label = Label.of([products[int(e)][0] for e in label.elem[::d].tolist()])
    batch = [in_shape[b] for b in in_axes[:-1]]
    if len(real_out) == 2 and all(isinstance(b, int) for b in batch):  # a static batch: heads tiled
        return {real_out[0]: heads_label.tile(int(np.prod(batch, dtype=np.int64))), real_out[1]: dims}
    if len(real_out) == 2:  # a symbolic batch: the heads ride beside the labels, batch-major
        ctx.batch_merged[node.output[0]] = (real_out[0], heads_label)
    else:
        ctx.pin(heads_label, HEADS_INTO_BATCH)
    return {real_out[-1]: dims}


# ---- a labelled axis merged into a batch of symbolic length ------------------------------------
# A label cannot list the positions of an axis of (batch x heads) positions when the batch is symbolic
# (torch dynamo's K as [batch * heads, S, d]). Position b * H + h holds head h whatever b is, so the
# heads ride beside the labels as a *batch-merged* record (ctx.batch_merged: tensor -> (axis, label
# of the H inner positions)) through ops that keep that axis as a batch axis (_batch_merged_flow:
# Transpose, unary elementwise ops, Softmax over another axis, elementwise ops and batched MatMuls
# whose operands carry the same record there or broadcast along it; records that meet are unioned),
# to the Reshape that splits the axis back into (batch.., H) (_unmerge_batch) or keeps it whole.
# Any other reader, a graph output or a subgraph's output pins the label (batch_merged_readers): the
# record never silently drops out of the walk.
def _merge_into_batch(ctx, node, labels, in_shape, out_shape, in_axes, out_axes) -> bool:
    """(batch.., L) -> (batch * L) with the batch symbolic and L the labelled last axis of the
    group: record the label as batch-merged on the output axis (True), else False."""
    a = in_axes[-1]
    real_out = [o for o in out_axes if out_shape[o] != 1]
    if a not in labels or any(b in labels for b in in_axes[:-1]) or len(real_out) != 1 or in_shape[a] != len(labels[a]):
        return False
    if ctx.stacked(node.input[0]) or all(isinstance(in_shape[b], int) for b in in_axes):
        return False
    ctx.batch_merged[node.output[0]] = (real_out[0], labels[a])
    return True


def _unmerge_batch(ctx, node, merged, in_shape, out_shape, in_axes, out_axes, mixed: bool, out: dict) -> None:
    """The Reshape group holding a batch-merged axis: split back into (batch.., H) (the label goes on
    the H axis), kept whole (the record moves), or anything else (the label pins)."""
    from ..graph import dim_product

    axis, label = merged
    real_out = [o for o in out_axes if out_shape[o] != 1]
    h = len(label)
    whole = dim_product([in_shape[axis]])
    if not mixed and in_axes == [axis] and real_out:
        last = out_shape[real_out[-1]]
        if len(real_out) >= 2 and last == h and dim_product([out_shape[o] for o in real_out[:-1]] + [h]) == whole:
            out[real_out[-1]] = label
            return
        if len(real_out) == 1 and dim_product([out_shape[real_out[0]]]) == whole:
            ctx.batch_merged[node.output[0]] = (real_out[0], label)
            return
    ctx.pin(label, HEADS_INTO_BATCH)


def batch_merged_readers(ctx, node) -> None:
    """Before a node's rule: where batch-merged records go (kept for carry_batch_merged); a reader
    that does not carry one pins its label (Reshape handles its own; If branches' and Loop/Scan
    bodies' outputs are read by the node)."""
    flow = _batch_merged_flow(ctx, node)
    ctx.batch_merged_flow = flow
    names = [n for n in node.input if n]
    for g in ctx.view.branches.get(id(node), []) + ([ctx.view.bodies[id(node)]] if id(node) in ctx.view.bodies else []):
        names += [o.name for o in g.output]
    reshaped = node.op_type == "Reshape" and node.domain in ("", "ai.onnx")
    for name in names:
        found = ctx.batch_merged.get(name)
        if found is not None and flow is None and not (reshaped and name == node.input[0]):
            ctx.pin(found[1], HEADS_INTO_BATCH)


def carry_batch_merged(ctx, node) -> None:
    """After the rule: the output's record (see batch_merged_readers)."""
    flow, ctx.batch_merged_flow = ctx.__dict__.pop("batch_merged_flow", None), None
    if flow is not None and node.output and node.output[0]:
        ctx.batch_merged[node.output[0]] = flow


def _batch_merged_flow(ctx, node):
    """(axis, label) of the output when `node` keeps its inputs' batch-merged axis a batch axis, the
    records that meet there unioned; None when it does not (or reads none)."""
    from .base import passthrough
    from ..registry import spec_of

    recs = [(i, ctx.batch_merged[n]) for i, n in enumerate(node.input) if n and n in ctx.batch_merged]
    if not recs or node.domain not in ("", "ai.onnx") or not node.output:
        return None
    op, spec = node.op_type, spec_of(node, ctx.view.opsets)
    (first, (axis, label)), out = recs[0], node.output[0]
    if op == "Transpose":
        perm, r = attr(node, "perm"), ctx.rank(node.input[0])
        perm = list(perm) if perm is not None else (list(reversed(range(r))) if r is not None else None)
        return None if perm is None or axis not in perm else (perm.index(axis), label)
    if (spec is not None and spec.rule is passthrough and first == 0) or op in ("Identity", "Cast"):
        return (axis, label) if first == 0 else None
    if op in ("Softmax", "LogSoftmax"):  # (before opset 13: over every axis from `axis` on)
        r, since13 = ctx.rank(node.input[0]), ctx.view.opsets.get("", 0) >= 13
        given = next((a.i for a in node.attribute if a.name == "axis"), -1 if since13 else 1)
        if r is None or not -r <= given < r:
            return None
        given %= r
        return (axis, label) if (axis != given if since13 else axis < given) else None
    if op not in ("Add", "Sub", "Mul", "Div", "MatMul"):
        return None
    ro = ctx.rank(out)
    ranks = [ctx.rank(n) for n in node.input]
    if ro is None or None in ranks:
        return None
    at = axis + ro - ranks[first]  # the merged axis, counted in the output
    if op == "MatMul" and (at >= ro - 2 or min(ranks) < 3):
        return None  # only a batch axis of a batched MatMul keeps its positions apart
    for i, name in enumerate(node.input):
        mine = ctx.batch_merged.get(name)
        a = at - (ro - ranks[i])
        if mine is not None:
            if mine[0] != a or len(mine[1]) != len(label) or not np.array_equal(mine[1].sub, label.sub):
                return None
            if i != first:
                ctx.union(label, mine[1])
        elif a >= 0 and ctx.dim(name, a) != 1:
            return None  # values in a fixed order along the merged axis
    return at, label


def _heads_out_of_batch(ctx, node, labels, in_shape, out_shape, in_axes, out_axes):
    """(batch * H, D) -> (batch, H * D), the way back. Heads pinned (not on the merged axis): the
    dims label is the same at every position of the merged axis, so the channel axis holds it once
    per head (tiled, copies told apart by sub). Heads tiled over the merged axis (a static batch):
    the block is split off (_untile) and merged with the dims into (head, dim) cells. Returns
    output axis -> label, or None where this is not such a Reshape."""
    from ..graph import dim_product

    a = in_axes[-1]
    real_out = [o for o in out_axes if out_shape[o] != 1]
    lead = [b for b in in_axes[:-1] if b in labels]
    if not real_out or a not in labels or (lead and lead != [in_axes[-2]]):
        return None
    label, n = labels[a], out_shape[real_out[-1]]
    if in_shape[a] != len(label) or not isinstance(n, int) or n % len(label) or n == len(label):
        return None
    heads = n // len(label)
    if dim_product([in_shape[b] for b in in_axes[:-1]]) != dim_product([out_shape[o] for o in real_out[:-1]] + [heads]):
        return None
    if not lead:
        return {real_out[-1]: label.tile(heads)}
    merged = labels[lead[0]]
    block = _untile(merged, [len(merged) // heads, heads]) if len(merged) % heads == 0 else None
    cells = None if block is None else _merge_pair(ctx, node, [block[1], label], [heads, len(label)])
    return None if cells is None else {real_out[-1]: cells}


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


def _keep_stacked(ctx, x, in_shape, out_shape) -> dict:
    """Before a Reshape: the stacked labels moved to the output when the Reshape keeps both their axes
    whole, each the only axis of more than one entry in its run of axes on both sides (onnxslim's
    Reshape for a Transpose that moves only a size-1 axis: [seq, 2, 1, H] -> [seq, 1, 2, H]); {} when
    it does not keep every one of them (then _merge_stacked decides)."""
    stacked = ctx.stacked(x)
    if not stacked or in_shape is None or out_shape is None:
        return {}
    where = {}
    for gi, go in _reshape_groups(in_shape, out_shape) or []:
        real_in = [a for a in gi if in_shape[a] != 1]
        real_out = [b for b in go if out_shape[b] != 1]
        if len(real_in) == 1 and len(real_out) == 1 and in_shape[real_in[0]] == out_shape[real_out[0]]:
            where[real_in[0]] = real_out[0]
    if not all(o in where and i in where for o, i in stacked):
        return {}
    return {(where[o], where[i]): label for (o, i), label in stacked.items()}


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
    if int(np.prod(out_dims, dtype=np.int64)) != len(label):  # another axis is merged in as well
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


def _repeated_heads(ctx, node, label, x, in_shape, after_axes, before):
    """(heads, copies) -> one axis where the copies axis is uniform (an Expand of a size-1 axis):
    torch's repeat_kv, each kv head once per query head that reads it. The positions become cells
    (head, copy) with fresh copy elements, so that the query heads met there stay neurons of their
    own, each a cell of its kv head (a kv head moves with the query heads sharing it; the copies,
    equal by construction, may move inside every head). None where it is not that."""
    sizes = [in_shape[b] for b in after_axes]
    if (not sizes or not all(isinstance(d, int) for d in sizes) or any(d != 1 for d in before)
            or not _plain(label) or not all(_is_uniform(ctx, x, b) for b, d in zip(after_axes, sizes) if d != 1)):
        return None
    copies = int(np.prod(sizes, dtype=np.int64))
    if copies < 2:
        return None
    ranks = ctx.new(copies, node, node.output[0], kind="factor")
    cells = ctx.new(len(label) * copies, node, node.output[0], kind="product")
    return cells if ctx.elements.product(cells.elem, label, ranks) else None


def _merge_pair(ctx, node, labels, dims):
    """(heads, dims) -> one axis: fresh cell elements, each the product of a head and a dim."""
    if len(labels) != 2 or not all(_plain(l) for l in labels) or not all(isinstance(d, int) for d in dims):
        return None
    if int(np.prod([d for d in dims if d != 1], dtype=np.int64)) != len(labels[0]) * len(labels[1]):
        return None  # another non-trivial axis is merged in as well
    cells = ctx.new(len(labels[0]) * len(labels[1]), node, node.output[0], kind="product")
    return cells if ctx.elements.product(cells.elem, labels[0], labels[1]) else None


def _untile(label, out_dims):
    """(batch * heads) -> (batch, heads) where the label is one block repeated per batch index (a
    static batch merged with the heads, Label.tile): the inner axis holds the block, whatever the
    batch index. Returns (1, block label) or None."""
    if len(out_dims) != 2 or not all(isinstance(d, int) and d > 1 for d in out_dims):
        return None
    lead, inner = out_dims
    if lead * inner != len(label):
        return None
    elem, sub = label.elem.reshape(lead, inner), label.sub.reshape(lead, inner)
    offset = sub - sub[:1]
    if not (elem == elem[:1]).all() or not (offset == offset[:, :1]).all() or len(np.unique(offset[:, 0])) != lead:
        return None
    return 1, Label(elem[0].copy(), sub[0].copy())


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
    from ..graph import dim_divide, dim_product

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


def pad(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    r = ctx.rank(x)
    pads = attr(node, "pads")
    if pads is None:
        pads = const_ints(ctx, _inputs(node, 1))
    axes = const_ints(ctx, _inputs(node, 3)) if _inputs(node, 3) else list(range(r or 0))
    axes = norm_axes(axes, r)
    if labels and (pads is None or axes is None or len(pads) != 2 * len(axes)):
        for l in labels.values():
            ctx.pin(l, "Pad with non-constant or malformed pads")
        return
    if labels:
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
    for extra in node.output[1:]:  # indices are flat offsets over (N, C, H, W): they name channels
        if extra and (ctx.view.consumers.get(extra) or extra in ctx.view.graph_outputs) and 1 in labels:
            ctx.pin(labels[1], f"{node.op_type} indices output is used")


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
    reps = const_ints(ctx, _inputs(node, 1))
    out = {}
    for a, l in labels.items():
        if reps is not None and a < len(reps) and reps[a] == 1:
            out[a] = l
        else:
            ctx.pin(l, "Tile along the channel axis")
    ctx.set(node.output[0], out)


# ---- declarations ---------------------------------------------------------------------------
_VIEW = dict(layout=True, homogeneous=True, trivial=True, foldable=True, quantized_view=True)
declare("Transpose", transpose, attributes={"perm": None}, stacked=True, weight_view=True, **_VIEW)
for _op, _rule in (("Squeeze", squeeze), ("Unsqueeze", unsqueeze)):  # axes: an attribute, then an input
    declare(_op, _rule, attributes={"axes": None}, stacked=True, weight_view=True, **_VIEW)
    declare(_op, _rule, since=13, stacked=True, weight_view=True, **_VIEW)
declare("Reshape", reshape, stacked=True, weight_view=True, **_VIEW)
declare("Flatten", flatten, attributes={"axis": 1}, **_VIEW)
declare("Expand", expand, layout=True, homogeneous=True, foldable=True, quantized_view=True)
declare("Tile", tile, layout=True, homogeneous=True, foldable=True, quantized_view=True)
declare("Pad", pad, attributes={"pads": None}, homogeneous=True, trivial=True)  # pads: an attribute,
declare("Pad", pad, since=11, homogeneous=True, trivial=True)  # then an input
for _op in ("Resize", "Upsample"):
    declare(_op, resize, homogeneous=True, trivial=True, quantized_view=True)
for _op in ("MaxPool", "GlobalMaxPool"):
    declare(_op, pool, homogeneous=True, trivial=True, quantized_view=True)
for _op in ("AveragePool", "GlobalAveragePool"):
    declare(_op, pool, homogeneous=True, trivial=True)
for _op in ("LpPool", "GlobalLpPool"):
    declare(_op, pool)
# no rule yet: channels and space trade places in blocks the walker does not model (they pin)
for _op in ("DepthToSpace", "SpaceToDepth"):
    declare(_op, None, homogeneous=True, quantized_view=True)
declare("Shape", shape_only, stacked=True, foldable=True, output_type="int64", shape_reader=True)
declare("Size", shape_only, output_type="int64", shape_reader=True)
declare("ConstantOfShape", constant_of_shape, stacked=True)
declare("NonZero", None, output_type="int64")
