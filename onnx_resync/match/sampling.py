"""Evenly spread sub-grids of a tensor: what the cheap statistics of huge weights look at.

A sub-grid takes, on every axis, indices spread evenly over its length (np.ix_ of them), so that a
memory-mapped tensor is read only where the sample lies and every region of the tensor is seen.
"""

from __future__ import annotations

import math

import numpy as np


def spread_counts(dims: list[int], budget: int) -> list[int]:
    """How many indices to take on each axis so that their product is at most about `budget`:
    short axes whole, the rest of the budget shared out evenly over the longer ones."""
    counts = [1] * len(dims)
    left = max(1, budget)
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    for done, i in enumerate(order):
        fair = max(1, int(left ** (1 / (len(dims) - done))))
        counts[i] = max(1, min(dims[i], fair))
        left = max(1, left // counts[i])
    return counts


def spread(length: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(length), first and last included."""
    if count >= length:
        return np.arange(length, dtype=np.int64)
    return np.unique(np.linspace(0, length - 1, count).round().astype(np.int64))


def sub_grid(shape: tuple[int, ...], budget: int) -> list[np.ndarray] | None:
    """One index array per axis for a sub-grid of about `budget` entries; None if the whole tensor
    fits in the budget."""
    if math.prod(shape) <= budget:
        return None
    return [spread(d, c) for d, c in zip(shape, spread_counts(list(shape), budget))]
