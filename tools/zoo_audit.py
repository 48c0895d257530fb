#!/usr/bin/env python3
"""Audit the exporter zoo (tools/build_zoo.py) and write its confusion table: docs/zoo.md.

Every variant in the zoo's manifest is audited (``onnx_resync.api.audit``) twice:

- against its source model (``models/<name>.onnx``): truth "derived", with the kind the manifest
  names: identical (not permuted, not perturbed), permuted, or perturbed (noise), and the storage
  format (fp16, int8) to be recognized;
- against the unrelated twin (``models/variants/<name>_seed1.onnx``, same architecture, trained from
  another seed): truth "not derived".

A verdict is right when (see `judge`): the twin gets "not derived"; the source gets the expected
verdict (identical / permuted / perturbed) with at least 99% of neurons matched, a perturbed file
names noise among the kinds and says permuted exactly when it was, and an fp16 or int8 file that is
judged identical or permuted names its storage. Exit 3 (cannot align or load) and timeouts are wrong
in both cases and counted apart.

Audits run in worker processes (``--jobs``, default 2) with a per-file timeout (``--timeout``, a
worker past it is killed and replaced). Results are cached in ``<zoo>/audit_cache.json`` keyed by the
suspect's and the reference's content hashes and a hash of the package's source (``onnx_resync/**/*.py``),
so a rerun without code changes is fast and any change to the package audits again.

Usage::

    python tools/build_zoo.py && python tools/zoo_audit.py          # docs/zoo.md
    python tools/zoo_audit.py --only mlp,gru --jobs 2 --timeout 120
    python tools/zoo_audit.py --write-known tests/zoo_known_failures.json   # xfail list of tests/test_zoo.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# $ONNX_RESYNC_SRC: a folder holding another onnx_resync to measure (e.g. `git archive HEAD onnx_resync`
# unpacked there, while the working tree is mid-edit); default: this checkout
sys.path.insert(0, os.environ.get("ONNX_RESYNC_SRC") or str(ROOT))
if str(ROOT / "tools") not in sys.path:
    sys.path.append(str(ROOT / "tools"))

from build_decoder import DECODER, VARIANTS as DECODER_VARIANTS, file_sha256  # noqa: E402
from build_zoo import DEFAULT_CACHE, MODEL_NAMES, TRANSFORMS, plan  # noqa: E402

MIN_MATCHED = 0.99
DEFAULT_TIMEOUT = 120.0
STORAGE_NAMES = {"fp16": ("float16",), "int8": ("int8", "uint8", "quantized"), "int4": ("int4",)}
VERDICTS = ["identical", "permuted", "perturbed", "not derived", "cannot judge", "exit 3", "timeout"]


# ---------------------------------------------------------------------------------------------
# the tasks and their truth


def load_manifest(cache: Path) -> dict:
    path = cache / "manifest.json"
    if not path.exists():
        raise SystemExit(f"no zoo at {cache}: run tools/build_zoo.py first")
    return json.loads(path.read_text())


def tasks(manifest: dict, models=None) -> list[dict]:
    """One task per (variant, reference): against the source (truth: the variant's expected verdict)
    and against the twin (truth: not derived)."""
    out = []
    for model in MODEL_NAMES + [DECODER]:
        if models and model not in models or model not in manifest["models"]:
            continue
        entry = manifest["models"][model]
        # the decoder (tools/build_decoder.py): its own variants, audited against its torch export
        names = list(DECODER_VARIANTS) if model == DECODER else [v for v, _, _ in plan(model)]
        for variant in names:
            v = entry["variants"].get(variant)
            if v is None or not v.get("ok"):
                continue
            base = {"model": model, "variant": variant, "transform": v["transform"], "suspect": v["file"],
                    "suspect_sha256": v["sha256"], "storage": v["storage"], "permuted": v["permuted"],
                    "perturbed": v["perturbed"]}
            out.append({**base, "against": "source", "reference": entry["source"],
                        "reference_sha256": entry["source_sha256"], "expected": v["expected"]})
            if entry.get("twin"):
                out.append({**base, "against": "twin", "reference": entry["twin"], "reference_sha256": None,
                            "expected": "not derived"})
    return out


def task_id(task: dict) -> str:
    return f"{task['model']}/{task['variant']} vs {task['against']}"


def code_hash() -> str:
    """sha256 over the source of the onnx_resync package that the audits import."""
    import onnx_resync

    package = Path(onnx_resync.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(package.rglob("*.py")):
        h.update(str(p.relative_to(package)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def file_hash(path: str) -> str:
    """The file's content with its external data (model.onnx.data beside it: the genai builder's)."""
    return file_sha256(Path(path))


# ---------------------------------------------------------------------------------------------
# auditing


def audit_one(suspect: str, reference: str) -> dict:
    """api.audit on one pair, as a small JSON-ready record; never raises."""
    from onnx_resync import api
    from onnx_resync.errors import ResyncError

    t0 = time.perf_counter()
    try:
        report = api.audit(suspect, reference)
        d = report.to_dict(detail=False)
        rec = {"exit_code": report.exit_code, "verdict": d["verdict"], "derived": d["derived"],
               "permuted": d["permuted"], "perturbed": d["perturbed"], "summary": d["summary"],
               "neurons": d["neurons"], "matched": d["matched"], "moved": d["moved"],
               "matched_fraction": d["matched_fraction"], "statistic": d["statistic"],
               "kinds": list(d["perturbation"].get("kinds", [])),
               "storage": list(d["precision"].get("storage", [])), "quantized": bool(d["precision"].get("quantized")),
               "format_change": d.get("format_change", ""),
               "evidence": d["evidence"]}
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        code = exc.exit_code if isinstance(exc, ResyncError) and exc.exit_code >= 3 else 3
        text = str(exc).strip().splitlines()
        rec = {"exit_code": code, "verdict": None, "error": f"{type(exc).__name__}: {text[0] if text else ''}"[:300]}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _worker(conn) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send((job[0], audit_one(job[1], job[2])))


def run_pool(todo: list[tuple[str, str, str]], jobs: int, timeout: float, log):
    """Yield (key, record) for each (key, suspect, reference), `jobs` worker processes at a time; a
    worker past `timeout` seconds on one file is killed and replaced (the file's record: timeout)."""
    if not todo:
        return
    ctx = multiprocessing.get_context("spawn")
    share = str(max(1, (os.cpu_count() or 1) // jobs))
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, share)
    queue = list(reversed(todo))
    workers = []

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "job": None, "since": 0.0}

    def give(w):
        if queue:
            w["job"] = queue.pop()
            w["since"] = time.monotonic()
            w["conn"].send(w["job"])
        else:
            w["job"] = None

    try:
        for _ in range(min(jobs, len(todo))):
            w = start()
            workers.append(w)
            give(w)
        while any(w["job"] is not None for w in workers):
            busy = [w for w in workers if w["job"] is not None]
            ready = wait([w["conn"] for w in busy], timeout=1.0)
            now = time.monotonic()
            for w in busy:
                if w["conn"] in ready:
                    try:
                        key, rec = w["conn"].recv()
                    except (EOFError, OSError):
                        key, rec = w["job"][0], {"exit_code": 3, "verdict": None,
                                                 "error": "worker process died (crash or out of memory)"}
                        w["proc"].join(timeout=5)
                        w.update(start())
                    yield key, rec
                    give(w)
                elif now - w["since"] > timeout:
                    key = w["job"][0]
                    w["proc"].kill()
                    w["proc"].join()
                    yield key, {"exit_code": None, "verdict": None, "timeout": True,
                                "error": f"timeout: no verdict within {timeout:g}s", "seconds": round(now - w["since"], 1)}
                    w.update(start())
                    give(w)
    finally:
        for w in workers:
            if w["proc"].is_alive():
                try:
                    w["conn"].send(None)
                except OSError:
                    pass
                w["proc"].join(timeout=5)
                if w["proc"].is_alive():
                    w["proc"].kill()


# ---------------------------------------------------------------------------------------------
# judging


def observed(rec: dict) -> str:
    if rec.get("timeout"):
        return "timeout"
    if rec.get("verdict") is None:
        return "exit 3"
    return rec["verdict"]


def judge(task: dict, rec: dict) -> tuple[bool, str]:
    """(right, why not) for one audit record against the task's truth."""
    got = observed(rec)
    want = task["expected"]
    if got != want:
        return False, f"{got}, expected {want}"
    if want == "not derived":
        return True, ""
    if rec["matched_fraction"] < MIN_MATCHED:
        return False, f"{want} but only {100 * rec['matched_fraction']:.1f}% of neurons matched"
    if want == "perturbed":
        if bool(rec["permuted"]) != bool(task["permuted"]):
            return False, f"perturbed, but permuted={rec['permuted']} (truth {task['permuted']})"
        if not any(k.startswith("noise") for k in rec.get("kinds", [])):
            return False, f"perturbed, but the kinds do not name noise ({'; '.join(rec.get('kinds', [])) or 'none'})"
        return True, ""
    names = STORAGE_NAMES.get(task["storage"])
    if names is not None:
        said = " ".join(rec.get("storage", [])) + (" quantized" if rec.get("quantized") else "") \
            + " " + (rec.get("format_change") or "")  # (int4 is stored packed in uint8: the format names it)
        if not any(n in said for n in names):
            return False, f"{want}, but the {task['storage']} storage is not named (storage {rec.get('storage')})"
    return True, ""


def truth_row(task: dict) -> str:
    if task["expected"] == "not derived":
        return "not derived (twin)"
    return f"{task['expected']} ({task['storage']})"


def short_verdict(rec: dict) -> str:
    if rec.get("verdict") is None:
        return rec.get("error", "?")
    return rec.get("summary", rec["verdict"])


# ---------------------------------------------------------------------------------------------
# the report


def write_report(path: Path, results: list[tuple[dict, dict]], manifest: dict, timing: dict) -> dict:
    rows = sorted({truth_row(t) for t, _ in results},
                  key=lambda r: (r.startswith("not derived"), ["identical", "permuted", "perturbed"].index(r.split()[0])
                                 if not r.startswith("not") else 0, r))
    table = defaultdict(Counter)
    wrong_detail = Counter()
    false, by_transform = [], defaultdict(lambda: {"source": [0, 0], "twin": [0, 0]})
    for t, rec in results:
        right, why = judge(t, rec)
        row = truth_row(t)
        table[row][observed(rec)] += 1
        if not right and observed(rec) == t["expected"]:
            wrong_detail[row] += 1
        cell = by_transform[t["transform"]][t["against"]]
        cell[1] += 1
        cell[0] += right
        if not right:
            false.append((t, rec, why))
    n_false = len(false)
    exit3 = sum(1 for t, rec in results if observed(rec) == "exit 3")
    timeouts = sum(1 for t, rec in results if observed(rec) == "timeout")
    variants = [v for m in manifest["models"].values() for v in m["variants"].values()]
    failed_builds = [(m, name, v) for m, e in sorted(manifest["models"].items())
                     for name, v in e["variants"].items() if not v.get("ok")]

    out = ["# The exporter zoo: audit's confusion table", "",
           "Generated by `python tools/build_zoo.py && python tools/zoo_audit.py` (issue 14, \"Proven by\"). "
           "Every bundled model re-exported the ways a vendor does (tools/build_zoo.py: ONNX Runtime's saved "
           "optimized model at three levels, onnxruntime.transformers' BERT optimizer fp32/fp16, onnxslim, "
           "static QDQ per channel / per tensor / after ORT's pre-processing, QOperator, dynamic int8, fp16 "
           "with ORT's and onnxconverter-common's converters, nodes reordered, every name changed, "
           "torch.onnx dynamo and TorchScript), each also from the permuted source and some from the "
           "permuted and perturbed source (noise 0.02 x std), every file checked with ONNX Runtime to "
           "compute what its source computes. Each is audited against its source (truth: derived, with "
           "the kind) and against the `_seed1` twin (truth: not derived). The decoder (tools/build_decoder.py): "
           "a small Llama-style model (grouped-query attention, rotary, SwiGLU, RMSNorm with non-unit scales) "
           "exported by torch.onnx (dynamo, TorchScript) and by the onnxruntime-genai model builder (fp32, "
           "int4), and permuted copies; audited against its dynamo export and against the seed-1 twin's.", "",
           f"Measured: {_provenance()}.", "",
           f"Zoo: {sum(v['ok'] for v in variants)} files from {len(manifest['models'])} models "
           f"({len(failed_builds)} transforms failed to produce a file); {len(results)} audits; "
           f"**{n_false} false verdicts** ({exit3} exit 3 \"cannot align\", {timeouts} timeouts).", "",
           "## Confusion table (truth x verdict)", "",
           "Rows: the truth (expected verdict and the suspect's storage). Columns: the audit's verdict; "
           "exit 3 = the audit could not load, canonicalize or align (counted apart). \"wrong detail\": the "
           "verdict is right but the kind is not (under 99% of neurons matched, noise not named, the "
           "permuted flag wrong, the storage format not named).", "",
           "| truth \\ verdict | " + " | ".join(VERDICTS) + " | wrong detail | right / total |",
           "|---|" + "---:|" * (len(VERDICTS) + 2)]
    for row in rows:
        c = table[row]
        total = sum(c.values())
        want = "not derived" if row.startswith("not derived") else row.split(" (")[0]
        right = c[want] - wrong_detail[row]
        cells = [(f"**{c[v]}**" if v == want and c[v] else str(c[v] or "")) for v in VERDICTS]
        out.append(f"| {row} | " + " | ".join(cells) + f" | {wrong_detail[row] or ''} | {right} / {total} |")
    stats = {a: [_number(rec.get("statistic")) for t, rec in results if t["against"] == a and rec.get("verdict")]
             for a in ("source", "twin")}
    stats = {a: [x for x in v if x is not None] for a, v in stats.items()}
    if stats["source"] and stats["twin"]:
        out += ["", f"Decision statistic (resync's evidence; derived at >= 1): lowest against a source "
                    f"{min(stats['source']):.2f}, highest against a twin {max(stats['twin']):.2f}."]
    out += ["", "## By transform (right / audited)", "",
            "| transform | vs source | vs twin |", "|---|---:|---:|"]
    for tr in list(TRANSFORMS) + sorted(set(by_transform) - set(TRANSFORMS)):
        if tr in by_transform:
            s, w = by_transform[tr]["source"], by_transform[tr]["twin"]
            out.append(f"| {tr} | {s[0]} / {s[1]} | {w[0]} / {w[1]} |")
    decoder = [(t, rec) for t, rec in results if t["model"] == DECODER]
    if decoder:
        out += ["", "## The Llama-style decoder (tools/build_decoder.py)", "",
                "Every decoder file against the reference (its torch.onnx dynamo export) and the seed-1 twin.", "",
                "| file | against | truth | verdict | neurons matched | right |", "|---|---|---|---|---:|---|"]
        for t, rec in sorted(decoder, key=lambda tr: (list(DECODER_VARIANTS).index(tr[0]["variant"]), tr[0]["against"])):
            right, why = judge(t, rec)
            m = rec.get("matched_fraction")
            out.append(f"| {t['variant']} | {t['against']} | {truth_row(t)} | {_cell(short_verdict(rec))} | "
                       f"{'' if m is None else f'{100 * m:.1f}%'} | {'yes' if right else 'NO: ' + _cell(why)} |")
    out += ["", "## False verdicts by symptom", "",
            "Grouped by what the audit said (the first words of its error or verdict), with the files.", ""]
    groups = defaultdict(list)
    for t, rec, why in false:
        got = observed(rec)
        key = f"{got}: {_symptom(rec.get('error', ''))}" if got in ("exit 3", "timeout") else _symptom(why)
        groups[key].append((t, rec, why))
    for key, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        names = [f"`{task_id(t)}`" for t, _, _ in items]
        more = f", and {len(names) - 40} more" if len(names) > 40 else ""
        out.append(f"- **{key}** ({len(items)}): " + ", ".join(names[:40]) + more)
    out += ["", "## Every false verdict", "",
            "| file | against | verdict | expected | why false | audit's summary or error |", "|---|---|---|---|---|---|"]
    for t, rec, why in sorted(false, key=lambda x: (x[0]["model"], x[0]["variant"], x[0]["against"])):
        out.append(f"| {t['model']}/{t['variant']} | {t['against']} | {observed(rec)} | {t['expected']} | "
                   f"{_cell(why)} | {_cell(short_verdict(rec))} |")
    out += ["", "## Transforms that failed to produce a file", ""]
    if failed_builds:
        out += [f"- {m}/{name}: {_cell(v.get('error', '?'))}" for m, name, v in failed_builds]
    else:
        out.append("None.")
    out += ["", "## Timings", "",
            f"- zoo build (tools/build_zoo.py from scratch, the sum of each file's build and check): "
            + ", ".join(f"{m} {_build_seconds(e):.0f}s" for m, e in sorted(manifest["models"].items()))
            + f"; {sum(_build_seconds(e) for e in manifest['models'].values()):.0f}s in all",
            f"- audit: {timing['audited']} audited in {timing['seconds']:.0f}s with {timing['jobs']} processes "
            f"({timing['cached']} results reused from the cache); per audit median "
            f"{timing['median']:.1f}s, max {timing['max']:.1f}s", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    begin, end = "<!-- vendor-zoo:begin -->", "<!-- vendor-zoo:end -->"  # tools/vendor_zoo.py's section stays
    if begin in old and end in old:
        out += [old[old.index(begin):old.index(end) + len(end)], ""]
    path.write_text("\n".join(out))
    return {"false": n_false, "exit3": exit3, "timeouts": timeouts, "audits": len(results)}


def _provenance() -> str:
    """Which onnx_resync the audits ran: the package folder, its source hash, and this checkout's commit."""
    import subprocess

    import onnx_resync

    package = Path(onnx_resync.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    where = "this checkout's working tree" if package == (ROOT / "onnx_resync").resolve() else f"`{package}`"
    return (f"onnx_resync from {where} (source sha256 {code_hash()[:12]}; checkout at commit {head or '?'}), "
            f"onnxruntime {_version('onnxruntime')}, onnx {_version('onnx')}")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "?"


def _number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _build_seconds(entry: dict) -> float:
    return (sum(v.get("seconds", 0) for v in entry["variants"].values())
            + sum(v.get("seconds", 0) for v in entry.get("sources", {}).values()))


def _symptom(error: str) -> str:
    import re

    text = re.sub(r"\S*\.onnx:?", "FILE", error)
    text = re.sub(r"'[^'\s]*'|\"[^\"\s]*\"", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return text[:200]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


# ---------------------------------------------------------------------------------------------


def results_for(cache: Path, todo_tasks: list[dict], jobs: int, timeout: float, log, use_cache: bool = True):
    """(task, record) for every task: from the cache when the suspect's, reference's and code's hashes
    match, audited otherwise (and cached)."""
    code = code_hash()
    cache_path = cache / "audit_cache.json"
    stored = json.loads(cache_path.read_text()) if cache_path.exists() and use_cache else {}
    stored = {k: v for k, v in stored.items() if k.endswith(":" + code)}  # other code versions' results go
    ref_hash = {}
    keyed = []
    for t in todo_tasks:
        if t["reference"] not in ref_hash:
            ref_hash[t["reference"]] = file_hash(t["reference"])
        keyed.append((f"{t['suspect_sha256']}:{ref_hash[t['reference']]}:{code}", t))
    cached = sum(1 for k, _ in keyed if k in stored)
    # files with equal content (plain is the source's bytes) are audited once
    todo = list({k: (k, t["suspect"], t["reference"]) for k, t in keyed if k not in stored}.values())
    todo.sort(key=lambda x: (x[2], x[1]))  # one reference at a time: the worker keeps its canonical form
    log(f"{cached} results from the cache, {len(todo)} distinct pairs to audit")
    done = 0
    t0 = time.perf_counter()
    for key, rec in run_pool(todo, jobs, timeout, log):
        stored[key] = rec
        done += 1
        if done % 10 == 0 or done == len(todo):
            log(f"{done}/{len(todo)} audited ({time.perf_counter() - t0:.0f}s)")
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored))
            os.replace(tmp, cache_path)
    timing = {"audited": len(todo), "cached": cached, "seconds": time.perf_counter() - t0, "jobs": jobs}
    secs = sorted(stored[k].get("seconds", 0) for k, _ in keyed)
    timing.update(median=secs[len(secs) // 2] if secs else 0.0, max=secs[-1] if secs else 0.0)
    return [(t, stored[k]) for k, t in keyed], timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Audit the exporter zoo; write docs/zoo.md")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--only", help="comma-separated models")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per audit")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo.md")
    ap.add_argument("--no-cache", action="store_true", help="audit everything again")
    ap.add_argument("--write-known", type=Path, help="write the false verdicts as tests/test_zoo.py's xfail list")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    manifest = load_manifest(args.cache)
    models = args.only.split(",") if args.only else None
    results, timing = results_for(args.cache, tasks(manifest, models), args.jobs, args.timeout, log,
                                  use_cache=not args.no_cache)
    broken = [(task_id(t), rec) for t, rec in results if t["variant"] == "plain" and t["against"] == "source"
              and observed(rec) != "identical"]
    if broken:
        log(f"WARNING: {len(broken)} source(s) not judged identical to themselves ({broken[0][0]}: "
            f"{short_verdict(broken[0][1])}); is the package broken right now?")
    counts = write_report(args.out, results, manifest, timing)
    log(f"{counts['audits']} audits, {counts['false']} false verdicts ({counts['exit3']} exit 3, "
        f"{counts['timeouts']} timeouts): {args.out}")
    if args.write_known and broken:
        log(f"not writing {args.write_known}: the package fails on the sources themselves")
        return 1
    if args.write_known:
        known = {}
        for t, rec in results:
            right, why = judge(t, rec)
            if not right:
                known[task_id(t)] = f"{why} | {short_verdict(rec)}"[:300]
        args.write_known.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
        log(f"{len(known)} known false verdicts written to {args.write_known}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
