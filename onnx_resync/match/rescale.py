"""Exact estimate (and undo) of neutral rescales: a neuron scaled by a > 0 on the producer side and
1/a on the consumer side, across positively homogeneous activations only (DESIGN.md, integrity).

Pure numpy on a suspect already put in the reference's order. Sides are structural: a slot whose
weight feeds one of the group's producers (rows, bias; or the scale and bias of the
BatchNormalization right after it) is +1, one inside (a producer before a BatchNormalization, the
running mean and variance) 0, every other slot -1. For every weight
element where both models are non-zero with the same sign, log|suspect / reference| must then equal
the sum over its grouped axes of side * log(a) of the neuron there. The log-scales are found by
alternating per-neuron medians (a few sweeps; exact data converges at once), and a neuron is taken
as rescaled only where that model explains every element of every slot to float rounding; anything
else (noise, fine-tuning, a rescale that does not compensate) is left alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..walk import registry
from .sampling import spread, spread_counts

# Which readers keep a rescale neutral (positively homogeneous ones), and which producers may be
# rescaled (linear ones; not an RNN, whose state feeds back), are properties in the op registry
# (walk/registry.py). (An Add of a constant that is not a slot would break neutrality; the ORT check
# after the undo catches that, and resync then keeps the rescale; without the check, resync does
# not undo at all.)
EXACT = 1e-5  # residual in log|ratio| allowed per element (float32 rounding is ~1e-7)
MIN_LOG_SCALE = 1e-4  # smaller is no rescale
MIN_SUPPORT = 2  # non-zero entries needed on each side of a neuron to see its compensation
SWEEPS = 4
SAMPLE_ENTRIES = 256  # entries per neuron and slot that the estimate looks at
LSQR_ITERATIONS = 1000  # least-squares correction (exact data converges well before)
FULL_CHUNK = 1 << 22  # entries per block when the survivors are checked on all their entries


def structural_sides(group) -> list[int]:
    """Per slot of `group`: +1 on the producer side, 0 inside it, -1 on the consumer side.

    The walker's producer records say it (walk/groups.py): a producer's weights and the bias added
    right after it set the activation's scale; where a BatchNormalization follows, its scale and
    bias do, and the producer, mean and variance are inside (the normalization cancels their scale)."""
    return group.sides()


def _homogeneous(reader) -> bool:
    if reader.op_type == "BatchNormalization":
        return True  # its producer side is in the records: whether it is neutral is decided below
    spec = registry.lookup(reader.op_type, reader.domain)
    return spec is not None and (spec.homogeneous_joint if reader.labelled > 1 else spec.homogeneous)


def neutral_groups(walk_result) -> list:
    """Groups made by linear producers (each maybe followed by a BatchNormalization) whose
    activations only meet positively homogeneous or linear ops: there, a neuron scaled by a on the
    producer side and 1/a on the rest computes the same."""
    out = []
    for g in walk_result.groups:
        linear = all((registry.lookup(p.op_type, p.domain) or _NONE).linear_producer for p in g.producers)
        if not (g.producers and linear and all(_homogeneous(r) for r in g.readers)
                and all(slot.at is None for slot in g.slots)):  # the log model indexes whole axes
            continue
        # a BatchNormalization further on (after an activation) normalizes the scale away: not neutral
        norms = {p.norm for p in g.producers if p.norm}
        if all(r.node in norms for r in g.readers if r.op_type == "BatchNormalization"):
            out.append(g)
    return out


def find_rescales(model: onnx.ModelProto, ref_store, restored_store, groups) -> dict[str, np.ndarray]:
    """{group key: log(a) per neuron, 0 where not rescaled} for the exact neutral rescales.

    The estimate and a first exactness screen run on a sample of each neuron's entries (every slot
    of every group, SAMPLE_ENTRIES entries a neuron: an exact rescale shows in all of them); only the
    neurons that pass are checked on all their entries. So a suspect with no exact rescale (noise,
    fine-tuning) costs a sample of the model, and memory stays bounded for huge models."""
    if not groups:
        return {}
    sides = {g.key: structural_sides(g) for g in groups}
    terms = _Terms(groups, sides, ref_store)
    sections = {(g.key, k): _Section(ref_store, restored_store, slot, sample=True)
                for g in groups for k, slot in enumerate(g.slots)}
    scales = {g.key: np.zeros(g.size) for g in groups}
    for _ in range(SWEEPS):
        for g in groups:
            rows = [side * sections[g.key, k].residual(terms, scales, exclude=g.key)
                    for k, side in enumerate(sides[g.key]) if side]
            if not rows:
                continue
            values = np.concatenate(rows, axis=1)
            est = np.zeros(g.size)
            some = ~np.all(np.isnan(values), axis=1)
            if values.shape[1] and some.any():
                est[some] = np.nanmedian(values[some], axis=1)
            scales[g.key] = est
    # medians are robust to what no rescale explains, but two coupled groups can settle at opposite
    # offsets (their shared weight outvotes the few entries that pin each); on exact data a least-
    # squares correction lands on the exact scales: keep whichever the samples say explains more
    candidates = [scales] + ([_polished(groups, sections, terms, scales)]
                             if _offset_rows(sections, terms, scales) else [])
    for c in candidates:
        _keep_exact(groups, sides, c, lambda g, k, live, c=c: _worst(sections[g.key, k].residual(terms, c)[live]))
    scales = max(candidates, key=lambda c: sum(int(np.count_nonzero(v)) for v in c.values()))
    # the survivors on all their entries (a few neurons' rows at a time)
    _keep_exact(groups, sides, scales,
                lambda g, k, live: _full_worst(ref_store, restored_store, g.slots[k], live, terms, scales))
    return {k: v for k, v in scales.items() if np.any(np.abs(v) >= MIN_LOG_SCALE)}


def _offset_rows(sections, terms, scales) -> bool:
    """Some slot has rows whose residuals are one constant, not zero: what exact rescales with an
    offset left between coupled groups look like (noise leaves no constant rows)."""
    for sec in sections.values():
        res = sec.residual(terms, scales)
        enough = (~np.isnan(res)).sum(axis=1) >= 2
        if not enough.any():
            continue
        res = res[enough]
        level = np.nanmedian(res, axis=1)
        flat = np.nanmax(np.abs(res - level[:, None]), axis=1) <= EXACT
        if np.any(flat & (np.abs(level) > EXACT)):
            return True
    return False


def _polished(groups, sections, terms: "_Terms", scales) -> dict[str, np.ndarray]:
    """scales plus the least-squares correction that best explains the sampled residuals (scipy's
    lsqr on the sparse system: one equation per sampled entry, side coefficients per grouped axis)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import lsqr

    offset, unknowns = {}, 0
    for g in groups:
        offset[g.key], unknowns = unknowns, unknowns + g.size
    rows, cols, rhs, equations = [], [], [], 0
    for sec in sections.values():
        res = np.broadcast_to(sec.log_ratio - terms.model(sec.slot.weight, sec.index, scales), sec.log_ratio.shape)
        finite = np.flatnonzero(~np.isnan(res).reshape(-1))
        coords = np.unravel_index(finite, res.shape)
        for axis, key, side, neuron_at in terms.by_weight[sec.slot.weight]:
            at = neuron_at[sec.index[axis][coords[axis]]]
            hit = np.flatnonzero(at >= 0) if side else np.zeros(0, dtype=np.int64)
            rows.append(equations + hit)
            cols.append(np.stack([offset[key] + at[hit], np.full(len(hit), side)]))
        rhs.append(res.reshape(-1)[finite])
        equations += len(finite)
    if not equations or not unknowns:
        return {k: v.copy() for k, v in scales.items()}
    col = np.concatenate(cols, axis=1)
    A = csr_matrix((col[1].astype(np.float64), (np.concatenate(rows), col[0])), shape=(equations, unknowns))
    delta = lsqr(A, np.concatenate(rhs), atol=1e-14, btol=1e-14, iter_lim=LSQR_ITERATIONS)[0]
    return {g.key: scales[g.key] + delta[offset[g.key]:offset[g.key] + g.size] for g in groups}


