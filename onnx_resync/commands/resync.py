"""`onnx-resync resync SUSPECT --reference REF -o OUT`: undo a permutation, judge the suspect.

Exit 0 when the suspect is derived from the reference (identical, permuted, or permuted and
perturbed), 1 when it is not derived, 3 when the architectures differ; with -o, 4 when the restored
model's check cannot check and 7 when it is not equivalent to the suspect (nothing written; the
verdict and report are printed all the same).
"""

from __future__ import annotations

import sys

from ..api import resync
from ._common import add_verify_options, print_json, verdict_shown_on_failure, verify_options


def register(sub) -> None:
    p = sub.add_parser("resync", help="recover a suspect's permutations against its reference; integrity verdict",
                       description="Recover the permutation of every group of a suspect (possibly permuted and "
                       "perturbed) against the reference it may derive from, write it back in the reference's "
                       "order (-o) and judge it neuron by neuron. Exit 0 derived (and, with -o, the restored model "
                       "verified and written), 1 not derived, 2 usage, 3 architectures differ or a load/runtime "
                       "error, 4 the restored model's check cannot check, 7 the restored model is not equivalent to "
                       "the suspect (4 and 7: nothing written; the verdict and report are printed all the same).")
    p.add_argument("suspect", help="the suspect ONNX file (possibly permuted and perturbed)")
    p.add_argument("--reference", required=True, help="the reference ONNX file it may derive from")
    p.add_argument("-o", "--output", help="write the suspect in the reference's neuron order here")
    p.add_argument("--report", metavar="REPORT.json", help="write the full report (per neuron) here")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime equivalence check (rescales are then reported, not undone)")
    p.add_argument("--keep-rescale", action="store_true", help="do not undo neutral rescales")
    add_verify_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    with verdict_shown_on_failure(lambda report: _show(args, report)):
        _, report = resync(
            args.suspect,
            args.reference,
            args.output,
            report_path=args.report,
            check=not args.no_verify and args.output is not None,
            verify_options=verify_options(args),
            undo_rescale=not args.keep_rescale,
        )
    _show(args, report)
    if args.no_verify and args.output:
        print("not verified (--no-verify)", file=sys.stderr)
    return 0 if report.derived else 1


def _show(args, report) -> None:
    if args.json:
        print_json(report.to_dict())
    else:
        for line in report.summary_lines():
            print(line)
        if args.report:
            print(f"report: {args.report}")
