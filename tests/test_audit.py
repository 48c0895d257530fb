"""`audit`: vendor re-exports of the bundled models are recognized, unrelated models are not.

Suspects are built here from the bundled models the way a vendor's pipeline would rewrite them:
simplified (onnxslim, the test extra; ONNX Runtime's offline optimizer where it is missing), permuted,
every initializer renamed, weights converted to fp16 (Cast nodes after them), BatchNorm folded by
ONNX Runtime, weights quantized to int8 behind DequantizeLinear.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cli_worker
from onnx_resync.api import permute
from onnx_resync.audit import audit, audit_file
from onnx_resync.audit.canonical import canonicalize
from onnx_resync.errors import ModelMismatchError

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", ROOT / "models"))


def _model_path(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing (run tools/build_models.py)")
    return path


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _accuracy(model: onnx.ModelProto, name: str) -> float:
    data = np.load(MODELS / f"{name}_test.npz")
    return float((_run(model, data["input"]).argmax(1) == data["labels"]).mean())


# ---- what vendors do to a model --------------------------------------------------------------
def simplify(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """onnxslim if installed (folds BatchNorm, constants), else ORT's basic offline optimizer."""
    try:
        import onnxslim
    except ImportError:
        return ort_basic(model, tmp / "simplified.onnx")
    return onnxslim.slim(model)


def ort_basic(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """ONNX Runtime's offline optimizer at ORT_ENABLE_BASIC: folds BatchNorm into Conv, constants."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def ort_extended(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """ORT_ENABLE_EXTENDED: BatchNorm folded, Conv/Gemm + activation fused into com.microsoft ops."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def rename_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {t.name: f"vendor_w{k}" for k, t in enumerate(out.graph.initializer)}
    for t in out.graph.initializer:
        t.name = names[t.name]
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            if name in names:
                node.input[k] = names[name]
    for vi in out.graph.input:
        if vi.name in names:
            vi.name = names[vi.name]
    return out


def weights_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every float initializer as fp16, with a Cast back to float32 so ORT runs it as before."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    casts = []
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            name = t.name
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name + "_fp16"))
            casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT, name=f"{name}_cast"))
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(casts + nodes)
    return out


def quantize_conv_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv weights as per-channel symmetric int8 behind DequantizeLinear (QDQ weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    new_nodes = []
    for node in out.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            name = node.input[1]
            w = numpy_helper.to_array(inits[name])
            scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
            inits[name].CopyFrom(numpy_helper.from_array(q, name + "_q"))
            out.graph.initializer.append(numpy_helper.from_array(scale, name + "_scale"))
            out.graph.initializer.append(numpy_helper.from_array(np.zeros_like(q, shape=(w.shape[0],)), name + "_zp"))
            new_nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_scale", name + "_zp"],
                                              [name], axis=0, name=name + "_dq"))
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes + nodes)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


def vendor_copy(name: str, work: Path, seed: int = 7) -> Path:
    """simplified + permuted + every initializer renamed + fp16 weights; checked to still work."""
    path = work / f"{name}_vendor.onnx"
    if path.exists():
        return path
    reference = onnx.load(str(_model_path(name)))
    simplified = simplify(reference, work)
    permuted, result = permute(simplified, seed=seed)
    assert result.neurons_moved > 0
    suspect = weights_to_fp16(rename_initializers(permuted))
    onnx.checker.check_model(suspect)
    assert abs(_accuracy(suspect, name) - _accuracy(reference, name)) <= 0.005
    onnx.save(suspect, str(path))
    return path


# ---- (a) simplified + permuted + renamed + fp16 ----------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenet", "csp", "transformer", "gru"])
def test_vendor_reexport_is_derived_and_permuted(name, work):
    suspect = vendor_copy(name, work)
    report = audit(suspect, _model_path(name))
    assert report.derived and report.verdict == "permuted", report.summary
    assert report.permuted and not report.perturbed
    assert report.matched_fraction >= 0.99
    assert report.precision["within"] and "float16" in report.precision["storage"]
    assert any("float16" in d for d in report.re_export["differences"])
    # the table speaks of the suspect's own layers and tensors
    sus = onnx.load(str(suspect))
    node_names = {n.name for n in sus.graph.node}
    init_names = {t.name for t in sus.graph.initializer}
    for row in report.layers:
        assert row.layers and all(layer in node_names for layer in row.layers), row.layers
        assert row.weights and all(w in init_names for w in row.weights), row.weights
    data = json.loads(report.to_json())
    assert data["verdict"] == "permuted" and data["layers"][0]["margins"]


