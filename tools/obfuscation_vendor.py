#!/usr/bin/env python3
"""Structural obfuscation on real files (the vendor cache): docs/obfuscation_vendor.md.

tools/obfuscation.py attacks the bundled models; this runs the attacks that need a real exporter's
graph on files the project did not make (tests/vendor_models.py finds them in
~/.cache/onnx-resync/vendor): structured pruning of 30% (permuted after), a random inserted layer
that does not fold (permuted and rescaled after), a dummy head and a split value dim in every head
of a Hugging Face BERT export whose Reshape targets are built at run time (permuted and rescaled
after). Each attacked copy is audited (and resynced where the attack keeps the weights' names and
the function) against the file it came from.

Usage: python tools/obfuscation_vendor.py [--out docs/obfuscation_vendor.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import attacks  # noqa: E402

from onnx_resync import api  # noqa: E402
from onnx_resync.errors import ResyncError  # noqa: E402

VENDOR = Path.home() / ".cache" / "onnx-resync" / "vendor"
CASES = [("ppocr_cls", "prune"), ("pplcnet_orientation", "prune"), ("pplcnet_orientation", "deepened"),
         ("minilm", "dummy heads"), ("minilm", "split heads")]


def _file(name: str) -> Path | None:
    found = sorted((VENDOR / name).glob("*.onnx"))
    return found[0] if found else None


def _attacked(path: Path, kind: str):
    if kind == "prune":
        model, log = attacks.prune(onnx.load(path), 0.3, seed=0)
        return attacks.permute_rescale(model, 1, rescale=False), log, f"{log.neurons} channels pruned"
    if kind == "deepened":
        model, log = attacks.insert_layer(onnx.load(path), "random", 0)
        return attacks.permute_rescale(model, 1), log, f"{log.layers[0]} inserted"
    model, log = attacks.heads(str(path), kind, 0)
    return attacks.permute_rescale(model, 1), log, f"{log.neurons} head neurons added in {len(log.per_group)} blocks"


def _verdict(run) -> str:
    t0 = time.perf_counter()
    try:
        report = run()
    except ResyncError as exc:
        return f"refused (exit {exc.exit_code}): {str(exc).splitlines()[0][:100]}"
    summary = getattr(report, "summary", None) or report.verdict
    return (f"{summary[:160]}{'...' if len(summary) > 160 else ''}; {report.matched}/{report.neurons} matched; "
            f"{time.perf_counter() - t0:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "obfuscation_vendor.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        suspect = Path(tmp) / "suspect.onnx"
        for name, kind in CASES:
            path = _file(name)
            if path is None:
                rows.append((name, kind, "not in the vendor cache", "-", "-"))
                continue
            model, log, what = _attacked(path, kind)
            if not log.per_group and not log.layers:
                rows.append((name, kind, "no site for the attack", "-", "-"))
                continue
            onnx.save(model, suspect)
            audit = _verdict(lambda: api.audit(str(suspect), str(path)))
            resync = _verdict(lambda: api.resync(str(suspect), str(path))[1])
            rows.append((name, kind, what, audit, resync))
            print(" | ".join(rows[-1]), flush=True)
    lines = ["# Structural obfuscation on real files", "",
             "Written by `tools/obfuscation_vendor.py` (attacks: `tests/attacks.py`; the files: the vendor cache,",
             "`tests/vendor_models.py`). Each attacked copy is audited and resynced against the file it came",
             "from. resync pairs weights by name: a copy with an extra layer is refused there by design (audit",
             "aligns the layer sequences with gaps).", "",
             "| file | attack | what the attack did | audit | resync |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
