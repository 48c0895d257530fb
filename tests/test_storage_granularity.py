"""The granularity in a quantized weight's format phrase is its stored scale's (audit/storage.py
_describe), not that of the measured steps: quantize_dynamic's per-tensor ConvInteger weight with a
BatchNormalization folded into it has one step per channel in the canonical form (the folded scale
multiplies each channel's step) and read "int8 per channel" (the csp and resnet bundled models'
dynamic copies in the exporter zoo); its scale is one value: "per tensor". With per-channel scales
(a MatMulInteger weight's, one per column) it still says "per channel". A DynamicQuantizeLSTM's
scale of one value per direction is per tensor too (its schema: [num_directions] "per-tensor/layer",
[num_directions, 4*hidden_size] per channel): ddddocr_common's and oww_hey_mycroft's dynamic copies
read "int8 per channel" for their bidirectional LSTMs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit import audit


def _conv_bn() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv -> BatchNormalization, then Flatten -> MatMul: the
    BatchNorms fold into the Convs (channel scales 0.2..5, so folded steps differ 25x per channel)."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def bn(c, k):
        return {f"g{k}": np.exp(rng.uniform(np.log(0.2), np.log(5.0), c)).astype(np.float32), f"be{k}": w(c),
                f"m{k}": w(c), f"v{k}": (np.abs(w(c)) + 0.5).astype(np.float32)}

    weights = {"c0": w(8, 3, 3, 3), **bn(8, 0), "c1": w(6, 8, 3, 3), **bn(6, 1), "fc": w(6 * 4 * 4, 5)}
    nodes = [helper.make_node("Conv", ["x", "c0"], ["y0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y0", "g0", "be0", "m0", "v0"], ["n0"]),
             helper.make_node("Relu", ["n0"], ["r0"]),
             helper.make_node("Conv", ["r0", "c1"], ["y1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y1", "g1", "be1", "m1", "v1"], ["n1"]),
             helper.make_node("Flatten", ["n1"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _formats(tmp_path, per_channel: bool) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reference = _conv_bn()
    onnx.save(reference, str(tmp_path / "ref.onnx"))
    out = tmp_path / f"dynamic_{per_channel}.onnx"
    quantize_dynamic(str(tmp_path / "ref.onnx"), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    model = onnx.load(str(out))
    assert {"ConvInteger", "MatMulInteger", "BatchNormalization"} <= {n.op_type for n in model.graph.node}
    report = audit(str(out), reference)
    assert report.verdict == "identical", report.summary
    return report.format_change


def test_per_tensor_weights_with_a_folded_batchnorm_are_per_tensor(tmp_path):
    assert _formats(tmp_path, per_channel=False) == "int8 per tensor"


def test_per_channel_scales_are_per_channel(tmp_path):
    """per_channel=True: quantize_dynamic keeps one scale per ConvInteger weight, and gives the
    MatMulInteger weight one per column."""
    assert set(_formats(tmp_path, per_channel=True).split(", ")) == {"int8 per tensor", "int8 per channel"}


def test_one_scale_per_direction_is_per_tensor(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from test_audit_quantized import _lstm_model

    reference = _lstm_model()
    onnx.save(reference, str(tmp_path / "lstm.onnx"))
    out = tmp_path / "lstm_dynamic.onnx"
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(out), weight_type=QuantType.QInt8)
    model = onnx.load(str(out))
    lstm = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    scales = {t.name: list(t.dims) for t in model.graph.initializer}
    assert scales[lstm.input[8]] == [2], scales  # W_scale: one per direction
    report = audit(str(out), reference)
    assert report.verdict == "identical", report.summary
    assert report.format_change == "int8 per tensor", report.format_change
