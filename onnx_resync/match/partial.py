"""Partial (rectangular) assignment: a suspect narrower than its reference (structured pruning).

Vocabulary: groups of the two models *pair* by their first slot's weight name (a group key is that
name and the group's size, and pruning changes only the size). Where a suspect group has fewer
neurons, each suspect neuron is assigned one reference neuron (scipy's linear_sum_assignment on a
rectangular cost); reference neurons left over are *pruned*. While the assignment is refined, the
suspect is *padded*: written in the reference's shapes and neuron order, a pruned neuron present as
zeros, so that every axis can be compared in the reference's order. The caller (reduce/against.py)
then judges the suspect against the reference without its pruned neurons: on matched neurons only.

The cost: first from what a neuron carries whatever the order of the other axes (its 1-D entries,
bias and normalization parameters, exactly; quantiles of its other entries), then refined
(REFINE passes) by the cosine of its entries with every other axis put in the reference's order by
the current assignment, over the entries present in both.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..io import WeightStore
from .gather import take
from ..walk import Group, WalkResult, walk

REFINE = 4  # passes of the refinement (it stops earlier when nothing moves)
QUANTILES = np.linspace(0.05, 0.95, 9)


def stem(key: str) -> str:
    """A group key without its size: the same group in a pruned copy."""
    return key.rsplit("/", 1)[0]


class Unpaired(Exception):
    """The two models' groups do not pair (or a suspect group is wider): not a pruned copy."""


def assign_partial(reference: onnx.ModelProto, ref_walk: WalkResult, suspect: onnx.ModelProto,
                   name_of=None) -> list[dict]:
    """Per pruned reference group {"layer" (its producers, named by `name_of(node name)`), "group"
    (its key), "removed", "of", "kept": the reference neurons matched, in order}; Unpaired when the
    suspect is not a pruned copy."""
    name_of = name_of or (lambda name: name)
    sus_walk = walk(suspect)
    ref_by = {stem(g.key): g for g in ref_walk.groups}
    sus_by = {stem(g.key): g for g in sus_walk.groups}
    if set(ref_by) != set(sus_by):
        extra = sorted(set(ref_by) ^ set(sus_by))
        raise Unpaired(f"the channel groups do not pair ({extra[0]!r} is in one model only)")
    for s, g in ref_by.items():
        if sus_by[s].size > g.size:
            raise Unpaired(f"group {s!r} is wider in the suspect ({sus_by[s].size} > {g.size}) and its extra "
                           "neurons are not dummies")
        if any(slot.at is not None for slot in g.slots + sus_by[s].slots) and sus_by[s].size != g.size:
            raise Unpaired(f"group {s!r} lies in one direction of a recurrent layer (its width is an attribute)")
        if _slot_names(g) != _slot_names(sus_by[s]):
            raise Unpaired(f"group {s!r} has other slots in the suspect")
    ref_store, sus_store = WeightStore(reference), WeightStore(suspect)
    assign = {s: _initial(ref_store, sus_store, ref_by[s], sus_by[s]) for s in ref_by}
    padded = _pad(reference, suspect, ref_by, sus_by, assign)
    for _ in range(REFINE):
        store = WeightStore(padded)
        new = {s: _refined(ref_store, store, ref_by[s], assign[s]) for s in ref_by}
        if all(np.array_equal(new[s], assign[s]) for s in ref_by):
            break
        assign = new
        padded = _pad(reference, suspect, ref_by, sus_by, assign)
    pruned = []
    for s, g in ref_by.items():
        removed = int((assign[s] < 0).sum())
        if removed:
            pruned.append({"layer": ", ".join(sorted({name_of(p.name) for p in g.producers})) or g.key, "group": g.key,
                           "removed": removed, "of": g.size, "kept": np.flatnonzero(assign[s] >= 0).tolist()})
    return pruned


def _slot_names(group: Group) -> list[tuple]:
    return sorted((s.weight, s.axis, s.at) for s in group.slots)


def _features(store: WeightStore, group: Group) -> np.ndarray:
    """Per neuron, what does not depend on the order of the other axes: 1-D entries exactly,
    quantiles of the rest (slot after slot, sorted by weight name)."""
    cols = []
    for slot in sorted(group.slots, key=lambda s: (s.weight, s.axis)):
        array = store.get(slot.weight).astype(np.float64)
        rows = np.moveaxis(take(array, slot.positions.reshape(-1), axis=slot.axis), slot.axis, 0)
        rows = rows.reshape(group.size, -1)
        if array.ndim == 1:
            cols.append(rows)
        else:
            cols.append(np.quantile(rows, QUANTILES, axis=1).T)
    return np.concatenate(cols, axis=1)


