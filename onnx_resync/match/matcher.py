"""Match a suspect's neurons to the reference's: one permutation per walker group (DESIGN.md, matching).

Pure numpy on the arrays the groups point at; scipy is imported only when an assignment is solved.

A neuron's feature is its slice in every slot of its group. Other axes of a slot that belong to a
group already resolved are aligned (the suspect is reindexed with that group's permutation, the
group's own other axes, e.g. an RNN's recurrent weight, with its current estimate); axes of groups
not yet resolved are summarized by sorting along them, which no permutation of them changes. Similarity of two neurons is
the mean of their per-slot cosines weighted by what each slot carries (its size, times, once the
slot's noise is known, the fraction of the neuron's slice that the noise leaves: _signal), so
rescaling one slot (the ReLU rescale attack) leaves it at 1. 1-D slots (bias, normalization
parameters, quantization scales) compare by a kernel of their values at the slot's own noise
(_scalar_kernel); they weigh as one entry for a neuron whose rows carry it, in full for one whose rows
are drowned (a *decayed* neuron: every slot of 2+ entries below DECAYED of the group's 90th-percentile
norm, trained down to nothing), which they then place. Decayed neurons that nothing tells apart are
interchangeable; the statistics (evidence) come from the *live* neurons (neither decayed nor
interchangeable) and from the slots of 2+ entries only.

Each solve first pairs neurons whose slices are byte-identical (a pure permutation needs nothing
else; in the first sweep this is tried on the slots that need no summary, a producer's rows and
its norm parameters), then runs a linear assignment on the similarity matrix of the rest, with the
mutual-best shortcut; the matched pairs measure each slot's noise, and where that noise drowns some
neuron's slice the group is solved once more with the slots so weighed. A topological sweep gives a starting point (large groups compared on a random
sample of feature columns, first a quarter of it, accepted only with a wide margin; a group whose slots that need no
summary place every neuron by a wide margin alone, a residual stream by its embedding and lm_head,
is *partial*: its other slots are not sorted); then coordinate descent where it is
needed (uncertain groups, groups answered while a neighbour was summarized unless exact, partial
groups, and in turn the neighbours of every group whose answer changed), each group solved with all
the others fixed, until nothing changes; a solve whose inputs (the permutations its slots are read
with, its starting noise) are those of the group's last solve is skipped. The statistics of each
group's last solve are reported.

A group too large to hold as rows (a transformer's residual stream: GROUP_*) is compared throughout
on an evenly spread sample of its entries, read a slot at a time; its norms, hashes and byte
identity come from every entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelMismatchError, UnsupportedError
from ..permute import PermutationRecord
from .gather import take, transposed as _transposed
from .sampling import spread
from ..walk import WalkResult
from .wide import WideSlot

AGREE = 1.0  # a group agrees (its matches stand out) at this evidence or more
INFORMATIVE = 3.0  # a group votes if an exact copy would give this much (capacity) or it gives it
EXACT_COSINE = 1 - 1e-6  # matched similarity of an exact copy (float32 rounding)
SHORTCUT_MARGIN = 0.05  # cosine gap to the runner-up (row and column) for a mutual best to be accepted
NULL_COLUMNS = 128  # unrelated suspect neurons sampled per row to estimate the null spread of cosines
NULL_COLUMNS_WIDE = 32  # the same for a group with wide slots (each costs a product over every entry)
RESCALE_DETECT = 0.1  # |log norm ratio| (against the slot's median) that counts as a rescaled slot
RESCALE_ONE_SIDED = float(np.log(1.5))  # a slot this far from its median, the others not: one-sided
RESCALE_SCALAR_FLOOR = 0.1  # a 1-D slot's ratio counts where its value is at least this x the slot's median
SAMPLE_COLUMNS = 1024  # the sweep compares large groups on a random sample of feature columns ...
SAMPLE_FIRST = SAMPLE_COLUMNS // 4  # ... first this many (where every match stands out, enough) ...
SAMPLE_WORK = 1 << 28  # ... where n * n * feature width exceeds this ...
SAMPLED_MARGIN = 0.25  # ... and accepts a mutual best there only with this margin (else: full solve)
# the sweep solves a group on its slots that need no summary alone (no sort of its other slots along
# unresolved neighbours: a residual stream by its embedding and lm_head, whose other axes are pinned)
# where they hold this many entries per neuron (a sample of them places random rows far apart) ...
PARTIAL_ENTRIES = 1024
PARTIAL_MARGIN = SAMPLED_MARGIN  # ... and every neuron is a mutual best by this margin (else: every slot)
HASH_COLUMNS = 64  # columns per slot hashed to find byte-identical neurons (collisions then compared whole)
WIDE_ENTRIES = 4096  # a slot with this many entries per neuron ...
WIDE_BYTES = 32 << 20  # ... and this many bytes of rows is read in pieces, never copied whole (wide.py)
# ... or this many where the neurons are the weight's rows: they are views then, and reading in
# pieces (the suspect aligned piece by piece) would cost several times the one aligned copy
WIDE_ROWS_BYTES = 512 << 20
# a group whose neurons each have more than GROUP_COLUMNS entries in its 2+-entry slots, that take
# more than GROUP_BYTES per model as rows and cost more than GROUP_WORK multiply-adds per similarity
# matrix (a transformer's residual stream: its neurons' slices of nearly every weight) is compared on
# an evenly spread sample of GROUP_COLUMNS entries per neuron, shared out over its slots by width;
# its norms, hashes and byte-identity are still taken on every entry, a slot at a time (_sampled)
GROUP_COLUMNS = 16384
GROUP_BYTES = 64 << 20
GROUP_WORK = 1 << 35
# such a group's slots are kept between its solves, each while the permutations it was read with
# stand (the embedding and lm_head of a residual stream: read in the first sweep, not again in the descent)
KEEP_SLOTS = True
DECAYED = 1e-3  # a neuron's slot this far below the group's 90th-percentile norm is negligible; a neuron
#                 negligible in every slot of 2+ entries is decayed (functionally inert, see _decayed)
REWEIGHT = 0.9  # a neuron's slot whose expected matched cosine (see _signal) is below this: the group is
#                 solved again with every slot weighed by what it still carries ...
REWEIGH_ROUNDS = 3  # ... until the noise its answer shows is the noise it was weighed with (or this many solves)
TYPICAL_SIGNAL = 0.5  # ... unless the noise drowns the group's typical neuron too (then no copy: no weights)
SCALAR_BINS = 32  # a 1-D slot compared at 1/this of its spread until its noise is known (_scalar_kernel) ...
SCALAR_FLOOR = 1e-4  # ... then at its noise, or at least this x its spread

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
    exact: bool = False  # every neuron has a byte-identical partner (its statistics then come from
    #                      the slots that needed no summary: an exact copy needs no more)
    decayed: np.ndarray | None = None  # per reference neuron: negligible in every slot of 2+ entries
    carry: np.ndarray | None = None  # per reference neuron: how much of the group it carries (0..1)
    noise: np.ndarray | None = None  # per slot: estimated noise norm per neuron (reference units; 0: none)

    @property
    def interchangeable(self) -> np.ndarray:
        """Per reference neuron: it, or the suspect neuron matched to it, has an identical twin (or,
        decayed, nothing tells it from another decayed neuron)."""
        return (self.ref_class >= 0) | (self.sus_class[self.perm] >= 0)

    @property
    def moved(self) -> np.ndarray:
        """Per reference position: the suspect neuron there is not the reference's, nor one the reference
        cannot tell from it (a twin, or a decayed neuron of the same class: any order of those is the
        same model)."""
        n = np.arange(self.size)
        same_class = (self.ref_class >= 0) & (self.ref_class == self.ref_class[self.perm])
        return (self.perm != n) & ~same_class

    @property
    def live(self) -> np.ndarray:
        """Per reference neuron: it carries the model and can be told apart: it votes (evidence)."""
        decayed = self.decayed if self.decayed is not None else np.zeros(self.size, dtype=bool)
        return ~decayed & ~self.interchangeable


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
        self.uncertain: set[int] = set()
        self.pending = [False] * len(self.groups)  # last solve summarized an unresolved neighbour
        self.result: list[GroupMatch | None] = [None] * len(self.groups)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.axis_groups: dict[tuple[str, int], list] = {}
        weight_groups: dict[str, set[int]] = {}
        for gi, g in enumerate(self.groups):
            for slot in g.slots:
                self.axis_groups.setdefault((slot.weight, slot.axis), []).append((gi, slot))
                weight_groups.setdefault(slot.weight, set()).add(gi)
        # per-head groups (the dims inside one head, walk/heads.py) -> their head group: they move
        # positions once the heads have moved, so their moves compose after it (heads are solved
        # first, then each head's dims) and count only where the heads' move is applied
        by_key = {g.key: gi for gi, g in enumerate(self.groups)}
        self.head_of = {gi: by_key.get(g.within[0]) for gi, g in enumerate(self.groups) if g.within}
        for members in self.axis_groups.values():
            members.sort(key=lambda m: m[0] in self.head_of)  # (stable)
        # groups with two axes of one weight (an RNN's recurrent weight): solved against themselves
        self.self_coupled = {gi for gi, g in enumerate(self.groups)
                             if len({s.weight for s in g.slots}) < len(g.slots)}
        self.neighbours = [set() for _ in self.groups]
        for members in weight_groups.values():
            for gi in members:
                self.neighbours[gi] |= members - {gi}
        self.solves = 0
        self.noise: dict[int, dict] = {}  # per group: {slot index: noise norm per neuron} (last solve)
        self._sample_cache: dict = {}  # aligned_only -> (state, rows): the last sampled group's (see features)
        # slot index -> (permutations it was read with, width, norms, sample): the last sampled group's
        # slots, each kept while what it was read with stands (see features)
        self._slot_cache: tuple[int, dict] = (-1, {})
        self.partial: set[int] = set()  # groups whose last solve read only the slots needing no summary
        # what each group's last solve depended on: the noise it started from, the permutations its
        # slots were read with ({group: perm or None}), whether it was a first-sweep shortcut (see solve)
        self._last: dict[int, tuple] = {}
        self._reads: dict | None = None  # the permutations read by the solve under way
        self._by_first = False  # the solve under way took a first-sweep shortcut (partial, aligned only, sampled)
        self._overlaps: dict = {}  # (id(slot), id(slot)) -> they share a position (_overlap; slots live as long)
        self._position_sets: dict = {}  # id(slot) -> its positions, a set (_overlap)

    def run(self, max_passes: int) -> MatchResult:
        # topological sweep: axes of groups not resolved yet are summarized; large groups are
        # compared on a sample of their feature columns first
        for gi in range(len(self.groups)):
            self.solve(gi, first=True)
        # coordinate descent where needed: groups not settled by the shortcut, RNN groups (their own
        # axes can now be aligned), then the neighbours of every group whose answer changed ...
        # ... and the groups answered while a neighbour was summarized, unless their matches are
        # exact (a pure permutation: aligned features cannot say otherwise)
        inexact = {gi for gi, r in enumerate(self.result) if self.pending[gi] and r.cosine.min() < EXACT_COSINE}
        dirty = self.uncertain | self.self_coupled | inexact | self.partial  # (partial: the others' slots unread)
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
            dirty |= changed & self.self_coupled
        for gi, r in enumerate(self.result):
            if r.evidence < INFORMATIVE and not r.exact:
                r.capacity = self.capacity(gi)
        return MatchResult([r for r in self.result], passes, self.solves)

    # ---- features ----------------------------------------------------------------------------
    def _overlap(self, a, b) -> bool:
        """Slots a and b (on one axis of one weight) share some position (once per pair of slots:
        a layer's per-head groups are each read with every other's)."""
        key = (id(a), id(b))
        if key not in self._overlaps:  # (sets of each slot's positions, made once: a pair costs a set test)
            mine, theirs = (self._position_sets.setdefault(id(x), frozenset(x.positions.reshape(-1).tolist()))
                            for x in (a, b))
            self._overlaps[key] = not mine.isdisjoint(theirs)
        return self._overlaps[key]

    def _read(self, gj: int) -> None:
        """Note that the solve under way reads group gj's permutation (or that it has none yet)."""
        if self._reads is not None:
            self._reads[gj] = self.perm[gj]

    def shape(self, name: str) -> tuple[int, ...]:
        """A weight's shape, the same in both models."""
        r, s = self.ref.shape(name), self.sus.shape(name)
        if r != s:
            raise ModelMismatchError(f"weight {name!r} has shape {list(s)} in the suspect, {list(r)} in the reference")
        return r

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(reference, suspect) values of a weight, float. Kept for in-memory weights only: a lazy
        weight is mapped again or computed again (io/lazy.py keeps the newest) when asked, never
        held for the whole run (a cast or dequantized huge model would be held whole)."""
        if name in self._arrays:
            return self._arrays[name]
        self.shape(name)
        r, s = self.ref.get(name), self.sus.get(name)
        if self._lazy(name):
            return r, s  # (as stored: slot_features casts the part it reads, not the whole weight)
        pair = self._arrays[name] = (_as_float(r), _as_float(s))
        return pair

    def _lazy(self, name: str) -> bool:
        """The weight stays on disk or is computed when read, in either model (never kept: arrays)."""
        return self.ref.is_lazy(name) or self.sus.is_lazy(name)

    def slot_features(self, gi: int, slot, aligned_only: bool = False, sampled: bool = False):
        """(reference rows, suspect rows): one row per neuron, the suspect in its own order (None if
        aligned_only and some axis would need a summary). sampled: the caller reads the rows' norms
        and a sample of their columns only, so rows that are a transposed view stay one (not copied).

        Axes of resolved groups are aligned (the suspect reindexed as apply_permutations would; moves
        of groups sharing an axis, heads and the dims inside them, compose); that includes the
        group's own other axes (an RNN's recurrent weight), at its current estimate. An unresolved
        group on another axis is summarized by sorting along its neurons; one on the slot's own axis
        (dims inside the heads being matched) by sorting inside each neuron's block. The order of a
        row's entries is the same for both models, not the weight's.

        A slot in one slice of the weight (slot.at: one direction of an RNN) reads that slice only,
        where the other slices' groups do not reach; a group in one slice seen from a whole-weight
        slot is aligned in its slice, or, unresolved, summarized by sorting the whole axis."""
        shape = self.shape(slot.weight)  # (the weight is read once the plan stands: aligned_only may refuse)
        summarize: dict[int, list] = {}
        presort: dict[int, dict] = {}  # axis -> {head group: its positions}, sorted inside each head first
        indexes: dict[int, np.ndarray] = {}  # axis -> gather index aligning the suspect there
        block_sort = False
        sliced_moves: list = []  # (slot of another group in one slice, its permutation): applied in place
        for o in range(len(shape)):
            index = None
            for hj, hslot in self.axis_groups.get((slot.weight, o), ()):
                if slot.at is not None and hslot.at not in (None, slot.at):
                    continue  # another slice than the one read
                if hj == gi and o == slot.axis and hslot.at == slot.at:
                    continue
                sliced = slot.at is None and hslot.at is not None  # moves one slice of what is read
                resolved = self.perm[hj] is not None
                hh = self.head_of.get(hj, -1)  # a per-head group's head group
                if hj in self.head_of:
                    if o == slot.axis and not self._overlap(hslot, slot):
                        continue  # another head's dims: nothing read moves
                    heads_moved = hh is None or (self.perm[hh] is not None and not (hh == gi and o == slot.axis))
                    if hh is not None and not (hh == gi and o == slot.axis):
                        self._read(hh)
                    if heads_moved:
                        self._read(hj)
                    resolved = resolved and heads_moved
                    if not resolved and not heads_moved and o != slot.axis and not aligned_only:
                        # heads and the dims inside each unresolved: sorted inside every head, then
                        # along the heads (summarize), which no move of either changes
                        presort.setdefault(o, {}).update((h2, hs.positions) for h2, hs in self.axis_groups[(slot.weight, o)] if h2 == hh)
                        continue
                else:
                    self._read(hj)
                if resolved and sliced:
                    sliced_moves.append((hslot, self.perm[hj]))
                elif resolved:  # (in the slot's own slice, moving the whole axis
                    move = np.arange(shape[o])   # changes nothing that is read)
                    move[hslot.positions.reshape(-1)] = hslot.positions[self.perm[hj]].reshape(-1)
                    index = move if index is None else index[move]
                elif aligned_only:
                    return None
                elif o == slot.axis:
                    block_sort = True
                elif sliced:  # sorting the whole axis: invariant to any move in any slice
                    summarize[o] = [np.arange(shape[o])[:, None]]
                else:
                    summarize.setdefault(o, []).append(hslot.positions)
            if index is not None:
                indexes[o] = index
        if not summarize and not presort and not block_sort and slot.at is None and not sliced_moves and \
                WideSlot.worth(shape, slot.axis, slot.positions, WIDE_ENTRIES,
                               WIDE_ROWS_BYTES if slot.axis == 0 else WIDE_BYTES):
            return WideSlot(*self.arrays(slot.weight), slot.axis, slot.positions, indexes)
        n, b = slot.positions.shape
        positions = slot.positions
        if slot.at is None and positions.size < shape[slot.axis]:
            # a part of the axis (a head's block): picked first (the suspect through its alignment
            # there), so that the other axes are aligned and cast on that part only; a lazy weight
            # computes that part alone (a head's columns of a cast or dequantized weight)
            along = indexes.pop(slot.axis, None)
            mine, theirs = positions.reshape(-1), (positions if along is None else along[positions]).reshape(-1)
            if self._lazy(slot.weight) and not sliced_moves:
                R = self.ref.select(slot.weight, [None] * slot.axis + [mine])
                s = self.sus.select(slot.weight, [None] * slot.axis + [theirs])
            else:
                R, s = self._moved(slot.weight, sliced_moves)
                R, s = take(R, mine, axis=slot.axis, same_layout=True), take(s, theirs, axis=slot.axis, same_layout=True)
            positions = np.arange(n * b).reshape(n, b)
        else:
            R, s = self._moved(slot.weight, sliced_moves)
        for o, index in indexes.items():  # (a dequantized weight, a transposed view, stays one: _rows reads it so)
            s = take(s, index, axis=o, same_layout=True)
        (r_part, axis), (s_part, _) = slot.part(R), slot.part(s)
        xr = _as_float(_rows(r_part, axis, positions, copy=not sampled))
        xs = _as_float(_rows(s_part, axis, positions, copy=not sampled))
        gone = [slot.axis] + ([slot.at[0]] if slot.at else [])  # axes not among the other axes
        for o, blocks in presort.items():
            axis = 2 + o - sum(g < o for g in gone)
            for positions in blocks.values():
                xr, xs = _sort_blocks(xr, axis, positions), _sort_blocks(xs, axis, positions)
        for o in sorted(summarize, reverse=True):  # (n, b, *other axes); o's place in that
            axis = 2 + o - sum(g < o for g in gone)
            xr, xs = _summarize(xr, axis, summarize[o]), _summarize(xs, axis, summarize[o])
        if block_sort:  # (the block last and contiguous: a sort along a strided axis is 3x slower)
            xr, xs = np.moveaxis(xr, 1, -1).copy(), np.moveaxis(xs, 1, -1).copy()  # (ours to sort)
            xr.sort(axis=-1)
            xs.sort(axis=-1)
        return xr.reshape(n, -1), xs.reshape(n, -1)

    def _moved(self, name: str, sliced_moves: list) -> tuple[np.ndarray, np.ndarray]:
        """(reference, suspect) values of a weight, the suspect's slices moved by sliced_moves (a copy then)."""
        R, s = self.arrays(name)
        if sliced_moves:
            s = s.copy()
            for hslot, perm in sliced_moves:
                _reindex(*hslot.part(s), hslot.positions, perm)
        return R, s

    # ---- one group ---------------------------------------------------------------------------
    def features(self, gi: int, aligned_only: bool = False, noise: dict | None = None) -> "_Features | None":
        """Every slot's rows (or, with aligned_only, the slots that need no summary; None if none).
        noise: {slot index: noise norm per neuron} from an earlier solve, to weigh each slot by what
        it carries (_signal); None: every non-empty slot at its size's weight."""
        slots = self.groups[gi].slots
        self.pending[gi] = any(self.perm[hj] is None for slot in slots for o in range(len(self.ref.shape(slot.weight)))
                               for hj, _ in self.axis_groups.get((slot.weight, o), ()) if hj != gi)
        columns = self._sample_columns(gi)  # per slot: how many of its entries are compared (None: all)
        # a sampled group's samples are kept while nothing they depend on changes (the group is
        # solved again with other slot weights, its capacity measured): its slots are read, aligned
        # and summarized once, not once per solve
        state = (gi, tuple(None if p is None else p.tobytes() for p in self.perm)) if columns else None
        cached = self._sample_cache.get(aligned_only) if state is not None else None
        if cached is not None and cached[0] == state:
            used, feats, dims, nr, ns, held, keys, pairs, decayed, carry, classes = cached[1]
            if self._reads is not None:
                self._reads.update(cached[2])
        else:
            # (the samples of another group or state go: their memory is free for these)
            self._sample_cache = {a: c for a, c in self._sample_cache.items() if c[0] == state}
            outer, self._reads = self._reads, {}  # (the permutations these samples are read with)
            used, feats, dims, norms = [], [], [], []
            if columns is not None and self._slot_cache[0] != gi:
                self._slot_cache = (gi, {})  # (another group's slots go)
            kept = self._slot_cache[1] if columns is not None and KEEP_SLOTS else {}
            for k, slot in enumerate(slots):  # (a slot at a time: a sampled group holds one slot whole at most)
                old = kept.pop(k, None)
                if old is not None and (old[4] or not aligned_only) and \
                        all(_same(self.perm[hj], p) for hj, p in old[0].items()):
                    # a sampled group's slot read with the permutations of its last read (the embedding
                    # and lm_head of a residual stream, from the first sweep to the descent): the same
                    # norms and sample, not read again (one read aligned_only needed no summary: it is
                    # what a full read gives; a full read may hold a summary aligned_only refuses)
                    self._reads.update(old[0])
                    kept[k] = old
                    used.append(k)
                    dims.append(old[1])
                    norms.append(old[2])
                    feats.append(old[3])
                    continue
                del old
                mine, self._reads = self._reads, {}  # (what this slot is read with)
                rows = self.slot_features(gi, slot, aligned_only, sampled=columns is not None)
                mine, self._reads = self._reads, mine
                self._reads.update(mine)
                if rows is None:
                    continue
                used.append(k)
                dims.append(rows.width if isinstance(rows, WideSlot) else rows[0].shape[1])
                norms.append(rows.norms() if isinstance(rows, WideSlot) else (_row_norms(rows[0]), _row_norms(rows[1])))
                feats.append(rows if columns is None else _sampled(rows, columns[k]))
                del rows
                if columns is not None and KEEP_SLOTS:
                    kept[k] = (mine, dims[-1], norms[-1], feats[-1], aligned_only)
            reads, self._reads = self._reads, outer
            if outer is not None:
                outer.update(reads)
            if not feats:
                return None
            dims = np.array(dims, dtype=np.int64)
            for k, pair in zip(used, norms):
                for side, values in zip(("reference", "suspect"), pair):
                    if not np.isfinite(values).all():  # (norms add up in float64: only NaN or Inf get here)
                        raise UnsupportedError(f"weight {slots[k].weight!r} holds NaN or infinite values in the "
                                               f"{side}: its neurons cannot be compared")
            nr = np.stack([r for r, _ in norms], axis=1)
            ns = np.stack([s for _, s in norms], axis=1)
            # (a sampled group's rows are unit rows of the sample: scaled by the sample's norms)
            held = None if columns is None else [(_row_norms(x[0]), _row_norms(x[1])) for x in feats]
            # byte identity is a matter of every entry: a sampled group's slots are read again for it
            whole = feats if columns is None else _Reread(self, gi, [slots[k] for k in used], aligned_only)
            keys = _keys(feats, whole)
            pairs = _exact_pairs(keys["ref_key"], keys["sus_key"])
            i = np.flatnonzero(pairs >= 0)
            for x in (whole if len(i) else ()):  # the hash said equal: check it
                if isinstance(x, WideSlot):
                    for xr, xs in x.chunks():  # (take: a column gather 4x faster than indexing)
                        mine = xr if len(i) == x.n else take(xr, i, axis=1)  # (all: in order)
                        same = (mine == take(xs, pairs[i], axis=1)).all(axis=0)
                        pairs[i[~same]] = -1
                        i = i[same]
                else:
                    same = _rows_equal(x[0], x[1], i, pairs[i])
                    pairs[i[~same]] = -1
                    i = i[same]
            del whole
            decayed, carry, classes = _decayed(feats, dims, nr)
            if state is not None:
                self._sample_cache[aligned_only] = (state, (used, feats, dims, nr, ns, held, keys, pairs, decayed, carry,
                                                            classes), reads)
        eps = np.array([(noise or {}).get(k, -1.0) for k in used])  # (-1: not known)
        fr, fs, wide, blocks, kernels = _combined(feats, dims, nr, ns, eps, held)
        pairs = pairs.copy()  # (the caller's to change)
        return _Features(slots=used, dims=dims, fr=fr, fs=fs, wide=wide, nr=nr, ns=ns, pairs=pairs, blocks=blocks,
                         kernels=kernels,
                         decayed=decayed, carry=carry, decayed_class=classes, noise=eps, **keys)

    def _sample_columns(self, gi: int) -> list[int] | None:
        """Per slot of the group: how many of its entries per neuron are compared, where the group
        is compared on a sample (GROUP_COLUMNS, shared out by width; 1-D slots whole); None: all."""
        g = self.groups[gi]
        widths = [_slot_width(self.ref.shape(s.weight), s) for s in g.slots]
        total = sum(w for w in widths if w >= 2)
        if total <= GROUP_COLUMNS or g.size * total * 4 <= GROUP_BYTES or g.size * g.size * total <= GROUP_WORK:
            return None
        return [w if w < 2 else max(2, min(w, round(GROUP_COLUMNS * w / total))) for w in widths]

    def solve(self, gi: int, first: bool = False) -> None:
        """Byte-identical neurons are paired outright; the rest go through the assignment.

        The matched pairs then measure the noise of each slot (_noise); where some neuron's slot is
        drowned in it (a decayed neuron: its rows are noise, one quantization level, or zero), the
        group is solved once more with every slot of every neuron weighed by what it still carries,
        so that its other slots (bias, normalization statistics, a consumer's column) place it.

        A descent solve whose inputs are those of the group's last solve (the permutations its slots
        were read with, the noise it started from, no first-sweep shortcut) is skipped: the solve is
        deterministic, its answer would be the same (a head group, never settled by the shortcut,
        is otherwise solved again each pass)."""
        noise = start = self.noise.get(gi)
        last = self._last.get(gi)
        if not first and last is not None and not last[2] and last[0] == noise and \
                all(_same(self.perm[hj], p) for hj, p in last[1].items()):
            return
        self._reads, self._by_first = {}, False
        for _ in range(REWEIGH_ROUNDS):  # until the weights are those its own answer measures
            f, perm, cos, margin, settled, gap, rest = self._solve_once(gi, first, noise)
            new = _noise(f, perm)
            if new is not None and not _drowned(f, new):
                new = None  # nothing drowned: every slot at its size's weight (as without noise)
            if new == noise:
                break
            noise = new
        self.noise[gi] = noise
        perm = self._decayed_by_value(gi, f, perm)
        self._last[gi] = (start, self._reads, self._by_first)
        self._reads = None
        self.perm[gi] = perm
        n = len(perm)
        if settled < n:
            self.uncertain.add(gi)
        else:
            self.uncertain.discard(gi)
        self.describe(gi, f, perm, cos, margin, settled, gap)
        self.result[gi].exact = not len(rest)

    def _decayed_by_value(self, gi: int, f: "_Features", perm: np.ndarray) -> np.ndarray:
        """Decayed neurons that nothing tells apart (one decayed class) are the same model in any
        order, but a storage may still show what they hold: a float16 converter clamps every tiny
        value to +-1e-7 keeping its sign, and a 'decayed' consumer column may still hold values
        float16 keeps. Among the suspect neurons matched to a class, each is put where its values
        are closest (squared difference, then the sign of each entry), so that the restored file
        equals the reference wherever the storage kept something. The neurons matched outside the
        class keep their places."""
        classes = f.decayed_class
        if classes is None or (classes >= 0).sum() < 2 or self._sample_columns(gi) is not None:
            return perm  # (a group compared on a sample is too large to read whole once more)
        pairs = [self.slot_features(gi, self.groups[gi].slots[k]) for k in f.slots]
        pairs = [(np.asarray(r, dtype=np.float64), np.asarray(s_, dtype=np.float64)) for r, s_ in
                 (p for p in pairs if p is not None and not isinstance(p, WideSlot))]
        if not pairs:
            return perm
        from scipy.optimize import linear_sum_assignment

        perm = perm.copy()
        for c in np.unique(classes[classes >= 0]):
            idx = np.flatnonzero(classes == c)
            cand = perm[idx]
            d2 = np.zeros((len(idx), len(idx)))
            agree = np.zeros((len(idx), len(idx)))
            entries = 0
            for r, s_ in pairs:
                r, s_ = r.reshape(r.shape[0], -1)[idx], s_.reshape(s_.shape[0], -1)[cand]
                d2 += (r ** 2).sum(1)[:, None] + (s_ ** 2).sum(1)[None, :] - 2 * r @ s_.T
                agree += np.sign(r) @ np.sign(s_).T + (r == 0).astype(np.float64) @ (s_ == 0).T.astype(np.float64)
                entries += r.shape[1]
            top = d2.max()
            cost = (np.maximum(d2, 0.0) / top if top > 0 else np.zeros_like(d2)) - 1e-3 * agree / max(entries, 1)
            _, col = linear_sum_assignment(cost)
            perm[idx] = cand[col]
        return perm

    def _solve_once(self, gi: int, first: bool, noise: dict | None):
        self.solves += 1
        f = self.features(gi, aligned_only=True, noise=noise) if first else None
        complete = f is not None and len(f.slots) == len(self.groups[gi].slots)
        self.partial.discard(gi)
        if not complete and (f is None or (f.pairs < 0).any() or (_classes(f.ref_key) >= 0).any()):
            if f is not None and int(f.dims[f.dims >= 2].sum()) >= PARTIAL_ENTRIES:
                # the slots that need no summary may place every neuron alone (a residual stream
                # by its embedding and lm_head): no sort of the rest, which the descent then reads
                # aligned; accepted only where every neuron stands out by PARTIAL_MARGIN
                out = self._assign_features(gi, f, first, PARTIAL_MARGIN)
                if out[3] == len(out[0]):
                    self.partial.add(gi)
                    self._by_first = True
                    return (f,) + out
            # no exact copy (or twins that only the other slots tell apart): every slot
            f = self.features(gi, noise=noise)
        elif not complete:  # an exact copy: the slots that need no summary say all there is to say
            self._by_first = True
        return (f,) + self._assign_features(gi, f, first)

    def _assign_features(self, gi: int, f: "_Features", first: bool, margin: float | None = None):
        """perm, cos, margin, settled, gap, rest of one solve on features f; margin: the shortcut's
        (None: the sweep's sampled margin or the matcher's)."""
        perm = f.pairs.copy()
        n, width = len(perm), f.width
        rest = np.flatnonzero(perm < 0)
        sampled = width > SAMPLE_COLUMNS and n * n * width > SAMPLE_WORK and (first or not len(rest))
        self._by_first |= sampled and bool(len(rest))  # (a descent solve compares them all)
        if sampled:
            # an unbiased estimate of every similarity: assignments accepted only with a wide margin,
            # first on SAMPLE_FIRST columns (a copy's matches stand out there already: an MLP's
            # 8192 x 8192 product costs a quarter), on SAMPLE_COLUMNS where some neuron does not
            # (all pairs exact: it only estimates the runner-ups for the report, the small sample)
            samples = (SAMPLE_FIRST, SAMPLE_COLUMNS) if len(rest) else (SAMPLE_FIRST,)
            margin = max(SAMPLED_MARGIN, margin or 0.0)
        else:
            samples = (None,)
            margin = margin or self.margin
        K = _kernel_gram(f.kernels) if f.kernels else None  # (once: the statistics take it out again)
        taken = np.zeros(n, dtype=bool)
        taken[perm[perm >= 0]] = True
        free = np.flatnonzero(~taken)
        for k in samples:
            C = f.gram(kernels=False) if k is None else \
                f.sampled_gram(k, np.random.default_rng(gi), kernels=False)
            if K is not None:
                C += K
            settled = n - len(rest)
            if not len(rest):
                break
            final = k == samples[-1]
            # (all of C: itself, not a copy; assign restores what it changes)
            sub, _, _, ok = assign(C if len(rest) == n else np.ascontiguousarray(C[np.ix_(rest, free)]), margin,
                                   stats=False, solve=final)
            if final or ok == len(rest):
                perm[rest] = free[sub]
                settled += ok
                break
            del C
        rows = np.arange(n)
        runner_up, _ = _runner_up(C, rows, perm, columns=False)
        null_cols = _null_columns(n, np.random.default_rng(gi), NULL_COLUMNS_WIDE if f.wide else NULL_COLUMNS)
        if sampled:  # estimates: the matched pairs and the null sample are computed exactly
            cos, null = f.paired(perm, null_cols)  # (one read of the wide slots for both)
        else:  # every similarity is in C already
            cos, null = C[rows, perm].astype(np.float64), C[:, null_cols]
        margin = cos - runner_up
        # the evidence comes from the slots of 2+ entries: a 1-D slot places a neuron that nothing
        # else does, but one value per neuron agreeing is no evidence of a copy (an inconsistent
        # shuffle keeps each slot's values)
        if K is not None and (f.dims >= 2).any():
            C -= K
            runner_up, _ = _runner_up(C, rows, perm, columns=False)
            null = null - K[:, null_cols]
            margin_v = cos - K[rows, perm] - runner_up
        else:
            margin_v = margin
        del C, K
        gap = margin_v / np.maximum(_spread(null, null_cols, perm), 1e-12)
        return perm, cos, margin, settled, gap, rest

    def capacity(self, gi: int) -> float:
        """The evidence an exact copy would give: the reference matched against itself."""
        f = self.features(gi, noise=self.noise.get(gi))
        vec = bool((f.dims >= 2).any())  # (as the evidence: the 2+-entry slots where there are some)
        C = f.gram(suspect=False, kernels=not vec)
        self_similarity = np.diag(C).astype(np.float64)
        np.fill_diagonal(C, -np.inf)
        runner_up = C.max(axis=1)
        del C
        ident = np.arange(len(runner_up))
        spread = _null_spread(f, ident, np.random.default_rng(gi), suspect=False, kernels=not vec)
        gap = (self_similarity - runner_up) / np.maximum(spread, 1e-12)
        live = ~f.decayed & (f.decayed_class < 0) & (_classes(f.ref_key) < 0)
        return _weighted_median(gap[live], f.carry[live])

    def describe(self, gi: int, f: "_Features", perm, cos, margin, settled, gap) -> None:
        g = self.groups[gi]
        n = g.size
        num = np.sqrt((f.ns[perm] ** 2).sum(axis=1))
        den = np.sqrt((f.nr ** 2).sum(axis=1))
        slot_ratio = np.divide(f.ns[perm], f.nr, out=np.ones_like(f.nr), where=f.nr > 0)
        ref_class = _classes(f.ref_key)
        # decayed neurons that nothing tells apart (no slot beyond the negligible): one class
        ref_class = np.where(f.decayed_class >= 0, f.decayed_class + 2 * n + 1, ref_class)
        sus_class = _classes(f.sus_key)
        live = ~f.decayed & (ref_class < 0) & (sus_class[perm] < 0)
        # a decayed neuron's norm ratio is a ratio of near-zeros (a float16 clamp makes it 1e18): no
        # evidence of a rescale
        detected, one_sided = _rescales(slot_ratio[~f.decayed], f.dims, f.nr[~f.decayed])
        self.result[gi] = GroupMatch(
            # (the 1-D slots' kernels can lift a rounded similarity past 1: a cosine is at most 1)
            key=g.key, size=n, perm=perm, cosine=np.clip(cos, -1.0, 1.0), margin=margin,
            norm_ratio=np.divide(num, den, out=np.ones(n), where=den > 0),
            slot_names=[g.slots[k].name() for k in f.slots], slot_dims=f.dims,
            slot_ratio=slot_ratio,
            gap=gap, evidence=_weighted_median(gap[live], f.carry[live]),
            ref_class=ref_class, sus_class=sus_class, shortcut=int(settled),
            solved=int(n - settled), rescale_detected=detected,
            rescale_one_sided=one_sided, decayed=f.decayed, carry=f.carry,
            noise=np.array([(self.noise.get(gi) or {}).get(k, 0.0) for k in f.slots]),
        )


