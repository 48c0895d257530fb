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
from .io import WeightStore
from .walk import Group, WalkResult

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


def slot_indices(walk: WalkResult, perms: dict[str, list[int]], dim_of) -> dict[tuple[str, int], np.ndarray]:
    """For every (weight, axis) touched: the gather index that realizes all the group permutations.

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
            k = (slot.weight, slot.axis)
            if k not in index:
                index[k] = np.arange(dim_of(*k))
            # compose: groups on one axis touch disjoint positions, or commute (heads and the dims
            # inside every head), so gathering one after the other realizes them all
            move = np.arange(len(index[k]))
            move[slot.positions.reshape(-1)] = slot.positions[perm].reshape(-1)
            index[k] = index[k][move]
    return index


def apply_permutations(model: onnx.ModelProto, walk: WalkResult, record: PermutationRecord) -> int:
    """Rewrite the model's weights in place; returns the number of weight tensors changed."""
    store = WeightStore(model)
    index = slot_indices(walk, record.perms, lambda w, a: store.shape(w)[a])
    by_weight: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (weight, axis), idx in index.items():
        by_weight[weight].append((axis, idx))
    for weight, moves in by_weight.items():
        if store.is_lazy(weight):  # a huge model: permuted one tensor at a time, when it is saved
            store.set_lazy(weight, _permuted(store.reader(weight), moves))
            continue
        array = store.get(weight)
        for axis, idx in moves:
            array = np.take(array, idx, axis=axis)
        store.set(weight, array)
    return len(by_weight)


def _permuted(read, moves):
    """The permuted tensor as a computation, which can also produce a sub-grid alone: entry i along
    a moved axis is entry idx[i] of the source, so a sample reads only the entries it needs."""
    def compute() -> np.ndarray:
        array = read()
        for axis, idx in moves:
            array = np.take(array, idx, axis=axis)
        return array

    def grid(index: list[np.ndarray]) -> np.ndarray:
        source = list(index)
        for axis, idx in moves:
            source[axis] = idx[source[axis]]
        source_grid = getattr(read, "grid", None)
        return source_grid(source) if source_grid is not None else read()[np.ix_(*source)]

    compute.grid = grid
    return compute
