"""Quantized versions of the bundled models (made here with onnxruntime.quantization): the walker
opens the same groups as in the float model, and permuting keeps the function.

Formats: dynamic (DynamicQuantizeLinear + MatMulInteger/ConvInteger), static QDQ with per-channel
weight scales (QuantizeLinear/DequantizeLinear pairs), static QOperator (QLinearConv plus ONNX
Runtime's com.microsoft QLinearAdd/QLinearMul/QGemm/QLinearGlobalAveragePool).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnx_resync.api import permute
from onnx_resync.walk import walk
from quantize_bundled import quantize

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]


def _quantize(name: str, kind: str, folder: Path) -> onnx.ModelProto:
    return onnx.load(str(quantize(MODELS / f"{name}.onnx", folder / f"{name}_{kind}.onnx", name, kind)))


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
