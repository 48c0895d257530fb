"""Match a suspect's neurons to the reference's: one permutation per walker group (DESIGN.md, matching).

Pure numpy on the arrays the groups point at; scipy is imported only when an assignment is solved.

A neuron's feature is its slice in every slot of its group. Other axes of a slot that belong to a
group already resolved are aligned (the suspect is reindexed with that group's permutation); axes of
groups not yet resolved (and the group's own other axes, e.g. an RNN's recurrent weight) are
summarized by sorting along them, which no permutation of them changes. Similarity of two neurons is
the mean of their per-slot cosines weighted by slot size, so rescaling one slot (the ReLU rescale
attack) leaves it at 1. Groups are swept in topological order, then the uncertain ones (any neuron not
settled by the mutual-best shortcut) and the neighbours of every group whose answer changed are
solved again, until nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ModelMismatchError
from .permute import PermutationRecord
from .walk import WalkResult

SHORTCUT_MARGIN = 0.05  # cosine gap to the runner-up (row and column) for a mutual best to be accepted
NULL_COLUMNS = 128  # unrelated suspect neurons sampled per row to estimate the null spread of cosines
EVIDENCE_MIN_DIM = 8  # slots with fewer entries per neuron carry no evidence (a bias, a BN scale)
RESCALE_DETECT = 0.05  # |log norm ratio| that counts as a rescaled slot
RESCALE_EXACT = 2e-3  # slots of a neutral rescale agree with +-log(a) (or 0) this closely
CHUNK_ELEMENTS = 1 << 24  # rows of a similarity matrix processed at a time (memory bound)

# Ops through which scaling a neuron by a > 0 scales what reaches the consumers by a (and nothing
# else): positively homogeneous activations and linear ops. "Op/2" (two labelled inputs) is not
# listed for Mul, Div, MatMul: a product of two scaled activations scales by a^2.
HOMOGENEOUS_READERS = {
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool",
    "Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat",
    "Split", "Slice", "Gather", "Pad", "Resize", "Upsample", "Add", "Sub", "Mul", "Div", "Sum",
    "Conv", "ConvTranspose", "Gemm", "MatMul", "ReduceSum", "ReduceMean", "ReduceMax",
    "SpaceToDepth", "DepthToSpace", "Tile", "Expand",
}
HOMOGENEOUS_READERS |= {f"{op}/{k}" for op in ("Add", "Sub", "Sum", "Concat") for k in range(2, 9)}


@dataclass
class GroupMatch:
    """The answer for one group; arrays are indexed by reference neuron."""

    key: str
    size: int
    perm: np.ndarray  # perm[i] = suspect neuron matched to reference neuron i (a PermutationRecord entry)
    cosine: np.ndarray  # similarity of the matched pair (slot-size-weighted mean of slot cosines)
    margin: np.ndarray  # cosine minus the best other suspect neuron's
    norm_ratio: np.ndarray  # ||suspect|| / ||reference|| over all slots
    slot_names: list[str]  # "weight:axis" for each slot
    slot_dims: np.ndarray  # entries per neuron in each slot
    slot_ratio: np.ndarray  # (size, slots) norm ratio per slot
    gap: np.ndarray  # margin in units of the spread of the row's cosines with unrelated suspect neurons
    evidence: float  # median gap: how far matches stand out (unrelated models: about 0)
    slot_z: np.ndarray  # per slot: mean z-score of matched cosines vs unrelated pairs (nan: no evidence)
    aligned_slots: int  # slots whose other axes were all aligned in the last solve
    ref_class: np.ndarray  # interchangeable class of each reference neuron (-1: unique)
    sus_class: np.ndarray  # same for each suspect neuron, in the suspect's order
    shortcut: int  # neurons settled by the mutual-best shortcut
    solved: int  # neurons that went through the assignment solve
    rescale: np.ndarray  # a > 0 per neuron (1: none) where a neutral-looking rescale was found
    slot_sides: np.ndarray  # (size, slots): +1 scaled by a, -1 by 1/a, 0 untouched (only where rescale != 1)
    rescale_detected: int = 0  # neurons with an opposite-sign norm pattern (exact or not)
    neutral: bool = True  # every reader of the group is positively homogeneous
    readers: list[str] = field(default_factory=list)

    @property
    def interchangeable(self) -> np.ndarray:
        """Per reference neuron: it, or the suspect neuron matched to it, has an identical twin."""
        return (self.ref_class >= 0) | (self.sus_class[self.perm] >= 0)


@dataclass
class MatchResult:
    groups: list[GroupMatch]
    passes: int
    solves: int

    def record(self) -> PermutationRecord:
        """Applied to the suspect (permute.apply_permutations), puts it in the reference's order."""
        return PermutationRecord({g.key: g.perm.tolist() for g in self.groups}, notes={"from": "resync"})


