"""Apply (and exactly undo) permutations of walker groups: the only place that rewrites weights.

A permutation of a group of size n is an array `perm` with perm[i] = the old neuron that moves to
place i. Every slot of the group is reindexed the same way, so the function is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import LoadError, ModelMismatchError, UsageError
from .io import WeightStore, copy_without_payloads, is_in_place, load_model, open_input
from .walk import Group, WalkResult, slot_part

# format 2 names the models by content (source_sha256, permuted_sha256); format 1 records (no hashes)
# are still read, without that check
RECORD_FORMAT = "onnx-resync/permutation/2"
RECORD_FORMATS_WITHOUT_HASH = ("onnx-resync/permutation/1",)
MAX_SEED = 2 ** 63 - 1


@dataclass
class PermutationRecord:
    """Which permutation was applied to which group; JSON-serializable, used to undo.

    source_sha256: content hash (model_sha256) of the model the permutations were applied to;
    permuted_sha256: that of the permuted file written, the one `permute --undo` takes.
    """

    perms: dict[str, list[int]]  # group key -> perm
    seed: int | None = None
    format: str = RECORD_FORMAT
    notes: dict = field(default_factory=dict)
    source_sha256: str | None = None
    permuted_sha256: str | None = None
    # per-head groups (Group.within) move the positions of one head once the heads have moved; an
    # inverse record undoes them first, then the heads (the two do not commute)
    per_head_first: bool = False

    @property
    def has_hashes(self) -> bool:
        return self.format not in RECORD_FORMATS_WITHOUT_HASH

    def to_dict(self) -> dict:
        data = {"format": self.format, "seed": self.seed, "notes": self.notes}
        if self.has_hashes:
            data.update(source_sha256=self.source_sha256, permuted_sha256=self.permuted_sha256)
        if self.per_head_first:
            data["per_head_first"] = True
        data["groups"] = self.perms
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(data, where: str = "record") -> "PermutationRecord":
        """Validate and build: every group a permutation of 0..n-1 (n checked against a model by
        check_groups), integers only; anything else is a one-line UsageError."""
        known = (RECORD_FORMAT, *RECORD_FORMATS_WITHOUT_HASH)
        if not isinstance(data, dict) or data.get("format") not in known or not isinstance(data.get("groups"), dict):
            raise UsageError(f"{where}: not an onnx-resync permutation record (expected format {RECORD_FORMAT!r})")
        perms = {key: _permutation(key, value, where) for key, value in data["groups"].items()}
        seed = data.get("seed")
        if seed is not None and not _is_int(seed):
            raise UsageError(f"{where}: seed {_show(seed)} is not an integer")
        notes = data.get("notes", {})
        if not isinstance(notes, dict):
            raise UsageError(f"{where}: notes must be a JSON object")
        hashes = {}
        if data["format"] not in RECORD_FORMATS_WITHOUT_HASH:
            for name in ("source_sha256", "permuted_sha256"):
                value = data.get(name)
                if value is not None and not _is_sha256(value):
                    raise UsageError(f"{where}: {name} {_show(value)} is not a sha256 hex digest")
                hashes[name] = value
        order = data.get("per_head_first", False)
        if not isinstance(order, bool):
            raise UsageError(f"{where}: per_head_first {_show(order)} is not true or false")
        return PermutationRecord(perms, seed, format=data["format"], notes=notes, per_head_first=order, **hashes)

    def check_groups(self, walk: WalkResult, where: str = "record") -> None:
        """Every group named exists in this model and has as many neurons as the record's permutation."""
        by_key = {g.key: g for g in walk.groups}
        for key, perm in self.perms.items():
            group = by_key.get(key)
            if group is None:
                raise UsageError(f"{where} names group {key!r}, which this model does not have "
                                 "(a record of another model?)")
            if len(perm) != group.size or not _is_permutation(perm):
                raise UsageError(f"{where}: group {key!r} has {len(perm)} entries, not a permutation of this "
                                 f"model's {group.size} neurons")

    def heads_first(self, walk: WalkResult) -> "PermutationRecord":
        """The same moves with every per-head group applied after its heads (resync's order), so that
        two records compare group by group. Applied first, head k's own perm moves the dims of the
        head that then goes to every place i with heads[i] = k: after the heads, place i takes it."""
        if not self.per_head_first:
            return self
        by_key = {g.key: g for g in walk.groups}
        sibling = {(g.within[0], g.key.rsplit("~head", 1)[0], g.within[1]): g.key for g in walk.groups if g.within}
        perms = dict(self.perms)
        for key, perm in self.perms.items():
            group = by_key.get(key)
            if group is None or group.within is None:
                continue
            heads_key, i = group.within
            heads = self.perms.get(heads_key)
            source = sibling.get((heads_key, key.rsplit("~head", 1)[0], heads[i] if heads is not None else i))
            perms[key] = list(self.perms.get(source, range(len(perm))))
        for (heads_key, base, i), key in sibling.items():  # a head whose own perm the record left out
            heads = self.perms.get(heads_key)
            if key not in perms and heads is not None and sibling.get((heads_key, base, heads[i])) in self.perms:
                perms[key] = list(self.perms[sibling[(heads_key, base, heads[i])]])
        return PermutationRecord(perms, self.seed, notes=dict(self.notes))

    def inverse(self) -> "PermutationRecord":
        if not all(_is_permutation(p) for p in self.perms.values()):
            raise UsageError("record: a group's entries are not a permutation (nothing inverted)")
        return PermutationRecord({k: np.argsort(v).tolist() for k, v in self.perms.items()}, self.seed,
                                 notes={"inverse_of_seed": self.seed}, per_head_first=not self.per_head_first)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _show(value) -> str:
    if _is_int(value) and value.bit_length() > 100:
        return f"an integer of {value.bit_length()} bits"
    text = json.dumps(value) if isinstance(value, (dict, list, str, type(None), bool)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_permutation(perm) -> bool:
    n = len(perm)
    seen = bytearray(n)
    for v in perm:
        if not _is_int(v) or not 0 <= v < n or seen[v]:
            return False
        seen[v] = 1
    return True


def _permutation(key, value, where: str) -> list[int]:
    if not isinstance(value, list):
        raise UsageError(f"{where}: group {key!r} is {_show(value)}, not a list of neuron indices")
    seen = bytearray(len(value))
    for i, v in enumerate(value):
        if not _is_int(v):
            raise UsageError(f"{where}: group {key!r} entry {i} is {_show(v)}, not an integer")
        if not 0 <= v < len(value):
            raise UsageError(f"{where}: group {key!r} entry {i} is {_show(v)}, outside 0..{len(value) - 1}")
        if seen[v]:
            raise UsageError(f"{where}: group {key!r} lists neuron {v} twice (not a permutation)")
        seen[v] = 1
    return list(value)


def model_sha256(path: str | os.PathLike) -> str:
    """Content hash of a model file and of the external-data files it reads (in the order of their
    names), streamed: what a record or a batch result names a model by. A file that cannot be parsed
    is hashed alone (its bytes still say whether it changed)."""
    path = Path(path)
    digest = hashlib.sha256()
    _hash_into(digest, path)
    for location in _external_locations(path):
        digest.update(b"\0external:" + location.encode("utf-8", "surrogateescape") + b"\0")
        _hash_into(digest, path.parent / location)
    return digest.hexdigest()


def _hash_into(digest, path: Path) -> None:
    buffer = bytearray(1 << 18)  # one reused buffer: no fresh memory per chunk (this runs beside a load)
    view = memoryview(buffer)
    with open_input(path, what="file", error=LoadError, buffering=0) as fh:  # a regular file only: a FIFO would block
        while size := fh.readinto(buffer):
            digest.update(view[:size])


def _external_locations(path: Path) -> list[str]:
    try:
        model = load_model(path, load_weights=False, check=False, lazy=True)
    except Exception:  # noqa: BLE001 - unreadable: the file's own bytes are the whole content
        return []
    found = set()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.HasField("t") else [])
                tensors.extend(attr.tensors)
                stack.extend([attr.g] if attr.HasField("g") else [])
                stack.extend(attr.graphs)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL and not is_in_place(t):
                found.update(e.value for e in t.external_data if e.key == "location")
    return sorted(found)