@dataclass
class _Features:
    """A group's neurons as unit rows, the dot product of two rows being their similarity (see
    _combined): slots of ordinary size held as two matrices, wide slots (wide.py) read in pieces."""

    slots: list[int]  # which of the group's slots
    dims: np.ndarray  # entries per neuron in each slot
    fr: np.ndarray  # combined rows of the slots held, reference
    fs: np.ndarray  # same, suspect (suspect order)
    wide: list  # (WideSlot, reference row scale, suspect row scale): the rest of each row
    nr: np.ndarray  # (n, slots) norms, reference
    ns: np.ndarray  # (n, slots) norms, suspect
    ref_key: np.ndarray  # per neuron: equal keys for neurons identical in every slot (either model)
    sus_key: np.ndarray
    pairs: np.ndarray  # reference neuron -> its byte-identical suspect neuron, -1 (twins in order)
    blocks: dict  # slot (index into slots) -> columns of fr/fs holding it (slots of 2+ entries held)
    kernels: dict  # 1-D slot (index into slots) -> (ref values, sus values, bandwidth, ref scale, sus scale) (_scalar_kernel)
    decayed: np.ndarray  # per reference neuron: negligible in every slot of 2+ entries (_decayed)
    carry: np.ndarray  # per reference neuron: share of the group's typical norm it carries (0..1)
    decayed_class: np.ndarray  # decayed neurons that nothing tells apart share an id (-1: none)
    noise: np.ndarray  # per slot: the noise per neuron the rows were weighed with (-1: not known)

    @property
    def width(self) -> int:
        return self.fr.shape[1] + sum(w.width for w, _, _ in self.wide)

    def gram(self, cols: np.ndarray | None = None, suspect: bool = True, kernels: bool = True) -> np.ndarray:
        """Similarity of every reference neuron with the suspect's (or, suspect=False, the
        reference's) neurons `cols` (None: all), float32 (n, len(cols))."""
        other = self.fs if suspect else self.fr
        C = self.fr @ (other if cols is None else other[cols]).T
        for w, sr, ss in self.wide:
            so = ss if suspect else sr
            if cols is not None:
                so = so[cols]
            part = np.zeros(C.shape)
            for xr, xs in w.chunks():
                xo = xs if suspect else xr
                part += xr.T @ (xo if cols is None else take(xo, cols, axis=1))
            part *= sr[:, None]  # (in place: an n x n matrix of a wide layer is large)
            part *= so[None, :]
            C += part
        if self.kernels and kernels:  # (kernels=False: the 2+-entry slots' part, what evidence reads)
            C += _kernel_gram(self.kernels, cols, suspect)
        return C

    def sampled_gram(self, k: int, rng: np.random.Generator, kernels: bool = True) -> np.ndarray:
        """An unbiased estimate of gram() from about k entries per row: k columns drawn at random
        from the held part, and evenly spread ones from each wide slot, shared out by width."""
        width = self.width
        held = self.fr.shape[1]
        if held:  # (the product scaled in place: an n x n matrix of a wide group is large)
            kh = min(held, max(1, round(k * held / width)))
            cols = np.sort(rng.choice(held, kh, replace=False))
            C = self.fr[:, cols] @ self.fs[:, cols].T
            C *= np.float32(held / kh)
        else:
            C = np.zeros((self.fr.shape[0], self.fs.shape[0]), dtype=np.float32)
        for w, sr, ss in self.wide:
            xr, xs = w.sample(max(1, round(k * w.width / width)))
            # the scales applied to the sample's columns, not to the n x n product
            xr = xr * (sr * (w.width / xr.shape[0]))[None, :].astype(np.float32)
            C += xr.T @ (xs * ss[None, :].astype(np.float32))
        if self.kernels and kernels:  # (exact: cheap)
            C += _kernel_gram(self.kernels)
        return C

    def paired(self, perm: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Similarity of each reference neuron with suspect neuron perm[i] (float64), and
        gram(cols), in one read of the wide slots."""
        cos = np.einsum("ij,ij->i", self.fr, self.fs[perm]).astype(np.float64)
        C = self.fr @ self.fs[cols].T
        for w, sr, ss in self.wide:
            part, cross = np.zeros(len(perm)), np.zeros(C.shape)
            for xr, xs in w.chunks():
                part += np.einsum("ij,ij->j", xr, take(xs, perm, axis=1))
                cross += xr.T @ take(xs, cols, axis=1)
            cos += part * sr * ss[perm]
            C += (cross * sr[:, None] * ss[cols][None, :]).astype(C.dtype)
        for r, s, h, wr, ws in self.kernels.values():
            cos += np.exp(-0.5 * ((r - s[perm]) / h) ** 2) * wr * ws[perm]
        if self.kernels:
            C += _kernel_gram(self.kernels, cols)
        return cos, C


def _combined(feats, dims, nr, ns, noise=None, held_norms=None):
    """Unit rows per slot, each weighted by the square root of its share of the row, side by side,
    so that a dot product is the weighted mean of slot cosines; rows end at unit length.

    A slot's share is its information: for a slot of 2+ entries its size times what the neuron's
    slice still carries against the slot's noise (_signal; 1 where no noise is known), for a 1-D slot
    (a bias, a normalization parameter) the number of levels its spread holds at its noise
    (_scalar_kernel). A neuron drowned in some slots (decayed) is compared on the others. Empty
    slices (dead, pruned) weigh nothing. 1-D slots are compared by a kernel of their values, not
    held in the rows; wide slots are not copied: their part of the rows is the slot read in pieces
    times a scale per row. Returns (ref, sus, [(wide slot, ref scale, sus scale)], {slot: columns
    held}, [(ref values, sus values, bandwidth, ref scale, sus scale)])."""
    n = nr.shape[0]
    noise = np.zeros(len(dims)) if noise is None else noise
    vec = [k for k, d in enumerate(dims) if d >= 2]
    small = [k for k, d in enumerate(dims) if d < 2]
    held = [k for k in vec if not isinstance(feats[k], WideSlot)]
    top = max((int(dims[k]) for k in vec), default=1)
    scalars = {k: _scalar_kernel(feats[k][0], feats[k][1], noise[k], top) for k in small}
    total = max(float(dims[vec].sum()) + sum(x[3] for x in scalars.values()), 1.0)
    columns = {k: feats[k][0].shape[1] for k in held}  # (a sample of the slot: fewer than dims[k])
    width = sum(columns.values())
    out, scales, blocks = [], {}, {}
    for side, norms in ((0, nr), (1, ns)):
        f = np.empty((n, width), dtype=np.float32)
        share = np.zeros(norms.shape)
        for k in vec:
            share[:, k] = (norms[:, k] > 0) * (dims[k] / total) * _signal(norms[:, k], noise[k], side)
        # what the neuron's 2+-entry slots still carry (1: all of it): a 1-D slot's information
        # counts in full only where they do not (a decayed, drowned or pruned neuron), else as one
        # entry: a bias alone never outvotes the rows (an inconsistent shuffle stays unrelated)
        carried = share[:, vec].sum(axis=1) * total / max(float(dims[vec].sum()), 1.0) if vec else np.zeros(n)
        for k in small:
            share[:, k] = (1.0 + (scalars[k][3] - 1.0) * (1.0 - carried)) / total if scalars[k][3] > 0 else 0.0
        length = share.sum(axis=1)
        share = np.divide(share, length[:, None], out=np.zeros_like(share), where=length[:, None] > 0)
        col = 0
        for k in vec:
            scale = np.divide(np.sqrt(share[:, k]), norms[:, k], out=np.zeros(n), where=norms[:, k] > 0)
            if k not in held:
                scales.setdefault(k, []).append(scale)
                continue
            if held_norms is not None:  # a sample: unit rows of what is held
                mine = held_norms[k][side]
                scale = np.divide(np.sqrt(share[:, k]), mine, out=np.zeros(n), where=(mine > 0) & (norms[:, k] > 0))
            stop = col + columns[k]
            np.multiply(feats[k][side], scale[:, None].astype(np.float32), out=f[:, col:stop], casting="unsafe")
            blocks[k] = slice(col, stop)
            col = stop
        for k in small:
            scales.setdefault(k, []).append(np.sqrt(share[:, k]))
        out.append(f)
    wide = [(feats[k], scales[k][0], scales[k][1]) for k in vec if k not in held]
    kernels = {k: scalars[k][:3] + (scales[k][0], scales[k][1]) for k in small if scalars[k][3] > 0}
    return out[0], out[1], wide, blocks, kernels


def _signal(norms: np.ndarray, noise: float, side: int) -> np.ndarray:
    """What a slice of this norm still carries against noise of norm `noise` per neuron: for the
    reference, the cosine expected with its noisy copy, |r| / sqrt(|r|^2 + noise^2); for the
    suspect, the fraction of its norm that is not noise, sqrt(|s|^2 - noise^2) / |s|. 1 without
    noise; about 0 for a slice that the noise drowns (a decayed neuron's rows)."""
    if noise <= 0:
        return np.ones(len(norms))
    if side == 0:
        return norms / np.sqrt(norms ** 2 + noise ** 2)
    return np.divide(np.sqrt(np.maximum(norms ** 2 - noise ** 2, 0.0)), norms, out=np.zeros(len(norms)),
                     where=norms > 0)


def _scalar_kernel(ref: np.ndarray, sus: np.ndarray, noise: float, top: int):
    """A 1-D slot (one value per neuron: bias, normalization scale/shift/statistics, quantization
    scale): (reference values, suspect values, bandwidth h, information). Two neurons compare by
    exp(-(a - b)^2 / 2h^2): equal values 1, values h apart or more about 0. h is the slot's noise (the
    matched pairs' median difference; SCALAR_FLOOR x its spread at least: float rounding) once known,
    1/SCALAR_BINS of its spread before. Its information is the number of levels its spread holds,
    (spread / h)^2 (an entry of a 2+-entry slot counts 1), at most the group's widest slot `top`:
    where rows are drowned and the bias is exact, the bias decides; a slot whose reference values
    are all equal tells nothing (information 0)."""
    r, s = ref.reshape(len(ref), -1)[:, 0].astype(np.float64), sus.reshape(len(sus), -1)[:, 0].astype(np.float64)
    med = np.median(r)
    spread = 1.4826 * np.median(np.abs(r - med)) or r.std()
    if not spread > 0 or not np.isfinite(spread):
        return r, s, 1.0, 0.0
    h = spread / SCALAR_BINS if noise < 0 else max(noise, SCALAR_FLOOR * spread)
    info = 1.0 if noise < 0 else float(min((spread / h) ** 2, top))
    return r, s, h, max(info, 1.0)


def _kernel_gram(kernels, cols: np.ndarray | None = None, suspect: bool = True):
    """The 1-D slots' part of gram(): sum over kernels of ref scale x other scale x kernel value."""
    out = None
    for r, s, h, wr, ws in kernels.values():
        o, wo = (s, ws) if suspect else (r, wr)
        if cols is not None:
            o, wo = o[cols], wo[cols]
        if out is None:
            out = np.zeros((len(r), len(o)), dtype=np.float32)
        step = max(1, (1 << 22) // max(len(o), 1))
        for a in range(0, len(r), step):
            d = ((r[a:a + step, None] - o[None, :]) / h).astype(np.float32)
            np.multiply(d, d, out=d)
            np.multiply(d, np.float32(-0.5), out=d)
            np.exp(d, out=d)
            d *= (wr[a:a + step, None] * wo[None, :]).astype(np.float32)
            out[a:a + step] += d
    return out


def _noise(f: "_Features", perm: np.ndarray) -> dict | None:
    """Per slot of 2+ entries: the noise norm per neuron (reference units) that the matched pairs
    show, |r| tan(angle between r and its match), median over the upper half of the neurons by norm
    (the ones that surely carry the slot: their matches are right). None where every slot matched
    exactly (nothing to weigh)."""
    out, any_noise = {}, False
    for k, cos in _slot_cosines(f, perm).items():
        r = f.nr[:, k]
        upper = (r >= np.median(r)) & (r > 0) & (f.ns[perm, k] > 0)
        if not upper.any():
            continue
        c = np.clip(cos[upper], 1e-3, 1.0)
        eps = float(np.median(r[upper] * np.sqrt(1 - c ** 2) / c))
        if _signal(np.percentile(r, 90, keepdims=True), eps, 0)[0] < TYPICAL_SIGNAL:
            return None  # the group's typical neurons do not match: no copy whose noise to measure
        out[f.slots[k]] = eps
        any_noise |= eps > 0
    for k, (r, s, _, _, _) in f.kernels.items():
        out[f.slots[k]] = float(np.median(np.abs(s[perm] - r)))
    return out if any_noise else None


def _slot_cosines(f: "_Features", perm: np.ndarray) -> dict[int, np.ndarray]:
    """Per slot of 2+ entries (index into f.slots): cosine of each reference neuron with its match."""
    out = {}
    for k, cols in f.blocks.items():
        a, b = f.fr[:, cols], f.fs[perm, cols]  # (only the slot's columns gathered)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        out[k] = np.divide(np.einsum("ij,ij->i", a, b), den, out=np.zeros(len(perm)), where=den > 0)
    wide_at = [k for k, d in enumerate(f.dims) if d >= 2 and k not in f.blocks]
    for k, (w, _, _) in zip(wide_at, f.wide):
        dot = np.zeros(len(perm))
        for xr, xs in w.chunks():
            dot += np.einsum("ij,ij->j", xr, take(xs, perm, axis=1))
        den = f.nr[:, k] * f.ns[perm, k]
        out[k] = np.divide(dot, den, out=np.zeros(len(perm)), where=den > 0)
    return out


def _drowned(f: "_Features", noise: dict) -> bool:
    """Some neuron's slot of 2+ entries carries less than REWEIGHT against the slot's noise."""
    return any(f.dims[j] >= 2 and noise.get(k, 0.0) > 0 and (_signal(f.nr[:, j], noise[k], 0) < REWEIGHT).any()
               for j, k in enumerate(f.slots))


def _decayed(feats, dims, nr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per reference neuron: decayed (every slot of 2+ entries below DECAYED x the group's 90th
    percentile norm in that slot: trained down to nothing, functionally inert), how much of the group
    it carries (mean over those slots, by size, of its norm against the 90th percentile, capped at 1),
    and a class id shared by decayed neurons that nothing tells apart (their 1-D values equal, the
    negligible ones taken as 0; -1: none)."""
    n = nr.shape[0]
    vec = [k for k, d in enumerate(dims) if d >= 2]
    if not vec:
        return np.zeros(n, dtype=bool), np.ones(n), np.full(n, -1, dtype=np.int64)
    p90 = np.percentile(nr[:, vec], 90, axis=0)
    rel = np.divide(nr[:, vec], p90, out=np.zeros((n, len(vec))), where=p90 > 0)
    decayed = (rel <= DECAYED).all(axis=1)
    carry = (np.minimum(rel, 1.0) * dims[vec]).sum(axis=1) / dims[vec].sum()
    classes = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(decayed)
    if len(idx) > 1:
        values = [np.zeros(len(idx))]
        for k, d in enumerate(dims):
            if d < 2:
                v = feats[k][0].reshape(n, -1)[:, 0].astype(np.float64)
                tiny = np.abs(v) <= DECAYED * np.percentile(np.abs(v), 90)
                values.append(np.where(tiny, 0.0, v)[idx])
        _, inverse, counts = np.unique(np.stack(values, axis=1), axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        shared = counts[inverse] > 1
        classes[idx[shared]] = inverse[shared]
    return decayed, carry, classes


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Median of `values` with `weights` (NaN: no values; equal weights: the ordinary median)."""
    if not len(values):
        return float("nan")
    if not np.any(weights > 0) or np.all(weights == weights[0]):
        return float(np.median(values))
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][min(np.searchsorted(cum, 0.5 * cum[-1]), len(values) - 1)])


COMPARE_BLOCK_BYTES = 1 << 20


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Two permutations (or None: not resolved) are the same."""
    return a is b or (a is not None and b is not None and np.array_equal(a, b))


def _rows_equal(a: np.ndarray, b: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Per k: row rows_a[k] of a equals row rows_b[k] of b, entry for entry; a block of rows at a
    time, so that no copy of a whole slot is made (rows_a all of a, in order: views)."""
    out = np.empty(len(rows_a), dtype=bool)
    in_order = len(rows_a) == len(a) and (rows_a == np.arange(len(a))).all()
    step = max(1, COMPARE_BLOCK_BYTES // max(1, a[0].nbytes if len(a) else 1))
    for start in range(0, len(rows_a), step):
        stop = min(start + step, len(rows_a))
        mine = a[start:stop] if in_order else take(a, rows_a[start:stop], axis=0)
        out[start:stop] = (mine == take(b, rows_b[start:stop], axis=0)).all(axis=1)
    return out


def _row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row; squares that overflow float32 are added up again in float64. (einsum:
    no temporary the size of x, which linalg.norm makes.)"""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if not np.isfinite(norms).all():
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return norms


def _put_unit(out: np.ndarray, x: np.ndarray, weight: float) -> None:
    norms = np.linalg.norm(x, axis=1)
    scale = np.divide(weight, norms, out=np.zeros_like(norms), where=norms > 0)
    np.multiply(x, scale[:, None].astype(np.float32), out=out, casting="unsafe")


# ---- assignment ------------------------------------------------------------------------------
def assign(C: np.ndarray, margin: float = SHORTCUT_MARGIN, stats: bool = True, solve: bool = True):
    """Maximize the total similarity of a bijection rows -> columns.

    Rows whose best column picks them back (mutual best) with a gap of at least `margin` to the
    runner-up, in the row and in the column, are accepted as they are; the O(n^3) solve
    (scipy.optimize.linear_sum_assignment) runs on the rest only. A few passes over C, no copies
    (C is modified and restored).
    Returns (perm, matched similarity, margin to the runner-up, number settled by the shortcut);
    stats=False: (perm, None, None, settled), one pass over C fewer; solve=False: the shortcut alone
    (perm -1 where it did not settle a row; with stats=False only).
    """
    n = C.shape[0]
    rows = np.arange(n)
    rbest = C.argmax(axis=1)
    r1 = C[rows, rbest]
    mutual = np.flatnonzero(r1 >= C.max(axis=0)[rbest])
    mutual = mutual[np.unique(rbest[mutual], return_index=True)[1]]  # one row per column (ties)
    r2, c2 = _runner_up(C, mutual, rbest[mutual])
    ok = np.zeros(n, dtype=bool)
    ok[mutual] = (r1[mutual] - r2[mutual] >= margin) & (r1[mutual] - c2[rbest[mutual]] >= margin)
    perm = np.full(n, -1, dtype=np.int64)
    perm[ok] = rbest[ok]
    rest_r = np.flatnonzero(~ok)
    if len(rest_r) and not solve:
        return perm, None, None, int(ok.sum())
    if len(rest_r):
        taken = np.zeros(n, dtype=bool)
        taken[perm[ok]] = True
        rest_c = np.flatnonzero(~taken)
        from scipy.optimize import linear_sum_assignment

        ri, ci = linear_sum_assignment(C[np.ix_(rest_r, rest_c)], maximize=True)
        perm[rest_r[ri]] = rest_c[ci]
    if not stats:
        return perm, None, None, int(ok.sum())
    matched = C[rows, perm]
    runner_up, _ = _runner_up(C, rows, perm, columns=False)
    return perm, matched.astype(np.float64), (matched - runner_up).astype(np.float64), int(ok.sum())


def _runner_up(C: np.ndarray, rows: np.ndarray, cols: np.ndarray, columns: bool = True):
    """Row and column maxima of C with the entries (rows, cols) left out."""
    saved = C[rows, cols].copy()
    C[rows, cols] = -np.inf
    try:
        return C.max(axis=1), (C.max(axis=0) if columns else None)
    finally:
        C[rows, cols] = saved


# ---- helpers ---------------------------------------------------------------------------------
def _as_float(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _reindex(a: np.ndarray, axis: int, positions: np.ndarray, perm: np.ndarray) -> None:
    """In place: apply one group's permutation along `axis` (as permute.apply_permutations does)."""
    view = np.moveaxis(a, axis, 0)
    view[positions.reshape(-1)] = view[positions[perm].reshape(-1)]


def _rows(a: np.ndarray, axis: int, positions: np.ndarray, copy: bool = True) -> np.ndarray:
    """(neurons, block, *other axes): each neuron's positions along `axis` (one gather). A matrix's
    rows or columns in order are C-ordered rows, copied by tiles where they lie across the storage
    (copy=False: the transposed view then, for a reader of norms and a sample of columns)."""
    n, b = positions.shape
    in_order = positions.size == a.shape[axis] and (positions.reshape(-1) == np.arange(a.shape[axis])).all()
    if axis == 0 and in_order and a.ndim == 2 and a.flags.f_contiguous and not a.flags.c_contiguous and copy:
        return _transposed(a.T).reshape((n, b) + a.shape[1:])  # (rows of a transposed view)
    if axis == 0 and in_order:
        return a.reshape((n, b) + a.shape[1:])  # the neurons are the rows, in order: a view
    if axis == 1 and in_order and a.size == a.shape[0] * a.shape[1]:  # a matrix's columns, in order
        m = a.reshape(a.shape[0], a.shape[1])  # (a transposed view, a dequantized weight: its transpose is C-ordered)
        return (m.T if m.flags.f_contiguous or not copy else _transposed(m)).reshape((n, b) + a.shape[:1] + a.shape[2:])
    picked = np.moveaxis(a, axis, 0)[positions.reshape(-1)]
    return picked.reshape((n, b) + picked.shape[1:])


def _sort_blocks(x: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Sort inside each neuron's block (positions (n, block)) along `axis`: invariant to any move
    inside one head (the per-head dims of walk/heads.py)."""
    x = np.moveaxis(x, axis, -1).copy()
    flat = positions.reshape(-1)
    block = x[..., flat].reshape(x.shape[:-1] + positions.shape)
    block.sort(axis=-1)
    x[..., flat] = block.reshape(x.shape[:-1] + (-1,))
    return np.moveaxis(x, -1, axis)


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


def _null_columns(n: int, rng: np.random.Generator, count: int = NULL_COLUMNS) -> np.ndarray:
    """The suspect neurons whose similarities with every row estimate the null spread."""
    return np.arange(n) if n <= count + 1 else rng.choice(n, count, replace=False)


def _spread(null: np.ndarray, cols: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Per row: standard deviation of the similarities `null` (with suspect neurons `cols`), the
    row's own match left out."""
    null = null.copy()
    null[cols[None, :] == perm[:, None]] = np.nan
    if null.shape[1] < 2:
        return np.ones(len(perm))
    return np.nan_to_num(np.nanstd(null, axis=1), nan=1.0)


def _null_spread(f: _Features, perm, rng, suspect: bool = True, kernels: bool = True) -> np.ndarray:
    """Per row: standard deviation of the similarity with a sample of unrelated suspect neurons."""
    cols = _null_columns(len(perm), rng)
    return _spread(f.gram(cols, suspect=suspect, kernels=kernels), cols, perm)


def _keys(feats, whole=None) -> dict:
    """Per neuron of either model, one key for all its slices: equal slices, equal keys.

    A random linear hash of the bits (mod 2^64; different slices collide with probability ~2^-64,
    and exact pairs are checked element by element anyway) of at most HASH_COLUMNS columns per slot;
    the neurons that share such a key are then hashed again on all their entries: wide layers cost
    a hash of a sample, and of the few collisions. whole: the slots whole where feats holds a
    sample of their entries (a sampled group; read again slot by slot), for that second hash."""
    n = _neurons(feats[0])
    key = _hash(feats, np.arange(2 * n), HASH_COLUMNS, n)
    # keys shared inside one model (twins, or a sample that cannot tell two neurons apart): one
    # reference and one suspect neuron under a key is the pair that the element-wise check confirms
    inverse = np.unique(key, return_inverse=True)[1].reshape(-1)
    keys = int(inverse.max()) + 1
    in_ref, in_sus = np.bincount(inverse[:n], minlength=keys), np.bincount(inverse[n:], minlength=keys)
    shared = np.flatnonzero((in_ref[inverse] > 1) | (in_sus[inverse] > 1))
    second = np.zeros_like(key)  # unique keys stay unique whatever the second part
    if len(shared):
        second[shared] = _hash(feats if whole is None else whole, shared, None, n)
    key = np.unique(np.stack([key, second], axis=1), axis=0, return_inverse=True)[1].reshape(2 * n)
    return {"ref_key": key[:n], "sus_key": key[n:]}


class _Reread:
    """A sampled group's slots whole, read again one at a time as they are iterated."""

    def __init__(self, matcher: "_Matcher", gi: int, slots: list, aligned_only: bool):
        self.matcher, self.gi, self.slots, self.aligned_only = matcher, gi, slots, aligned_only

    def __iter__(self):
        for slot in self.slots:
            yield self.matcher.slot_features(self.gi, slot, self.aligned_only)


def _sampled(rows, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, suspect) rows on `count` evenly spread entries of a slot (all if it has fewer)."""
    if isinstance(rows, WideSlot):
        xr, xs = rows.sample(count)  # (entries, neurons)
        return np.ascontiguousarray(xr.T), np.ascontiguousarray(xs.T)
    if count >= rows[0].shape[1]:
        return rows
    cols = spread(rows[0].shape[1], count)
    return np.ascontiguousarray(rows[0][:, cols]), np.ascontiguousarray(rows[1][:, cols])


def _slot_width(shape: tuple[int, ...], slot) -> int:
    """Entries per neuron in a slot of a weight of this shape."""
    dims = list(shape)
    axis = slot.axis
    if slot.at is not None:
        axis -= slot.axis > slot.at[0]
        del dims[slot.at[0]]
    return int(slot.positions.shape[1] * np.prod([d for o, d in enumerate(dims) if o != axis], dtype=np.int64))


def _neurons(x) -> int:
    """Neurons of one slot's features: a WideSlot, or (reference rows, suspect rows)."""
    return x.n if isinstance(x, WideSlot) else x[0].shape[0]


def _hash(feats, which: np.ndarray, columns: int | None, n: int) -> np.ndarray:
    """Hash of neurons `which` (indices over [reference, suspect], n neurons each) on `columns`
    evenly spread columns of each slot (None: all; a wide slot: about that many, see WideSlot.sample)."""
    mine, theirs = which[which < n], which[which >= n] - n
    key = np.zeros(len(which), dtype=np.uint64)
    rng = np.random.default_rng(0x5EED)
    for x in feats:
        if isinstance(x, WideSlot):
            pieces = [x.sample(columns)] if columns is not None else x.chunks()
        else:
            cols = slice(None) if columns is None else spread(x[0].shape[1], columns)
            pieces = [(x[0][:, cols], x[1][:, cols])]
        for xr, xs in pieces:  # (a wide slot's pieces are hashed in turn, like slots)
            if isinstance(x, WideSlot):  # pieces are (entries, neurons)
                both = np.concatenate([take(xr, mine, axis=1), take(xs, theirs, axis=1)], axis=1).T + 0
            else:
                both = np.concatenate([xr[mine], xs[theirs]]) + 0  # -0.0 and 0.0 alike
            words = np.ascontiguousarray(both).view(np.uint32 if both.itemsize == 4 else np.uint64)
            mult = rng.integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
            with np.errstate(over="ignore"):
                key = key * np.uint64(0x9E3779B97F4A7C15) + words.astype(np.uint64) @ mult
    return key


def _exact_pairs(ref_key: np.ndarray, sus_key: np.ndarray) -> np.ndarray:
    """perm[i] = a suspect neuron byte-identical to reference neuron i (twins paired in order), -1."""
    n = len(ref_key)
    code_r = ref_key * (n + 1) + _rank_within(ref_key)
    code_s = sus_key * (n + 1) + _rank_within(sus_key)
    perm = np.full(n, -1, dtype=np.int64)
    _, ir, js = np.intersect1d(code_r, code_s, assume_unique=True, return_indices=True)
    perm[ir] = js
    return perm


def _rank_within(keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... among the entries with the same key, in index order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ranks = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    out = np.empty_like(ranks)
    out[order] = ranks
    return out


def _classes(key: np.ndarray) -> np.ndarray:
    """Class id per neuron for neurons identical to another of the same model (-1: unique)."""
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return np.where(counts[inverse] > 1, key, -1)


def _rescales(slot_ratio: np.ndarray, dims: np.ndarray, nr: np.ndarray | None = None) -> tuple[int, int]:
    """Neurons whose norm is scaled up in some slots and down in others (what rescaling across an
    activation does), and neurons with one slot far off alone. Judged against each slot's median
    ratio, so that what a perturbation does to a whole tensor (noise inflates norms, pruning shrinks
    them) is not taken for a rescale. A 1-D slot (a bias, a normalization's scale or shift: where a
    rescale may live on the producer's side) counts where its reference value is not small (at
    least RESCALE_SCALAR_FLOOR x the slot's median magnitude: a ratio of near-zeros means nothing).
    The exact estimate and its undo are in rescale.py."""
    logs = np.log(np.where(slot_ratio > 0, slot_ratio, 1.0))
    vec = dims >= 2
    if not vec.any() and nr is None:
        return 0, 0
    dev = logs - np.median(logs, axis=0)
    if nr is not None:
        floor = RESCALE_SCALAR_FLOOR * np.median(nr, axis=0)
        counted = vec[None, :] | ((nr > floor[None, :]) & (nr > 0))
    else:
        counted = np.broadcast_to(vec[None, :], dev.shape)
    hi = np.where(counted, dev, -np.inf).max(axis=1, initial=-np.inf)
    lo = np.where(counted, dev, np.inf).min(axis=1, initial=np.inf)
    two_sided = (hi > RESCALE_DETECT) & (lo < -RESCALE_DETECT) & (np.abs(hi + lo) <= 0.5 * (hi - lo))
    wide = dims[vec] >= 16
    one_sided = ~two_sided & (np.abs(dev[:, vec][:, wide]).max(axis=1, initial=0.0) > RESCALE_ONE_SIDED)
    return int(two_sided.sum()), int(one_sided.sum())
