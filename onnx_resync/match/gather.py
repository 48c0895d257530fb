"""Gathers along one axis that never copy a whole weight to read a part of it.

np.take makes a C-contiguous copy of its whole input first when the input is not C-contiguous: a
weight dequantized from MatMulNBits is the transposed view of a [N, K] array (F-contiguous), so
reading 16384 columns of a [2048 x 128256] lm_head, or one head's 128 columns of a [2048 x 2048]
projection, first copied all of it (1 GiB, 16 MiB) on every read. `take` gives np.take's answer,
the same values in the same (C) layout, gathering an F-contiguous array through its C-contiguous
transpose and any other strided view by indexing (which reads only the entries picked).
"""

from __future__ import annotations

import numpy as np

TRANSPOSE_TILE = 16  # source rows transposed together (transposed): a cache line of float32 per output row


def take(a: np.ndarray, index, axis: int = 0, *, same_layout: bool = False) -> np.ndarray:
    """np.take(a, index, axis=axis): the same values, C-contiguous, read without a copy of all of a.
    same_layout: an F-contiguous `a` (a transposed view) gives an F-contiguous answer, the transposed
    view of its gathered transpose, for a reader that wants it transposed anyway (no copy back and forth)."""
    if a.flags.c_contiguous or a.ndim < 2:
        return np.take(a, index, axis=axis)
    axis = axis % a.ndim
    if a.flags.f_contiguous:  # a transposed view: gather its C-ordered transpose, put the axes back
        out = np.take(a.T, index, axis=a.ndim - 1 - axis)
        if same_layout:
            return out.T
        return transposed(out) if out.ndim == 2 else np.ascontiguousarray(out.T)
    return np.ascontiguousarray(a[(slice(None),) * axis + (np.asarray(index),)])


def transposed(a: np.ndarray) -> np.ndarray:
    """a.T as a new C-ordered array, copied TRANSPOSE_TILE source rows at a time: numpy's strided copy
    of a whole transpose misses the cache on every entry; a strip of rows written per output row
    fills a cache line (2-3x faster than 64 x 64 tiles, 1536 x 4096 to 8192 x 2048 float32)."""
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)
    t = TRANSPOSE_TILE
    for i in range(0, a.shape[0], t):
        out[:, i:i + t] = a[i:i + t].T
    return out
