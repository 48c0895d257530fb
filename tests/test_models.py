"""The bundled trained models in models/ (built by tools/build_models.py) are what MANIFEST.json says.

No torch here: only numpy, onnx and onnxruntime (CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parent.parent / "models"
MANIFEST_PATH = MODELS / "MANIFEST.json"
MAIN = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]

# Op types each model promises (each inner list: at least one of them must be present).
REQUIRED_OPS = {
    "mlp": [["Gemm"], ["Relu"]],
    "vgg": [["Conv"], ["BatchNormalization"], ["MaxPool"], ["Flatten", "Reshape"], ["Gemm"]],
    "resnet": [["Conv"], ["BatchNormalization"], ["Add"], ["Gemm"]],
    "mobilenet": [["Conv"], ["BatchNormalization"], ["Mul"], ["HardSigmoid", "HardSwish"], ["HardSigmoid"],
                  ["HardSwish"], ["Add"]],
    "csp": [["Conv"], ["BatchNormalization"], ["Split"], ["Concat"], ["MaxPool"]],
    "transformer": [["Softmax"], ["LayerNormalization"], ["MatMul"], ["Reshape"], ["Transpose"]],
    "gru": [["GRU"]],
}

MAX_MAIN_BYTES = 10 * 1024 * 1024
MAX_ALL_BYTES = 40 * 1024 * 1024


def _manifest():
    if not MANIFEST_PATH.exists():
        pytest.skip("models/MANIFEST.json missing (run tools/build_models.py)")
    return json.loads(MANIFEST_PATH.read_text())


MANIFEST = json.loads(MANIFEST_PATH.read_text()) if MANIFEST_PATH.exists() else {"models": {}, "variants": {}}


def _ops(model):
    return {n.op_type for n in model.graph.node}


def _accuracy(path, npz_path):
    data = np.load(npz_path)
    x, y = data["input"], data["labels"]
    assert x.dtype == np.float32 and y.dtype == np.int64
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    logits = sess.run(["logits"], {"input": x})[0]
    assert logits.shape == (len(y), 10)
    return float((logits.argmax(1) == y).mean())


def test_manifest_lists_all_models():
    m = _manifest()
    assert sorted(m["models"]) == sorted(MAIN)


@pytest.mark.parametrize("name", MAIN)
def test_model_matches_manifest(name):
    entry = _manifest()["models"].get(name)
    assert entry is not None, f"{name} missing from MANIFEST.json"
    path = MODELS / entry["file"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.ir_version == 8 == entry["ir_version"]
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17 == entry["opset"]

    # interface: input `input` with symbolic batch dim `batch`, output `logits` [batch, 10]
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    in_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch"
    assert [d.dim_value for d in in_dims[1:]] == entry["input_shape"][1:]
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == 10

    # weights are graph initializers or Constant nodes, never Identity over an initializer
    inits = {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]

    ops = _ops(model)
    for alternatives in REQUIRED_OPS[name]:
        assert ops & set(alternatives), f"{name}: none of {alternatives} in {sorted(ops)}"
    hist = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    assert hist == entry["op_histogram"]

    acc = _accuracy(path, MODELS / entry["test_npz"])
    assert abs(acc - entry["test_accuracy"]) <= 0.005, (acc, entry["test_accuracy"])
    assert acc > 0.9


def test_conv_models_keep_batchnorm_unfolded():
    for name in ("vgg", "resnet", "mobilenet", "csp"):
        entry = _manifest()["models"][name]
        model = onnx.load(str(MODELS / entry["file"]))
        hist = entry["op_histogram"]
        assert hist.get("BatchNormalization", 0) >= 4, name
        for n in model.graph.node:
            if n.op_type == "BatchNormalization":
                assert all(a.i == 0 for a in n.attribute if a.name == "training_mode")


def test_mobilenet_has_depthwise_conv():
    model = onnx.load(str(MODELS / "mobilenet.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    depthwise = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            w = inits[n.input[1]]
            if group > 1 and group == w.dims[0] and w.dims[1] == 1:
                depthwise += 1
    assert depthwise >= 4


def test_main_models_under_10mb():
    m = _manifest()
    total = sum((MODELS / m["models"][n]["file"]).stat().st_size for n in MAIN)
    assert total < MAX_MAIN_BYTES, total


def test_models_dir_under_40mb():
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < MAX_ALL_BYTES, total


@pytest.mark.parametrize("variant", sorted(MANIFEST.get("variants", {})))
def test_variant_matches_manifest(variant):
    entry = _manifest()["variants"][variant]
    base = _manifest()["models"][entry["base"]]
    path = MODELS / entry["file"]
    model = onnx.load(str(path))
    assert model.ir_version == 8
    ref = onnx.load(str(MODELS / base["file"]))
    # same architecture: the same op sequence and the same initializer shapes as the bundled model
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in ref.graph.node]
    assert sorted((t.name, tuple(t.dims)) for t in model.graph.initializer) == \
        sorted((t.name, tuple(t.dims)) for t in ref.graph.initializer)
    acc = _accuracy(path, MODELS / entry["test_npz"])
    assert abs(acc - entry["test_accuracy"]) <= 0.005, (acc, entry["test_accuracy"])


def test_every_main_model_has_three_variants():
    variants = _manifest()["variants"]
    for name in MAIN:
        for suffix in ("seed1", "ft10", "ft50"):
            assert f"{name}_{suffix}" in variants, f"{name}_{suffix}"
