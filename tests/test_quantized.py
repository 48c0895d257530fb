"""Quantized versions of the bundled models (made here with onnxruntime.quantization): the walker
opens the same groups as in the float model, and permuting keeps the function.

Formats: dynamic (DynamicQuantizeLinear + MatMulInteger/ConvInteger), static QDQ with per-channel
weight scales (QuantizeLinear/DequantizeLinear pairs), static QOperator (QLinearConv plus ONNX
Runtime's com.microsoft QLinearAdd/QLinearMul/QGemm/QLinearGlobalAveragePool).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)

from onnx_resync.api import permute
from onnx_resync.walk import walk

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]


class _Calibration(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._feeds = iter([{"input": x[i:i + 1]} for i in range(min(16, len(x)))])

    def get_next(self):
        return next(self._feeds, None)


def _quantize(name: str, kind: str, folder: Path) -> onnx.ModelProto:
    src, dst = MODELS / f"{name}.onnx", folder / f"{name}_{kind}.onnx"
    if kind == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    else:
        x = np.load(MODELS / f"{name}_test.npz")["input"]
        fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
        quantize_static(str(src), str(dst), _Calibration(x), quant_format=fmt, per_channel=True,
                        weight_type=QuantType.QInt8)
    return onnx.load(str(dst))


@pytest.mark.parametrize("kind", ["dynamic", "qdq", "qoperator"])
@pytest.mark.parametrize("name", NAMES)
def test_quantized_model_permutes_like_the_float_one(name, kind, tmp_path):
    float_walk = walk(onnx.load(str(MODELS / f"{name}.onnx")))
    model = _quantize(name, kind, tmp_path)
    result = walk(model)
    assert result.coverage == 1.0, [p.reason for p in result.pinned]
    assert sorted(g.size for g in result.groups) == sorted(g.size for g in float_walk.groups)
    permuted, info = permute(model, seed=5)
    assert info.verified and info.neurons_moved > 0
    restored, _ = permute(permuted, undo=info.record, check=False)
    assert restored.SerializeToString() == model.SerializeToString()
