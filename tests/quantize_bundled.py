"""Quantize a model the way a vendor would, with onnxruntime.quantization (shared by the tests).

kind: "dynamic" (quantize_dynamic, int8 weights), "qdq" or "qoperator" (quantize_static, per-channel
int8 weights, calibrated on the first 16 test samples of the bundled model `name`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)

MODELS = Path(__file__).resolve().parent.parent / "models"


class _Calibration(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._feeds = iter([{"input": x[i:i + 1]} for i in range(min(16, len(x)))])

    def get_next(self):
        return next(self._feeds, None)


def quantize(src: Path, dst: Path, name: str, kind: str) -> Path:
    if kind == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    else:
        x = np.load(MODELS / f"{name}_test.npz")["input"]
        fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
        quantize_static(str(src), str(dst), _Calibration(x), quant_format=fmt, per_channel=True,
                        weight_type=QuantType.QInt8)
    return dst