def match(ref_store, sus_store, walk: WalkResult, *, max_passes: int = 8,
          shortcut_margin: float = SHORTCUT_MARGIN) -> MatchResult:
    """For every group of `walk` (the reference's), the permutation that maps the suspect back."""
    m = _Matcher(ref_store, sus_store, walk, shortcut_margin)
    return m.run(max_passes)


class _Matcher:
    def __init__(self, ref_store, sus_store, walk: WalkResult, shortcut_margin: float):
        self.ref, self.sus = ref_store, sus_store
        self.groups = walk.groups
        self.margin = shortcut_margin
        self.perm: list[np.ndarray | None] = [None] * len(self.groups)
        self.result: list[GroupMatch | None] = [None] * len(self.groups)
        self.uncertain: set[int] = set()
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.axis_groups: dict[tuple[str, int], list] = {}
        weight_groups: dict[str, set[int]] = {}
        for gi, g in enumerate(self.groups):
            for slot in g.slots:
                self.axis_groups.setdefault((slot.weight, slot.axis), []).append((gi, slot))
                weight_groups.setdefault(slot.weight, set()).add(gi)
        self.neighbours = [set() for _ in self.groups]
        for members in weight_groups.values():
            for gi in members:
                self.neighbours[gi] |= members - {gi}
        self.solves = 0

    def run(self, max_passes: int) -> MatchResult:
        for gi in range(len(self.groups)):
            self.solve(gi)
        # re-solve what is uncertain or was solved before its neighbours were known
        dirty = set(self.uncertain) | {gi for gi, r in enumerate(self.result) if r.aligned_slots < len(r.slot_names)}
        passes = 1
        while dirty and passes <= max_passes:
            changed = set()
            for gi in sorted(dirty):
                old = self.perm[gi]
                self.solve(gi)
                if not np.array_equal(old, self.perm[gi]):
                    changed.add(gi)
            passes += 1
            dirty = set().union(*(self.neighbours[gi] for gi in changed)) if changed else set()
        return MatchResult([r for r in self.result], passes, self.solves)

    # ---- features ----------------------------------------------------------------------------
    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._arrays:
            r, s = self.ref.get(name), self.sus.get(name)
            if r.shape != s.shape:
                raise ModelMismatchError(f"weight {name!r} has shape {list(s.shape)} in the suspect, "
                                         f"{list(r.shape)} in the reference")
            self._arrays[name] = (_as_float(r), _as_float(s))
        return self._arrays[name]

    def slot_features(self, gi: int, slot) -> tuple[np.ndarray, np.ndarray, bool]:
        """(reference rows, suspect rows, aligned): one row per neuron, suspect in its own order."""
        R, S = self.arrays(slot.weight)
        r, s = R, S
        aligned = True
        for o in range(R.ndim):
            if o == slot.axis:
                continue
            for hj, hslot in self.axis_groups.get((slot.weight, o), ()):
                if hj != gi and self.perm[hj] is not None:
                    s = s.copy() if s is S else s
                    _reindex(s, o, hslot.positions, self.perm[hj])
                else:
                    r = r.copy() if r is R else r
                    s = s.copy() if s is S else s
                    _sort_blocks(r, o, hslot.positions)
                    _sort_blocks(s, o, hslot.positions)
                    aligned = False
        return _rows(r, slot.axis, slot.positions), _rows(s, slot.axis, slot.positions), aligned

    # ---- one group ---------------------------------------------------------------------------
    def solve(self, gi: int) -> None:
        self.solves += 1
        g = self.groups[gi]
        n = g.size
        feats = [self.slot_features(gi, slot) for slot in g.slots]
        dims = np.array([xr.shape[1] for xr, _, _ in feats], dtype=np.int64)
        total = max(int(dims.sum()), 1)
        nr = np.stack([np.linalg.norm(xr, axis=1) for xr, _, _ in feats], axis=1)
        ns = np.stack([np.linalg.norm(xs, axis=1) for _, xs, _ in feats], axis=1)
        # combined features: unit rows per slot, weighted by sqrt(slot share); scalars pooled
        blocks_r, blocks_s = [], []
        small = [k for k, d in enumerate(dims) if d < 2]
        for k, (xr, xs, _) in enumerate(feats):
            if dims[k] >= 2:
                w = np.sqrt(dims[k] / total)
                blocks_r.append(_unit(xr, nr[:, k]) * w)
                blocks_s.append(_unit(xs, ns[:, k]) * w)
        if small:
            pr = np.concatenate([feats[k][0] for k in small], axis=1)
            ps = np.concatenate([feats[k][1] for k in small], axis=1)
            w = np.sqrt(len(small) / total)
            blocks_r.append(_unit(pr, np.linalg.norm(pr, axis=1)) * w)
            blocks_s.append(_unit(ps, np.linalg.norm(ps, axis=1)) * w)
        fr = np.concatenate(blocks_r, axis=1) if len(blocks_r) > 1 else blocks_r[0]
        fs = np.concatenate(blocks_s, axis=1) if len(blocks_s) > 1 else blocks_s[0]
        del blocks_r, blocks_s
        C = fr @ fs.T
        perm, cos, margin, settled = assign(C, self.margin)
        del C
        spread = _null_spread(fr, fs, perm, np.random.default_rng(gi))
        del fr, fs
        self.perm[gi] = perm
        if settled < n:
            self.uncertain.add(gi)
        else:
            self.uncertain.discard(gi)
        self.result[gi] = self._summarize(gi, feats, dims, nr, ns, perm, cos, margin, spread, settled)

    def _summarize(self, gi, feats, dims, nr, ns, perm, cos, margin, spread, settled) -> GroupMatch:
        g = self.groups[gi]
        n = g.size
        num = np.sqrt((ns[perm] ** 2).sum(axis=1))
        den = np.sqrt((nr ** 2).sum(axis=1))
        norm_ratio = np.divide(num, den, out=np.ones(n), where=den > 0)
        slot_ratio = np.divide(ns[perm], nr, out=np.ones_like(nr), where=nr > 0)
        gap = margin / np.maximum(spread, 1e-12)
        slot_z = np.full(len(feats), np.nan)
        rng = np.random.default_rng(gi)
        for k, (xr, xs, ok) in enumerate(feats):
            if ok and dims[k] >= EVIDENCE_MIN_DIM:
                slot_z[k] = float(np.mean(_zscores(xr, xs, nr[:, k], ns[:, k], perm, rng)))
        aligned = sum(ok for _, _, ok in feats)
        ref_class = _classes([xr for xr, _, _ in feats])
        sus_class = _classes([xs for _, xs, _ in feats])
        neutral = all(r in HOMOGENEOUS_READERS for r in g.readers)
        rescale, sides, detected = _rescales(slot_ratio, dims)
        return GroupMatch(
            key=g.key, size=n, perm=perm, cosine=cos, margin=margin, norm_ratio=norm_ratio,
            slot_names=[f"{s.weight}:{s.axis}" for s in g.slots], slot_dims=dims, slot_ratio=slot_ratio,
            gap=gap, evidence=float(np.median(gap)), slot_z=slot_z, aligned_slots=int(aligned),
            ref_class=ref_class, sus_class=sus_class, shortcut=int(settled), solved=int(n - settled),
            rescale=rescale, slot_sides=sides, rescale_detected=int(detected), neutral=neutral,
            readers=list(g.readers),
        )


