"""The reduction as a step of resync and audit: used only when the suspect's structure differs.

`to_reference` runs the caller's structure check; when it fails (a width or depth that differs),
the suspect is reduced (pipeline.py) and checked again: a suspect whose padding explains the
difference goes on to matching, reduced; anything else is refused as before, with what the
reduction found added to the message.
"""

from __future__ import annotations

import onnx

from ..errors import ModelMismatchError
from .pipeline import reduce_model
from .report import ReduceReport


def to_reference(check, suspect: onnx.ModelProto, verify_options: dict | None = None
                 ) -> tuple[onnx.ModelProto, ReduceReport | None]:
    """(the suspect, None) when `check(suspect)` passes; else (the reduced suspect, its report) when
    the reduced one passes; else the check's ModelMismatchError, saying what was reduced."""
    try:
        check(suspect)
        return suspect, None
    except ModelMismatchError as first:
        reduced, report = reduce_model(suspect, verify_options=_proof_options(verify_options))
        if not report.changed:
            raise
        try:
            check(reduced)
        except ModelMismatchError as again:
            raise ModelMismatchError(f"{again} (after reducing the suspect: {report.phrase()})") from first
        return reduced, report


def _proof_options(options: dict | None) -> dict:
    """The caller's check options that concern the inputs (the proof runs on the same feeds)."""
    keep = ("shapes", "inputs", "samples", "device", "tolerance")
    return {k: v for k, v in (options or {}).items() if k in keep and v is not None}
