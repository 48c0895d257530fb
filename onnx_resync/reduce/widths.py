"""Width edits: a group's neurons read, combined and removed in every slot at once.

Vocabulary (walk/groups.py): a *slot* is (weight, axis, positions) where a weight's axis holds the
group's channels; `Group.sides()` says per slot whether it sets a neuron's value (+1: the
producer's rows and bias, or the scale and bias of the BatchNormalization after it), lies inside it
(0: a producer before a normalization, the running mean and variance) or reads it (-1: every
reader's input axis). A neuron's *incoming* entries are those of its +1 and 0 slots, its *outgoing*
entries those of its -1 slots.

`Widths` holds the weights a pass rewrites (float64 copies), applies "add a times neuron j's
outgoing entries to neuron i's" and "remove these neurons" in the positions of the walk it was
made from (so the decisions of every group, taken on one walk, compose), and writes the weights
back with their new shapes. A slot inside one direction of a bidirectional RNN (`at`) is never
edited: the RNN's hidden size is an attribute, not a weight.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from ..io import WeightStore
from ..walk import Group


def editable(group: Group, layouts=()) -> bool:
    """Every slot indexes a whole axis (not one direction's slice of it) of a weight stored as it is
    read (not in a layout: an NCHWc filter holds whole blocks of channels)."""
    return bool(group.slots) and all(slot.at is None and slot.weight not in layouts for slot in group.slots)


class Widths:
    """Pending width edits on one model, in the positions of one walk."""

    def __init__(self, model: onnx.ModelProto):
        self.store = WeightStore(model)
        self.arrays: dict[str, np.ndarray] = {}
        self.removed: dict[tuple[str, int], set[int]] = defaultdict(set)

    def _array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = self.store.get(name).astype(np.float64)
        return self.arrays[name]

    def rows(self, group: Group, sides: set[int], neurons=None) -> np.ndarray:
        """(neurons, entries) float64: each neuron's entries in the group's slots of the given sides,
        slot after slot, as the pending edits leave them: entries that other groups' removals take
        away are left out (so a group read after its readers sees dummies that fed only dummies as
        dead)."""
        neurons = np.arange(group.size) if neurons is None else np.asarray(neurons)
        parts = []
        for side, slot in zip(group.sides(), group.slots):
            if side not in sides:
                continue
            array = self._array(slot.weight)
            taken = np.take(array, slot.positions[neurons].reshape(-1), axis=slot.axis)
            for axis in range(array.ndim):
                gone = self.removed.get((slot.weight, axis)) if axis != slot.axis else None
                if gone:
                    taken = np.delete(taken, sorted(gone), axis=axis)
            parts.append(np.moveaxis(taken, slot.axis, 0).reshape(len(neurons), -1))
        if not parts:
            return np.zeros((len(neurons), 0))
        return np.concatenate(parts, axis=1)

    def add_outgoing(self, group: Group, target: int, source: int, factor: float) -> None:
        """Neuron `target`'s outgoing entries += factor x neuron `source`'s (source is removed after)."""
        for side, slot in zip(group.sides(), group.slots):
            if side != -1:
                continue
            view = np.moveaxis(self._array(slot.weight), slot.axis, 0)
            view[slot.positions[target]] += factor * view[slot.positions[source]]

    def remove(self, group: Group, neurons) -> None:
        """Take the neurons out of every slot of the group."""
        for slot in group.slots:
            self.removed[(slot.weight, slot.axis)].update(slot.positions[list(neurons)].reshape(-1).tolist())

    def gone(self, group: Group, neuron: int) -> bool:
        """Every entry of the neuron is already removed (by another group's edit)."""
        return all(set(slot.positions[neuron].tolist()) <= self.removed.get((slot.weight, slot.axis), set())
                   for slot in group.slots)

    def touched(self) -> bool:
        return bool(self.arrays) or any(self.removed.values())

    def write(self) -> None:
        """Store the edited weights (the store's model changes in place), with their new shapes."""
        for (name, axis), positions in self.removed.items():
            if positions:
                self.arrays[name] = np.delete(self._array(name), sorted(positions), axis=axis)
        for name, array in self.arrays.items():
            self.store.set(name, array)
        forget_shapes(self.store.model)


def forget_shapes(model: onnx.ModelProto) -> None:
    """Drop the recorded intermediate shapes (value_info): widths changed, and ONNX Runtime and the
    walker infer them again from the weights."""
    del model.graph.value_info[:]
