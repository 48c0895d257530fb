"""Walker coverage on files ONNX Runtime writes itself -> docs/ort_coverage.md (issue 15, item 5).

The files: the bundled models saved by ONNX Runtime's optimizer (SessionOptions.optimized_model_filepath)
at its extended level (FusedConv, FusedGemm, FusedMatMul, QuickGelu, BiasGelu, ...) and its full level
(also the NCHWc layout on CPU), the same for their QDQ and dynamically quantized copies
(tests/quantize_bundled.py: QLinearConv in NHWC, QLinearAdd, QGemm, DynamicQuantizeMatMul,
MatMulIntegerToFloat, ...), QDQ copies whose weights stay in float behind a Q -> DQ pair
(AddQDQPairToWeight, as TensorRT-style exports store them), the zoo's BERT-optimizer files and the
vendor MiniLM through the same optimizer (SkipLayerNormalization, Attention with
packed QKV, BiasGelu), and, with --decoder DIR, the onnxruntime-genai builder's fp32 and int4 decoders
(tools/build_decoder.py's export stage: GroupQueryAttention with rotary and a KV cache,
SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization, MatMulNBits).

Each file is measured as tools/coverage_report.py measures (coverage over inner channels, interface
apart; permute of every group verified with ONNX Runtime, undo). The files are written once into
~/.cache/onnx-resync/ort_files, so a run of an earlier commit (PYTHONPATH at its checkout, --json)
measures the same files: --before gives the before -> after column.

Run: python tools/ort_coverage.py [--out docs/ort_coverage.md] [--json rows.json] [--before rows.json]
     [--before-label TEXT] [--decoder /tmp/dec]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from coverage_report import BUNDLED, _share, measure  # noqa: E402

CACHE = Path(os.environ.get("ONNX_RESYNC_ORT_FILES", Path.home() / ".cache" / "onnx-resync" / "ort_files"))
ZOO = Path(os.environ.get("ONNX_RESYNC_ZOO", Path.home() / ".cache" / "onnx-resync" / "zoo"))
LEVELS = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
# the genai decoder's inputs (a KV cache of 4 past tokens, 8 new ones)
DECODER_SHAPES = {"input_ids": [1, 8], "attention_mask": [1, 12],
                  **{f"past_key_values.{n}.{kv}": [1, 2, 4, 16] for n in (0, 1) for kv in ("key", "value")}}


def ort_saved(src: Path, dst: Path, level: str) -> Path:
    if not dst.exists():
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[level]
        options.optimized_model_filepath = str(dst)
        options.log_severity_level = 3
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def fake_quantized(src: Path, dst: Path, name: str) -> Path:
    """QDQ with every weight kept in float behind QuantizeLinear -> DequantizeLinear (AddQDQPairToWeight,
    the form of TensorRT-style QDQ exports)."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from quantize_bundled import _Calibration

    x = np.load(ROOT / "models" / f"{name}_test.npz")["input"]
    quantize_static(str(src), str(dst), _Calibration(x), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, extra_options={"AddQDQPairToWeight": True})
    return dst


def files(decoder: Path | None) -> list[tuple[str, Path, dict]]:
    from quantize_bundled import quantize

    CACHE.mkdir(parents=True, exist_ok=True)
    out = []
    for name in BUNDLED:
        src = ROOT / "models" / f"{name}.onnx"
        for level in LEVELS:
            out.append((f"{name} ort_{level}", ort_saved(src, CACHE / f"{name}.ort_{level}.onnx", level), {}))
        for kind in ("qdq", "dynamic"):
            q = CACHE / f"{name}.{kind}.onnx"
            if not q.exists():
                quantize(src, q, name, kind)
            for level in LEVELS:
                out.append((f"{name} {kind} ort_{level}", ort_saved(q, CACHE / f"{name}.{kind}.ort_{level}.onnx", level),
                            {}))
    for name in ("resnet", "mobilenet", "transformer"):  # weights kept in float behind a Q -> DQ pair
        path = CACHE / f"{name}.qdq_weight_pair.onnx"
        if not path.exists():
            fake_quantized(ROOT / "models" / f"{name}.onnx", path, name)
        out.append((f"{name} qdq weight pair", path, {}))
    for variant in ("bert", "bert_fp16"):
        path = ZOO / "transformer" / f"{variant}.onnx"
        if path.exists():
            out.append((f"zoo transformer {variant}", path, {}))
    try:  # a real BERT (the vendor MiniLM) through onnxruntime.transformers' optimizer
        import vendor_models
        from onnxruntime.transformers import optimizer

        path = CACHE / "minilm.bert_optimized.onnx"
        if not path.exists():
            optimizer.optimize_model(str(vendor_models.fetch("minilm")), model_type="bert", num_heads=0,
                                     hidden_size=0).save_model_to_file(str(path))
        out.append(("vendor minilm bert optimizer", path, {}))
    except Exception as exc:  # no vendor cache and no registry: said, not hidden
        print(f"skip vendor minilm: {exc}", file=sys.stderr)
    if decoder is not None:
        for variant in ("genai_fp32", "genai_int4"):
            path = decoder / variant / "model.onnx"
            if path.exists():
                out.append((f"decoder {variant}", path, DECODER_SHAPES))
    return out