def random_permutations(walk: WalkResult, seed: int, keys: list[str] | None = None) -> PermutationRecord:
    """A seeded random permutation of every group (or of the groups named by key or id)."""
    rng = np.random.default_rng(check_seed(seed))
    chosen = select_groups(walk, keys)
    perms = {}
    for g in walk.groups:  # draw for every group so a selection does not change the others' draws
        perm = rng.permutation(g.size)
        if g in chosen:
            perms[g.key] = perm.tolist()
    return PermutationRecord(perms, seed)


def check_seed(seed) -> int:
    """A seed is an integer in 0..MAX_SEED; anything else is a one-line UsageError."""
    if isinstance(seed, (bool, float, str)) or not hasattr(seed, "__index__"):
        raise UsageError(f"seed {_show(seed)} is not an integer")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        shown = str(seed) if seed.bit_length() < 100 else f"of {seed.bit_length()} bits"
        raise UsageError(f"seed {shown} is outside 0..2**63-1")
    return seed


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


def slot_indices(walk: WalkResult, perms, dim_of) -> dict[tuple, np.ndarray]:
    """For every (weight, axis, at) touched: the gather index that realizes all the group permutations
    (`at`: the slice it applies to, None for the whole weight; see GroupSlot).

    perms: a PermutationRecord, or its group key -> perm (heads before the dims inside them);
    dim_of(weight, axis) gives the axis length.
    """
    first = False
    if isinstance(perms, PermutationRecord):
        perms, first = perms.perms, perms.per_head_first
    by_key = {g.key: g for g in walk.groups}
    # per-head groups after the others (before them in an inverse record): the order they were made in
    ordered = sorted(perms, key=lambda k: (by_key[k].within is None) == first if k in by_key else False)
    index: dict[tuple[str, int], np.ndarray] = {}
    for key in ordered:
        perm = perms[key]
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
            # inside every head; slices of one axis), or come in order (a head's own dims after the
            # heads), so gathering one after the other realizes them all
            move = np.arange(len(index[k]))
            move[slot.positions.reshape(-1)] = slot.positions[perm].reshape(-1)
            index[k] = index[k][move]
    return index


