"""A slot too wide to hold as rows: its neurons' rows, read a chunk of entries at a time.

match.py turns every slot into one row per neuron (the neuron's slice of the weight, other axes
aligned). For a weight whose neurons run along a short axis of a long tensor (a MatMul [98369, 256]
of a huge model) that is a transposed copy of the whole tensor, for each model: on a memory-mapped
weight, the copy costs more than every statistic taken from it. A WideSlot never builds those rows.
It cuts the weight along another axis (the longest) into pieces of about CHUNK_BYTES, read straight
from the (mapped) tensor, and serves them as columns, one per neuron, (entries, neurons): in the
weight's own layout where the neurons run along its last axis (no copy), a transposed view of
gathered rows where they run along the first; every statistic is then a matrix product or a
reduction over axis 0. It serves:
- chunks(): every piece in turn, for statistics that add up over entries (norms, dot products,
  equality, a linear hash);
- sample(k): the rows on about k entries taken at evenly spread positions of the cut axis, for
  estimates (similarity of every pair, the first hash).
Reference and suspect pieces hold the same entries in the same order, the suspect aligned on the
axes of groups already resolved (`indexes`), as match.slot_features would align it.
"""

from __future__ import annotations

import math

import numpy as np

from .gather import take
from .sampling import spread

CHUNK_BYTES = 8 << 20  # rows of one piece, per model: small enough to stay in reused memory


class WideSlot:
    def __init__(self, ref: np.ndarray, sus: np.ndarray, axis: int, positions: np.ndarray,
                 indexes: dict[int, np.ndarray]):
        self.ref, self.sus = ref, sus
        self.axis = axis
        self.positions = positions
        self.indexes = indexes  # axis -> gather index that aligns the suspect there
        others = [o for o in range(ref.ndim) if o != axis]
        self.cut = max(others, key=lambda o: ref.shape[o])  # the axis cut into pieces
        self.n, block = positions.shape
        self.width = block * math.prod(ref.shape[o] for o in others)  # entries per neuron
        per_index = self.width // ref.shape[self.cut]  # entries per neuron per index of the cut axis
        self.step = max(1, CHUNK_BYTES // max(1, self.n * per_index * 4))

    @staticmethod
    def worth(shape: tuple[int, ...], axis: int, positions: np.ndarray, min_entries: int, min_bytes: int) -> bool:
        """Rows of this slot would be wide (per neuron) and large (in all)."""
        others = [d for o, d in enumerate(shape) if o != axis]
        if not others:
            return False
        width = positions.shape[1] * math.prod(others)
        return width >= min_entries and positions.size * math.prod(others) * 4 >= min_bytes

    def columns(self, sel: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """(reference, suspect) on the entries at `sel` of the cut axis: (entries, n) each."""
        r, s = self._cut(self.ref, sel), self._cut(self.sus, sel, self.indexes.get(self.cut))
        for o, index in self.indexes.items():
            if o != self.cut:
                s = take(s, index, axis=o)
        return _neuron_columns(r, self.axis, self.positions), _neuron_columns(s, self.axis, self.positions)

    def _cut(self, a: np.ndarray, sel: np.ndarray | slice, align: np.ndarray | None = None) -> np.ndarray:
        """a's entries at `sel` of the cut axis (through `align`, the suspect's alignment there, if
        any): a view for a run without alignment, else a gather."""
        if align is not None:
            picked = np.arange(a.shape[self.cut])[sel] if isinstance(sel, slice) else sel
            return take(a, align[picked], axis=self.cut)
        if isinstance(sel, slice):
            return a[(slice(None),) * self.cut + (sel,)]
        return take(a, sel, axis=self.cut)

    def chunks(self):
        length = self.ref.shape[self.cut]
        for start in range(0, length, self.step):
            yield self.columns(slice(start, min(start + self.step, length)))

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Columns on at least min(k, width) entries, whole slices of the cut axis spread evenly."""
        length = self.ref.shape[self.cut]
        per_index = self.width // length
        return self.columns(spread(length, max(1, -(-k // per_index))))

    def norms(self) -> tuple[np.ndarray, np.ndarray]:
        """Per neuron: L2 norm of its entries, reference and suspect."""
        sr, ss = np.zeros(self.n), np.zeros(self.n)
        for xr, xs in self.chunks():
            sr += np.einsum("ij,ij->j", xr, xr)
            ss += np.einsum("ij,ij->j", xs, xs)
        if not (np.isfinite(sr).all() and np.isfinite(ss).all()):  # float32 squares overflowed, or NaN/Inf
            sr, ss = np.zeros(self.n), np.zeros(self.n)
            for xr, xs in self.chunks():
                sr += np.einsum("ij,ij->j", xr, xr, dtype=np.float64)
                ss += np.einsum("ij,ij->j", xs, xs, dtype=np.float64)
        return np.sqrt(sr), np.sqrt(ss)


def _neuron_columns(a: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """(entries, neurons): each neuron's positions along `axis`, the other axes flattened."""
    n, block = positions.shape
    if axis == 0 and block == 1 and np.array_equal(positions[:, 0], np.arange(a.shape[0])):
        picked = a.reshape(n, -1).T  # the neurons are the rows, in order: a transposed view
    elif axis == 0:  # rows are contiguous: gather them, hand out the transposed view
        picked = a[positions.reshape(-1)].reshape(n, -1).T
    else:
        x = np.moveaxis(a, axis, -1)
        if block == 1 and np.array_equal(positions[:, 0], np.arange(x.shape[-1])):
            picked = x.reshape(-1, n)  # a view where the axis was already last
        else:
            x = take(x, positions.reshape(-1), axis=-1).reshape(x.shape[:-1] + (n, block))
            picked = np.moveaxis(x, -2, -1).reshape(-1, n)
    return picked if picked.dtype in (np.float32, np.float64) else picked.astype(np.float32)
