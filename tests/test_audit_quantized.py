"""`audit` of a vendor-quantized copy of our model against the float model.

The bundled models are quantized here with onnxruntime.quantization in the three formats it writes:
dynamic (DynamicQuantizeLinear + ConvInteger/MatMulInteger + Cast + Mul by scales), static QOperator
with per-channel weights (QLinearConv, QLinearMatMul, com.microsoft QGemm/QLinearAdd/...), and static
QDQ for comparison; permuted before or after quantization. Each must come out "derived with a format
change" (permuted, stored as int8: every weight within half a step of its own scale) with at least 99%
of neurons matched; an independently trained copy (models/variants/<name>_seed1.onnx) quantized the
same way must come out "not derived".

The canonical form of a quantized model is the float graph (canonical.py, dequantize.py): the same
operators as the float model's canonical form, and it runs in ONNX Runtime with outputs close to the
quantized model's.

The real vendor pair (marked vendor): ddddocr's `common_old.onnx` (dynamically quantized, with
com.microsoft DynamicQuantizeLSTM) and `common.onnx` (fp32) have the same architecture but are
independently trained networks: "not derived", by a clear margin, and no alignment error.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.api import permute
from onnx_resync.audit import audit
from onnx_resync.audit.canonical import canonicalize
from quantize_bundled import quantize

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]
FORMATS = ["dynamic", "qoperator", "qdq"]
ORDERS = ["permuted_then_quantized", "quantized_then_permuted"]
QUANT_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger",
             "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
             "QLinearSoftmax", "QLinearGlobalAveragePool", "QLinearConcat", "DynamicQuantizeLSTM"}
# model x format x order that cannot be built, with the reason (shown in the test id)
SKIPS: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(name, kind) -> the bundled float model quantized, made once per module."""
    folder = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, kind: str) -> Path:
        if (name, kind) not in made:
            made[name, kind] = quantize(MODELS / f"{name}.onnx", folder / f"{name}_{kind}.onnx", name, kind)
        return made[name, kind]

    return get


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _cases():
    for name in NAMES:
        for kind in FORMATS:
            for order in ORDERS:
                reason = SKIPS.get((name, kind, order))
                if reason:
                    yield pytest.param(name, kind, order, id=f"{name}-{kind}-{order}-SKIPPED_{_slug(reason)[:60]}",
                                       marks=pytest.mark.skip(reason=f"{name} {kind}: {reason}"))
                else:
                    yield pytest.param(name, kind, order, id=f"{name}-{kind}-{order}")


