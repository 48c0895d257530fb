"""`onnx-resync audit SUSPECT --reference REF [--json] [--html REPORT.html]`: is this file our model?

Batch: `onnx-resync audit --reference REF suspects/*.onnx --jobs N --jsonl results.jsonl` audits
the files in parallel through `api.audit_many` (one process each), appends one JSON line per file as
each finishes, and on a rerun skips a file only when its content hash and the reference's equal those
of its line (a changed file is audited again and says so; `--retry-errors` redoes the failed ones); a
failing file is recorded without stopping the batch. This module only parses and prints.

Exit codes: 0 derived; 1 not derived (batch: any file not derived); 2 usage; 3 load or runtime
error (batch: any file failed and none was found not derived); 4 cannot judge: less than half of the
reference's parameters could be compared (batch: any file, and none not derived or failed).

With -o (one suspect): when derived, the suspect's own file (its graph, dtypes, quantization tensors)
with its neurons in the reference's order, verified equivalent to the suspect (audit/restore.py);
4 when that check cannot check, 7 when the restored file is not equivalent (nothing written; the
verdict is printed all the same). Not derived (1) or cannot judge (4): nothing written.
"""

from __future__ import annotations

import json
import sys
import time

from .. import api
from ..errors import UsageError
from ._common import add_verify_options, int_arg, print_json, verdict_shown_on_failure, verify_options

VERDICTS = ("identical", "permuted", "perturbed", "not derived", "cannot judge")


def register(sub) -> None:
    p = sub.add_parser("audit", help="is this file our model? align a re-exported suspect with the reference, "
                                     "resync it and judge it (JSON, text, HTML; batch mode)",
                       description="Bring a suspect (possibly re-exported, renamed, fp16, quantized, BatchNorm-"
                       "folded, permuted, perturbed) and the reference to canonical form, align and resync them, "
                       "and judge: identical, permuted (either one 'with a format change' when the suspect stores "
                       "its weights as fp16 or int8 and every weight is within its storage's step), perturbed, "
                       "not derived, or cannot judge (less than half of the reference's parameters compared, e.g. "
                       "weights inside If/Loop/Scan bodies). Several suspects (or --jsonl) run as a batch. Exit 0 derived, "
                       "1 not derived (batch: any), 2 usage, 3 load or runtime error (batch: any file failed and "
                       "none was not derived), 4 cannot judge (batch: any, and none of the above). With -o: when "
                       "derived, the suspect's own file (graph, dtypes, quantization tensors) with its neurons put "
                       "back in the reference's order, verified equivalent to the suspect with ONNX Runtime; 4 the "
                       "check cannot check, 7 not equivalent (nothing written).")
    p.add_argument("suspects", nargs="+", metavar="SUSPECT", help="suspect ONNX file(s)")
    p.add_argument("--reference", required=True, help="the reference ONNX file")
    p.add_argument("--json", action="store_true", help="print the full report as JSON (batch: JSON lines)")
    p.add_argument("--html", metavar="REPORT.html", help="write a self-contained HTML report (one suspect)")
    p.add_argument("-o", "--output", metavar="RESTORED.onnx",
                   help="one suspect: write it in its own format with its neurons in the reference's order "
                   "(when derived and verified equivalent), e.g. to read a white-box watermark from a vendor's "
                   "int8 or fp16 file")
    p.add_argument("--jsonl", metavar="RESULTS.jsonl", help="batch: append one JSON line per file here; on a "
                   "rerun, files whose content (and the reference's) is unchanged are skipped")
    p.add_argument("-j", "--jobs", type=int_arg(1, api.MAX_JOBS), default=1,
                   help=f"batch: parallel processes, 1..{api.MAX_JOBS} (default 1)")
    p.add_argument("--retry-errors", action="store_true", help="batch: audit again the files that failed before")
    p.add_argument("--detail", action="store_true", help="batch: keep per-neuron lists in the records")
    add_verify_options(p, prefix_help=" (of the file -o writes)")
    p.set_defaults(func=run)


def run(args) -> int:
    if len(args.suspects) == 1 and args.jsonl is None:
        return _single(args)
    if args.html:
        raise UsageError("--html takes one suspect; in batch mode use --jsonl")
    if args.output:
        raise UsageError("-o takes one suspect (the restored file of each is written by one audit each)")
    return _batch(args)


def _single(args) -> int:
    options = verify_options(args) if args.output else None
    with verdict_shown_on_failure(lambda report: _show(args, report)):
        report = api.audit(args.suspects[0], args.reference, html=args.html, output=args.output,
                           verify_options=options)
    _show(args, report)
    return report.exit_code


def _show(args, report) -> None:
    if args.json:
        print_json(report.to_dict())
    else:
        print("\n".join(report.summary_lines()))
        if args.html:
            print(f"report: {args.html}")


def _batch(args) -> int:
    t0 = time.perf_counter()
    batch = api.audit_many(args.suspects, args.reference, jobs=args.jobs, jsonl=args.jsonl,
                           retry_errors=args.retry_errors, detail=args.detail)
    if batch.reused:
        print(f"skipping {len(batch.reused)} file(s) already in {args.jsonl} (content unchanged)", file=sys.stderr)
    for s, reason in batch.reasons.items():
        print(f"re-auditing {s}: {reason}", file=sys.stderr)
    records: list[dict] = []
    k = 0
    for record in batch:
        records.append(record)
        if record.get("from_earlier_run"):
            continue
        k += 1
        if args.json:
            print(json.dumps(record, allow_nan=False), flush=True)
        else:
            print(_line(record), flush=True)
        print(f"[{k}/{len(batch.todo)}] {record['file']} ({record.get('seconds', 0):.1f}s)", file=sys.stderr)
    codes = [r.get("exit_code", 3) for r in records]
    verdicts = [r.get("verdict") for r in records if r.get("ok")]
    tally = ", ".join(f"{verdicts.count(v)} {v}" for v in VERDICTS if verdicts.count(v))
    errors = sum(1 for r in records if not r.get("ok"))
    redone = len(batch.reasons)
    print(f"{len(records)} file(s): {tally or 'none audited'}" + (f", {errors} failed" if errors else "")
          + (f" ({len(batch.reused)} from an earlier run)" if batch.reused else "")
          + (f" ({redone} audited again, see above)" if redone else "")
          + f"; {time.perf_counter() - t0:.1f}s with {args.jobs} job(s)", file=sys.stderr if args.json else sys.stdout)
    if 1 in codes:
        return 1
    if any(c not in (0, 4) for c in codes):
        return 3
    return 4 if 4 in codes else 0


def _line(record: dict) -> str:
    again = f" [audited again: {record['reaudited']}]" if record.get("reaudited") else ""
    if not record.get("ok"):
        return f"error\t{record['file']}\t{record.get('error', '')}{again}"
    fraction = record.get("matched_fraction")
    matched = f"{100 * fraction:.1f}% matched" if fraction is not None else "no neurons to match"
    return f"{record['verdict']}\t{record['file']}\t{record.get('summary', '')} [{matched}]{again}"
