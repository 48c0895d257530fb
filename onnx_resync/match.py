"""Match a suspect's neurons to the reference's: one permutation per walker group (DESIGN.md, matching).

Pure numpy on the arrays the groups point at; scipy is imported only when an assignment is solved.

A neuron's feature is its slice in every slot of its group. Other axes of a slot that belong to a
group already resolved are aligned (the suspect is reindexed with that group's permutation, the
group's own other axes, e.g. an RNN's recurrent weight, with its current estimate); axes of groups
not yet resolved are summarized by sorting along them, which no permutation of them changes. Similarity of two neurons is
the mean of their per-slot cosines weighted by slot size, so rescaling one slot (the ReLU rescale
attack) leaves it at 1.

A topological sweep gives a starting point (for large groups on a random sample of feature columns).
Then coordinate descent: every group is solved with all the others fixed (all axes aligned), and the
neighbours of every group whose answer changed are solved again, until nothing changes. Each solve
is a linear assignment on the similarity matrix, with the mutual-best shortcut; the statistics of
the final solve are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelMismatchError
from .permute import PermutationRecord
from .walk import WalkResult

AGREE = 1.0  # a group agrees (its matches stand out) at this evidence or more
INFORMATIVE = 3.0  # a group votes if an exact copy would give this much (capacity) or it gives it
SHORTCUT_MARGIN = 0.05  # cosine gap to the runner-up (row and column) for a mutual best to be accepted
NULL_COLUMNS = 128  # unrelated suspect neurons sampled per row to estimate the null spread of cosines
RESCALE_DETECT = 0.1  # |log norm ratio| (against the slot's median) that counts as a rescaled slot
RESCALE_ONE_SIDED = float(np.log(1.5))  # a slot this far from its median, the others not: one-sided
SKETCH_DIM = 1024  # the starting sweep compares a random sample of this many feature columns ...
SKETCH_WORK = 1 << 28  # ... where n * n * feature width exceeds this
CHUNK_ELEMENTS = 1 << 24  # rows of a similarity matrix processed at a time (memory bound)

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
    ref_class: np.ndarray  # interchangeable class of each reference neuron (-1: unique)
    sus_class: np.ndarray  # same for each suspect neuron, in the suspect's order
    shortcut: int  # neurons settled by the mutual-best shortcut
    solved: int  # neurons that went through the assignment solve
    rescale_detected: int = 0  # neurons with an opposite-sign norm pattern (see rescale.py for exact)
    rescale_one_sided: int = 0  # neurons with one slot's norm far off and no compensation
    capacity: float = float("nan")  # evidence an exact copy would give (computed where evidence < INFORMATIVE)

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
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.axis_groups: dict[tuple[str, int], list] = {}
        weight_groups: dict[str, set[int]] = {}
        for gi, g in enumerate(self.groups):
            for slot in g.slots:
                self.axis_groups.setdefault((slot.weight, slot.axis), []).append((gi, slot))
                weight_groups.setdefault(slot.weight, set()).add(gi)
        # groups with two axes of one weight (an RNN's recurrent weight): solved against themselves
        self.self_coupled = {gi for gi, g in enumerate(self.groups)
                             if len({s.weight for s in g.slots}) < len(g.slots)}
        self.neighbours = [set() for _ in self.groups]
        for members in weight_groups.values():
            for gi in members:
                self.neighbours[gi] |= members - {gi}
        self.solves = 0

    def run(self, max_passes: int) -> MatchResult:
        # a starting point: topological sweep, axes of groups not resolved yet summarized, large
        # similarity matrices on a sample of the feature columns
        for gi in range(len(self.groups)):
            self.solve(gi, sweep=True)
        # coordinate descent: each group solved with every other group fixed, until nothing changes
        dirty = set(range(len(self.groups)))
        passes = 0
        while dirty and passes < max_passes:
            changed = set()
            for gi in sorted(dirty):
                old = self.perm[gi]
                self.solve(gi)
                if not np.array_equal(old, self.perm[gi]):
                    changed.add(gi)
            passes += 1
            dirty = set().union(*(self.neighbours[gi] for gi in changed)) if changed else set()
            dirty |= changed & self.self_coupled
        for gi, r in enumerate(self.result):
            if r.evidence < INFORMATIVE:
                r.capacity = self.capacity(gi)
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

    def slot_features(self, gi: int, slot):
        """(reference rows, suspect rows, aligned): one row per neuron, the suspect in its own order;
        aligned: no axis had to be summarized.

        Axes of resolved groups are aligned (the suspect reindexed as apply_permutations would; moves
        of groups sharing an axis, heads and the dims inside them, compose); that includes the
        group's own other axes (an RNN's recurrent weight), at its current estimate. An unresolved
        group on another axis is summarized by sorting along its neurons; one on the slot's own axis
        (dims inside the heads being matched) by sorting inside each neuron's block. The order of a
        row's entries is the same for both models, not the weight's."""
        R, S = self.arrays(slot.weight)
        s = S
        summarize: dict[int, list] = {}
        block_sort = False
        for o in range(R.ndim):
            index = None
            for hj, hslot in self.axis_groups.get((slot.weight, o), ()):
                if hj == gi and o == slot.axis:
                    continue
                if self.perm[hj] is not None:
                    move = np.arange(R.shape[o])
                    move[hslot.positions.reshape(-1)] = hslot.positions[self.perm[hj]].reshape(-1)
                    index = move if index is None else index[move]
                elif o == slot.axis:
                    block_sort = True
                else:
                    summarize.setdefault(o, []).append(hslot.positions)
            if index is not None:
                s = np.take(s, index, axis=o)
        n, b = slot.positions.shape
        xr, xs = _rows(R, slot.axis, slot.positions), _rows(s, slot.axis, slot.positions)
        for o in sorted(summarize, reverse=True):  # (n, b, *other axes); o's place in that
            axis = 2 + (o if o < slot.axis else o - 1)
            xr, xs = _summarize(xr, axis, summarize[o]), _summarize(xs, axis, summarize[o])
        if block_sort:
            xr, xs = np.sort(np.moveaxis(xr, 1, -1), axis=-1), np.sort(np.moveaxis(xs, 1, -1), axis=-1)
        return xr.reshape(n, -1), xs.reshape(n, -1), not summarize and not block_sort

    # ---- one group ---------------------------------------------------------------------------
    def features(self, gi: int, sweep: bool = False) -> "_Features":
        slots = self.groups[gi].slots
        feats = [self.slot_features(gi, slot) for slot in slots]
        f = _Features(np.array([xr.shape[1] for xr, _, _ in feats], dtype=np.int64),
                      np.array([ok for _, _, ok in feats], dtype=bool))
        if not sweep:
            f.nr = np.stack([np.linalg.norm(xr, axis=1) for xr, _, _ in feats], axis=1)
            f.ns = np.stack([np.linalg.norm(xs, axis=1) for _, xs, _ in feats], axis=1)
            f.ref_ids = np.stack([_row_ids(xr) for xr, _, _ in feats], axis=1)
            f.sus_ids = np.stack([_row_ids(xs) for _, xs, _ in feats], axis=1)
        f.fr, f.fs, f.spans = _combined(feats, f.dims)
        return f

    def solve(self, gi: int, sweep: bool = False) -> None:
        self.solves += 1
        f = self.features(gi, sweep)
        n, width = f.fr.shape
        if sweep and width > SKETCH_DIM and n * n * width > SKETCH_WORK:
            cols = np.sort(np.random.default_rng(gi).choice(width, SKETCH_DIM, replace=False))
            C = f.fr[:, cols] @ f.fs[:, cols].T
        else:
            C = f.fr @ f.fs.T
        perm, cos, margin, settled = assign(C, self.margin)
        del C
        self.perm[gi] = perm
        if not sweep:
            self.describe(gi, f, perm, cos, margin, settled)

    def capacity(self, gi: int) -> float:
        """The evidence an exact copy would give: the reference matched against itself."""
        f = self.features(gi)
        C = f.fr @ f.fr.T
        np.fill_diagonal(C, -np.inf)
        runner_up = C.max(axis=1)
        del C
        ident = np.arange(len(runner_up))
        spread = _null_spread(f.fr, f.fr, ident, np.random.default_rng(gi))
        gap = (np.einsum("ij,ij->i", f.fr, f.fr) - runner_up) / np.maximum(spread, 1e-12)
        return float(np.median(gap))

    def describe(self, gi: int, f: "_Features", perm, cos, margin, settled) -> None:
        g = self.groups[gi]
        n = g.size
        rng = np.random.default_rng(gi)
        spread = _null_spread(f.fr, f.fs, perm, rng)
        num = np.sqrt((f.ns[perm] ** 2).sum(axis=1))
        den = np.sqrt((f.nr ** 2).sum(axis=1))
        slot_ratio = np.divide(f.ns[perm], f.nr, out=np.ones_like(f.nr), where=f.nr > 0)
        gap = margin / np.maximum(spread, 1e-12)
        detected, one_sided = _rescales(slot_ratio, f.dims)
        self.result[gi] = GroupMatch(
            key=g.key, size=n, perm=perm, cosine=cos, margin=margin,
            norm_ratio=np.divide(num, den, out=np.ones(n), where=den > 0),
            slot_names=[f"{s.weight}:{s.axis}" for s in g.slots], slot_dims=f.dims, slot_ratio=slot_ratio,
            gap=gap, evidence=float(np.median(gap)),
            ref_class=_classes(f.ref_ids), sus_class=_classes(f.sus_ids), shortcut=int(settled),
            solved=int(n - settled), rescale_detected=detected,
            rescale_one_sided=one_sided,
        )


@dataclass
class _Features:
    dims: np.ndarray  # entries per neuron in each slot
    aligned: np.ndarray  # per slot: every other axis aligned
    nr: np.ndarray | None = None  # (n, slots) norms, reference
    ns: np.ndarray | None = None  # (n, slots) norms, suspect (suspect order)
    ref_ids: np.ndarray | None = None  # (n, slots) equal ids for identical slices
    sus_ids: np.ndarray | None = None
    fr: np.ndarray | None = None  # combined unit features (see _combined)
    fs: np.ndarray | None = None
    spans: list | None = None


def _combined(feats, dims):
    """Unit rows per slot, weighted by sqrt(slot share) and side by side (scalar slots pooled), so
    that a dot product is the size-weighted mean of slot cosines. Returns (ref, sus, column spans)."""
    n = feats[0][0].shape[0]
    total = max(int(dims.sum()), 1)
    small = [k for k, d in enumerate(dims) if d < 2]
    width = int(dims[dims >= 2].sum()) + len(small)
    fr = np.zeros((n, width), dtype=np.float32)
    fs = np.zeros((n, width), dtype=np.float32)
    spans = []
    col = 0
    for k, (xr, xs, _) in enumerate(feats):
        if dims[k] < 2:
            spans.append((0, 0))
            continue
        stop = col + int(dims[k])
        w = float(np.sqrt(dims[k] / total))
        _put_unit(fr[:, col:stop], xr, w)
        _put_unit(fs[:, col:stop], xs, w)
        spans.append((col, stop))
        col = stop
    if small:
        w = float(np.sqrt(len(small) / total))
        _put_unit(fr[:, col:], np.concatenate([feats[k][0] for k in small], axis=1), w)
        _put_unit(fs[:, col:], np.concatenate([feats[k][1] for k in small], axis=1), w)
    return fr, fs, spans


def _put_unit(out: np.ndarray, x: np.ndarray, weight: float) -> None:
    norms = np.linalg.norm(x, axis=1)
    scale = np.divide(weight, norms, out=np.zeros_like(norms), where=norms > 0)
    np.multiply(x, scale[:, None].astype(np.float32), out=out, casting="unsafe")


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
    cbest, c1, c2 = _top2_columns(C)
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
        blk = np.array(C[a:a + step])
        rows = np.arange(len(blk))
        best[a:a + step] = blk.argmax(axis=1)
        first[a:a + step] = blk[rows, best[a:a + step]]
        if m > 1:
            blk[rows, best[a:a + step]] = -np.inf
            second[a:a + step] = blk.max(axis=1)
    return best, first, second


def _top2_columns(C: np.ndarray):
    """Per column: argmax, max, second max, reading C by rows only (no strided copies)."""
    n, m = C.shape
    best = np.zeros(m, dtype=np.int64)
    first = np.full(m, -np.inf, dtype=C.dtype)
    second = np.full(m, -np.inf, dtype=C.dtype)
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    cols = np.arange(m)
    for a in range(0, n, step):
        blk = C[a:a + step]
        arg = blk.argmax(axis=0)
        top = blk[arg, cols]
        if len(blk) > 1:
            part = np.partition(blk, len(blk) - 2, axis=0)[len(blk) - 2]
        else:
            part = np.full(m, -np.inf, dtype=C.dtype)
        # merge the chunk's (top, part) with the running (first, second)
        new_first = np.maximum(first, top)
        second = np.where(top > first, np.maximum(first, part), np.maximum(second, top))
        best = np.where(top > first, arg + a, best)
        first = new_first
    return best, first, second


# ---- helpers ---------------------------------------------------------------------------------
def _as_float(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _reindex(a: np.ndarray, axis: int, positions: np.ndarray, perm: np.ndarray) -> None:
    """In place: apply one group's permutation along `axis` (as permute.apply_permutations does)."""
    view = np.moveaxis(a, axis, 0)
    view[positions.reshape(-1)] = view[positions[perm].reshape(-1)]