def _keep_exact(groups, sides, scales, worst_of) -> None:
    """Zero the scales of neurons the model does not explain exactly, or without support on both
    sides; repeat until nothing changes (a neuron let go changes its neighbours' residuals).
    worst_of(group, slot number, neurons) -> (largest |residual|, supported entries) per neuron."""
    for _ in range(SWEEPS):
        changed = False
        for g in groups:
            live = np.flatnonzero(scales[g.key])
            if not len(live):
                continue
            worst = np.zeros(len(live))
            seen = {1: np.zeros(len(live), dtype=np.int64), -1: np.zeros(len(live), dtype=np.int64)}
            for k, side in enumerate(sides[g.key]):
                w, n = worst_of(g, k, live)
                worst = np.fmax(worst, w)
                if side:  # a slot inside the producer must be unchanged, and is no support
                    seen[side] += n
            bad = (worst > EXACT) | (seen[1] < MIN_SUPPORT) | (seen[-1] < MIN_SUPPORT)
            if bad.any():
                scales[g.key][live[bad]] = 0.0
                changed = True
        if not changed:
            break


def _worst(res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest |residual| and the number of supported (non-NaN) entries."""
    finite = ~np.isnan(res)
    return np.where(finite, np.abs(res), 0.0).max(axis=1, initial=0.0), finite.sum(axis=1)


def rescaled(scales: dict[str, np.ndarray]) -> int:
    """Number of neurons found rescaled."""
    return sum(int(np.count_nonzero(np.abs(v) >= MIN_LOG_SCALE)) for v in scales.values())


class _Terms:
    """The log-scale model's terms on each weight: (axis, group key, side, neuron at each position
    along the axis or -1)."""

    def __init__(self, groups, sides, store):
        self.by_weight: dict[str, list] = {}
        for g in groups:
            for side, slot in zip(sides[g.key], g.slots):
                neuron_at = np.full(store.shape(slot.weight)[slot.axis], -1, dtype=np.int64)
                neuron_at[slot.positions] = np.arange(g.size)[:, None]
                self.by_weight.setdefault(slot.weight, []).append((slot.axis, g.key, side, neuron_at))

    def model(self, weight: str, index: list[np.ndarray], scales, exclude: str | None = None):
        """Sum of side * log(a) over the grouped axes, on the sub-grid np.ix_(*index)."""
        total = 0.0
        for axis, key, side, neuron_at in self.by_weight[weight]:
            if key == exclude or not np.any(scales[key]):
                continue
            at = neuron_at[index[axis]]
            values = np.where(at >= 0, side * scales[key][np.maximum(at, 0)], 0.0)
            shape = [1] * len(index)
            shape[axis] = -1
            total = total + values.reshape(shape)
        return total


def _log_ratio(ref_store, restored_store, weight: str, index: list[np.ndarray]) -> np.ndarray:
    """log|restored / reference| on a sub-grid; NaN where the two are not non-zero with one sign."""
    r = ref_store.get_grid(weight, index).astype(np.float64)
    s = restored_store.get_grid(weight, index).astype(np.float64)
    ok = (r != 0) & (s != 0) & (np.sign(r) == np.sign(s)) & np.isfinite(r) & np.isfinite(s)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, np.log(np.abs(s) / np.where(ok, np.abs(r), 1.0)), np.nan)


def _neuron_rows(x: np.ndarray, axis: int, n: int) -> np.ndarray:
    """(neurons, entries): the slot's axis (neuron-major positions) first, the rest flattened."""
    return np.moveaxis(x, axis, 0).reshape(n, -1)


