"""The vendor zoo: real vendor files re-exported by standard tools, each audited against the original.

For each vendor file (tests/vendor_models.py; the cached copy in ~/.cache/onnx-resync/vendor only,
nothing is downloaded here) the transforms of tools/build_zoo.py (ONNX Runtime's saved optimized
model, onnxslim, fp16 by two converters, dynamic int8, other node order, other names) are applied
to the file and to a permuted copy (truth: identical / permuted), and an unrelated twin is drawn:
every float weight of two or more values redrawn from a normal law with the tensor's own mean and
std (truth: not derived). A copy ONNX Runtime cannot load is 'not built' (the tool wrote no usable
file). Dynamic int8 is built as a user builds it (`t_dynamic`): quantize_dynamic on
the file, and where ONNX Runtime's quantizer refuses it (Paddle files: "Expected conv2d_157.w_0 to be an
initializer", a Conv with a bias whose weight is a Constant node), ONNX Runtime's quantization
pre-processing first, as its warning asks (quant_pre_process: its optimizer writes the Constant nodes
as initializers; symbolic shape inference skipped where it cannot complete, its --skip_symbolic_shape). Each is audited by the CLI against the original; the truth x verdict
table goes into docs/zoo.md, section "Vendor files" (between its markers; tools/zoo_audit.py keeps
it when it rewrites the rest).

    python tools/vendor_zoo.py                      # every cached vendor file of KEYS
    python tools/vendor_zoo.py ppocr_rec minilm     # some; --rerun audits again after a change
    python tools/vendor_zoo.py ppocr_rec --transforms dynamic --rerun   # one transform (and the twin) again
Built files and results are cached in ~/.cache/onnx-resync/vendor_zoo/<key>/ (results.json).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_resync.walk.graph import nested_graphs

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ONNX_RESYNC_VENDOR_ZOO", Path.home() / ".cache/onnx-resync/vendor_zoo"))
BEGIN, END = "<!-- vendor-zoo:begin -->", "<!-- vendor-zoo:end -->"
# every catalog file that is a model of its own (silero_vad_openvino: op15's weights, another graph)
KEYS = ["ppocr_rec", "ppocr_det", "ppocr_cls", "pplcnet_orientation", "nudenet_320n", "silero_vad_op15", "minilm",
        "mtcnn_onet", "arabic_gru_encoder", "ddddocr_common",
        "ppocrv3_det", "ppocrv3_rec", "picodet_layout", "magika", "basic_pitch", "mtcnn_pnet", "mtcnn_rnet",
        "silero_vad_openvino", "silero_vad_ifless", "silero_vad_if", "silero_vad_v6", "ddddocr_det",
        "ddddocr_common_old", "arabic_gru_decoder", "oww_silero_vad", "oww_melspectrogram", "oww_embedding",
        "oww_hey_mycroft", "dnsmos_sig_bak_ovr", "plcmos_v2"]
TRANSFORMS = ["plain", "reordered", "renamed", "ort_basic", "ort_extended", "ort_all", "onnxslim",
              "fp16_ort", "fp16_occ", "dynamic"]
TWIN_SEED = 7
# integer weights a quantized file stores (ddddocr's common_old: ConvInteger on int8 codes): a twin
# that kept them would share every neuron's direction with the file (int64/int32: shapes, indices)
QUANTIZED = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
PARAMETER_INPUTS = {"Resize": (1, 2), "Upsample": (1,), "Clip": (1, 2), "Pad": (1, 2, 3)}  # kept by the twin
TIMEOUT_S = 900


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_twin(src: Path, dst: Path, seed: int = TWIN_SEED) -> None:
    """Every float or int8/uint8 weight (initializer or Constant node, in the main graph and in every
    If/Loop/Scan body: silero_vad_if keeps all its weights in its branches) of 2+ values redrawn with
    its mean and std (integers rounded and clipped to their type), except BatchNormalization's
    running mean and variance (statistics; a variance must stay positive) and an op's parameters
    (PARAMETER_INPUTS: Resize scales, Clip bounds, Pad values)."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    graphs = list(nested_graphs(model.graph))  # (every If/Loop/Scan body too)
    stats = {n.input[i] for g in graphs for n in g.node if n.op_type == "BatchNormalization" for i in (3, 4)
             if len(n.input) > i}
    # an op's parameters, not weights: redrawn Resize scales give shapes ONNX Runtime refuses
    stats |= {n.input[i] for g in graphs for n in g.node for i in PARAMETER_INPUTS.get(n.op_type, ())
              if len(n.input) > i}
    tensors = [t for g in graphs for t in g.initializer] + [
        a.t for g in graphs for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) + QUANTIZED \
                or t.name in stats:
            continue
        w = numpy_helper.to_array(t)
        if w.size < 2:
            continue
        drawn = rng.standard_normal(w.shape) * float(w.astype(np.float64).std()) + float(w.astype(np.float64).mean())
        if w.dtype.kind in "iu":  # a quantized weight's codes (its float scales are redrawn too)
            drawn = np.clip(np.round(drawn), np.iinfo(w.dtype).min, np.iinfo(w.dtype).max)
        t.CopyFrom(numpy_helper.from_array(drawn.astype(w.dtype), t.name))
    onnx.save(model, str(dst))