def apply_permutations(model: onnx.ModelProto, walk: WalkResult, record: PermutationRecord) -> int:
    """Rewrite the model's weights in place; returns the number of weight tensors changed."""
    store = WeightStore(model)
    by_weight = _moves_by_weight(walk, record, store)
    _rewrite(store, store, by_weight, walk.layouts)
    return len(by_weight)


def permuted_copy(model: onnx.ModelProto, walk: WalkResult, record: PermutationRecord,
                  store: WeightStore | None = None) -> tuple[onnx.ModelProto, int]:
    """A new model: `model` with the record applied (the weights it rewrites are not copied first);
    and the number of weight tensors changed. `store`: the caller's WeightStore of `model`."""
    store = store if store is not None else WeightStore(model)
    by_weight = _moves_by_weight(walk, record, store)
    copy = copy_without_payloads(model, set(by_weight))
    _rewrite(WeightStore(copy), store, by_weight, walk.layouts)
    return copy, len(by_weight)


def _rewrite(store: WeightStore, read: WeightStore, by_weight: dict[str, list[tuple]], layouts: dict) -> None:
    """Write each weight's moved values (read from `read`) into `store`; a weight with a layout
    (walk/layouts.py: an NCHWc filter) is moved in its logical array and stored back in its own."""
    for weight, moves in by_weight.items():
        if weight in layouts:  # (WeightStore's own get/set: the stored form, whatever store it is)
            layout = layouts[weight]
            WeightStore.set(store, weight, layout.stored(apply_moves(layout.logical(WeightStore.get(read, weight)),
                                                                     moves)))
            continue
        if read.is_lazy(weight):  # a huge model: permuted one tensor at a time, when it is saved
            store.set_lazy(weight, _permuted(read.reader(weight), moves))
            continue
        store.set(weight, apply_moves(read.get(weight), moves))


def _moves_by_weight(walk: WalkResult, record: PermutationRecord, store: WeightStore) -> dict[str, list[tuple]]:
    index = slot_indices(walk, record, lambda w, a: store.shape(w)[a])
    by_weight: dict[str, list[tuple]] = defaultdict(list)
    for (weight, axis, at), idx in index.items():
        by_weight[weight].append((axis, at, idx))
    return by_weight


def _permuted(source, moves):
    """The lazy tensor `source` (WeightStore.reader) permuted, computed when read or saved: entry i
    along a moved axis is entry idx[i] of the source, so a sample reads only the entries it needs,
    and a save only a piece at a time. A move inside one direction's slice is not one index per
    axis: that tensor is computed whole."""
    if any(at is not None for _, at, _ in moves):
        return lambda: apply_moves(source.read(), moves)
    return source.permuted({axis: idx for axis, _, idx in moves})


def apply_moves(array: np.ndarray, moves) -> np.ndarray:
    """`array` gathered along each (axis, at, index): the whole axis, or inside the slice `at`."""
    for axis, at, idx in moves:
        if at is None:
            array = np.take(array, idx, axis=axis)
        else:
            array = array.copy()
            part, part_axis = slot_part(array, axis, at)
            part[...] = np.take(part, idx, axis=part_axis)
    return array