# ---- assignment ------------------------------------------------------------------------------
def assign(C: np.ndarray, margin: float = SHORTCUT_MARGIN):
    """Maximize the total similarity of a bijection rows -> columns.

    Rows whose best column picks them back (mutual best) with a gap of at least `margin` to the
    runner-up, in the row and in the column, are accepted as they are; the O(n^3) solve
    (scipy.optimize.linear_sum_assignment) runs on the rest only.
    Returns (perm, matched similarity, margin to the runner-up, number settled by the shortcut).
    """
    n = C.shape[0]
    rows = np.arange(n)
    rbest, r1, r2 = _top2(C)
    cbest, c1, c2 = _top2(C.T)
    ok = (cbest[rbest] == rows) & (r1 - r2 >= margin) & (c1[rbest] - c2[rbest] >= margin)
    perm = np.full(n, -1, dtype=np.int64)
    perm[ok] = rbest[ok]
    rest_r = np.flatnonzero(~ok)
    if len(rest_r):
        taken = np.zeros(n, dtype=bool)
        taken[perm[ok]] = True
        rest_c = np.flatnonzero(~taken)
        from scipy.optimize import linear_sum_assignment

        ri, ci = linear_sum_assignment(C[np.ix_(rest_r, rest_c)], maximize=True)
        perm[rest_r[ri]] = rest_c[ci]
    matched = C[rows, perm]
    runner_up = np.where(perm == rbest, r2, r1)
    return perm, matched.astype(np.float64), (matched - runner_up).astype(np.float64), int(ok.sum())


