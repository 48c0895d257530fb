"""A storage format is reported as that, and a perturbation's kind is named only where the evidence
beyond the storage's bound supports it (issue 14.3):

- per-tensor int8/uint8 weights whose scale sits outside a DequantizeLinear (quantize_dynamic's
  MatMulInteger/ConvInteger weights, an embedding table gathered then dequantized): "per tensor"
  (was "per channel": the granularity was read from steps that include the extra step given to
  values at an end of the int8 range); with per_channel=True, its MatMul weights: "per channel";
- storage.allowed keeps a float32 piece's bound in float32 where a float16 side is involved (the
  report's float32 screen), with the float64 check's values;
- an fp16 (and a float32) copy with noise on one small layer: "noise" named, in that weight (was no kind: the median
  over every weight drowned it); one neuron rescaled (row x a, bias x a, consumer column / a):
  "rescaled" and no noise (was "rescaled" and "noise"); one neuron scaled on its producer side only:
  neurons scaled, no noise.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit import audit
from onnx_resync.audit.rewrite import WeightOrigin
from onnx_resync.audit.storage import allowed


def _dynamic_reference() -> onnx.ModelProto:
    """An embedding table gathered then two MatMuls; two Convs: every weight an initializer."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    weights = {"table": w(20, 16), "m1": w(16, 12), "b1": w(12), "m2": w(12, 5), "c1": w(8, 3, 3, 3), "c2": w(6, 8, 3, 3)}
    inits = [numpy_helper.from_array(v, n) for n, v in weights.items()]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "m1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["h1"]), helper.make_node("Tanh", ["h1"], ["t"]),
             helper.make_node("MatMul", ["t", "m2"], ["z"]),
             helper.make_node("Conv", ["x", "c1"], ["y0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y0"], ["y1"]),
             helper.make_node("Conv", ["y1", "c2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4]),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 5]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_dynamic_quantization_per_tensor_is_named_per_tensor(tmp_path, weight_type):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reference = _dynamic_reference()
    onnx.save(reference, str(tmp_path / "ref.onnx"))
    formats = {}
    for per_channel in (False, True):
        out = tmp_path / f"q{per_channel}.onnx"
        quantize_dynamic(str(tmp_path / "ref.onnx"), str(out), weight_type=getattr(QuantType, weight_type),
                         per_channel=per_channel)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"MatMulInteger", "ConvInteger", "Gather"} <= ops and "DequantizeLinear" not in ops, ops
        report = audit(str(out), reference)
        assert report.verdict == "identical", report.summary
        formats[per_channel] = report.format_change
    assert "per channel" not in formats[False] and "per tensor" in formats[False], formats
    assert "per channel" in formats[True], formats  # the MatMul weights' scales per column: it can say so


def test_allowed_keeps_float32_with_a_float16_side():
    r = (np.random.default_rng(0).standard_normal(4096) * 0.05).astype(np.float32)
    r[:4] = [0.0, 5e-8, -2e4, 1e-6]  # at the fp16 converter's clamps
    fp16, plain = WeightOrigin(["w"], "float16", ["cast float16 -> float32"]), WeightOrigin(["w"], "float32", [])
    step = np.full(r.shape, 1e-3, np.float32)
    for so, st in ((fp16, None), (fp16, step), (plain, step)):
        b32 = allowed(r, so, plain, st, None, scale=float(np.abs(r).max()))
        b64 = allowed(r.astype(np.float64), so, plain, None if st is None else st.astype(np.float64), None,
                      scale=float(np.abs(r).max()))
        assert b32.dtype == np.float32 and b64.dtype == np.float64
        np.testing.assert_allclose(b32, b64, rtol=1e-6)


C0, C1, C2, C3 = 3, 16, 24, 8


def _conv3(noise: float = 0.0, rescale: int | None = None, one_sided: int | None = None) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Conv(1x1). noise: x std on the first (smallest) Conv's weight;
    rescale: that neuron of the second Conv x 1.5 (row and bias), its column in the third / 1.5 (the
    same function); one_sided: that row x 1.5 alone."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((C1, C0, 3, 3)) * 0.3).astype(np.float32)
    b0 = (rng.standard_normal(C1) * 0.1).astype(np.float32)
    w1 = (rng.standard_normal((C2, C1, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(C2) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((C3, C2, 1, 1)) * 0.3).astype(np.float32)
    if noise:
        w0 = (w0 + noise * w0.std() * np.random.default_rng(5).standard_normal(w0.shape)).astype(np.float32)
    if rescale is not None:
        w1[rescale] *= 1.5
        b1[rescale] *= 1.5
        w2[:, rescale] /= 1.5
    if one_sided is not None:
        w1[one_sided] *= 1.5
    inits = [numpy_helper.from_array(v, n) for v, n in ((w0, "w0"), (b0, "b0"), (w1, "w1"), (b1, "b1"), (w2, "w2"))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "conv3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C0, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C3, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


@pytest.mark.parametrize("store", ["float16", "float32"])
def test_kinds_beyond_the_storage_are_named_from_their_shape(store):
    reference = _conv3()
    stored = _fp16 if store == "float16" else (lambda m: m)
    plain = audit(stored(reference), reference)
    assert plain.verdict == "identical" and not plain.perturbation["kinds"], plain.summary

    noisy = audit(stored(_conv3(noise=0.02)), reference)
    kinds = noisy.perturbation["kinds"]
    assert noisy.verdict == "perturbed" and len(kinds) == 1 and kinds[0].startswith("noise"), kinds
    assert "(w0)" in kinds[0] and 0.005 < noisy.perturbation["noise_relative_std"] < 0.03, noisy.perturbation
    assert noisy.precision["beyond"]["spread_weights"].keys() == {"w0"}, noisy.precision["beyond"]

    rescaled = audit(stored(_conv3(rescale=5)), reference)
    kinds = rescaled.perturbation["kinds"]
    assert rescaled.verdict == "perturbed" and kinds and all(k.startswith("rescaled") for k in kinds), kinds
    assert rescaled.precision["beyond"]["scaled_weights"] == {"w1": 1, "w2": 1}, rescaled.precision["beyond"]

    one_sided = audit(stored(_conv3(one_sided=5)), reference)
    kinds = one_sided.perturbation["kinds"]
    assert one_sided.verdict == "perturbed" and kinds and not any(k.startswith("noise") for k in kinds), kinds
    assert one_sided.precision["beyond"]["scaled_weights"] == {"w1": 1}, one_sided.precision["beyond"]
