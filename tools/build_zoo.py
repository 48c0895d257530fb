#!/usr/bin/env python3
"""Build the exporter zoo of issue 14: every bundled model re-exported the ways a vendor does.

For each bundled model (``models/<name>.onnx``) this writes, into a cache folder
(``~/.cache/onnx-resync/zoo/<name>/<variant>.onnx``; ``--cache`` or ``$ONNX_RESYNC_ZOO`` elsewhere),
the files that standard tools produce from it:

======================  =========================================================================
transform               what writes it
======================  =========================================================================
plain                   the file itself (a copy: the baseline)
reordered               nodes in another valid topological order (seeded), names kept
renamed                 another order and every node, initializer and value name changed (graph
                        inputs and outputs too)
ort_basic/extended/all  ONNX Runtime's saved optimized model (``SessionOptions.optimized_model_
                        filepath``, CPU) at ORT_ENABLE_BASIC / EXTENDED / ALL
onnxslim                ``onnxslim.slim``
bert, bert_fp16         (transformer only) ``onnxruntime.transformers.optimizer.optimize_model``,
                        model_type "bert", 4 heads, hidden 64; fp16 with the optimizer model's
                        ``convert_float_to_float16(keep_io_types=True)``
qdq_pc, qdq_pt          ``quantize_static``, QDQ, int8 weights per channel / per tensor, calibrated on
                        32 samples of ``models/<name>_test.npz``
qdq_pre                 ``quant_pre_process`` (ORT's recommended pre-processing: shape inference and
                        the basic optimizer, which folds BatchNorm) then QDQ per channel
qop                     ``quantize_static``, QOperator, per channel
dynamic                 ``quantize_dynamic`` (int8 weights)
fp16_ort                ``onnxruntime.transformers.float16.convert_float_to_float16`` (keep_io_types)
fp16_occ                ``onnxconverter_common.float16.convert_float_to_float16`` (keep_io_types)
torch_dynamo            ``torch.onnx.export(dynamo=True)`` of the PyTorch module of tools/build_models.py
                        with the ONNX file's weights copied in
torch_script            ``torch.onnx.export(dynamo=False)`` (default settings: eval mode, BatchNorm
                        folded, constant folding)
======================  =========================================================================

Each transform is applied to the source, to the source permuted (``onnx-resync permute --seed 1``:
``<transform>.perm``) and, for some transforms, to the source permuted and perturbed (Gaussian noise,
0.02 x the tensor's std, on every float weight but BatchNorm statistics: ``<transform>.perm.noise``);
``plain.noise`` is the perturbed source without a permutation. (The permutation and the noise are
applied to the fp32 source before the tool runs, as a vendor would permute its copy and then export.)

Every file is run with ONNX Runtime (CPU) on 64 samples of the test set next to what it was made from
(the source, permuted or perturbed as the variant says) and enters the zoo only when its normalized
error (max |a - b| / max |reference| over the outputs) is within its storage's bound (fp32 1e-4,
fp16 2e-2, int8 0.35); the error is recorded either way. A transform that fails (the tool raises, or
the file does not compute what its source computes) is listed in the manifest with its error.

``<cache>/manifest.json`` says for every variant: file, transform, truth (permuted, perturbed,
storage, the verdict an audit must give: identical, permuted or perturbed), error, seconds, op
histogram, or the tool's error. The unrelated twin (``models/variants/<name>_seed1.onnx``) is named
per model; tools/zoo_audit.py audits every variant against both.

Usage::

    python tools/build_zoo.py                         # all models; reuses what is there
    python tools/build_zoo.py --only mlp,gru          # these models
    python tools/build_zoo.py --rebuild               # everything again
    python tools/build_zoo.py --retry-failed          # failed transforms again (e.g. a tool installed since)

Needs the dev extra (onnxslim, onnxconverter-common); the torch variants need torch and onnxscript
(``pip install torch onnxscript``): without them those variants are listed as failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# $ONNX_RESYNC_SRC: a folder holding another onnx_resync to measure (e.g. `git archive HEAD onnx_resync`
# unpacked there, while the working tree is mid-edit); default: this checkout
sys.path.insert(0, os.environ.get("ONNX_RESYNC_SRC") or str(ROOT))

from onnx_resync.walk.graph import nested_graphs, subgraphs  # noqa: E402

ZOO_VERSION = 1  # bump when a transform changes: every variant is built again
DEFAULT_CACHE = Path(os.environ.get("ONNX_RESYNC_ZOO", Path.home() / ".cache" / "onnx-resync" / "zoo"))
MODEL_NAMES = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]
PERMUTE_SEED = 1
NOISE = 0.02
NOISE_SEED = 2
VERIFY_SAMPLES = 64
CALIBRATION_SAMPLES = 32
BOUNDS = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.35}

# transform -> storage of the file it writes
TRANSFORMS = {
    "plain": "fp32", "reordered": "fp32", "renamed": "fp32",
    "ort_basic": "fp32", "ort_extended": "fp32", "ort_all": "fp32",
    "onnxslim": "fp32", "bert": "fp32", "bert_fp16": "fp16",
    "qdq_pc": "int8", "qdq_pt": "int8", "qdq_pre": "int8", "qop": "int8", "dynamic": "int8",
    "fp16_ort": "fp16", "fp16_occ": "fp16",
    "torch_dynamo": "fp32", "torch_script": "fp32",
}
ONLY_FOR = {"bert": {"transformer"}, "bert_fp16": {"transformer"}}
# transforms also applied to the permuted and perturbed source
NOISY = {"plain", "renamed", "ort_extended", "bert", "qdq_pc", "fp16_occ", "torch_dynamo"}


def plan(model: str) -> list[tuple[str, str, str]]:
    """(variant, transform, source kind) for one model; source kind: src, perm, noise, perm_noise."""
    out = []
    for t in TRANSFORMS:
        if t in ONLY_FOR and model not in ONLY_FOR[t]:
            continue
        out.append((t, t, "src"))
        out.append((f"{t}.perm", t, "perm"))
        if t in NOISY:
            out.append((f"{t}.perm.noise", t, "perm_noise"))
    out.append(("plain.noise", "plain", "noise"))
    return out


def truth(source_kind: str, transform: str) -> dict:
    permuted = "perm" in source_kind
    perturbed = "noise" in source_kind
    expected = "perturbed" if perturbed else "permuted" if permuted else "identical"
    return {"permuted": permuted, "perturbed": perturbed, "storage": TRANSFORMS[transform], "expected": expected}


# ---------------------------------------------------------------------------------------------
# helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def test_inputs(model: str) -> np.ndarray:
    return np.load(MODELS / f"{model}_test.npz")["input"]


def op_histogram(path: Path) -> dict:
    mp = onnx.load(str(path), load_external_data=False)
    hist = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in mp.graph.node)
    return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))


def run_ort(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Outputs of a file on CPU; inputs fed by position (renamed files), cast to the input's type."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return [np.asarray(o, dtype=np.float32) for o in sess.run(None, {inp.name: x.astype(dtype)})]


def normalized_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(ref) != len(got):
        raise ValueError(f"{len(got)} outputs, the source has {len(ref)}")
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            raise ValueError(f"output shape {b.shape}, the source's is {a.shape}")
        scale = float(np.abs(a).max()) or 1.0
        worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


@contextlib.contextmanager
def quiet():
    """Tools print progress and warnings; keep the build's output to one line a variant."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                yield
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------------------------
# sources: permuted, perturbed