def _top2(C: np.ndarray):
    """Per row: argmax, max, second max (in row chunks to bound the temporary copies)."""
    n, m = C.shape
    best = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=C.dtype)
    second = np.full(n, -np.inf, dtype=C.dtype)
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    for a in range(0, n, step):
        blk = np.array(C[a:a + step])  # a copy: C.T chunks are strided
        best[a:a + step] = blk.argmax(axis=1)
        first[a:a + step] = blk[np.arange(len(blk)), best[a:a + step]]
        if m > 1:
            blk[np.arange(len(blk)), best[a:a + step]] = -np.inf
            second[a:a + step] = blk.max(axis=1)
    return best, first, second


# ---- helpers ---------------------------------------------------------------------------------
def _as_float(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _reindex(a: np.ndarray, axis: int, positions: np.ndarray, perm: np.ndarray) -> None:
    """In place: put the suspect's neurons of one group in the reference's order along `axis`."""
    view = np.moveaxis(a, axis, 0)
    view[positions.reshape(-1)] = view[positions[perm].reshape(-1)]


def _sort_blocks(a: np.ndarray, axis: int, positions: np.ndarray) -> None:
    """In place: sort along a group's neurons (keeping each neuron's block structure)."""
    view = np.moveaxis(a, axis, 0)
    block = view[positions]
    block.sort(axis=0)
    view[positions] = block


def _rows(a: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    n = positions.shape[0]
    return np.moveaxis(a, axis, 0)[positions.reshape(-1)].reshape(n, -1)


def _unit(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape, dtype=np.float32)
    nz = norms > 0
    out[nz] = x[nz] / norms[nz, None]
    return out


def _null_spread(fr, fs, perm, rng) -> np.ndarray:
    """Per row: standard deviation of the similarity with a sample of unrelated suspect neurons."""
    n = len(perm)
    cols = np.arange(n) if n <= NULL_COLUMNS + 1 else rng.choice(n, NULL_COLUMNS, replace=False)
    null = fr @ fs[cols].T
    null[cols[None, :] == perm[:, None]] = np.nan
    if null.shape[1] < 2:
        return np.ones(n)
    return np.nan_to_num(np.nanstd(null, axis=1), nan=1.0)


def _zscores(xr, xs, nr, ns, perm, rng) -> np.ndarray:
    """How far each matched cosine stands above the cosines with unrelated suspect neurons."""
    n = len(perm)
    ur, us = _unit(xr, nr), _unit(xs, ns)
    matched = np.einsum("ij,ij->i", ur, us[perm])
    cols = np.arange(n) if n <= NULL_COLUMNS + 1 else rng.choice(n, NULL_COLUMNS, replace=False)
    null = ur @ us[cols].T
    null[cols[None, :] == perm[:, None]] = np.nan
    mean = np.nanmean(null, axis=1)
    std = np.nanstd(null, axis=1)
    return np.where(std > 0, (matched - mean) / np.maximum(std, 1e-12), 0.0)


def _classes(blocks: list[np.ndarray]) -> np.ndarray:
    """Class id per neuron for neurons whose slices are identical in every slot (-1: unique)."""
    n = blocks[0].shape[0]
    ids = np.empty((n, len(blocks)), dtype=np.int64)
    for k, x in enumerate(blocks):
        x = np.ascontiguousarray(x)
        view = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).reshape(n)
        ids[:, k] = np.unique(view, return_inverse=True)[1].reshape(n)
    _, inverse, counts = np.unique(ids, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(n)
    return np.where(counts[inverse] > 1, inverse, -1)


def _rescales(slot_ratio: np.ndarray, dims: np.ndarray):
    """Neurons scaled by a on some slots and 1/a on others (the ReLU rescale symmetry).

    Returns (a per neuron, 1 where none or not exact; sides per slot: +1 scaled by a, -1 by 1/a;
    number of neurons showing an opposite-sign norm pattern at all).
    """
    n, k = slot_ratio.shape
    logs = np.log(np.where(slot_ratio > 0, slot_ratio, 1.0))
    vec = dims >= 2
    if not vec.any():
        vec = np.ones(k, dtype=bool)
    hi = logs[:, vec].max(axis=1)
    lo = logs[:, vec].min(axis=1)
    detected = (hi > RESCALE_DETECT) & (lo < -RESCALE_DETECT)
    level = (hi - lo) / 2
    sides = np.zeros((n, k), dtype=np.int8)
    scale = np.ones(n)
    for i in np.flatnonzero(detected & (np.abs(hi + lo) <= 2 * RESCALE_EXACT)):
        l = level[i]
        up = np.abs(logs[i] - l) <= RESCALE_EXACT
        down = np.abs(logs[i] + l) <= RESCALE_EXACT
        still = np.abs(logs[i]) <= RESCALE_EXACT
        if np.all(up | down | still):
            sides[i] = up.astype(np.int8) - down.astype(np.int8)
            scale[i] = float(np.exp(l))
    return scale, sides, int(detected.sum())
