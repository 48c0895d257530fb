"""Canonicalization passes over one rewrite workspace (../rewrite.py), one file per family.

Each pass is a function `pass_(ws) -> bool` (True if it changed anything) that brings one kind of
re-export back to one form and keeps what the graph computes; canonical.py runs them in order:

- fused.py: ONNX Runtime's fused contrib ops back to the op and its activation;
- constants.py: nodes of constants evaluated into constants;
- run_time.py: ConvInteger/MatMulInteger on operands quantized at run time (weights stored as
  float, quantized by DynamicQuantizeLinear) as the float op;
- dequantize.py: quantized graphs (QDQ, QOperator, dynamic) back to the float graph;
- floats.py: every float tensor float32;
- nchwc.py: ONNX Runtime's NCHWc layout (blocked tensors and filters) back to NCHW;
- contrib.py: fused GELU forms, QuickGelu and FusedMatMul in standard ops;
- norms.py: SkipLayerNormalization, (Skip)SimplifiedLayerNormalization, EmbedLayerNormalization as
  Add + LayerNormalization / RMSNorm and embedding Gathers;
- attention.py: packed-QKV Attention as three projections and scaled dot-product attention;
- recurrent.py: LSTM/GRU/RNN initial states (and peepholes) of zeros left out, as the default;
- cleanup.py: no-op nodes (Identity, Dropout, Cast to the same type) and unused nodes removed;
- transposes.py: a Transpose read by an element-wise op of a constant moved after it;
- affine.py: BatchNormalization, per-channel Add/Mul/Sub and depthwise 1x1 Convs folded into their
  producer (left unfolded: Mul + Add), Gemm written as MatMul (+ Add), Conv biases made explicit.
"""
