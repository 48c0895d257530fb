"""Apply (and exactly undo) permutations of walker groups: the only place that rewrites weights.

A permutation of a group of size n is an array `perm` with perm[i] = the old neuron that moves to
place i. Every slot of the group is reindexed the same way, so the function is unchanged.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import ModelMismatchError, UsageError
from .io import WeightStore, copy_without_payloads
from .walk import Group, WalkResult, slot_part

RECORD_FORMAT = "onnx-resync/permutation/1"


@dataclass
class PermutationRecord:
    """Which permutation was applied to which group; JSON-serializable, used to undo."""

    perms: dict[str, list[int]]  # group key -> perm
    seed: int | None = None
    format: str = RECORD_FORMAT
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": self.format, "seed": self.seed, "notes": self.notes, "groups": self.perms}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(data: dict) -> "PermutationRecord":
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("groups"), dict):
            raise UsageError(f"not an onnx-resync permutation record (expected format {RECORD_FORMAT!r})")
        return PermutationRecord({k: list(map(int, v)) for k, v in data["groups"].items()}, data.get("seed"),
                                 notes=data.get("notes", {}))

    def inverse(self) -> "PermutationRecord":
        return PermutationRecord({k: np.argsort(v).tolist() for k, v in self.perms.items()}, self.seed,
                                 notes={"inverse_of_seed": self.seed})


def random_permutations(walk: WalkResult, seed: int, keys: list[str] | None = None) -> PermutationRecord:
    """A seeded random permutation of every group (or of the groups named by key or id)."""
    rng = np.random.default_rng(seed)
    chosen = select_groups(walk, keys)
    perms = {}
    for g in walk.groups:  # draw for every group so a selection does not change the others' draws
        perm = rng.permutation(g.size)
        if g in chosen:
            perms[g.key] = perm.tolist()
    return PermutationRecord(perms, seed)


def select_groups(walk: WalkResult, keys: list[str] | None) -> list[Group]:
    if not keys:
        return list(walk.groups)
    by_key = {g.key: g for g in walk.groups}
    by_id = {str(g.id): g for g in walk.groups}
    chosen = []
    for k in keys:
        g = by_key.get(k) or by_id.get(k)
        if g is None:
            raise UsageError(f"no group {k!r} in this model (see `onnx-resync groups`)")
        chosen.append(g)
    return chosen


def slot_indices(walk: WalkResult, perms: dict[str, list[int]], dim_of) -> dict[tuple, np.ndarray]:
    """For every (weight, axis, at) touched: the gather index that realizes all the group permutations
    (`at`: the slice it applies to, None for the whole weight; see GroupSlot).

    dim_of(weight, axis) gives the axis length.
    """
    by_key = {g.key: g for g in walk.groups}
    index: dict[tuple[str, int], np.ndarray] = {}
    for key, perm in perms.items():
        group = by_key.get(key)
        if group is None:
            raise ModelMismatchError(f"the record names group {key!r}, which this model does not have")
        perm = np.asarray(perm, dtype=np.int64)
        if perm.shape != (group.size,) or not np.array_equal(np.sort(perm), np.arange(group.size)):
            raise UsageError(f"record for group {key!r} is not a permutation of {group.size} neurons")
        for slot in group.slots:
            k = (slot.weight, slot.axis, slot.at)
            if k not in index:
                index[k] = np.arange(dim_of(slot.weight, slot.axis))
            # compose: groups on one axis touch disjoint positions, or commute (heads and the dims
            # inside every head; slices of one axis), so gathering one after the other realizes them all
            move = np.arange(len(index[k]))
            move[slot.positions.reshape(-1)] = slot.positions[perm].reshape(-1)
            index[k] = index[k][move]
    return index


def apply_permutations(model: onnx.ModelProto, walk: WalkResult, record: PermutationRecord) -> int:
    """Rewrite the model's weights in place; returns the number of weight tensors changed."""
    store = WeightStore(model)
    by_weight = _moves_by_weight(walk, record, store)
    _rewrite(store, store, by_weight)
    return len(by_weight)


def permuted_copy(model: onnx.ModelProto, walk: WalkResult, record: PermutationRecord,
                  store: WeightStore | None = None) -> tuple[onnx.ModelProto, int]:
    """A new model: `model` with the record applied (the weights it rewrites are not copied first);
    and the number of weight tensors changed. `store`: the caller's WeightStore of `model`."""
    store = store if store is not None else WeightStore(model)
    by_weight = _moves_by_weight(walk, record, store)
    copy = copy_without_payloads(model, set(by_weight))
    _rewrite(WeightStore(copy), store, by_weight)
    return copy, len(by_weight)


def _rewrite(store: WeightStore, read: WeightStore, by_weight: dict[str, list[tuple]]) -> None:
    """Write each weight's moved values (read from `read`) into `store`."""
    for weight, moves in by_weight.items():
        if read.is_lazy(weight):  # a huge model: permuted one tensor at a time, when it is saved
            store.set_lazy(weight, _permuted(read.reader(weight), moves))
            continue
        store.set(weight, _moved(read.get(weight), moves))


def _moves_by_weight(walk: WalkResult, record: PermutationRecord, store: WeightStore) -> dict[str, list[tuple]]:
    index = slot_indices(walk, record.perms, lambda w, a: store.shape(w)[a])
    by_weight: dict[str, list[tuple]] = defaultdict(list)
    for (weight, axis, at), idx in index.items():
        by_weight[weight].append((axis, at, idx))
    return by_weight


def _permuted(read, moves):
    """The permuted tensor as a computation, which can also produce a sub-grid or some rows alone:
    entry i along a moved axis is entry idx[i] of the source, so a sample reads only the entries it
    needs, and a save only a piece at a time (a move inside one direction's slice is not one index
    per axis: that sub-grid is computed whole)."""
    def compute() -> np.ndarray:
        return _moved(read(), moves)

    def grid(index: list[np.ndarray]) -> np.ndarray:
        if any(at is not None for _, at, _ in moves):
            return compute()[np.ix_(*index)]
        source = list(index)
        for axis, _, idx in moves:
            source[axis] = idx[source[axis]]
        source_grid = getattr(read, "grid", None)
        return source_grid(source) if source_grid is not None else read()[np.ix_(*source)]

    def rows(index: np.ndarray) -> np.ndarray:
        if any(at is not None for _, at, _ in moves):
            return compute()[index]
        source = index
        for axis, _, idx in moves:
            if axis == 0:
                source = idx[source]
        source_rows = getattr(read, "rows", None)
        piece = source_rows(source) if source_rows is not None else read()[source]
        return _moved(piece, [move for move in moves if move[0] != 0])

    compute.grid = grid
    compute.rows = rows
    return compute


def _moved(array: np.ndarray, moves) -> np.ndarray:
    """`array` gathered along each (axis, at, index): the whole axis, or inside the slice `at`."""
    for axis, at, idx in moves:
        if at is None:
            array = np.take(array, idx, axis=axis)
        else:
            array = array.copy()
            part, part_axis = slot_part(array, axis, at)
            part[...] = np.take(part, idx, axis=part_axis)
    return array
