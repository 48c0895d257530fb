"""What lies beyond the storage's bound in one weight, by its shape: spread over the weight's elements
(noise, further training) or whole neurons scaled. report._beyond_kinds names a kind only from this.

- **slice**: the elements of a weight with one index on axis 0 or on axis 1 (a neuron's row in its
  producer, its column in a consumer: both axes are tried, whatever the layout);
- **scaled slice**: its elements beyond the bound all have s / r of one sign and one size: the
  standard deviation of log|s / r| at most SCALED_SPREAD times |its mean| (a neuron scaled by 1.5
  and stored in float16: ~3e-4 against 0.41; noise: about as wide as its mean), and at least
  MIN_SLICE_ELEMENTS of them (one element says nothing of a factor);
- a weight's **evidence**: "scaled" when on axis 0 or on axis 1 every slice that holds elements
  beyond the bound is scaled (neurons: the fewer such slices of the two axes), "spread" otherwise.
  A 1-D weight (a bias, a norm's scale) has one element per neuron: it says "spread" only when more
  than SPREAD_SHARE of its elements lie beyond the bound; a few agree with neurons scaled elsewhere
  and are "few" (evidence for neither kind).

Newly zero elements are pruning's (report): the caller leaves them out. Accumulated a piece of the
flat weight at a time (bincounts per slice): never a copy of a huge weight.
"""

from __future__ import annotations

import math

import numpy as np

SCALED_SPREAD = 0.1
MIN_SLICE_ELEMENTS = 2
SPREAD_SHARE = 0.1


class SliceEvidence:
    """Per-slice statistics of the elements beyond the bound of one weight (`add` a flat piece at a
    time), and the kind they support (`kind`)."""

    def __init__(self, shape: tuple[int, ...]):
        self.size = math.prod(shape) if shape else 1
        self.beyond = 0
        # per axis: (elements per index step, slices), and per slice: count, same sign, sum and sum of
        # squares of log|s / r|
        self.axes = []
        if len(shape) >= 2 and self.size:
            self.axes = [(self.size // shape[0], shape[0]), (self.size // (shape[0] * shape[1]), shape[1])]
        self.stats = [np.zeros((4, n)) for _, n in self.axes]

    def add(self, start: int, r: np.ndarray, s: np.ndarray, beyond: np.ndarray) -> None:
        """A flat piece of the weight from element `start`: r, s in float64, `beyond` the elements
        that count."""
        index = np.flatnonzero(beyond)
        if not index.size:
            return
        self.beyond += int(index.size)
        if not self.axes:
            return
        rr, ss = r[index], s[index]
        same = (np.sign(rr) == np.sign(ss)) & (rr != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log = np.where(same, np.log(np.abs(np.where(same, ss, 1.0)) / np.abs(np.where(same, rr, 1.0))), 0.0)
        log[~np.isfinite(log)] = 0.0
        flat = index + start
        for (inner, n), st in zip(self.axes, self.stats):
            k = (flat // inner) % n
            st[0] += np.bincount(k, minlength=n)
            st[1] += np.bincount(k, weights=same.astype(np.float64), minlength=n)
            st[2] += np.bincount(k, weights=log, minlength=n)
            st[3] += np.bincount(k, weights=log * log, minlength=n)

    def kind(self) -> tuple[str, int]:
        """("", 0): nothing beyond; ("few", 0): a few elements of a 1-D weight; ("spread", 0); or
        ("scaled", neurons)."""
        if not self.beyond:
            return "", 0
        if not self.axes:
            return ("spread", 0) if self.beyond > max(1, SPREAD_SHARE * self.size) else ("few", 0)
        neurons = []
        for count, same, total, squares in self.stats:
            hit = count > 0
            c = np.maximum(count, 1)
            mean = total / c
            std = np.sqrt(np.maximum(squares / c - mean * mean, 0.0))
            scaled = (count >= MIN_SLICE_ELEMENTS) & (same == count) & (std <= SCALED_SPREAD * np.abs(mean)) \
                & (mean != 0)
            if hit.any() and scaled[hit].all():
                neurons.append(int(hit.sum()))
        return ("scaled", min(neurons)) if neurons else ("spread", 0)
