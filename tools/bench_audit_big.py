"""Audit of big LLM-style files (issue 14 item 5): fp16 and int4 copies against their fp32 reference.

    python tools/bench_audit_big.py                  # build (cached), measure, write docs/performance.md
    python tools/bench_audit_big.py --tiny --check   # a small one, each file run in ONNX Runtime
    python tools/bench_audit_big.py --profile int4   # cProfile + tracemalloc of one audit, in this process
    python tools/bench_audit_big.py --config medium --only fp16 --before /tmp/base   # before -> after, one run

Models (cached in ~/.cache/onnx-resync/big/<config>/; every file is written tensor by tensor, so
building needs little memory):
- reference.onnx: fp32, external data; a decoder-shaped plain stack of MatMul layers: token
  embedding Gather, LAYERS blocks of RMSNorm (written out: x * 1/sqrt(mean(x^2) + eps) * g) ->
  q/k/v MatMul -> multi-head attention (Reshape/Transpose, softmax(q k^T / sqrt(d)) v) -> o MatMul
  + residual, RMSNorm -> SwiGLU MLP (silu(x Wg) * (x Wu)) Wd + residual; final RMSNorm and lm_head
  MatMul. Random weights (seed 0), RMSNorm scales not 1;
- permuted.onnx: `onnx-resync permute reference.onnx --seed 1 --no-verify` (the package's own
  walker finds the groups);
- fp16.onnx: permuted.onnx with every float tensor, input and output float16;
- int4.onnx: permuted.onnx with every MatMul weight stored as com.microsoft MatMulNBits, 4 bits in
  blocks of 32 with packed zero points (round to nearest, min/max per block: what
  onnxruntime.quantization's MatMulNBitsQuantizer writes, written here tensor by tensor because
  that quantizer holds the whole model in memory); the embedding stays fp32, as that quantizer
  leaves Gather.

Measured, each in its own process (wall time; peak RSS = ru_maxrss of that process, from wait4):
- the baseline per file: `onnx.load(path)` (external data loaded) + `onnx.save(model, out,
  save_as_external_data=True)`; the baseline of an audit is that of its two files, added;
- `onnx-resync audit SUSPECT --reference reference.onnx --json` for each suspect.
Targets: audit <= 3x baseline time, peak RSS <= 1.5x the larger file of the two.
--before DIR also measures the audits with the package of another tree (say `git archive` of an
earlier commit unpacked in DIR; PYTHONPATH=DIR), in the same run: before -> after on one machine state.
Figures go to docs/performance.md between `<!-- audit-big:CONFIG -->` markers (--doc for a config other than big).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
DOC = ROOT / "docs" / "performance.md"
CACHE = Path(os.environ.get("ONNX_RESYNC_CACHE", Path.home() / ".cache" / "onnx-resync")) / "big"
BLOCK = 32
BUILD_VERSION = 1  # bump when the files' content changes

# hidden, heads, intermediate, layers, vocab
CONFIGS = {
    "big": dict(hidden=1536, heads=12, inter=4096, layers=17, vocab=32000),  # 579M parameters
    # Llama-3.2-1B's width and vocabulary on 4 layers: 793M parameters; the embedding stays fp32 in the
    # int4 copy (as MatMulNBitsQuantizer leaves Gather), so the int4 file passes 1 GiB too (1.3 GiB)
    "wide": dict(hidden=2048, heads=16, inter=8192, layers=4, vocab=128256),
    # Llama-3.2-1B's shape, its 16 layers and 32 heads of 64 (multi-head attention here, where it has
    # 8 key/value heads; an lm_head of its own, where it ties the embedding): 1.5G parameters, a
    # 5.9 GiB reference, a 2.9 GiB fp16 and a 1.7 GiB int4 copy
    "llama1b": dict(hidden=2048, heads=32, inter=8192, layers=16, vocab=128256),
    # llama1b's width on 2 layers and a small vocabulary: its per-layer costs (32 heads of 64, MLP 8192)
    # in 20 s, for A/B runs of the matcher (a 0.5 GiB reference)
    "l2": dict(hidden=2048, heads=32, inter=8192, layers=2, vocab=8000),
    "medium": dict(hidden=1024, heads=8, inter=2816, layers=4, vocab=16000),
    "small": dict(hidden=256, heads=4, inter=704, layers=2, vocab=8000),
    "tiny": dict(hidden=64, heads=4, inter=160, layers=2, vocab=100),
}


# ---- writing a model tensor by tensor ------------------------------------------------------------
class Writer:
    """Graph pieces; tensor data goes straight to the external data file as it is added."""

    def __init__(self, path: Path):
        self.path = path
        self.data_name = path.name + ".data"
        self.fh = open(path.parent / self.data_name, "wb")
        self.inits, self.nodes = [], []
        self._k = 0

    def tensor(self, name: str, array: np.ndarray) -> str:
        import onnx
        from onnx import helper

        array = np.ascontiguousarray(array)
        t = onnx.TensorProto()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        if array.nbytes < 1024:
            t.raw_data = array.tobytes()
        else:
            self.fh.write(b"\0" * (-self.fh.tell() % 64))
            offset = self.fh.tell()
            self.fh.write(memoryview(array.reshape(-1)).cast("B"))
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> str:
        from onnx import helper

        self._k += 1
        outs = [f"{op.lower()}_{self._k}" + (f"_{i}" if i else "") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{self._k}", domain=domain or None, **attrs))
        return outs[0]

    def finish(self, inputs, outputs, ms: bool = False) -> Path:
        from onnx import helper

        self.fh.close()
        graph = helper.make_graph(self.nodes, "decoder", inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
        model = helper.make_model(graph, ir_version=8, opset_imports=opsets)
        self.path.write_bytes(model.SerializeToString())
        return self.path


def build_reference(path: Path, hidden: int, heads: int, inter: int, layers: int, vocab: int, seed: int = 0) -> Path:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w = Writer(path)
    f32 = np.float32
    d = hidden // heads

    def mat(name, a, b):
        return w.tensor(name, rng.standard_normal((a, b), dtype=f32) / np.float32(np.sqrt(a)))

    def gain(name):
        return w.tensor(name, (1 + 0.2 * rng.standard_normal(hidden, dtype=f32)).astype(f32))

    eps = w.tensor("eps", np.array(1e-6, f32))
    inv_sqrt_d = w.tensor("inv_sqrt_d", np.array(1 / np.sqrt(d), f32))
    heads_shape = w.tensor("heads_shape", np.array([0, 0, heads, d], np.int64))
    merged_shape = w.tensor("merged_shape", np.array([0, 0, hidden], np.int64))

    def rms(x, g):
        sq = w.node("Mul", [x, x])
        mean = w.node("ReduceMean", [sq], axes=[-1], keepdims=1)
        inv = w.node("Reciprocal", [w.node("Sqrt", [w.node("Add", [mean, eps])])])
        return w.node("Mul", [w.node("Mul", [x, inv]), g])

    def split_heads(t):
        return w.node("Transpose", [w.node("Reshape", [t, heads_shape])], perm=[0, 2, 1, 3])

    x = w.node("Gather", [w.tensor("embed", rng.standard_normal((vocab, hidden), dtype=f32) * f32(0.02)), "ids"])
    for k in range(layers):
        p = f"layers.{k}."
        n = rms(x, gain(p + "attn_norm"))
        q = split_heads(w.node("MatMul", [n, mat(p + "q", hidden, hidden)]))
        kk = split_heads(w.node("MatMul", [n, mat(p + "k", hidden, hidden)]))
        v = split_heads(w.node("MatMul", [n, mat(p + "v", hidden, hidden)]))
        scores = w.node("Mul", [w.node("MatMul", [q, w.node("Transpose", [kk], perm=[0, 1, 3, 2])]), inv_sqrt_d])
        ctx = w.node("MatMul", [w.node("Softmax", [scores], axis=-1), v])
        ctx = w.node("Reshape", [w.node("Transpose", [ctx], perm=[0, 2, 1, 3]), merged_shape])
        x = w.node("Add", [x, w.node("MatMul", [ctx, mat(p + "o", hidden, hidden)])])
        n = rms(x, gain(p + "mlp_norm"))
        g = w.node("MatMul", [n, mat(p + "gate", hidden, inter)])
        silu = w.node("Mul", [g, w.node("Sigmoid", [g])])
        up = w.node("MatMul", [n, mat(p + "up", hidden, inter)])
        x = w.node("Add", [x, w.node("MatMul", [w.node("Mul", [silu, up]), mat(p + "down", inter, hidden)])])
    n = rms(x, gain("final_norm"))
    w.node("MatMul", [n, mat("lm_head", hidden, vocab)])
    w.nodes[-1].output[0] = "logits"
    return w.finish([helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])])


def _tensors(path: Path):
    """(model without data, name -> array memory-mapped or inline)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            out[t.name] = np.memmap(path.parent / info["location"], dtype=dtype, mode="r",
                                    offset=int(info["offset"]), shape=tuple(t.dims))
        else:
            out[t.name] = numpy_helper.to_array(t)
    return model, out


