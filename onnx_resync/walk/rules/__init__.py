"""Walker rules by op family; importing this package fills the op registry (walk/registry.py).

base: helpers and fallbacks; elementwise; producers (Conv, Gemm, MatMul); einsum; layout (Transpose,
Reshape, Flatten, Pad, pooling, ...); selection (Gather, Concat, Split, Slice); normalization;
reduction; recurrent (LSTM, GRU, RNN); sequence (SequenceInsert, ConcatFromSequence, ...); quantized
(Q/DQ, integer and QLinear ops); contrib (ONNX Runtime's fused, normalization, attention and
blocked-quantization ops).
"""

from . import (contrib, einsum, elementwise, layout, normalization, producers, quantized, recurrent, reduction,  # noqa: F401
               selection, sequence)
from .base import resolve_weight_axes, unknown_op  # noqa: F401
