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

import onnx

from ..errors import ModelMismatchError
from ..match.partial import Unpaired, assign_partial
from .pipeline import reduce_model
from .report import ReduceReport
from .widths import Widths


def to_reference(check, suspect: onnx.ModelProto, verify_options: dict | None = None, *,
                 reference: onnx.ModelProto | None = None, ref_walk=None
                 ) -> tuple[onnx.ModelProto, ReduceReport | None]:
    """(the suspect, None) when `check(suspect)` passes; else (the reduced suspect, its report) when
    the reduced one passes; else, given the reference (and its walk), the reduced suspect padded to
    the reference's widths when it is a pruned copy; else the check's ModelMismatchError, saying
    what was reduced."""
    try:
        check(suspect)
        return suspect, None
    except ModelMismatchError as first:
        options = _proof_options(verify_options)
        reduced, report = reduce_model(suspect, verify_options=options)
        try:
            check(reduced)
            if not report.changed:
                raise first
            return reduced, report
        except ModelMismatchError as again:
            why = again
            if reference is not None:
                try:
                    report.reference, report.pruned = _narrowed(reduced, reference, ref_walk)
                    return reduced, report
                except (ModelMismatchError, Unpaired) as exc:
                    why = exc if report.changed else first
            if not report.changed:
                raise why from None
            raise ModelMismatchError(f"{why} (after reducing the suspect: {report.phrase()})") from first


def _narrowed(suspect, reference, ref_walk) -> tuple[onnx.ModelProto, list[dict]]:
    """The reference without the neurons a pruned suspect lacks (its structure then checks against
    the suspect's), and per group what was pruned."""
    from ..walk import walk

    ref_walk = ref_walk or walk(reference)
    pruned = assign_partial(reference, ref_walk, suspect)
    narrowed = onnx.ModelProto()
    narrowed.CopyFrom(reference)
    widths = Widths(narrowed)
    by_key = {g.key: g for g in ref_walk.groups}
    for p in pruned:
        group = by_key[p["group"]]
        widths.remove(group, sorted(set(range(group.size)) - set(p["kept"])))
    widths.write()
    return narrowed, pruned


def _proof_options(options: dict | None) -> dict:
    """The caller's check options that concern the inputs (the proof runs on the same feeds)."""
    keep = ("shapes", "inputs", "samples", "device", "tolerance")
    return {k: v for k, v in (options or {}).items() if k in keep and v is not None}
