"""Per-head dims: the dims inside each attention head move by that head's own permutation (issue 15.6).

Vocabulary (walker.py, channels.ElementTable.products): a *grid* makes channels *cells* (head, dim);
its *head group* H moves heads as wholes, a *dim group* D moves the dims. Shared, D moves the same
dims in every head. D is *per head* when every place one of its dims appears carries the dim's head:

- a cell whose other factors hold exactly one *head* (Wq's columns, Wo's rows; in
  GroupQueryAttention a query head is itself a cell (kv head, rank) and its kv head is the head);
- a tensor axis labelled by the bare dims ([B, heads, S, dims] after a Reshape into heads) in a
  tensor that also has an axis holding a head at every position, read only by ops that keep each
  head's index apart (the registry's `stacked` ops, elementwise ops, Concat, Expand, Tile,
  reductions (what they reduce is checked as a tensor in turn), MatMul, a Softmax over another axis).

The heads are H's neurons, or, where the heads do not move (no group: heads something pins), the
neurons in that place, each standing still. Then head
i's dims may move by a permutation of their own, and D is replaced by one group per head
(`Group.within` = (H's key or None, i)) whose slots are D's positions in head i. Anything else keeps
D shared: a dim read without its head (a norm weight of head_dim shared by all heads, a mean over
the heads, a weight with a heads axis and a dims axis, which a one-axis slot cannot move per head),
an op that mixes the heads of a tensor that keeps them (a Softmax over the heads), a stacked label,
a tied chunk (rules/selection.py: chunks carry tags, never heads), a head group that is itself split.

A per-head group moves the positions of head i once the heads have moved (records are ordered:
permute.py applies them after the head group, and undoes them before); the matcher solves the
heads first, then each head's dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import registry
from .groups import Group, GroupSlot

# ops that keep each head's index apart without being `stacked` or elementwise in the registry
_KEEP_HEADS = {"Concat", "Expand", "Tile", "MatMul", "Identity",
               # quantized attention: (de)quantizing is elementwise (a scale per tensor or per one
               # axis), a dynamic scale is a min/max over the whole tensor, the integer MatMuls are MatMuls
               "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "MatMulInteger"}
_ALONG_ONE_AXIS = {"Softmax", "LogSoftmax", "Hardmax"}  # keep them unless the axis is the heads'


@dataclass
class _Heads:
    group: int | None  # the head group, None: heads that do not move
    index: dict  # head neuron -> its place (rank in the group, or order among the still heads)


def split_per_head(groups: list[Group], ctx, roots: np.ndarray, products: dict, group_of: np.ndarray,
                   rank_of: np.ndarray) -> list[Group]:
    """`groups` with every per-head dim group replaced by its per-head groups (appended last, after
    every group they are applied after). ctx: the walk's context (labels, slots, the graph);
    products: neuron -> (row, col, i, j, rows, cols); group_of/rank_of: per element."""
    if not products or not groups:
        return groups
    leaves = _Leaves(products, roots)
    tagged = {int(roots[e]) for e in ctx.elements.tags}
    heads_of = _candidates(groups, leaves, roots, group_of, rank_of, products, tagged)
    split_ids = set(heads_of)
    heads_of = {d: h for d, h in heads_of.items() if h.group not in split_ids}  # a head group is never split
    bad = _checked_activations(heads_of, ctx, leaves, roots, group_of)
    split: dict[int, list[Group]] = {}
    for d, h in heads_of.items():
        if d not in bad:
            parts = _split(groups[d], groups[h.group].key if h.group is not None else None, h, ctx.slots, leaves, roots)
            if parts is not None:
                split[d] = parts
    if not split:
        return groups
    kept = [g for g in groups if g.id not in split]
    added = [part for d in sorted(split) for part in split[d]]
    for new_id, g in enumerate(kept + added):
        g.id = new_id
    return kept + added


class _Leaves:
    """Neuron -> the neurons a cell is made of (nested grids: q/k/v x heads x dims), memoized."""

    def __init__(self, products: dict, roots: np.ndarray):
        self.products, self.roots, self.memo = products, roots.tolist(), {}  # (a list: fast scalar reads)

    def __call__(self, r: int, depth: int = 0) -> tuple[int, ...]:
        if r in self.memo:
            return self.memo[r]
        rec = self.products.get(r)
        if rec is None or depth > 8:
            out = (r,)
        else:
            out = self(self.roots[rec[0]], depth + 1) + self(self.roots[rec[1]], depth + 1)
        self.memo[r] = out
        return out


def _candidates(groups, leaves, roots, group_of, rank_of, products, tagged) -> dict[int, _Heads]:
    """Dim group -> its heads: one head group every cell holding one of its dims has exactly one
    neuron of, or else exactly one factor in no group in every such cell (still heads)."""
    cols = {leaves(leaves.roots[b])[-1] for _, b, *_ in products.values()}  # innermost columns: dims
    gof = group_of.tolist()  # (fast scalar reads)
    common: dict[int, set | None] = {}
    still: dict[int, set | None] = {}  # the still heads, None once a cell has none or two
    for r in products:
        ls = leaves(r)
        for k, leaf in enumerate(ls):
            d = gof[leaf]
            if d < 0 or leaf not in cols:
                continue
            others = ls[:k] + ls[k + 1:]
            gs = [gof[x] for x in others]
            mine = {g for g in gs if g >= 0 and g != d and gs.count(g) == 1}
            common[d] = mine if common.get(d, None) is None else common[d] & mine
            loose = [x for x, g in zip(others, gs) if g < 0]
            if d not in still or still[d] is not None:
                ok = len(loose) == 1 and loose[0] not in tagged
                still[d] = (still.get(d) or set()) | {loose[0]} if ok else None
    out = {}
    for d, hs in common.items():
        if hs:
            h = min(hs)
            members = np.flatnonzero(group_of == h)
            members = members[roots[members] == members]
            out[d] = _Heads(h, {int(m): int(rank_of[m]) for m in members})
        elif still.get(d) and len(still[d]) >= 2:
            out[d] = _Heads(None, {m: i for i, m in enumerate(sorted(still[d]))})
    return out


def _head_key(elem_roots: np.ndarray, heads: _Heads, leaves) -> np.ndarray:
    """Per position: the place of its head (its own, or the one among its cell's factors), -1 where
    there is none or more than one."""
    uniq, inv = np.unique(elem_roots, return_inverse=True)
    place = np.full(len(uniq), -1, dtype=np.int64)
    for u, r in enumerate(uniq.tolist()):
        found = [heads.index[x] for x in leaves(r) if x in heads.index]
        if len(found) == 1:
            place[u] = found[0]
    return place[inv.reshape(-1)]


def _checked_activations(heads_of: dict[int, _Heads], ctx, leaves, roots, group_of) -> set[int]:
    """Dim groups some tensor carries without their heads, or hands to an op that may mix them. (A
    cell's heads were checked with the candidates: every cell holding a dim has exactly one head.)"""
    bad: set[int] = set()
    if not heads_of:
        return bad
    dim = np.full(len(roots), -1, dtype=np.int64)  # neuron -> its candidate dim group
    for d in heads_of:
        dim[np.flatnonzero(group_of == d)] = d
    in_cell = np.zeros(len(roots), dtype=bool)  # cells holding a candidate's dim
    for r in leaves.products:
        in_cell[r] = any(dim[x] >= 0 for x in leaves(r))
    for name, by_axis in ctx.labels.items():
        axes = {axis: roots[label.elem] for axis, label in by_axis.items()}
        for axis, r in axes.items():
            if isinstance(axis, tuple):  # a stacked label: its outer index is no head
                found = set(dim[r][dim[r] >= 0].tolist()) | {int(dim[x]) for u in np.unique(r[in_cell[r]]).tolist()
                                                            for x in leaves(u) if dim[x] >= 0}
                bad |= found
                continue
            for d in set(dim[r][dim[r] >= 0].tolist()) - bad:  # bare dims: an axis of this tensor holds
                heads = heads_of[d]                            # their heads, which its readers keep apart
                at = [o for o, other in axes.items() if o != axis and not isinstance(o, tuple)
                      and (_head_key(other, heads, leaves) >= 0).all()]
                if not at or not all(_keeps_heads(ctx, node, name, at[0]) for node in ctx.view.consumers.get(name, [])):
                    bad.add(d)
    return bad


def _keeps_heads(ctx, node, name: str, axis: int) -> bool:
    """Whether `node` reading `name` keeps the index along `axis` (the heads) apart."""
    if node.domain not in ("", "ai.onnx"):
        return False
    spec = registry.spec_of(node, ctx.view.opsets)
    if spec is None:
        return False
    module = getattr(spec.rule, "__module__", "") or ""
    if spec.stacked or module.endswith((".elementwise", ".reduction")) or node.op_type in _KEEP_HEADS:
        return True  # (a reduction over the heads leaves dims without heads: that tensor is checked)
    if node.op_type in _ALONG_ONE_AXIS and node.input[0] == name:
        r, since13 = ctx.rank(name), ctx.view.opsets.get("", 0) >= 13
        given = registry.attr(node, "axis", -1 if since13 else 1)
        if r is None or not -r <= given < r:
            return False
        return axis != given % r if since13 else axis < given % r
    return False


def _split(dim: Group, heads_key: str | None, heads: _Heads, slot_labels: dict, leaves, roots):
    """One group per head: the dims of `dim` in that head; None if a slot's block columns do not each
    lie in one head (or a position lies in none)."""
    per_head: dict[int, list[GroupSlot]] = {}
    for slot in dim.slots:
        key = (slot.weight, slot.axis) if slot.at is None else (slot.weight, slot.axis, slot.at)
        label = slot_labels.get(key)
        if label is None:
            return None
        pos = slot.positions
        place = _head_key(roots[label.elem[pos.reshape(-1)]], heads, leaves).reshape(pos.shape)
        if (place < 0).any() or (place != place[:1]).any():  # a block column holds one head in every row
            return None
        for i in np.unique(place[0]).tolist():
            per_head.setdefault(i, []).append(GroupSlot(slot.weight, slot.axis, pos[:, place[0] == i], slot.at))
    if len(per_head) < 2:
        return None
    return [Group(-1, dim.size, list(dim.producers), slots, f"{dim.key}~head{i}", list(dim.readers),
                  within=(heads_key, i)) for i, slots in sorted(per_head.items())]