# ---- (b) BatchNorm folded by ONNX Runtime against the BatchNorm reference ---------------------
@pytest.mark.parametrize("name,level", [("resnet", "basic"), ("mobilenet", "basic"), ("vgg", "extended")])
def test_batchnorm_folded_suspect(name, level, work):
    reference = onnx.load(str(_model_path(name)))
    assert any(n.op_type == "BatchNormalization" for n in reference.graph.node)
    permuted, _ = permute(reference, seed=11)
    path = work / f"{name}_{level}.onnx"
    folded = ort_basic(permuted, path) if level == "basic" else ort_extended(permuted, path)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    report = audit(path, _model_path(name))
    assert report.verdict == "permuted", report.summary
    assert report.matched_fraction >= 0.99
    assert any("BatchNormalization folded" in d for d in report.re_export["differences"])
    if level == "extended":  # com.microsoft FusedConv / FusedGemm were split back
        assert any("FusedConv" in d for d in report.re_export["differences"])


def test_node_order_does_not_matter():
    """q, k and v projections have equal shapes: they are told apart by what they feed, not by order."""
    reference = onnx.load(str(_model_path("transformer")))
    permuted, _ = permute(reference, seed=2)
    nodes = list(permuted.graph.node)
    produced = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = [{produced[x] for x in n.input if x in produced} for n in nodes]
    order, placed = [], set()
    while len(order) < len(nodes):  # another valid topological order: latest-ready first
        i = max(i for i in range(len(nodes)) if i not in placed and deps[i] <= placed)
        order.append(nodes[i])
        placed.add(i)
    del permuted.graph.node[:]
    permuted.graph.node.extend(order)
    names = [n.name for n in permuted.graph.node]
    assert names.index("/layers.0/attn/v/MatMul") < names.index("/layers.0/attn/q/MatMul")
    report = audit(permuted, reference)
    assert report.verdict == "permuted" and report.matched_fraction == 1.0


def test_the_reference_itself_is_identical():
    report = audit(_model_path("resnet"), _model_path("resnet"))
    assert report.verdict == "identical" and report.moved == 0 and report.matched_fraction == 1.0


def test_quantized_weights_are_dequantized(work):
    reference = onnx.load(str(_model_path("vgg")))
    permuted, _ = permute(reference, seed=5)
    suspect = quantize_conv_weights(permuted)
    assert abs(_accuracy(suspect, "vgg") - _accuracy(reference, "vgg")) <= 0.02
    report = audit(suspect, reference)
    assert report.derived and report.permuted and report.verdict == "permuted", report.summary
    assert report.precision["quantized"] and report.format_change == "int8 per channel", report.summary
    assert report.matched_fraction >= 0.99


