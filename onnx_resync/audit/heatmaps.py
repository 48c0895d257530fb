"""An audit report's heatmaps: per neuron group, the cosine of every reference neuron with every
suspect neuron (both in the reference's order after resync, so matched pairs lie on the diagonal),
max-pooled to the display size.

They are a display (the HTML report; nothing in the verdict or the JSON reads them), so `Heatmaps`
computes a group's matrix when it is first asked for and keeps it: a JSON or text audit of a big
model never pays for them (on an 84M-parameter decoder they were a fifth of the audit's CPU time).

- feature of a neuron: its slices in all the group's slots, each slot scaled to unit length and
  weighted by the square root of its share of the feature, so the cosine is the size-weighted mean
  of per-slot cosines (as in match/);
- columns: each slot's cosines come from evenly spread columns, SIMILARITY_COLUMNS in all, fewer for
  a large group (SIMILARITY_WORK multiply-adds per matrix at most), gathered from the weights in
  place (a mapped or computed weight is never copied whole in float32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..io import WeightStore
from ..match.sampling import spread

HEATMAP_MAX = 80  # similarity matrices larger than this are max-pooled down to it for display
SIMILARITY_COLUMNS = 16384  # a heatmap's cosines read at most about this many evenly spread feature columns ...
SIMILARITY_WORK = 1 << 32  # ... and fewer where its n x n product would take more multiply-adds than this


class Heatmaps(Mapping):
    """group key -> display-size similarity matrix (float32), computed on first access."""

    def __init__(self, groups: dict, ref_store: WeightStore, sus_store: WeightStore, size: int = HEATMAP_MAX):
        """groups: key -> the reference's walk group; the stores: the reference and the restored suspect."""
        self._groups, self._stores, self._size = groups, (ref_store, sus_store), size
        self._done: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._done:
            self._done[key] = downsample(similarity_matrix(self._groups[key], *self._stores), self._size)
        return self._done[key]

    def __iter__(self):
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)


def similarity_matrix(group, ref_store: WeightStore, sus_store: WeightStore) -> np.ndarray:
    """Cosine of every reference neuron's feature with every suspect neuron's (module docstring)."""
    n = group.size
    parts_r, parts_s, dims = [], [], []
    columns = min(SIMILARITY_COLUMNS, SIMILARITY_WORK // max(1, n * n))
    cap = max(64, columns // max(1, len(group.slots)))
    for slot in group.slots:
        r, width = _slot_columns(ref_store, slot, cap)
        s, _ = _slot_columns(sus_store, slot, cap)
        dims.append(width)  # the slot's weight: its whole width
        parts_r.append(r)
        parts_s.append(s)
    total = float(sum(dims)) or 1.0
    fr = np.concatenate([_unit(x) * math.sqrt(d / total) for x, d in zip(parts_r, dims)], axis=1) if dims else np.zeros((n, 0))
    fs = np.concatenate([_unit(x) * math.sqrt(d / total) for x, d in zip(parts_s, dims)], axis=1) if dims else np.zeros((n, 0))
    return (fr @ fs.T).astype(np.float32)


def _slot_columns(store: WeightStore, slot, cap: int) -> tuple[np.ndarray, int]:
    """A slot's rows (one per neuron: its positions along the axis, the other axes flattened) on at
    most `cap` evenly spread columns, float32, gathered straight from the weight (no copy of it);
    and the rows' whole width."""
    a, axis = slot.part(store.get(slot.weight))
    a = np.moveaxis(np.asarray(a), axis, 0)  # (axis, *other axes)
    others = a.shape[1:]
    per = math.prod(others)
    width = slot.positions.shape[1] * per
    pick = spread(width, cap) if width > cap else np.arange(width)
    block, rest = np.divmod(pick, per)
    index = (slot.positions[:, block],) + tuple(o[None, :] for o in np.unravel_index(rest, others)) if others \
        else (slot.positions[:, block],)
    return np.asarray(a[index], dtype=np.float32), width


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def downsample(m: np.ndarray, size: int) -> np.ndarray:
    """Max-pool a square matrix to at most size x size (the diagonal of a good match stays visible)."""
    n = m.shape[0]
    if n <= size:
        return m
    edges = np.linspace(0, n, size + 1).astype(int)
    rows = np.maximum.reduceat(m, edges[:-1], axis=0)
    return np.maximum.reduceat(rows, edges[:-1], axis=1)
