"""Coverage of the walker on the bundled models and the real vendor files -> docs/coverage.md.

For every model: hidden channels, permutable share, groups, what pins (reason and count), ops
without a rule, the walk time against onnx.load of the same file, and whether a random permutation
of every group verifies equivalent with ONNX Runtime (and undoes byte for byte).

Interface channels are counted apart: those that reach a graph output and those that must line up
with a graph input's values (a recurrent state the caller feeds); coverage is permutable / the rest,
and a model whose channels are all interface says "nothing to permute". `--json` keeps the rows;
`--before rows.json` (a run of an earlier commit, e.g. with PYTHONPATH at its checkout) adds a
before -> after column.

Run: python tools/coverage_report.py [--out docs/coverage.md] [--json rows.json] [--before rows.json]
(vendor files are fetched once; the zoo's torch_dynamo exports are added when ~/.cache/onnx-resync/zoo
exists; torch.nn.MultiheadAttention exported by torch.onnx's dynamo exporter, dynamic and static batch,
is built once into ~/.cache/onnx-resync/exports where torch is installed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from onnx_resync.api import permute  # noqa: E402
from onnx_resync.io import load_model  # noqa: E402
from onnx_resync.walk import walk  # noqa: E402

BUNDLED = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]
# vendor key -> input shapes for ONNX Runtime (symbolic dims that 1 would not fit)
VENDOR = {
    "pplcnet_orientation": {},
    "ppocr_cls": {"x": [1, 3, 48, 192]},
    "ppocr_det": {"x": [1, 3, 64, 64]},
    "ppocr_rec": {"x": [1, 3, 48, 320]},
    "ddddocr_det": {},
    "ddddocr_common": {"input1": [1, 1, 64, 64]},
    "ddddocr_common_old": {"input1": [1, 1, 64, 64]},
    "arabic_gru_encoder": {},
    "arabic_gru_decoder": {},
    "minilm": {"input_ids": [1, 8], "attention_mask": [1, 8], "token_type_ids": [1, 8]},
}


# exports this tool builds from public code when torch is installed (cached): name -> input shapes
EXPORTS = {"torch_mha_dynamic_batch": {"x": [3, 5, 8]}, "torch_mha_static_batch": {}}
# Loop/Scan/If exports (tests/loop_exports.py): x [T, B, 5], run over 4 steps so the state is read back
import loop_exports  # noqa: E402

EXPORTS.update({name: {"x": [4, 2, loop_exports.FEAT]} for name in loop_exports.NAMES})


def build_export(name: str, path: Path) -> None:
    """Loop exports: tests/loop_exports.py. Else torch.nn.MultiheadAttention (8 -> 16 inputs, 4 heads,
    16 -> 3 head) through torch.onnx's
    dynamo exporter, the batch dynamic or not: q/k/v picked by Gather out of the packed
    in-projection, heads merged into the batch by one Reshape."""
    if name in loop_exports.NAMES:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(loop_exports.build(name), str(path))
        return
    import warnings

    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = torch.nn.Linear(16, 3)

        def forward(self, x):
            z = torch.relu(self.inp(x))
            return self.out(self.mha(z, z, z, need_weights=False)[0])

    torch.manual_seed(0)
    dynamic = {"x": {0: torch.export.Dim("batch")}} if name.endswith("dynamic_batch") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Block().eval(), (torch.randn(2, 5, 8),), dynamo=True, verbose=False,
                                    dynamic_shapes=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(program.model_proto, str(path))


def export_paths() -> dict[str, Path]:
    """The exports of EXPORTS, built once into ~/.cache/onnx-resync/exports (none without torch)."""
    cache = Path(os.environ.get("ONNX_RESYNC_EXPORTS", Path.home() / ".cache" / "onnx-resync" / "exports"))
    paths = {}
    for name in EXPORTS:
        path = cache / f"{name}.onnx"
        if not path.exists():
            try:
                build_export(name, path)
            except Exception as exc:  # noqa: BLE001 - no torch, or an exporter this torch cannot run
                print(f"skip {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
        paths[name] = path
    return paths


def measure(name: str, path: Path, shapes: dict) -> dict:
    t = time.perf_counter()
    onnx.load(str(path))
    t_load = time.perf_counter() - t
    model = load_model(path)
    t = time.perf_counter()
    result = walk(model)
    t_walk = time.perf_counter() - t
    inputs = {i.name for i in model.graph.input}
    try:  # through files, as the CLI does: undo must give back the file's own bytes
        with tempfile.TemporaryDirectory() as tmp:
            out, record, back = Path(tmp) / "p.onnx", Path(tmp) / "r.json", Path(tmp) / "u.onnx"
            _, info = permute(path, out, seed=11, record_path=record,
                              verify_options={"shapes": {k: v for k, v in shapes.items() if k in inputs}})
            permute(out, back, undo=record, check=False)
            undo = "byte-exact" if back.read_bytes() == Path(path).read_bytes() else "DIFFERS"
        verdict = "equivalent" if info.verified else "not verified"
        worst = max(o["normalized_error"] for o in info.verify["outputs"])
    except Exception as exc:  # recorded, not hidden
        verdict, worst, undo = f"FAILED: {exc}", float("nan"), "-"
    ops = Counter(n.op_type for n in model.graph.node)
    from_inputs = getattr(result, "input_channels", 0)  # (an earlier commit's WalkResult has none)
    inner = result.hidden_channels - result.output_channels - from_inputs
    return {
        "name": name, "nodes": len(model.graph.node), "ops": len(ops), "hidden": result.hidden_channels,
        "outputs": result.output_channels, "inputs": from_inputs, "inner": inner,
        "permutable": result.permutable_channels,
        "coverage": result.permutable_channels / inner if inner else None, "groups": len(result.groups),
        "pinned": [(p.reason, p.channels) for p in result.pinned],
        "no_rule": result.ops_without_rule, "walk_s": t_walk, "load_s": t_load,
        "verdict": verdict, "error": worst, "undo": undo,
    }


def _share(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["inner"]:
        return "nothing to permute"
    return f"{r['permutable']}/{r['inner']} ({100 * r['coverage']:.1f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--before", help="rows of an earlier run (--json): a before -> after column")
    parser.add_argument("--before-label", help="what the earlier run was (a commit), for the text")
    parser.add_argument("--no-zoo", action="store_true", help="leave out the zoo's torch_dynamo exports")
    parser.add_argument("--no-exports", action="store_true",
                        help="leave out the exports built here (torch MultiheadAttention, needs torch)")
    args = parser.parse_args()
    before = {r["name"]: r for r in json.loads(Path(args.before).read_text())} if args.before else {}
    rows = []
    for name in BUNDLED:
        path = ROOT / "models" / f"{name}.onnx"
        if path.exists():
            rows.append(measure(f"bundled {name}", path, {}))
    import vendor_models

    for key, shapes in VENDOR.items():
        try:
            path = vendor_models.fetch(key)
        except Exception as exc:
            print(f"skip {key}: {exc}", file=sys.stderr)
            continue
        rows.append(measure(f"vendor {key}", path, shapes))
    zoo = Path(os.environ.get("ONNX_RESYNC_ZOO", Path.home() / ".cache" / "onnx-resync" / "zoo"))
    for name in ([] if args.no_zoo else BUNDLED):
        path = zoo / name / "torch_dynamo.onnx"
        if path.exists():
            rows.append(measure(f"zoo {name} torch_dynamo", path, {}))
    for name, path in ({} if args.no_exports else export_paths()).items():
        rows.append(measure(f"export {name}", path, EXPORTS[name]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))

    lines = ["# Walker coverage", "",
             "Generated by `python tools/coverage_report.py`. Coverage = permutable hidden channels / hidden "
             "channels that do not reach a graph output (hidden channels = output channels of producers: "
             "Conv, Gemm, MatMul with a weight, embeddings, recurrent units; a bidirectional layer has hidden_size "
             "units per direction, each direction its own group). Interface channels are apart: those "
             "that reach a graph output, and those that must line up with a graph input's values (a "
             "recurrent state the caller feeds). Every model is also permuted (every group, seed 11), "
             "verified with ONNX Runtime, and undone."
             + (f" The before column is {args.before_label}." if args.before_label else ""), "",
             "| model | nodes | hidden | interface: to outputs / from inputs | permutable / inner | "
             + ("before | " if before else "")
             + "groups | walk / load | permute + verify | max norm. error | undo |",
             "|---|---|---|---|---|" + ("---|" if before else "") + "---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nodes']} | {r['hidden']} | {r['outputs']} / {r['inputs']} | {_share(r)} | "
                     + (f"{_share(before.get(r['name']))} | " if before else "")
                     + f"{r['groups']} | {r['walk_s'] / max(r['load_s'], 1e-9):.2f} "
                     f"({1000 * r['walk_s']:.0f} ms) | {r['verdict']} | {r['error']:.1e} | {r['undo']} |")
    lines += ["", "## What still pins", ""]
    interface = ("reaches a graph output", "meets graph input")
    for r in rows:
        pins = [(reason, c) for reason, c in r["pinned"] if not reason.startswith(interface)]
        extra = f"; ops without a rule: {r['no_rule']}" if r["no_rule"] else ""
        if pins or extra:
            lines.append(f"- {r['name']}: " + "; ".join(f"{c} channels: {reason}" for reason, c in pins) + extra)
    if all(not [p for p, _ in r["pinned"] if not p.startswith(interface)] and not r["no_rule"] for r in rows):
        lines.append("Nothing but interface channels.")
    # a section another tool writes between its markers (tools/per_head_report.py) is kept
    old = Path(args.out).read_text() if Path(args.out).exists() else ""
    begin, end = "<!-- per-head: begin", "<!-- per-head: end -->"
    if begin in old and end in old:
        lines += ["", old[old.index(begin):old.index(end) + len(end)]]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