def make_permuted(src: Path, dst: Path) -> None:
    from onnx_resync import api

    api.permute(str(src), str(dst), seed=PERMUTE_SEED)


def make_perturbed(src: Path, dst: Path) -> None:
    """Gaussian noise, NOISE x the tensor's std, on every float initializer with more than one value
    except BatchNorm's running mean and variance (statistics, and a variance must stay positive)."""
    mp = onnx.load(str(src))
    stats = {n.input[i] for n in mp.graph.node if n.op_type == "BatchNormalization" for i in (3, 4) if len(n.input) > i}
    rng = np.random.default_rng(NOISE_SEED)
    for init in mp.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in stats:
            continue
        w = numpy_helper.to_array(init)
        if w.size < 2:
            continue
        noisy = (w + rng.standard_normal(w.shape) * NOISE * float(w.std())).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(mp, str(dst))


# ---------------------------------------------------------------------------------------------
# transforms: (source path, destination path, model name) -> writes destination


def t_plain(src, dst, model):
    shutil.copyfile(src, dst)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph reads from enclosing scopes (a body's implicit inputs): what its nodes and their
    bodies read that nothing in it defines."""
    defined = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    read = set()
    for n in graph.node:
        read.update(x for x in n.input if x)
        for g in subgraphs(n):
            read |= _outer_names(g)
        defined.update(n.output)
    return read - defined


def _topological_shuffle(graph: onnx.GraphProto, rng) -> list[onnx.NodeProto]:
    """Another valid order of the graph's nodes; a node with a body also waits for what its body reads
    from this scope."""
    produced_by = {}
    for i, n in enumerate(graph.node):
        for o in n.output:
            if o:
                produced_by[o] = i
    reads = [set(n.input).union(*(_outer_names(g) for g in subgraphs(n))) for n in graph.node]
    deps = [{produced_by[x] for x in r if x in produced_by} for r in reads]
    users = [[] for _ in graph.node]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    left = [len(d) for d in deps]
    ready = [i for i, c in enumerate(left) if c == 0]
    order = []
    while ready:
        i = ready.pop(int(rng.integers(len(ready))))
        order.append(i)
        for u in users[i]:
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        raise ValueError("the graph has a cycle")
    return [graph.node[i] for i in order]


def _reorder(src, dst, seed: int, rename: bool):
    """Every graph's nodes (bodies of If/Loop/Scan included) in another valid order; with rename, every
    tensor, node and graph name replaced, the same way in every scope (a body reads outer names)."""
    mp = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    todo = [mp.graph]
    while todo:  # parents first: extend() copies the nodes, so bodies are reached in the new copies
        g = todo.pop(0)
        nodes = _topological_shuffle(g, rng)
        del g.node[:]
        g.node.extend(nodes)
        todo += [b for n in g.node for b in subgraphs(n)]
    graphs = list(nested_graphs(mp.graph))
    if rename:
        names = set()
        for g in graphs:
            for n in g.node:
                names.update(x for x in list(n.input) + list(n.output) if x)
            names.update(t.name for t in g.initializer)
            names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        names = sorted(names)
        ids = rng.permutation(len(names))
        new = {old: f"t{ids[i]:05d}" for i, old in enumerate(names)}
        for depth, g in enumerate(graphs):
            for k, n in enumerate(g.node):
                n.input[:] = [new[x] if x else x for x in n.input]
                n.output[:] = [new[x] if x else x for x in n.output]
                n.name = f"node{rng.integers(1 << 30):09d}_{k}"
            for t in g.initializer:
                t.name = new[t.name]
            for v in list(g.input) + list(g.output) + list(g.value_info):
                v.name = new[v.name]
            g.name = "graph" if depth == 0 else f"graph{depth}"
    onnx.save(mp, str(dst))


def t_reordered(src, dst, model):
    _reorder(src, dst, seed=7, rename=False)


def t_renamed(src, dst, model):
    _reorder(src, dst, seed=8, rename=True)


def _ort_saved(src, dst, level_name):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    if not Path(dst).exists():
        raise RuntimeError("ONNX Runtime wrote no optimized model")


def t_ort_basic(src, dst, model):
    _ort_saved(src, dst, "ORT_ENABLE_BASIC")


def t_ort_extended(src, dst, model):
    _ort_saved(src, dst, "ORT_ENABLE_EXTENDED")


def t_ort_all(src, dst, model):
    _ort_saved(src, dst, "ORT_ENABLE_ALL")


def t_onnxslim(src, dst, model):
    import onnxslim

    with quiet():
        slim = onnxslim.slim(onnx.load(str(src)))
    onnx.save(slim, str(dst))


def _bert(src, dst, fp16: bool):
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet():
        opt = optimize_model(str(src), model_type="bert", num_heads=4, hidden_size=64)
        if fp16:
            opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(dst))


def t_bert(src, dst, model):
    _bert(src, dst, fp16=False)


def t_bert_fp16(src, dst, model):
    _bert(src, dst, fp16=True)


class _Calibration:
    """CalibrationDataReader over the first samples of the test set, one batch of 8 at a time."""

    def __init__(self, x: np.ndarray, name: str):
        self._feeds = iter([{name: x[i:i + 8]} for i in range(0, min(CALIBRATION_SAMPLES, len(x)), 8)])

    def get_next(self):
        return next(self._feeds, None)


def _static(src, dst, model, fmt_name: str, per_channel: bool):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Calibration", (_Calibration, CalibrationDataReader), {})(
        test_inputs(model), onnx.load(str(src), load_external_data=False).graph.input[0].name)
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        # quantize_static writes its augmented calibration model beside the working directory's files
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quantize_static(str(src), str(dst), reader, quant_format=getattr(QuantFormat, fmt_name),
                            per_channel=per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
        finally:
            os.chdir(cwd)


def t_qdq_pc(src, dst, model):
    _static(src, dst, model, "QDQ", True)


def t_qdq_pt(src, dst, model):
    _static(src, dst, model, "QDQ", False)


def t_qdq_pre(src, dst, model):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        with quiet():
            quant_pre_process(str(src), str(pre))
        _static(pre, dst, model, "QDQ", True)


def t_qop(src, dst, model):
    _static(src, dst, model, "QOperator", True)


def t_dynamic(src, dst, model):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def t_fp16_ort(src, dst, model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def t_fp16_occ(src, dst, model):
    from onnxconverter_common import float16

    with quiet():
        onnx.save(float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


# ---- torch: the module of tools/build_models.py with the ONNX file's weights


def _build_models_module():
    """tools/build_models.py as a module (its model classes); scikit-learn (only its data loading
    needs it) is stubbed when it is not installed."""
    import importlib.util

    stubs = []
    try:
        import sklearn  # noqa: F401
    except ImportError:
        stubs = ["sklearn", "sklearn.datasets", "sklearn.model_selection"]
        for name in stubs:
            sys.modules[name] = types.ModuleType(name)
        sys.modules["sklearn.datasets"].load_digits = None
        sys.modules["sklearn.model_selection"].train_test_split = None
    try:
        spec = importlib.util.spec_from_file_location("_zoo_build_models", ROOT / "tools" / "build_models.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for name in stubs:  # torch.export looks modules up by their spec: no stub may stay behind
            sys.modules.pop(name, None)
    return mod


_TORCH_MODULE = None


def torch_module(src: Path, model: str):
    """The PyTorch module (eval mode) with the ONNX file's weights: initializers named like the state
    dict are copied, MatMul weights (transposed Linear weights) found by the MatMul's node name, GRU
    weights by the GRU node's inputs (ONNX gates z, r, h; torch r, z, n). Checked against ONNX Runtime
    on the test set."""
    global _TORCH_MODULE
    import torch

    if _TORCH_MODULE is None:
        _TORCH_MODULE = _build_models_module()
    bm = _TORCH_MODULE
    net = bm.SPECS[model][0]()
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    mp = onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t) for t in mp.graph.initializer}
    done = set()

    def put(key, value):
        value = np.ascontiguousarray(value)
        if key not in state or tuple(state[key].shape) != value.shape:
            raise ValueError(f"no torch parameter {key} of shape {value.shape}")
        state[key] = torch.from_numpy(value.astype(np.float32).copy())
        done.add(key)

    for name, value in inits.items():
        if name in state:
            put(name, value)
    for n in mp.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and n.input[1] not in state:
            put(".".join(n.name.strip("/").split("/")[:-1]) + ".weight", inits[n.input[1]].T)
        if n.op_type == "GRU":
            prefix = ".".join(n.name.strip("/").split("/")[:-1])
            h = 64
            order = np.r_[h:2 * h, 0:h, 2 * h:3 * h]  # ONNX (z, r, h) -> torch (r, z, n)
            put(f"{prefix}.weight_ih_l0", inits[n.input[1]][0][order])
            put(f"{prefix}.weight_hh_l0", inits[n.input[2]][0][order])
            b = inits[n.input[3]][0]
            put(f"{prefix}.bias_ih_l0", b[:3 * h][order])
            put(f"{prefix}.bias_hh_l0", b[3 * h:][order])
    missing = [k for k, v in state.items() if k not in done and v.dtype.is_floating_point]
    if missing:
        raise ValueError(f"torch parameters not found in the ONNX file: {missing[:5]}")
    net.load_state_dict(state)
    x = test_inputs(model)[:VERIFY_SAMPLES]
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    err = normalized_error(run_ort(src, x), [out])
    if err > 1e-4:
        raise ValueError(f"the rebuilt torch module differs from the ONNX file by {err:.2e}")
    return net, torch.from_numpy(x[:2])


def _torch_export(src, dst, model, dynamo: bool):
    import torch

    net, example = torch_module(Path(src), model)
    kwargs = dict(input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    with quiet():
        if dynamo:
            prog = torch.onnx.export(net, (example,), dynamo=True, **kwargs)
            prog.save(str(dst))
        else:
            torch.onnx.export(net, (example,), str(dst), dynamo=False, opset_version=17, **kwargs)


def t_torch_dynamo(src, dst, model):
    _torch_export(src, dst, model, dynamo=True)


def t_torch_script(src, dst, model):
    _torch_export(src, dst, model, dynamo=False)


# ---------------------------------------------------------------------------------------------
# the build


def build_model(model: str, cache: Path, manifest: dict, rebuild: bool, retry_failed: bool, log) -> None:
    source = MODELS / f"{model}.onnx"
    twin = MODELS / "variants" / f"{model}_seed1.onnx"
    src_sha = sha256(source)
    entry = manifest["models"].get(model)
    if rebuild or entry is None or entry.get("source_sha256") != src_sha:
        entry = {"variants": {}}
    entry.update(source=str(source), source_sha256=src_sha, twin=str(twin) if twin.exists() else None)
    manifest["models"][model] = entry
    folder = cache / model
    sources_dir = folder / "_sources"
    sources_dir.mkdir(parents=True, exist_ok=True)

    sources = {"src": source}
    make = {"perm": (make_permuted, "src"), "noise": (make_perturbed, "src"), "perm_noise": (make_perturbed, "perm")}
    for kind in ("perm", "noise", "perm_noise"):
        path = sources_dir / f"{kind}.onnx"
        fn, base = make[kind]
        if rebuild or not path.exists() or entry.get("sources", {}).get(kind, {}).get("from") != src_sha:
            t = time.perf_counter()
            try:
                tmp = path.with_suffix(".tmp.onnx")
                tmp.unlink(missing_ok=True)
                fn(sources[base], tmp)
                os.replace(tmp, path)
            except Exception as exc:  # noqa: BLE001 - listed, the rest goes on
                entry.setdefault("sources", {})[kind] = {"error": one_line(exc)}
                log(f"{model}: source {kind} failed: {one_line(exc)}")
                continue
            entry.setdefault("sources", {})[kind] = {"from": src_sha, "seconds": round(time.perf_counter() - t, 2)}
        sources[kind] = path

    x = test_inputs(model)[:VERIFY_SAMPLES]
    outputs = {}
    for variant, transform, kind in plan(model):
        dst = folder / f"{variant}.onnx"
        old = entry["variants"].get(variant)
        if old is not None and not rebuild and (old.get("ok") and dst.exists() and old.get("sha256") == sha256(dst)
                                                or not old.get("ok") and not retry_failed):
            continue
        record = {"file": str(dst), "transform": transform, "source_kind": kind, **truth(kind, transform)}
        t = time.perf_counter()
        try:
            if kind not in sources:
                raise RuntimeError(f"the {kind} source could not be made")
            dst.unlink(missing_ok=True)
            tmp = dst.with_name(f".{dst.stem}.tmp.onnx")
            tmp.unlink(missing_ok=True)
            TRANSFORM_FUNCS[transform](sources[kind], tmp, model)
            t_build = time.perf_counter() - t
            if kind not in outputs:
                outputs[kind] = run_ort(sources[kind], x)
            err = normalized_error(outputs[kind], run_ort(tmp, x))
            record.update(normalized_error=err, bound=BOUNDS[record["storage"]])
            if not err <= BOUNDS[record["storage"]]:
                raise ValueError(f"the file does not compute what its source computes: normalized error "
                                 f"{err:.3g} > {BOUNDS[record['storage']]:g}")
            os.replace(tmp, dst)
            record.update(ok=True, sha256=sha256(dst), ops=op_histogram(dst), build_seconds=round(t_build, 2))
            log(f"{model}/{variant}: ok ({t_build:.1f}s, error {err:.2e})")
        except Exception as exc:  # noqa: BLE001 - a tool's failure is listed, not dropped
            record.update(ok=False, error=one_line(exc))
            if os.environ.get("ZOO_TRACEBACK"):
                traceback.print_exc()
            log(f"{model}/{variant}: FAILED {record['error']}")
            for p in folder.glob(f".{variant}.tmp*"):
                p.unlink(missing_ok=True)
        record["seconds"] = round(time.perf_counter() - t, 2)
        entry["variants"][variant] = record


TRANSFORM_FUNCS = {name: globals()[f"t_{name}"] for name in TRANSFORMS}


def load_manifest(cache: Path) -> dict:
    path = cache / "manifest.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("zoo_version") == ZOO_VERSION:
                return data
        except ValueError:
            pass
    return {"zoo_version": ZOO_VERSION, "models": {}}


def save_manifest(cache: Path, manifest: dict) -> None:
    manifest["complete"] = all(
        m in manifest["models"] and all(v in manifest["models"][m]["variants"] for v, _, _ in plan(m))
        for m in MODEL_NAMES)
    tmp = cache / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, cache / "manifest.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"zoo folder (default {DEFAULT_CACHE})")
    ap.add_argument("--only", help="comma-separated models (default all)")
    ap.add_argument("--rebuild", action="store_true", help="build every variant again")
    ap.add_argument("--retry-failed", action="store_true", help="try the failed transforms again")
    args = ap.parse_args(argv)
    models = args.only.split(",") if args.only else MODEL_NAMES
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(args.cache)
    t0 = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    for model in models:
        t = time.perf_counter()
        build_model(model, args.cache, manifest, args.rebuild, args.retry_failed, log)
        manifest["models"][model]["build_seconds_last_run"] = round(time.perf_counter() - t, 1)
        save_manifest(args.cache, manifest)
    variants = [v for m in manifest["models"].values() for v in m["variants"].values()]
    ok = sum(v["ok"] for v in variants)
    log(f"zoo: {ok} variants, {len(variants) - ok} failed, complete={manifest['complete']} "
        f"({time.perf_counter() - t0:.0f}s this run) in {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