def to_fp16(src: Path, dst: Path) -> Path:
    from onnx import TensorProto

    model, arrays = _tensors(src)
    w = Writer(dst)
    for t in model.graph.initializer:
        a = arrays[t.name]
        w.tensor(t.name, a.astype(np.float16) if a.dtype == np.float32 else np.asarray(a))
    w.nodes = list(model.graph.node)
    for vi in list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return w.finish(list(model.graph.input), list(model.graph.output))


def quantize_int4(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A MatMul weight [K, N] as MatMulNBits' (B [N, K/block, block/2] uint8, scales [N, K/block]
    float32, zero points [N, ceil(K/block/2)] uint8): min/max per block, round to nearest."""
    K, N = w.shape
    blocks = -(-K // block)
    t = np.zeros((N, blocks * block), np.float32)
    t[:, :K] = w.T
    t = t.reshape(N, blocks, block)
    lo = np.minimum(t.min(axis=2), 0)
    hi = np.maximum(t.max(axis=2), 0)
    scale = ((hi - lo) / 15).astype(np.float32)
    scale[scale == 0] = 1
    zp = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(t / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zp = zp.astype(np.uint8)
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((N, 1), np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale, zp_packed


def to_int4(src: Path, dst: Path) -> Path:
    from onnx import helper

    model, arrays = _tensors(src)
    w = Writer(dst)
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in arrays}
    for t in model.graph.initializer:
        if t.name not in matmul_weights:
            w.tensor(t.name, np.asarray(arrays[t.name]))
    nodes = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in matmul_weights:
            W = np.asarray(arrays[n.input[1]], dtype=np.float32)
            B, s, z = quantize_int4(W)
            name = n.input[1]
            w.tensor(name + "_Q4", B)
            w.tensor(name + "_scales", s)
            w.tensor(name + "_zp", z)
            nodes.append(helper.make_node("MatMulNBits", [n.input[0], name + "_Q4", name + "_scales", name + "_zp"],
                                          list(n.output), name=n.name + "_Q4", domain="com.microsoft",
                                          K=W.shape[0], N=W.shape[1], bits=4, block_size=BLOCK))
        else:
            nodes.append(n)
    w.nodes = nodes
    return w.finish(list(model.graph.input), list(model.graph.output), ms=True)


def build(config: str) -> dict[str, Path]:
    folder = CACHE / f"{config}-v{BUILD_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"{k}.onnx" for k in ("reference", "permuted", "fp16", "int4")}
    done = folder / "complete"
    if done.exists():
        return paths
    print(f"building {config} in {folder} ...", flush=True)
    build_reference(paths["reference"], **CONFIGS[config])
    rc = subprocess.run([sys.executable, "-m", "onnx_resync", "permute", str(paths["reference"]), "-o",
                         str(paths["permuted"]), "--seed", "1", "--no-verify"], capture_output=True, text=True)
    if rc.returncode:
        raise SystemExit(f"permute failed: {rc.stderr[-2000:]}")
    to_fp16(paths["permuted"], paths["fp16"])
    to_int4(paths["permuted"], paths["int4"])
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def check(paths: dict[str, Path]) -> None:
    """Each file in ONNX Runtime on the same ids: the suspects' logits near the reference's (the
    permutation keeps the function)."""
    import onnxruntime as ort

    ids = np.arange(7, dtype=np.int64).reshape(1, -1) % 50
    out = {}
    for k, p in paths.items():
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        out[k] = sess.run(None, {"ids": ids})[0].astype(np.float32)
    ref = out["reference"]
    for k, y in out.items():
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        print(f"{k}: max |logits - reference| / max |reference| = {err:.2e}")
        assert err < (1e-5 if k in ("reference", "permuted") else 2e-2 if k == "fp16" else 0.3), k


# ---- measuring ---------------------------------------------------------------------------------------
LOAD_SAVE = r"""
import sys, onnx
m = onnx.load(sys.argv[1], load_external_data=True)
onnx.save(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, location=sys.argv[3])
"""


def files_bytes(path: Path) -> int:
    from bench_huge import model_bytes

    return model_bytes(path)


# Runs one command and reports its rusage from wait4 (as tools/bench_huge.py's launcher, with CPU
# time: on this shared machine the wall time moves with the other processes' load, CPU time less)
LAUNCHER = r"""
import json, os, subprocess, sys, threading, time
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(sys.argv[4:], stdout=out, stderr=err)
    timer = threading.Timer(float(sys.argv[3]), proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss,
                  "rc": os.waitstatus_to_exitcode(status), "killed": seconds >= float(sys.argv[3])}))