def _initial(ref_store, sus_store, gr: Group, gs: Group) -> np.ndarray:
    """assign[r] = the suspect neuron put at reference neuron r, or -1 (pruned)."""
    fr, fs = _features(ref_store, gr), _features(sus_store, gs)
    spread = fr.std(axis=0)
    spread[spread == 0] = 1.0
    cost = np.linalg.norm((fr[:, None, :] - fs[None, :, :]) / spread, axis=2)
    return _solve(cost)


def _solve(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment  # (scipy loads when a pruned copy is met)

    rows, cols = linear_sum_assignment(cost)  # (reference, suspect): every suspect neuron placed
    assign = np.full(cost.shape[0], -1, dtype=np.int64)
    assign[rows] = cols
    return assign


def _rows(store: WeightStore, group: Group) -> np.ndarray:
    parts = []
    for slot in sorted(group.slots, key=lambda s: (s.weight, s.axis)):
        array = store.get(slot.weight).astype(np.float64)
        rows = np.moveaxis(take(array, slot.positions.reshape(-1), axis=slot.axis), slot.axis, 0)
        parts.append(rows.reshape(group.size, -1))
    return np.concatenate(parts, axis=1)


def _refined(ref_store, padded_store, group: Group, assign: np.ndarray) -> np.ndarray:
    """The assignment again, on entries with the other axes in the reference's order (padded model:
    reference neuron r's place holds suspect neuron assign[r]); entries that are zero in every
    padded neuron (a pruned neuron of another group) left out."""
    ref, pad = _rows(ref_store, group), _rows(padded_store, group)
    present = np.any(pad != 0, axis=0)
    ref, pad = ref[:, present], pad[:, present]
    held = np.flatnonzero(assign >= 0)  # places holding a suspect neuron
    a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-30)
    b = pad[held] / np.maximum(np.linalg.norm(pad[held], axis=1, keepdims=True), 1e-30)
    chosen = _solve(-(a @ b.T))  # chosen[r] = index into held
    out = np.full(len(assign), -1, dtype=np.int64)
    out[chosen >= 0] = assign[held[chosen[chosen >= 0]]]
    return out


def _pad(reference, suspect, ref_by, sus_by, assign) -> onnx.ModelProto:
    """The suspect in the reference's shapes: along every slot axis, reference position p of neuron
    r holds the suspect's same-role position of neuron assign[r], or zero; positions no group
    covers keep their order."""
    index: dict[tuple[str, int], np.ndarray] = {}
    ref_store, sus_store = WeightStore(reference), WeightStore(suspect)
    for s, gr in ref_by.items():
        gs = sus_by[s]
        by_slot = {(sl.weight, sl.axis): sl for sl in gs.slots}
        for slot in gr.slots:
            k = (slot.weight, slot.axis)
            if k not in index:
                index[k] = np.full(ref_store.shape(slot.weight)[slot.axis], -2, dtype=np.int64)
            kept = assign[s] >= 0
            index[k][slot.positions[kept]] = by_slot[k].positions[assign[s][kept]]
            index[k][slot.positions[~kept]] = -1
    out = onnx.ModelProto()
    out.CopyFrom(suspect)
    store = WeightStore(out)
    arrays: dict[str, np.ndarray] = {}
    for (weight, axis), idx in index.items():
        array = arrays.get(weight, sus_store.get(weight))
        covered = set(idx[idx >= 0].tolist())
        free = [p for p in range(array.shape[axis]) if p not in covered]
        uncovered = np.flatnonzero(idx == -2)
        if len(free) != len(uncovered):
            raise Unpaired(f"weight {weight!r} axis {axis}: {len(free)} channels outside the groups in the suspect, "
                           f"{len(uncovered)} in the reference")
        idx = idx.copy()
        idx[uncovered] = free
        taken = take(array, np.maximum(idx, 0), axis=axis)
        shape = [1] * taken.ndim
        shape[axis] = -1
        arrays[weight] = np.where((idx >= 0).reshape(shape), taken, np.zeros((), dtype=taken.dtype))
    for name, array in arrays.items():
        store.set(name, array)
    del out.graph.value_info[:]
    return out