class _Section:
    """One slot's log ratios for some of its neurons (all by default): their positions along the
    slot's axis and, on the other axes, an evenly spread sample of indices (about SAMPLE_ENTRIES
    entries per neuron) or, with sample=False, all of them."""

    def __init__(self, ref_store, restored_store, slot, sample: bool, neurons: np.ndarray | None = None):
        shape = ref_store.shape(slot.weight)
        positions = slot.positions if neurons is None else slot.positions[neurons]
        others = [a for a in range(len(shape)) if a != slot.axis]
        counts = [shape[a] for a in others]
        if sample:
            counts = spread_counts(counts, max(1, SAMPLE_ENTRIES // positions.shape[1]))
        self.index = [None] * len(shape)
        self.index[slot.axis] = positions.reshape(-1)
        for a, m in zip(others, counts):
            self.index[a] = spread(shape[a], m)
        self.slot, self.n = slot, len(positions)
        self.log_ratio = _log_ratio(ref_store, restored_store, slot.weight, self.index)

    def residual(self, terms: _Terms, scales, exclude: str | None = None) -> np.ndarray:
        """Log ratio minus the model (without group `exclude`): (neurons, entries)."""
        res = self.log_ratio - terms.model(self.slot.weight, self.index, scales, exclude)
        return _neuron_rows(np.broadcast_to(res, self.log_ratio.shape), self.slot.axis, self.n)


def _full_worst(ref_store, restored_store, slot, neurons: np.ndarray, terms: _Terms, scales):
    """_worst of some neurons over every entry of the slot, FULL_CHUNK entries at a time."""
    shape = ref_store.shape(slot.weight)
    row = max(1, math.prod(shape) // max(shape[slot.axis], 1) * slot.positions.shape[1])
    step = max(1, FULL_CHUNK // row)
    worst = np.zeros(len(neurons))
    seen = np.zeros(len(neurons), dtype=np.int64)
    for start in range(0, len(neurons), step):
        part = _Section(ref_store, restored_store, slot, sample=False, neurons=neurons[start:start + step])
        worst[start:start + step], seen[start:start + step] = _worst(part.residual(terms, scales))
    return worst, seen


def undo_rescales(model: onnx.ModelProto, store, groups, scales: dict[str, np.ndarray]) -> int:
    """Divide each rescaled neuron's producer-side slots by a and multiply the rest by a."""
    pending: dict[str, np.ndarray] = {}
    count = 0
    for g in groups:
        log_a = scales.get(g.key)
        if log_a is None:
            continue
        count += int(np.count_nonzero(np.abs(log_a) >= MIN_LOG_SCALE))
        for side, slot in zip(structural_sides(g), g.slots):
            if slot.weight not in pending:
                pending[slot.weight] = store.get(slot.weight).astype(np.float64)
            factor = np.ones(pending[slot.weight].shape[slot.axis])
            factor[slot.positions] = np.exp(-side * log_a)[:, None]
            shape = [1] * pending[slot.weight].ndim
            shape[slot.axis] = -1
            pending[slot.weight] *= factor.reshape(shape)
    for name, array in pending.items():
        store.set(name, array)
    return count