def _before_text(prev: dict | None) -> str:
    """The earlier run's share, with how many ops it had no rule for (their channels were not even
    counted: 'nothing to permute' then means the walk saw no producer)."""
    if prev is None:
        return "-"
    if "failed" in prev:
        return "load failed"
    no_rule = sum(prev["no_rule"].values())
    return _share(prev) + (f", {no_rule} ops without a rule" if no_rule else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "ort_coverage.md"))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--before", help="rows of an earlier run (--json): a before -> after column")
    parser.add_argument("--before-label", help="what the earlier run was (a commit), for the text")
    parser.add_argument("--decoder", type=Path, help="tools/build_decoder.py's export folder (genai_fp32, genai_int4)")
    args = parser.parse_args()
    before = {r["name"]: r for r in json.loads(Path(args.before).read_text())} if args.before else {}
    rows = []
    for name, path, shapes in files(args.decoder):
        try:
            rows.append(measure(name, path, shapes))
        except Exception as exc:  # recorded, not hidden (an earlier commit may not load the file)
            rows.append({"name": name, "failed": f"{type(exc).__name__}: {str(exc)[:160]}"})
        print(name, rows[-1].get("permutable"), rows[-1].get("inner"), rows[-1].get("failed", ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if not args.out:
        return
    lines = ["# Walker coverage on files ONNX Runtime writes", "",
             "Generated by `python tools/ort_coverage.py` (see its docstring for the files). Coverage = permutable "
             "hidden channels / inner hidden channels (interface apart: channels that reach a graph output, or "
             "must line up with a graph input such as a key/value cache). Every file is permuted (every group, "
             "seed 11), verified with ONNX Runtime (CPU), and undone."
             + (f" The before column is {args.before_label}." if args.before_label else ""), "",
             "| file | contrib ops without a rule | interface: to outputs / from inputs | permutable / inner | "
             + ("before | " if before else "") + "groups | permute + verify | max norm. error | undo |",
             "|---|---|---|---|" + ("---|" if before else "") + "---|---|---|---|"]
    for r in rows:
        prev = before.get(r["name"])
        prev_text = _before_text(prev) if before else None
        if "failed" in r:
            lines.append(f"| {r['name']} | - | - | FAILED: {r['failed']} |" + (f" {prev_text} |" if before else "")
                         + " - | - | - | - |")
            continue
        no_rule = ", ".join(f"{k} x{v}" for k, v in sorted(r["no_rule"].items())) or "-"
        lines.append(f"| {r['name']} | {no_rule} | {r['outputs']} / {r['inputs']} | {_share(r)} | "
                     + (f"{prev_text} | " if before else "")
                     + f"{r['groups']} | {r['verdict']} | {r['error']:.1e} | {r['undo']} |")
    lines += ["", "Notes: 'nothing to permute' before means the walk met no producer it had a rule for (FusedGemm, "
              "DynamicQuantizeMatMul, ...), so it did not even count their channels. ORT's full level on a float CNN "
              "writes the NCHWc layout (com.microsoft.nchwc: blocked OIHWBiBo weights): no walker rule, its "
              "channels are pinned (a channel move there is not an axis gather of the stored tensor). The genai "
              "decoders keep their weights in model.onnx.data; the undone copy is written inline (a small model), "
              "so its bytes differ while every tensor is equal (compared tensor by tensor "
              "after the run: 19/19 fp32, 30/30 int4).", "", "## What still pins", ""]
    for r in rows:
        if "failed" in r:
            continue
        inner_pins = [(reason, n) for reason, n in r["pinned"]
                      if reason != "reaches a graph output" and not reason.startswith("meets graph input")]
        if inner_pins or r["no_rule"]:
            what = "; ".join(f"{n} channels: {reason}" for reason, n in inner_pins[:3])
            lines.append(f"- {r['name']}: {what or 'ops without a rule: ' + ', '.join(sorted(r['no_rule']))}")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
