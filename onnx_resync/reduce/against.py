"""The reduction as a step of resync and audit: used only when the suspect's structure differs.

`to_reference` runs the caller's structure check; when it fails (a width or depth that differs),
the suspect is reduced (pipeline.py) and checked again: a suspect whose padding explains the
difference goes on to matching, reduced. A suspect still narrower than the reference (structured
pruning) is paired with the reference's neurons by a rectangular assignment (match/partial.py); the
report then carries the reference without the neurons left unmatched (`ReduceReport.reference`),
against which the caller judges the suspect: on matched neurons only, the unmatched share reported
as pruned. Anything else is refused as before, with what the reduction found added to the message.
"""

from __future__ import annotations

import math

import onnx

from ..errors import ModelMismatchError, ResyncError
from ..io import WeightStore
from ..match.partial import Unpaired, assign_partial, stem
from .pipeline import reduce_model, reduce_near
from .report import ReduceReport
from .widths import Widths

MAX_REDUCE_BYTES = 1 << 30  # suspects with more weight bytes are not reduced (the mismatch is reported)


def to_reference(check, suspect: onnx.ModelProto, verify_options: dict | None = None, *,
                 reference: onnx.ModelProto | None = None, ref_walk=None, narrow=None, wider=None
                 ) -> tuple[onnx.ModelProto, ReduceReport | None]:
    """(the suspect, None) when `check(suspect)` passes; else (the reduced suspect, its report) when
    the reduced one passes; else, given the reference (and its walk), the reduced suspect with the
    nearest-to-dead or nearest-to-copy neurons of groups still wider removed (the error reported)
    and, for groups narrower (pruned), `report.reference`: the reference without the neurons left
    unmatched, to judge the suspect against; else the check's ModelMismatchError, saying what was
    reduced. A suspect the reduction cannot walk or run keeps the check's error, with the reason.
    `narrow(reduced suspect)`, for a caller whose models do not share weight names (audit: it pairs
    layers by structure, audit/widths.py), replaces the reference path: (the reference to judge
    against, per group what was pruned), or ModelMismatchError; with it, `wider(reduced suspect)`
    says which groups are still wider than the reference's and by how many neurons (group key ->
    excess), for the same approximate step (one implementation for both callers)."""
    try:
        check(suspect)
        return suspect, None
    except ModelMismatchError as first:
        size = _weight_bytes(suspect)
        if size > MAX_REDUCE_BYTES:  # the reduction holds float64 copies of the weights it reads
            raise ModelMismatchError(f"{first} (not reduced: {size / 2**30:.1f} GiB of weights, more than the "
                                     f"reduction's {MAX_REDUCE_BYTES / 2**30:.0f} GiB)") from None
        options = _proof_options(verify_options)
        try:
            reduced, report = reduce_model(suspect, verify_options=options)
        except ResyncError as exc:  # the suspect cannot be walked or run: the mismatch stands, and why
            raise ModelMismatchError(f"{first} (not reduced: {exc})") from None
        try:
            check(reduced)
            if not report.changed:
                raise first
            return reduced, report
        except ModelMismatchError as again:
            why = again
            if reference is not None or narrow is not None:
                try:
                    if narrow is None:  # resync: groups paired by weight names
                        from ..walk import walk

                        ref_walk = ref_walk or walk(reference)
                        wider = lambda m: _wider(ref_walk, m)  # noqa: E731
                        narrow = lambda m: narrowed(m, reference, ref_walk)  # noqa: E731
                    return _against_reference(check, reduced, report, options, wider, narrow), report
                except (ModelMismatchError, Unpaired, ValueError) as exc:
                    why = exc if report.changed else ModelMismatchError(f"{first} ({exc})")
            if not report.changed:
                raise why from None
            raise ModelMismatchError(f"{why} (after reducing the suspect: {report.phrase()})") from first


def _against_reference(check, reduced, report: ReduceReport, options, wider, narrow) -> onnx.ModelProto:
    """What is left once the exact reduction is done, with the reference's widths as the target:
    groups still wider (`wider(model)`: group key -> excess) lose their nearest-to-dead or
    nearest-to-copy neurons (an adaptive attacker's noisy copies; the error is measured and
    reported); groups narrower are a pruned copy, judged against the reference without its
    unmatched neurons (`narrow(model)` -> report.reference, report.pruned)."""
    candidate = reduced
    try:
        excess = wider(reduced) if wider is not None else {}
    except ModelMismatchError:  # the layers do not pair as a padded copy: pruned, or the mismatch stands
        excess = {}
    if excess:
        candidate, report.approximate, report.approximate_error = reduce_near(reduced, excess, verify_options=options)
        try:
            check(candidate)
            return candidate
        except ModelMismatchError:
            pass  # narrower somewhere as well: pruned
    report.reference, report.pruned = narrow(candidate)
    return candidate


def _wider(ref_walk, model: onnx.ModelProto) -> dict[str, int]:
    """Per group of `model` wider than its reference group: by how many neurons."""
    from ..walk import walk

    sizes = {stem(g.key): g.size for g in ref_walk.groups}
    return {g.key: g.size - sizes[stem(g.key)] for g in walk(model).groups
            if stem(g.key) in sizes and g.size > sizes[stem(g.key)]}


def narrowed(suspect, reference, ref_walk, name_of=None) -> tuple[onnx.ModelProto, list[dict]]:
    """The reference without the neurons a pruned suspect (with the reference's weight names) lacks
    (its structure then checks against the suspect's), and per group what was pruned (its layers
    named by `name_of(node name)`)."""
    from ..walk import walk

    ref_walk = ref_walk or walk(reference)
    pruned = assign_partial(reference, ref_walk, suspect, name_of=name_of)
    narrowed = onnx.ModelProto()
    narrowed.CopyFrom(reference)
    widths = Widths(narrowed)
    by_key = {g.key: g for g in ref_walk.groups}
    for p in pruned:
        group = by_key[p["group"]]
        widths.remove(group, sorted(set(range(group.size)) - set(p["kept"])))
    widths.write()
    return narrowed, pruned


def _weight_bytes(model: onnx.ModelProto) -> int:
    store = WeightStore(model)
    return sum(math.prod(store.shape(n)) * store.dtype(n).itemsize for n in store.names())


def _proof_options(options: dict | None) -> dict:
    """The caller's check options that concern the inputs (the proof runs on the same feeds)."""
    keep = ("shapes", "inputs", "samples", "device", "tolerance")
    return {k: v for k, v in (options or {}).items() if k in keep and v is not None}
