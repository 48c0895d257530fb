"""Per-head dims: the dims inside each attention head move by that head's own permutation (issue 15.6).

Vocabulary (walker.py, channels.ElementTable.products): a *grid* makes channels *cells* (head, dim);
its *head group* H moves heads as wholes, a *dim group* D moves the dims. Shared, D moves the same
dims in every head. D is *per head* when every place one of its dims appears carries the dim's head:

- a cell whose other factors include exactly one neuron of H (Wq's rows, Wo's columns; in
  GroupQueryAttention a query head is itself a cell (kv head, rank) and the kv head is H's);
- a tensor axis labelled by the bare dims ([B, heads, S, dims] after a Reshape into heads) in a
  tensor that also has an axis whose every position is a cell of one of H's heads, or one of them.

Then head i's dims may move by a permutation of their own, and D is replaced by one group per head
(`Group.within` = (H's key, i)) whose slots are D's positions in head i. Anything else keeps D
shared: a dim read without its head (a norm weight of head_dim shared by all heads, a sum over
heads, a weight with a heads axis and a dims axis, which a one-axis slot cannot move per head), a
stacked label, heads that are not a group, a head group that is itself split.

A per-head group moves the positions of head i once the heads have moved (records are ordered:
permute.py applies them after the head group, and undoes them before); the matcher solves the
heads first, then each head's dims.
"""

from __future__ import annotations

import numpy as np

from .groups import Group, GroupSlot


def split_per_head(groups: list[Group], labels: dict, slot_labels: dict, roots: np.ndarray, products: dict,
                   group_of: np.ndarray, rank_of: np.ndarray) -> list[Group]:
    """`groups` with every per-head dim group replaced by its per-head groups (appended last, after
    every group they are applied after). labels: tensor -> {axis: Label}; slot_labels: the walker's
    slot key -> Label; products: neuron -> (row, col, i, j, rows, cols); group_of/rank_of: per element."""
    if not products or not groups:
        return groups
    leaves = _Leaves(products, roots)
    heads_of = _candidates(groups, slot_labels, leaves, roots, group_of, products)
    heads_of = {d: h for d, h in heads_of.items() if h not in heads_of}  # a head group is never split
    if not heads_of:
        return groups
    bad = _checked_activations(heads_of, labels, leaves, roots, group_of)
    heads_of = {d: h for d, h in heads_of.items() if d not in bad}
    split: dict[int, list[Group]] = {}
    for d, h in heads_of.items():
        parts = _split(groups[d], groups[h], slot_labels, leaves, roots, group_of, rank_of, h)
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
        self.products, self.roots, self.memo = products, roots, {}

    def __call__(self, r: int, depth: int = 0) -> tuple[int, ...]:
        if r in self.memo:
            return self.memo[r]
        rec = self.products.get(r)
        if rec is None or depth > 8:
            out = (r,)
        else:
            out = self(int(self.roots[rec[0]]), depth + 1) + self(int(self.roots[rec[1]]), depth + 1)
        self.memo[r] = out
        return out


def _column_leaves(products: dict, roots: np.ndarray, leaves: _Leaves) -> set[int]:
    """Neurons that are a grid's innermost column (its dims: (q/k/v, (head, dim)) nests)."""
    return {leaves(int(roots[b]))[-1] for _, b, *_ in products.values()}


def _candidates(groups, slot_labels, leaves, roots, group_of, products) -> dict[int, int]:
    """Dim group -> the one head group every cell holding one of its dims has a neuron of."""
    cols = _column_leaves(products, roots, leaves)
    common: dict[int, set[int] | None] = {}
    for r in products:
        ls = leaves(r)
        for k, leaf in enumerate(ls):
            d = int(group_of[leaf])
            if d < 0 or leaf not in cols:
                continue
            others = [int(group_of[x]) for x in ls[:k] + ls[k + 1:]]
            mine = {g for g in others if g >= 0 and g != d and others.count(g) == 1}
            common[d] = mine if common.get(d) is None else common[d] & mine
    out = {}
    for d, hs in common.items():
        if hs and len(groups[d].slots) and all(g < len(groups) for g in hs):
            out[d] = min(hs)
    return out


def _head_key(elem_roots: np.ndarray, h: int, leaves, group_of) -> np.ndarray:
    """Per position: the neuron of head group h among the position's cell factors (itself if it is
    one of h's neurons), -1 where there is none or more than one."""
    out = np.full(len(elem_roots), -1, dtype=np.int64)
    uniq, inv = np.unique(elem_roots, return_inverse=True)
    for u, r in enumerate(uniq.tolist()):
        found = [x for x in leaves(r) if group_of[x] == h]
        if len(found) == 1:
            out[inv == u] = found[0]
    return out


def _checked_activations(heads_of: dict[int, int], labels: dict, leaves, roots, group_of) -> set[int]:
    """Dim groups some tensor carries without their heads (see the module docstring)."""
    bad: set[int] = set()
    for by_axis in labels.values():
        axes = {axis: roots[label.elem] for axis, label in by_axis.items()}
        for axis, r in axes.items():
            for u in np.unique(r).tolist():
                ls = leaves(u)
                for leaf in ls:
                    d = int(group_of[leaf])
                    if d not in heads_of or d in bad:
                        continue
                    h = heads_of[d]
                    if isinstance(axis, tuple):  # a stacked label: its outer index is no head
                        bad.add(d)
                    elif len(ls) > 1:  # a cell: exactly one of its factors is a head of h
                        if sum(int(group_of[x]) == h for x in ls) != 1:
                            bad.add(d)
                    elif not any(other != axis and not isinstance(other, tuple)
                                 and (_head_key(o, h, leaves, group_of) >= 0).all() for other, o in axes.items()):
                        bad.add(d)  # bare dims, and no axis of this tensor holds their heads
    return bad


def _split(dim: Group, head: Group, slot_labels: dict, leaves, roots, group_of, rank_of, h: int):
    """One group per head of `head`: the dims of `dim` in that head; None if a slot's block columns
    do not each lie in one head (or a position lies in none)."""
    per_head: dict[int, list[GroupSlot]] = {}
    for slot in dim.slots:
        key = (slot.weight, slot.axis) if slot.at is None else (slot.weight, slot.axis, slot.at)
        label = slot_labels.get(key)
        if label is None:
            return None
        pos = slot.positions
        found = _head_key(roots[label.elem[pos.reshape(-1)]], h, leaves, group_of).reshape(pos.shape)
        if (found < 0).any():
            return None
        rank = rank_of[found]
        if (rank != rank[:1]).any():  # a block column holds one head in every row
            return None
        for i in np.unique(rank[0]).tolist():
            per_head.setdefault(i, []).append(GroupSlot(slot.weight, slot.axis, pos[:, rank[0] == i], slot.at))
    if len(per_head) < 2:
        return None
    return [Group(-1, dim.size, list(dim.producers), slots, f"{dim.key}~head{i}", list(dim.readers),
                  within=(head.key, i)) for i, slots in sorted(per_head.items())]