def _noops(model):
    """Identity and Dropout after every Relu (an exporter in training mode, a careless converter)."""
    nodes = []
    for n in model.graph.node:
        nodes.append(n)
        if n.op_type == "Relu":
            out = n.output[0]
            n.output[0] = out + "_pre"
            nodes.append(helper.make_node("Identity", [out + "_pre"], [out + "_id"], name=n.name + "_id"))
            nodes.append(helper.make_node("Dropout", [out + "_id"], [out], name=n.name + "_dropout"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _constant_nodes(model):
    """Every initializer as a Constant node."""
    consts = [helper.make_node("Constant", [], [t.name], value=t, name="const_" + t.name) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _fp16_graph(model):
    """A model converted to fp16 throughout: weights, inputs and outputs."""
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16


@pytest.mark.parametrize("rewrite,phrase", [(_noops, "Dropout"), (_constant_nodes, "Constant"),
                                            (_fp16_graph, "float16")])
def test_other_reexports(rewrite, phrase):
    reference = onnx.load(str(_model_path("resnet")))
    suspect, _ = permute(reference, seed=1)
    rewrite(suspect)
    report = audit(suspect, reference)
    assert report.verdict == "permuted" and report.matched_fraction >= 0.99, report.summary
    assert any(phrase in d for d in report.re_export["differences"]), report.re_export


def test_fine_tuned_variant_is_perturbed():
    variant = MODELS / "variants" / "vgg_ft10.onnx"
    if not variant.exists():
        pytest.skip("variants missing")
    report = audit(variant, _model_path("vgg"))
    assert report.derived and report.verdict == "perturbed" and not report.permuted
    assert report.perturbation["kinds"]


# ---- (c) independently trained: not derived ---------------------------------------------------
@pytest.mark.parametrize("name", ["vgg", "mlp"])
def test_independently_trained_is_not_derived(name):
    variant = MODELS / "variants" / f"{name}_seed1.onnx"
    if not variant.exists():
        pytest.skip(f"{variant} missing")
    report = audit(variant, _model_path(name))
    assert report.verdict == "not derived" and not report.derived, report.summary
    assert report.exit_code == 1


def test_other_architecture_names_the_layer():
    with pytest.raises(ModelMismatchError, match="cannot align"):
        audit(_model_path("mlp"), _model_path("vgg"))


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"])
def test_canonical_form_computes_the_same(name):
    from onnx_resync.walk import walk

    model = onnx.load(str(_model_path(name)))
    canon = canonicalize(model)
    onnx.checker.check_model(canon.model)
    x = np.load(MODELS / f"{name}_test.npz")["input"][:32]
    np.testing.assert_allclose(_run(canon.model, x), _run(model, x), rtol=1e-4, atol=1e-4)
    assert not any(n.op_type in ("BatchNormalization", "Constant", "Identity") for n in canon.model.graph.node)
    # the walker sees the same channels in both forms
    assert walk(canon.model).permutable_channels == walk(model).permutable_channels


# ---- (d) batch mode ---------------------------------------------------------------------------
def test_batch_parallel_jsonl_resumes(work):
    reference = _model_path("vgg")
    good = vendor_copy("vgg", work)
    corrupt = work / "corrupt.onnx"
    corrupt.write_bytes(reference.read_bytes()[:3000])
    other = MODELS / "variants" / "vgg_seed1.onnx"
    if not other.exists():
        other = _model_path("mlp")  # another architecture: an error record, still a third file
    out = work / "results.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "onnx_resync", "audit", "--reference", str(reference),
           str(good), str(corrupt), str(other), "--jobs", "2", "--jsonl", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3, first.stderr
    by_file = {Path(r["file"]).name: r for r in records}
    assert by_file["corrupt.onnx"]["ok"] is False and "LoadError" in by_file["corrupt.onnx"]["error"]
    assert by_file[good.name]["verdict"] == "permuted" and by_file[good.name]["exit_code"] == 0
    assert first.returncode in (1, 3)  # not derived (seed1) or, without variants, the mismatch error
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == first.returncode
    assert "skipping 3" in second.stderr
    assert len(out.read_text().splitlines()) == 3


def test_audit_file_is_picklable_and_never_raises(work):
    work_fn = functools.partial(audit_file, reference_path=str(_model_path("vgg")))
    assert pickle.loads(pickle.dumps(work_fn)).func is audit_file
    record = work_fn(str(work / "does-not-exist.onnx"))
    assert record["ok"] is False and record["exit_code"] == 3 and "no such file" in record["error"]


def test_cli_single_exit_codes(work):
    """Through the CLI's main in the shared worker (tests/cli_worker.py); the batch test above runs
    `python -m onnx_resync audit` as a process of its own."""
    good = vendor_copy("vgg", work)
    base = ["audit", "--reference", str(_model_path("vgg"))]
    done = cli_worker.run(*base, str(good), "--json", timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["verdict"] == "permuted"
    mismatch = cli_worker.run(*base, str(_model_path("mlp")), timeout=120)
    assert mismatch.returncode == 3 and "cannot align" in mismatch.stderr
    usage = cli_worker.run(*base, str(good), str(good), "--html", str(work / "x.html"), timeout=120)
    assert usage.returncode == 2


# ---- (e) the HTML page renders ----------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.sections, self.external = [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "section":
            self.sections += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)


def test_html_report_renders(work):
    page = work / "report.html"
    report = audit(vendor_copy("vgg", work), _model_path("vgg"), html=page)
    text = page.read_text()
    parser = _Page()
    parser.feed(text)
    assert not parser.external, parser.external  # self-contained
    assert parser.sections == len(report.layers)
    assert parser.tags.count("svg") >= 3 * len(report.layers)  # heatmap + two histograms per layer
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if chromium is None:
        return
    shot = work / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={work / 'chromium'}", f"--screenshot={shot}", "--window-size=1200,900",
                    page.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    width, height, raw = _png_rows(shot.read_bytes())
    assert (width, height) == (1200, 900)
    # a blank page filters to (almost) all-zero bytes; ours has text, tables and heatmaps
    values = np.frombuffer(raw, dtype=np.uint8)
    assert np.count_nonzero(values) > 0.02 * values.size
    assert len(np.unique(values)) > 100


def _png_rows(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the filtered scanlines of a PNG (zlib + struct; no image library)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return header[0], header[1], zlib.decompress(idat)
