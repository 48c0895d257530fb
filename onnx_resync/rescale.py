"""Exact estimate (and undo) of neutral rescales: a neuron scaled by a > 0 on the producer side and
1/a on the consumer side, across positively homogeneous activations only (DESIGN.md, integrity).

Pure numpy on a suspect already put in the reference's order. Sides are structural: a slot whose
weight feeds one of the group's producers (rows, bias) is +1, every other slot -1. For every weight
element where both models are non-zero with the same sign, log|suspect / reference| must then equal
the sum over its grouped axes of side * log(a) of the neuron there. The log-scales are found by
alternating per-neuron medians (a few sweeps; exact data converges at once), and a neuron is taken
as rescaled only where that model explains every element of every slot to float rounding; anything
else (noise, fine-tuning, a rescale that does not compensate) is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx

# Readers through which scaling a neuron by a > 0 scales what reaches the consumers by a (and nothing
# else): positively homogeneous activations and linear ops. "Op/2" (two labelled inputs) is not
# listed for Mul or MatMul: a product of two scaled activations scales by a^2. (An Add of a constant
# that is not a slot would break it; the ORT check after the undo catches that, and resync then keeps
# the rescale.)
HOMOGENEOUS_READERS = {
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool",
    "Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat",
    "Split", "Slice", "Gather", "Pad", "Resize", "Upsample", "Add", "Sub", "Mul", "Sum",
    "Conv", "ConvTranspose", "Gemm", "MatMul", "ReduceSum", "ReduceMean", "ReduceMax",
    "SpaceToDepth", "DepthToSpace", "Tile", "Expand",
}
HOMOGENEOUS_READERS |= {f"{op}/{k}" for op in ("Add", "Sub", "Sum", "Concat") for k in range(2, 9)}
LINEAR_PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # not an RNN: its state feeds back
EXACT = 1e-5  # residual in log|ratio| allowed per element (float32 rounding is ~1e-7)
MIN_LOG_SCALE = 1e-4  # smaller is no rescale
MIN_SUPPORT = 2  # non-zero entries needed on each side of a neuron to see its compensation
SWEEPS = 4


def structural_sides(model: onnx.ModelProto, group) -> list[int]:
    """+1 for slots on the producer side of `group` (weights its producers read), -1 otherwise."""
    nodes = {n.name or n.op_type: n for n in model.graph.node}
    fed = {i for p in group.producers if p in nodes for i in nodes[p].input}
    return [1 if slot.weight in fed else -1 for slot in group.slots]


def neutral_groups(model: onnx.ModelProto, walk_result) -> list:
    """Groups made by linear producers whose activations only meet positively homogeneous or linear
    ops: there, a neuron scaled by a on the producer side and 1/a on the rest computes the same."""
    ops = {n.name or n.op_type: n.op_type for n in model.graph.node}
    return [g for g in walk_result.groups
            if all(r in HOMOGENEOUS_READERS for r in g.readers)
            and g.producers and all(ops.get(p) in LINEAR_PRODUCERS for p in g.producers)]


def find_rescales(model: onnx.ModelProto, ref_store, restored_store, groups) -> dict[str, np.ndarray]:
    """{group key: log(a) per neuron, 0 where not rescaled} for the exact neutral rescales."""
    if not groups:
        return {}
    sides = {g.key: structural_sides(model, g) for g in groups}
    names = sorted({slot.weight for g in groups for slot in g.slots})
    logratio = {}
    for name in names:
        r = ref_store.get(name).astype(np.float64)
        s = restored_store.get(name).astype(np.float64)
        ok = (r != 0) & (s != 0) & (np.sign(r) == np.sign(s)) & np.isfinite(r) & np.isfinite(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            logratio[name] = np.where(ok, np.log(np.abs(s) / np.where(ok, np.abs(r), 1.0)), np.nan)
    scales = {g.key: np.zeros(g.size) for g in groups}
    for _ in range(SWEEPS):
        for g in groups:
            rows = [sides[g.key][k] * _residual_rows(logratio, groups, sides, scales, slot, exclude=g.key)
                    for k, slot in enumerate(g.slots)]
            values = np.concatenate(rows, axis=1)
            est = np.zeros(g.size)
            some = ~np.all(np.isnan(values), axis=1)
            if values.shape[1] and some.any():
                est[some] = np.nanmedian(values[some], axis=1)
            scales[g.key] = est
    for _ in range(SWEEPS):  # keep only neurons the model explains exactly, seen on both sides
        changed = False
        for g in groups:
            worst = np.zeros(g.size)
            seen = {1: np.zeros(g.size, dtype=np.int64), -1: np.zeros(g.size, dtype=np.int64)}
            for side, slot in zip(sides[g.key], g.slots):
                res = _residual_rows(logratio, groups, sides, scales, slot)
                finite = ~np.isnan(res)
                seen[side] += finite.sum(axis=1)
                worst = np.fmax(worst, np.where(finite, np.abs(res), 0.0).max(axis=1, initial=0.0))
            bad = (worst > EXACT) | (seen[1] < MIN_SUPPORT) | (seen[-1] < MIN_SUPPORT)
            if np.any(bad & (scales[g.key] != 0)):
                scales[g.key][bad] = 0.0
                changed = True
        if not changed:
            break
    return {k: v for k, v in scales.items() if np.any(np.abs(v) >= MIN_LOG_SCALE)}


def rescaled(scales: dict[str, np.ndarray]) -> int:
    """Number of neurons found rescaled."""
    return sum(int(np.count_nonzero(np.abs(v) >= MIN_LOG_SCALE)) for v in scales.values())


def _residual_rows(logratio, groups, sides, scales, slot, exclude: str | None = None) -> np.ndarray:
    """log ratio minus the model (without group `exclude`), one row per neuron of the slot's group."""
    L = logratio[slot.weight]
    model = np.zeros_like(L)
    for g in groups:
        if g.key == exclude:
            continue
        for k, s in enumerate(g.slots):
            if s.weight == slot.weight and np.any(scales[g.key]):
                per_position = np.zeros(L.shape[s.axis])
                per_position[s.positions] = sides[g.key][k] * scales[g.key][:, None]
                shape = [1] * L.ndim
                shape[s.axis] = -1
                model = model + per_position.reshape(shape)
    res = L - model
    n = slot.positions.shape[0]
    return np.moveaxis(np.take(res, slot.positions.reshape(-1), axis=slot.axis), slot.axis, 0).reshape(n, -1)


def undo_rescales(model: onnx.ModelProto, store, groups, scales: dict[str, np.ndarray]) -> int:
    """Divide each rescaled neuron's producer-side slots by a and multiply the rest by a."""
    pending: dict[str, np.ndarray] = {}
    count = 0
    for g in groups:
        log_a = scales.get(g.key)
        if log_a is None:
            continue
        count += int(np.count_nonzero(np.abs(log_a) >= MIN_LOG_SCALE))
        for side, slot in zip(structural_sides(model, g), g.slots):
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
