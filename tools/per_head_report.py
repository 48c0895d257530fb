"""Per-head dims (issue 15.6) on the models with attention -> a section of docs/coverage.md.

For every model: the walk with the dims shared by every head (walk/heads.py's split turned off, the
walker before issue 15.6) and with per-head dims, in the same run: groups, per-head groups, and the
size of the permutation space the groups span (log2 of the number of distinct permutations, the sum
of log2(n!) over the groups: a per-head dim group of n dims in each of h heads is h * log2(n!) where
shared it was log2(n!)). Coverage by channel does not change (a cell moved already with its head or
its dim). Then, with per-head dims: permute every group (seed 11) verified with ONNX Runtime, undone
byte for byte, and resync of the permuted copy against the model (exact: the restored file is the
model's bytes).

Run: python tools/per_head_report.py [--out docs/coverage.md] (the section between the per-head
markers is replaced; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from onnx_resync import api  # noqa: E402
from onnx_resync.io import load_model  # noqa: E402
import onnx  # noqa: E402
from onnx_resync.walk import walk, walker  # noqa: E402

CACHE = Path.home() / ".cache" / "onnx-resync"
ZOO = Path(os.environ.get("ONNX_RESYNC_ZOO", CACHE / "zoo"))
BEGIN, END = "<!-- per-head: begin (tools/per_head_report.py) -->", "<!-- per-head: end -->"


def models() -> dict[str, tuple[Path, dict]]:
    """name -> (file, input shapes for ONNX Runtime); those not on this machine are left out."""
    out = {"bundled transformer": (ROOT / "models" / "transformer.onnx", {})}
    try:
        from vendor_models import cached_path
        out["vendor minilm"] = (cached_path("minilm"), {})
    except Exception:  # noqa: BLE001 - no vendor cache
        pass
    for name in ("bert", "dynamic", "onnxslim"):
        out[f"zoo transformer {name}"] = (ZOO / "transformer" / f"{name}.onnx", {})
    for name in ("torch_dynamo.onnx", "torch_script.onnx", "genai_fp32/model.onnx", "genai_int4/model.onnx"):
        out[f"zoo decoder {name.split('/')[0].removesuffix('.onnx')}"] = (ZOO / "decoder" / "_seed0" / name, {})
    exports = CACHE / "exports"
    for name in ("torch_mha_dynamic_batch", "torch_mha_static_batch"):
        out[f"export {name}"] = (exports / f"{name}.onnx", {"x": [2, 5, 8]})
    return {k: v for k, v in out.items() if v[0].exists()}


def same(a: Path, b: Path) -> bool:
    """The same model: graph and every tensor's bytes (external data read in: a file written
    elsewhere names its own data file)."""
    return a.read_bytes() == b.read_bytes() or onnx.load(str(a)).SerializeToString() == onnx.load(str(b)).SerializeToString()


def space(result) -> float:
    """log2 of the number of permutations the groups span."""
    return sum(math.lgamma(g.size + 1) for g in result.groups) / math.log(2)


def measure(name: str, path: Path, shapes: dict) -> dict:
    model = load_model(path)
    split = walker.split_per_head
    times = {True: [], False: []}
    for on in (False, True, False, True, False, True):  # (interleaved: a loaded machine drifts)
        walker.split_per_head = split if on else (lambda groups, *args, **kwargs: groups)
        try:
            t = time.perf_counter()
            result = walk(model)
            times[on].append(time.perf_counter() - t)
        finally:
            walker.split_per_head = split
        if on:
            after = result
        else:
            before = result
    t_walk, t_off = sorted(times[True])[1], sorted(times[False])[1]  # medians of three
    row = {"name": name, "groups": (len(before.groups), len(after.groups)),
           "per_head": sum(1 for g in after.groups if g.within),
           "space": (space(before), space(after)), "coverage": (before.coverage, after.coverage),
           "walk_s": t_walk, "walk_off_s": t_off}
    with tempfile.TemporaryDirectory() as tmp:
        out, record, back = Path(tmp) / "p.onnx", Path(tmp) / "r.json", Path(tmp) / "u.onnx"
        try:
            _, info = api.permute(path, out, seed=11, record_path=record, verify_options={"shapes": shapes})
            api.permute(out, back, undo=record, check=False)
            row["verdict"] = "equivalent" if info.verified else "not verified"
            row["undo"] = "byte-exact" if same(back, Path(path)) else "DIFFERS"
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            row["verdict"], row["undo"] = f"FAILED: {type(exc).__name__}: {exc}", "-"
        try:
            restored = Path(tmp) / "restored.onnx"
            t = time.perf_counter()
            _, report = api.resync(out, path, restored, verify_options={"shapes": shapes})
            row["resync_s"] = time.perf_counter() - t
            row["resync"] = "exact" if same(restored, Path(path)) else f"differs ({report.verdict})"
        except Exception as exc:  # noqa: BLE001
            row["resync"], row["resync_s"] = f"FAILED: {type(exc).__name__}: {exc}", float("nan")
    return row


def section(rows: list[dict]) -> str:
    lines = [BEGIN, "## Per-head dims (issue 15.6)", "",
             "Generated by `python tools/per_head_report.py`. Before: the dims of a head group move the same way in "
             "every head (walk/heads.py's split off, in the same run); after: each head its own group of Q/K dims and "
             "of V dims with the output projection's rows (rotary Q/K dims stay in order). Permutation space: log2 of "
             "the number of permutations the groups span (sum of log2 n! over the groups). Coverage by channel is "
             "unchanged (a cell moved already with its head or its dim). Permute (seed 11) is verified by ONNX "
             "Runtime and undone; resync of the permuted copy against the model gives its bytes back (exact).", "",
             "| model | groups before -> after | per-head groups | permutation space, log2: before -> after | "
             "coverage | permute + verify | undo | resync | walk: per-head / shared dims |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cov = "nothing to permute" if not r["coverage"][1] and r["coverage"][1] != 0 else f"{100 * r['coverage'][1]:.1f}%"
        lines.append(f"| {r['name']} | {r['groups'][0]} -> {r['groups'][1]} | {r['per_head']} | "
                     f"{r['space'][0]:.0f} -> {r['space'][1]:.0f} | {cov} | {r['verdict']} | {r['undo']} | "
                     f"{r['resync']} ({r['resync_s']:.1f} s) | {1000 * r['walk_s']:.0f} / {1000 * r['walk_off_s']:.0f} ms "
                     f"({r['walk_s'] / r['walk_off_s']:.2f}x) |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    parser.add_argument("--only", nargs="*", help="model names (substrings) to run")
    args = parser.parse_args()
    rows = []
    for name, (path, shapes) in models().items():
        if args.only and not any(o in name for o in args.only):
            continue
        rows.append(measure(name, path, shapes))
        print(rows[-1], flush=True)
    text = section(rows)
    out = Path(args.out)
    doc = out.read_text() if out.exists() else ""
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    out.write_text(doc)


if __name__ == "__main__":
    main()