"""


def measured(args: list[str], timeout: float = 1e9, env: dict | None = None, cwd: Path | None = None) -> dict:
    """A command in its own process: wall time, CPU time, peak RSS (ru_maxrss of that process);
    killed after `timeout` seconds (then "killed": True)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        p = subprocess.run([sys.executable, "-c", LAUNCHER, str(out), str(err), str(timeout), *args],
                           capture_output=True, text=True, env=env, cwd=cwd)
        if p.returncode != 0:
            raise SystemExit(f"launcher failed: {p.stderr[-2000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        return {"seconds": r["seconds"], "cpu": r["cpu"], "peak_rss_bytes": r["maxrss_kb"] * 1024, "rc": r["rc"],
                "killed": r["killed"], "stdout": out.read_text(errors="replace"),
                "stderr": err.read_text(errors="replace")}


def baseline(path: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        r = measured([sys.executable, "-c", LOAD_SAVE, str(path), str(Path(tmp) / "copy.onnx"), "copy.onnx.data"])
    if r["rc"] != 0:
        raise SystemExit(f"load + save of {path} failed: {r['stderr'][-3000:]}")
    return r


def audit(suspect: Path, reference: Path, timeout: float, tree: Path | None = None) -> dict:
    """tree: run the package of that tree (PYTHONPATH), not this one."""
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree is not None else None
    r = measured([sys.executable, "-m", "onnx_resync", "audit", str(suspect), "--reference", str(reference), "--json"],
                 timeout, env=env, cwd=tree)
    if r["killed"]:
        r["report"] = {"summary": f"(killed after {timeout:.0f} s: no verdict)", "timings": {}}
        return r
    if r["rc"] not in (0, 1):
        raise SystemExit(f"audit {suspect} failed ({r['rc']}): {r['stderr'][-3000:]}")
    r["report"] = json.loads(r["stdout"])
    return r


def measure(paths: dict[str, Path], repeats: int, timeout: float, only: tuple[str, ...] = ("fp16", "int4"),
            before: Path | None = None) -> dict:
    base = {}
    for k in ("reference",) + only:
        runs = [baseline(paths[k]) for _ in range(repeats)]
        base[k] = min(runs, key=lambda r: r["seconds"])
        print(f"load+save {k}: {base[k]['seconds']:.1f} s ({base[k]['cpu']:.1f} s CPU), peak RSS {base[k]['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
    audits, befores = {}, {}
    for k in only:
        for tree, into, label in ([(before, befores, f"before ({before})")] if before else []) + [(None, audits, "")]:
            runs = [audit(paths[k], paths["reference"], timeout, tree) for _ in range(repeats)]
            into[k] = min(runs, key=lambda r: r["seconds"])
            rep = into[k]["report"]
            print(f"audit {k} {label}: {into[k]['seconds']:.1f} s ({into[k]['cpu']:.1f} s CPU), peak RSS "
                  f"{into[k]['peak_rss_bytes'] / 2**30:.2f} GiB, {rep['summary']}; timings {rep['timings']}", flush=True)
    return {"baseline": base, "audit": audits, "before": befores, "bytes": {k: files_bytes(p) for k, p in paths.items()}}


def table(config: str, result: dict) -> str:
    gib = 2 ** 30
    b, a, size = result["baseline"], result["audit"], result["bytes"]
    before = result.get("before") or {}
    c = CONFIGS[config]
    params = (c["vocab"] * c["hidden"] * 2 + c["layers"] * (4 * c["hidden"] ** 2 + 3 * c["hidden"] * c["inter"])
              + (2 * c["layers"] + 1) * c["hidden"])
    lines = [
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"config `{config}`: hidden {c['hidden']}, {c['heads']} heads, MLP {c['inter']}, {c['layers']} layers, "
        f"vocab {c['vocab']}: {params / 1e6:.0f}M parameters. Files: reference fp32 {size['reference'] / gib:.2f} GiB, "
        f"fp16 {size['fp16'] / gib:.2f} GiB, int4 {size['int4'] / gib:.2f} GiB (model + external data).",
        "",
        "| suspect | baseline: load + save of both files, s (CPU s) | audit, s (CPU s) | time ratio (target <= 3) "
        "| CPU ratio | audit peak RSS (GiB) | larger file (GiB) | RSS / larger file (target <= 1.5) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in a:
        base_s = b[k]["seconds"] + b["reference"]["seconds"]
        base_cpu = b[k]["cpu"] + b["reference"]["cpu"]
        larger = max(size[k], size["reference"])
        rep = a[k]["report"]
        lines.append(f"| {k} | {base_s:.1f} ({base_cpu:.1f}) | {a[k]['seconds']:.1f} ({a[k]['cpu']:.1f}) "
                     f"| {a[k]['seconds'] / base_s:.2f}x | {a[k]['cpu'] / base_cpu:.2f}x "
                     f"| {a[k]['peak_rss_bytes'] / gib:.2f} | {larger / gib:.2f} "
                     f"| {a[k]['peak_rss_bytes'] / larger:.2f}x | {rep['summary']} |")
    lines += ["", "Per file, load + save alone: " + ", ".join(
        f"{k} {b[k]['seconds']:.1f} s / {b[k]['peak_rss_bytes'] / gib:.2f} GiB peak RSS" for k in b) + "."]
    for k, r in before.items():
        base_s = b[k]["seconds"] + b["reference"]["seconds"]
        larger = max(size[k], size["reference"])
        lines += ["", f"{k} before (other tree, same run): {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU), "
                      f"{r['seconds'] / base_s:.2f}x, peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB "
                      f"({r['peak_rss_bytes'] / larger:.2f}x), {r['report']['summary']}"]
    lines += ["", "Audit stages (s): " + "; ".join(
        f"{k}: " + (", ".join(f"{s} {v:.1f}" for s, v in a[k]["report"]["timings"].items()) or "-") for k in a) + "."]
    return "\n".join(lines)


def write_doc(text: str, config: str) -> None:
    """The config's figures between <!-- audit-big:CONFIG --> markers (added at the end the first time)."""
    doc = DOC.read_text()
    start, end = f"<!-- audit-big:{config} -->", f"<!-- /audit-big:{config} -->"
    block = f"{start}\n{text}\n{end}"
    if start in doc:
        doc = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(doc)


def profile(paths: dict[str, Path], which: str) -> None:
    import cProfile
    import pstats
    import tracemalloc

    from onnx_resync.api import audit as api_audit

    tracemalloc.start()
    prof = cProfile.Profile()
    prof.enable()
    report = api_audit(str(paths[which]), str(paths["reference"]))
    prof.disable()
    _, peak = tracemalloc.get_traced_memory()
    print(report.summary, report.timings)
    print(f"tracemalloc peak {peak / 2**30:.2f} GiB")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="big")
    ap.add_argument("--tiny", action="store_true", help="--config tiny")
    ap.add_argument("--check", action="store_true", help="run every file in ONNX Runtime (small configs)")
    ap.add_argument("--profile", choices=("fp16", "int4"), help="profile one audit in this process")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="an audit still running after this many seconds is "
                    "killed and reported as such")
    ap.add_argument("--doc", action="store_true", help="write docs/performance.md for a config other than big too")
    ap.add_argument("--only", choices=("fp16", "int4"), help="audit this suspect only")
    ap.add_argument("--before", type=Path, help="also audit with the package of this tree (PYTHONPATH), same run")
    args = ap.parse_args()
    config = "tiny" if args.tiny else args.config
    paths = build(config)
    if args.check:
        check(paths)
    if args.profile:
        profile(paths, args.profile)
        return
    result = measure(paths, args.repeats, args.timeout, (args.only,) if args.only else ("fp16", "int4"), args.before)
    text = table(config, result)
    text += f"\n\nCommand: `python tools/bench_audit_big.py --config {config}" + (
        f" --repeats {args.repeats}`" if args.repeats != 1 else "`")
    print(text)
    if not args.no_doc and (config == "big" or args.doc):
        write_doc(text, config)


if __name__ == "__main__":
    main()
