"""Walker rules by op family; importing this package fills the op registry (walk/registry.py).

base: helpers and fallbacks; elementwise; producers (Conv, Gemm, MatMul); einsum; layout (Transpose,
Reshape, Flatten, Pad, pooling, ...); selection (Gather, Concat, Split, Slice); normalization;
reduction; recurrent (LSTM, GRU, RNN); sequence (SequenceInsert, ConcatFromSequence, ...); quantized
(Q/DQ, integer and QLinear ops); contrib (ONNX Runtime's fused, normalization, attention and
blocked-quantization ops); nchwc (ONNX Runtime's blocked-channel convolutions and pools,
com.microsoft.nchwc).
"""

from . import (contrib, einsum, elementwise, layout, nchwc, normalization, producers, quantized, recurrent,  # noqa: F401
               reduction, selection, sequence)
from .base import resolve_weight_axes, unknown_op  # noqa: F401