def _stored(model: onnx.ModelProto) -> set[str]:
    """The model's stored tensors: initializers and Constant-node outputs."""
    return {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|"""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,kind,order", list(_cases()))
def test_quantized_copy_is_derived(name, kind, order, quantized, tmp_path):
    reference = MODELS / f"{name}.onnx"
    suspect = tmp_path / "suspect.onnx"
    if order == "permuted_then_quantized":
        permuted, info = permute(str(reference), seed=3, check=False)
        onnx.save(permuted, str(tmp_path / "permuted.onnx"))
        quantize(tmp_path / "permuted.onnx", suspect, name, kind)
    else:
        permuted, info = permute(str(quantized(name, kind)), seed=3, check=False)
        onnx.save(permuted, str(suspect))
    assert info.neurons_moved > 0
    report = audit(str(suspect), str(reference))
    print(f"{name} {kind} {order}: {report.verdict}, {report.matched}/{report.neurons} "
          f"({100 * report.matched_fraction:.2f}%) matched, {report.moved} moved, "
          f"statistic {report.statistic:.2f}, {report.timings['total']:.2f}s")
    assert report.derived and report.verdict == "permuted", report.summary
    assert report.permuted and report.moved > 0, report.summary
    assert report.precision["quantized"] and report.precision["within"]
    assert "int8 per" in report.format_change and "format change" in report.summary, report.summary
    assert not report.perturbation["kinds"], report.perturbation
    assert report.matched_fraction >= 0.99, report.summary
    # the report speaks of the suspect's own layers and stored integer tensors
    stored = _stored(onnx.load(str(suspect)))
    assert all(w in stored for row in report.layers for w in row.weights)
    assert any(w.endswith("_quantized") for row in report.layers for w in row.weights)


@pytest.mark.parametrize("kind", ["dynamic", "qoperator"])
@pytest.mark.parametrize("name", NAMES)
def test_quantized_independent_model_is_not_derived(name, kind, tmp_path):
    suspect = quantize(MODELS / "variants" / f"{name}_seed1.onnx", tmp_path / "seed1.onnx", name, kind)
    report = audit(str(suspect), str(MODELS / f"{name}.onnx"))
    print(f"{name}_seed1 {kind}: {report.verdict}, {100 * report.matched_fraction:.1f}% best candidates, "
          f"statistic {report.statistic:.2f}")
    assert not report.derived and report.verdict == "not derived", report.summary
    assert report.exit_code == 1


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_canonical_form_is_the_float_graph(name, kind, quantized):
    """No quantization op is left, the operators are those of the float model's canonical form, the
    weights point back at the stored integer tensors, and the graph runs in ONNX Runtime with outputs
    close to the quantized model's (not equal: activations are no longer quantized)."""
    path = quantized(name, kind)
    model = onnx.load(str(path))
    canon = canonicalize(model)
    ref = canonicalize(onnx.load(str(MODELS / f"{name}.onnx")))
    assert not set(_ops(canon.model)) & QUANT_OPS, _ops(canon.model)
    assert _ops(canon.model) == _ops(ref.model)
    stored = _stored(model)
    integer = [o for o in canon.origins.values() if any(s.startswith("dequantized") for s in o.steps)]
    assert integer and all(s in stored for o in integer for s in o.sources)
    feeds = {"input": np.load(MODELS / f"{name}_test.npz")["input"][:64]}
    y_canon, y_quant = _run(canon.model, feeds), _run(model, feeds)
    y_float = _run(onnx.load(str(MODELS / f"{name}.onnx")), feeds)
    assert not np.array_equal(y_canon, y_quant)
    assert float((y_canon.argmax(-1) == y_quant.argmax(-1)).mean()) >= 0.95
    # the canonical graph is the float model with rounded weights: closer to it than the quantized one
    assert _error(y_canon, y_float) < 0.05 and _error(y_canon, y_float) <= _error(y_quant, y_float)


def test_malformed_quantized_layer_is_left_alone(quantized):
    """A QLinearConv whose weight scale is missing is not guessed at: it stays as it is, and the
    audit is a mismatch naming the layer it could not pair (exit 3), not a crash."""
    from onnx_resync.errors import ModelMismatchError

    model = onnx.load(str(quantized("vgg", "qoperator")))
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    conv.input[4] = ""
    canon = canonicalize(model)
    assert "QLinearConv" in _ops(canon.model) and _ops(canon.model)["Conv"] == 3
    with pytest.raises(ModelMismatchError, match=re.escape("/features/features.0/features.0.0/Conv")) as info:
        audit(model, str(MODELS / "vgg.onnx"))
    assert info.value.exit_code == 3


def _lstm_model() -> onnx.ModelProto:
    """A bidirectional LSTM and a classifier: quantize_dynamic writes com.microsoft DynamicQuantizeLSTM."""
    rng = np.random.default_rng(0)
    n_in, hidden, steps, n_out = 24, 48, 10, 12
    weights = {"W": rng.normal(0, 0.2, (2, 4 * hidden, n_in)), "R": rng.normal(0, 0.2, (2, 4 * hidden, hidden)),
               "B": rng.normal(0, 0.1, (2, 8 * hidden)), "Wo": rng.normal(0, 0.2, (2 * hidden, n_out)),
               "bo": rng.normal(0, 0.1, n_out)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([steps, 1, 2 * hidden], np.int64), "shape"))
    nodes = [
        helper.make_node("LSTM", ["input", "W", "R", "B"], ["Y", "", ""], hidden_size=hidden,
                         direction="bidirectional", name="lstm"),
        helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3], name="transpose"),
        helper.make_node("Reshape", ["Yt", "shape"], ["Yr"], name="reshape"),
        helper.make_node("MatMul", ["Yr", "Wo"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "bo"], ["logits"], name="fc_bias"),
    ]
    graph = helper.make_graph(nodes, "lstm",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [steps, 1, n_in])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [steps, 1, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_dynamically_quantized_lstm_is_derived(tmp_path):
    reference = tmp_path / "lstm.onnx"
    onnx.save(_lstm_model(), str(reference))
    permuted, info = permute(str(reference), seed=1)
    assert info.verified and info.neurons_moved > 0
    onnx.save(permuted, str(tmp_path / "permuted.onnx"))
    suspect = quantize(tmp_path / "permuted.onnx", tmp_path / "suspect.onnx", "lstm", "dynamic")
    model = onnx.load(str(suspect))
    assert "DynamicQuantizeLSTM" in _ops(model)
    canon = canonicalize(model)
    assert "LSTM" in _ops(canon.model) and not set(_ops(canon.model)) & QUANT_OPS
    feeds = {"input": np.random.default_rng(1).normal(size=(10, 1, 24)).astype(np.float32)}
    assert _error(_run(canon.model, feeds), _run(model, feeds)) < 0.05
    report = audit(str(suspect), str(reference))
    assert report.verdict == "permuted" and report.permuted and report.matched_fraction >= 0.99, report.summary
    assert "int8" in report.format_change, report.summary
    assert any("lstm" in layer for row in report.layers for layer in row.layers)


@pytest.mark.vendor
def test_ddddocr_old_quantized_model_is_not_the_fp32_one():
    """common_old (dynamic int8, DynamicQuantizeLSTM) against common (fp32): same architecture, every
    layer aligns, the dequantized graph reproduces common_old's own outputs, but the weights match
    nothing: independently trained."""
    from vendor_models import vendor_model

    old, new = vendor_model("ddddocr_common_old"), vendor_model("ddddocr_common")
    model = onnx.load(str(old))
    canon = canonicalize(model)
    ops = _ops(canon.model)
    assert not set(ops) & QUANT_OPS and ops["Conv"] == 21 and ops["LSTM"] == 1, ops
    # the canonicalization is faithful: the float graph computes what the quantized file computes
    feeds = {"input1": np.random.default_rng(0).random((1, 1, 64, 160), dtype=np.float32)}
    y_canon, y_quant = _run(canon.model, feeds), _run(model, feeds)
    assert _error(y_canon, y_quant) < 0.05
    assert float((y_canon.argmax(-1) == y_quant.argmax(-1)).mean()) >= 0.95

    report = audit(str(old), str(new))
    cosine = sum(r.cosine_mean * r.neurons for r in report.layers) / report.neurons
    print(f"ddddocr common_old vs common: {report.verdict}; statistic {report.statistic:.2f}; "
          f"{report.matched}/{report.neurons} best candidates; mean cosine {cosine:.3f}")
    assert not report.derived and report.verdict == "not derived" and report.exit_code == 1, report.summary
    assert len(report.layers) >= 14 and report.neurons > 2000  # every layer aligned (no mismatch error)
    assert report.statistic < 0.5  # derived at >= 1; derived copies score several units
    assert cosine < 0.3  # derived copies: > 0.99
    assert report.matched_fraction < 0.6
    assert any("LSTM" in layer for row in report.layers for layer in row.layers)