def t_dynamic(src: Path, dst: Path, key: str, bz) -> None:
    """quantize_dynamic (build_zoo.t_dynamic) on the file; where the quantizer refuses it, on the file
    after ONNX Runtime's quantization pre-processing (module docstring)."""
    try:
        bz.t_dynamic(src, dst, key)
        return
    except Exception as exc:  # noqa: BLE001 - the quantizer's refusal: pre-process as its warning says
        first = exc
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        try:
            # (in tmp: a failed symbolic shape inference leaves sym_shape_infer_temp.onnx in the cwd)
            with bz.quiet(), contextlib.chdir(tmp):
                try:
                    quant_pre_process(str(src), str(pre))
                except Exception:  # noqa: BLE001 - "Incomplete symbolic shape inference": without it
                    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            bz.t_dynamic(pre, dst, key)
        except Exception as exc:
            raise RuntimeError(f"{first}; after quant_pre_process: {exc}") from exc


OWN_TRANSFORMS = {"dynamic": t_dynamic}  # transforms built here, not by build_zoo's t_<name>


def refused(path: Path) -> None:
    """Raise where ONNX Runtime cannot load a written copy: the tool wrote no file a user has (both
    float16 converters on ddddocr's dynamically quantized model: DynamicQuantizeLinear on float16)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - whatever ORT says is the row's message (less the path)
        said = str(exc).split(" failed:", 1)[-1] if str(path) in str(exc) else str(exc)
        raise RuntimeError(f"ONNX Runtime cannot load the copy: {said}") from None


def audit(suspect: Path, reference: Path) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "onnx_resync", "audit", str(suspect), "--reference", str(reference),
                            "--json"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"rc": None, "verdict": "timeout", "seconds": TIMEOUT_S, "line": "timeout"}
    seconds = round(time.time() - t0, 1)
    try:
        report = json.loads(p.stdout)
        return {"rc": p.returncode, "verdict": report["verdict"], "seconds": seconds, "line": report["summary"][:300]}
    except (json.JSONDecodeError, KeyError, TypeError):
        line = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"rc": p.returncode, "verdict": "error (exit 3)" if p.returncode == 3 else f"exit {p.returncode}",
                "seconds": seconds, "line": line[:300]}


def run_key(key: str, transforms: list[str], bz, vm, log, rerun: bool = False) -> list[dict]:
    src = vm.cached_path(key)
    if not src.exists():
        log(f"{key}: not cached ({src}); skipped")
        return []
    out = CACHE / key
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = json.loads(results_path.read_text()) if results_path.exists() else {}
    stamp = f"{src.stat().st_size}:{src.stat().st_mtime_ns}"
    if done.get("_stamp") != stamp:
        done = {"_stamp": stamp}
    elif rerun:  # this run's transforms (and the twin) again, the other rows kept
        done = {k: v for k, v in done.items()
                if k == "_stamp" or (k.split(".")[0] not in transforms and k != "twin")}
    perm = out / "perm.onnx"
    if not perm.exists():
        bz.make_permuted(src, perm)

    def builder(t: str):
        own = OWN_TRANSFORMS.get(t)
        return (lambda s, dst, key: own(s, dst, key, bz)) if own else getattr(bz, "t_" + t)

    jobs = [(f"{t}.{kind}", kind, lambda dst, t=t, s=s: builder(t)(s, dst, key))
            for t in transforms for kind, s in (("src", src), ("perm", perm))]
    jobs.append(("twin", "twin", lambda dst: make_twin(src, dst)))
    for name, kind, build in jobs:
        truth = {"src": "identical", "perm": "permuted", "twin": "not derived"}[kind]
        if name in done:
            continue
        dst = out / f"{name}.onnx"
        try:
            if not dst.exists():
                build(dst)
            refused(dst)
        except Exception as exc:  # a tool that cannot write this file: reported, not audited
            row = {"key": key, "name": name, "truth": truth, "verdict": "not built", "rc": None, "seconds": 0,
                   "line": " ".join(str(exc).split())[:200]}
        else:
            row = {"key": key, "name": name, "truth": truth, **audit(dst, src)}
        log(f"{key} {name}: truth {truth}, verdict {row['verdict']} ({row['seconds']}s) {row['line'][:120]}")
        done[name] = row
        results_path.write_text(json.dumps(done, indent=1))
    return [row for name, row in done.items() if name != "_stamp"]  # the key's every row, not only this run's


def right(row: dict) -> bool | None:
    """True: the verdict is the truth; False: a wrong verdict (derived said of the twin, or 'not
    derived' of a copy, or the wrong kind); None: no verdict (not built, error, cannot judge)."""
    v = row["verdict"]
    if v not in ("identical", "permuted", "perturbed", "not derived"):
        return None
    return v == row["truth"]


def section(rows: list[dict]) -> str:
    verdicts = ["identical", "permuted", "perturbed", "not derived", "cannot judge"]
    other = sorted({r["verdict"] for r in rows} - set(verdicts))
    cols = verdicts + other
    out = [BEGIN, "## Vendor files (tools/vendor_zoo.py)", "",
           "Real vendor files (tests/vendor_models.py), each through tools/build_zoo.py's transforms, also on a "
           "permuted copy, and an unrelated twin (every float weight, and int8/uint8 codes, redrawn with the tensor's "
           "mean and std, in If/Loop/Scan bodies too); each audited against the original ('not built': the tool "
           "failed, or wrote a copy ONNX Runtime cannot load).", "",
           "| truth \\ verdict | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for truth in ("identical", "permuted", "not derived"):
        counts = [sum(1 for r in rows if r["truth"] == truth and r["verdict"] == c) for c in cols]
        out.append(f"| {truth} | " + " | ".join(str(c) for c in counts) + " |")
    wrong = [r for r in rows if right(r) is False]
    none = [r for r in rows if right(r) is None]
    out += ["", f"{len(rows)} audits on {len({r['key'] for r in rows})} files: {len(rows) - len(wrong) - len(none)} "
            f"right, {len(wrong)} wrong, {len(none)} without a verdict.", ""]
    if wrong or none:
        out += ["| file | copy | truth | verdict | what it said |", "|---|---|---|---|---|"]
        for r in wrong + none:
            out.append(f"| {r['key']} | {r['name']} | {r['truth']} | {r['verdict']} | "
                       f"{r['line'].replace('|', '/')[:200]} |")
        out.append("")
    secs = sorted(r["seconds"] for r in rows if r.get("seconds"))
    if secs:
        out.append(f"Per audit: median {secs[len(secs) // 2]:.1f}s, max {secs[-1]:.1f}s.")
    out.append(END)
    return "\n".join(out)


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description="Audit vendor files re-exported by standard tools; docs/zoo.md")
    ap.add_argument("keys", nargs="*", default=KEYS)
    ap.add_argument("--transforms", default=",".join(TRANSFORMS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo.md")
    ap.add_argument("--rerun", action="store_true", help="audit again (the built files are kept)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tools"))
    bz = _module("build_zoo", ROOT / "tools" / "build_zoo.py")
    import vendor_models as vm
    rows = []
    for key in args.keys:
        rows += run_key(key, args.transforms.split(","), bz, vm, lambda m: print(m, flush=True), args.rerun)
    # the section covers every key with results in the cache, not only this run's
    for key in sorted({p.parent.name for p in CACHE.glob("*/results.json")} - set(args.keys)):
        rows += [r for k, r in json.loads((CACHE / key / "results.json").read_text()).items() if k != "_stamp"]
    write_section(args.out, section(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
