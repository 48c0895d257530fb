"""`onnx-resync audit SUSPECT --reference REF [--json] [--html REPORT.html]`: is this file our model?

Batch: `onnx-resync audit --reference REF suspects/*.onnx --jobs N --jsonl results.jsonl` audits
the files in parallel (one process each, `onnx_resync.audit.audit_file`), appends one JSON line per
file as each finishes (flushed), skips files already in the JSONL on a rerun (`--retry-errors` redoes
the failed ones), and records a failing file without stopping.

Exit codes: 0 derived; 1 not derived (batch: any file not derived); 2 usage; 3 load or runtime
error (batch: any file failed and none was found not derived).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("audit", help="is this file our model? align a re-exported suspect with the reference, "
                                     "resync it and judge it (JSON, text, HTML; batch mode)")
    p.add_argument("suspects", nargs="+", metavar="SUSPECT", help="suspect ONNX file(s)")
    p.add_argument("--reference", required=True, help="the reference ONNX file")
    p.add_argument("--json", action="store_true", help="print the full report as JSON (batch: JSON lines)")
    p.add_argument("--html", metavar="REPORT.html", help="write a self-contained HTML report (one suspect)")
    p.add_argument("--jsonl", metavar="RESULTS.jsonl", help="batch: append one JSON line per file here; "
                                                            "files already in it are skipped")
    p.add_argument("-j", "--jobs", type=int, default=1, help="batch: parallel processes (default 1)")
    p.add_argument("--retry-errors", action="store_true", help="batch: audit again the files that failed before")
    p.add_argument("--detail", action="store_true", help="batch: keep per-neuron lists in the records")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    inputs = [args.reference, *args.suspects]
    from ..io import refuse_overwrite

    for out in (args.html, args.jsonl):
        if out is not None:
            refuse_overwrite(out, inputs)
    if len(args.suspects) == 1 and args.jsonl is None:
        return _single(args)
    if args.html:
        raise UsageError("--html takes one suspect; in batch mode use --jsonl")
    return _batch(args)


def _single(args) -> int:
    from ..audit import audit

    report = audit(args.suspects[0], args.reference, html=args.html)
    if args.json:
        print_json(report.to_dict())
    else:
        print("\n".join(report.summary_lines()))
        if args.html:
            print(f"report: {args.html}")
    return report.exit_code


def _batch(args) -> int:
    from ..audit import audit_file

    t0 = time.perf_counter()
    suspects = list(dict.fromkeys(args.suspects))
    done = _read_jsonl(args.jsonl, args.retry_errors) if args.jsonl else {}
    records: list[dict] = []
    todo = []
    for s in suspects:
        key = _key(s)
        if key in done:
            records.append(done[key])
        else:
            todo.append(s)
    skipped = len(suspects) - len(todo)
    if skipped:
        print(f"skipping {skipped} file(s) already in {args.jsonl}", file=sys.stderr)
    out = _open_jsonl(args.jsonl) if args.jsonl else None
    work = functools.partial(audit_file, reference_path=args.reference, detail=args.detail)
    try:
        for k, record in enumerate(_results(work, todo, args.jobs), 1):
            records.append(record)
            line = json.dumps(record, allow_nan=False)
            if out is not None:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
            if args.json:
                print(line, flush=True)
            else:
                print(_line(record), flush=True)
            print(f"[{k}/{len(todo)}] {record['file']} ({record.get('seconds', 0):.1f}s)", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    codes = [r.get("exit_code", 3) for r in records]
    verdicts = [r.get("verdict") for r in records if r.get("ok")]
    tally = ", ".join(f"{verdicts.count(v)} {v}" for v in ("identical", "permuted", "perturbed", "not derived")
                      if verdicts.count(v))
    errors = sum(1 for r in records if not r.get("ok"))
    print(f"{len(records)} file(s): {tally or 'none audited'}" + (f", {errors} failed" if errors else "")
          + (f" ({skipped} from an earlier run)" if skipped else "")
          + f"; {time.perf_counter() - t0:.1f}s with {args.jobs} job(s)", file=sys.stderr if args.json else sys.stdout)
    if 1 in codes:
        return 1
    if any(c != 0 for c in codes):
        return 3
    return 0


def _results(work, files: list[str], jobs: int):
    """Yield one record per file as each finishes (in parallel when jobs > 1)."""
    if jobs == 1 or len(files) <= 1:
        for f in files:
            yield work(f)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process; same on every OS
    workers = min(jobs, len(files))
    # each worker's BLAS gets its share of the cores (N workers x all-core thread pools thrash);
    # the workers are spawned fresh, so they read these before importing numpy
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for k in _THREAD_VARS:
        os.environ.setdefault(k, share)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(work, f): f for f in files}
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    yield {"file": futures[fut], "reference": work.keywords.get("reference_path"), "ok": False,
                           "exit_code": 3, "error": "worker process died (crash or out of memory); rerun with "
                                                    "--retry-errors to try the unfinished files again"}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _line(record: dict) -> str:
    if not record.get("ok"):
        return f"error\t{record['file']}\t{record.get('error', '')}"
    pct = 100 * record.get("matched_fraction", 0.0)
    return f"{record['verdict']}\t{record['file']}\t{record.get('summary', '')} [{pct:.1f}% matched]"


def _key(path: str) -> str:
    return os.path.realpath(path)


def _read_jsonl(path: str, retry_errors: bool) -> dict[str, dict]:
    """Records already written, by file; unreadable lines (a run killed mid-line) are ignored."""
    done: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return done
    for line in p.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "file" not in record:
            continue
        if retry_errors and not record.get("ok"):
            done.pop(_key(record["file"]), None)
            continue
        done[_key(record["file"])] = record
    return done


def _open_jsonl(path: str):
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"output folder {p.parent} does not exist")
    fh = open(p, "a+b")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:  # a killed run may have left half a line: start on a fresh one
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        if last != b"\n":
            fh.write(b"\n")
    fh.close()
    return open(p, "a", encoding="utf-8")