def _rows(a: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """(neurons, block, *other axes): each neuron's positions along `axis` (one gather)."""
    n, b = positions.shape
    picked = np.moveaxis(a, axis, 0)[positions.reshape(-1)]
    return picked.reshape((n, b) + picked.shape[1:])


def _summarize(x: np.ndarray, axis: int, groups: list[np.ndarray]) -> np.ndarray:
    """Sort along the neurons of each group on `axis` (positions (n, block)), keeping blocks apart;
    the axis moves last so that the sorts are contiguous. Invariant to those groups' permutations."""
    x = np.moveaxis(x, axis, -1)
    pieces = []
    taken = np.zeros(x.shape[-1], dtype=bool)
    for positions in groups:
        nh, bh = positions.shape
        block = x[..., positions.T.reshape(-1)]
        block = block.reshape(block.shape[:-1] + (bh, nh))
        block.sort(axis=-1)
        pieces.append(block.reshape(block.shape[:-2] + (bh * nh,)))
        taken[positions.reshape(-1)] = True
    if not taken.all():
        pieces.insert(0, x[..., ~taken])
    return np.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


def _unit(x: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    _put_unit(out, x, 1.0)
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


def _row_ids(x: np.ndarray) -> np.ndarray:
    """Equal ids for byte-identical rows."""
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    if x.shape[1] == 0:
        return np.zeros(n, dtype=np.int64)
    view = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).reshape(n)
    return np.unique(view, return_inverse=True)[1].reshape(n)


def _classes(ids: np.ndarray) -> np.ndarray:
    """Class id per neuron for neurons identical in every slot (-1: unique)."""
    n = ids.shape[0]
    _, inverse, counts = np.unique(ids, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(n)
    return np.where(counts[inverse] > 1, inverse, -1)


def _rescales(slot_ratio: np.ndarray, dims: np.ndarray) -> tuple[int, int]:
    """Neurons whose norm is scaled up in some slots and down in others (what rescaling across an
    activation does), and neurons with one slot far off alone. Judged against each slot's median
    ratio, so that what a perturbation does to a whole tensor (noise inflates norms, pruning shrinks
    them) is not taken for a rescale. The exact estimate and its undo are in rescale.py."""
    logs = np.log(np.where(slot_ratio > 0, slot_ratio, 1.0))
    vec = dims >= 2
    if not vec.any():
        return 0, 0
    dev = (logs - np.median(logs, axis=0))[:, vec]
    hi, lo = dev.max(axis=1), dev.min(axis=1)
    two_sided = (hi > RESCALE_DETECT) & (lo < -RESCALE_DETECT) & (np.abs(hi + lo) <= 0.5 * (hi - lo))
    wide = dims[vec] >= 16
    one_sided = ~two_sided & (np.abs(dev[:, wide]).max(axis=1, initial=0.0) > RESCALE_ONE_SIDED)
    return int(two_sided.sum()), int(one_sided.sum())
