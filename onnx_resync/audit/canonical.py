"""Canonical form of a model, so that a vendor's re-export can be compared with the reference.

Exporters, simplifiers and runtimes write the same network in many ways. `canonicalize` reads a
model into a rewrite workspace (rewrite.py; the input is not modified) and runs the passes of
passes/ over it, in this order (each file's docstring says what form it reaches and why):

1. unused nodes removed (cleanup.py);
2. ONNX Runtime's FusedConv / FusedGemm split into the op and its activation (fused.py);
3. nodes of constants evaluated into constants: dequantized, cast or transposed weights become
   plain weights (constants.py);
4. integer ops on operands quantized at run time as the float op on what they quantize (run_time.py);
   quantized graphs (QDQ, QOperator, dynamic) back to the float graph (dequantize.py), then 3 again
   for what that exposed; the same inside If/Loop/Scan bodies (bodies.py);
5. every float tensor float32 (floats.py);
6. ONNX Runtime's contrib ops written out in standard ops: the NCHWc layout back to NCHW
   (nchwc.py), fused GELU / QuickGelu / FusedMatMul (contrib.py), Skip/Simplified/Embed layer
   normalizations (norms.py), packed-QKV Attention (attention.py);
   recurrent cells' zero initial states left out, as their default (recurrent.py);
7. no-op nodes removed: Identity, Dropout, Cast to the same type (cleanup.py); a Transpose read by
   an Add/Sub/Mul/Div of a constant moved after it, as ONNX Runtime's optimizer saves it
   (transposes.py);
8. BatchNormalization, per-channel Add/Mul/Sub and depthwise 1x1 Convs folded into the Conv,
   ConvTranspose or Gemm before them, to a fixed point; a BatchNormalization or depthwise 1x1 Conv
   left unfolded written as Mul + Add (affine.py);
9. Gemm with a constant B written as MatMul (+ Add), a Conv without a bias given a zero bias
   (affine.py).

Every pass keeps what the graph computes (up to the rounding of folded or dequantized weights).
The canonical model is for comparison (walk and match), not necessarily for running. It comes with
`origins`: for every canonical weight, the input model's stored tensors it was computed from, their
storage type, the steps applied and the input model's layer (node) that reads it, so that reports
speak of the input's own names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .bodies import body_names, fold_bodies
from .passes.affine import fold_into_producers, gemm_as_matmul, unfolded_as_mul_add, zero_biases
from .passes.attention import expand_attention
from .passes.cleanup import drop_noops, drop_unused
from .passes.constants import fold_constants
from .passes.contrib import expand_contrib
from .passes.dequantize import dequantize
from .passes.floats import FLOAT_TYPES, to_float32
from .passes.fused import split_fused
from .passes.nchwc import expand_nchwc
from .passes.norms import expand_norms
from .passes.recurrent import drop_default_inputs
from .passes.run_time import read_run_time_quantized
from .passes.transposes import sink_transposes
from .rewrite import WeightOrigin, Workspace, topological  # noqa: F401 (align imports topological)
from ..walk.graph import node_inputs

# (pass, run it again until it changes nothing)
PASSES = (
    (drop_unused, False),
    (split_fused, False),
    (fold_constants, False),
    (read_run_time_quantized, False),  # before dequantize: operands quantized at run time (run_time.py)
    (dequantize, False),
    (fold_constants, False),
    (fold_bodies, False),  # the same inside If/Loop/Scan bodies (bodies.py)
    (to_float32, False),
    (expand_nchwc, False),
    (expand_contrib, False),
    (expand_norms, False),
    (expand_attention, False),
    (drop_default_inputs, False),
    (drop_noops, False),
    (sink_transposes, False),
    (fold_into_producers, True),
    (unfolded_as_mul_add, False),
    (gemm_as_matmul, False),
    (zero_biases, False),
)


@dataclass
class CanonicalModel:
    model: onnx.ModelProto
    origins: dict[str, WeightOrigin]  # canonical weight name -> origin
    node_origins: dict[str, str]  # canonical node name -> the input model's node name (display form)
    changes: Counter = field(default_factory=Counter)  # "BatchNormalization folded" -> count

    def layer_of(self, node_name: str) -> str:
        return self.node_origins.get(node_name, node_name)

    def changes_list(self) -> list[str]:
        return [f"{what} ({n})" if n > 1 else what for what, n in sorted(self.changes.items())]


def canonicalize(model: onnx.ModelProto) -> CanonicalModel:
    """The canonical form of `model` (see the module docstring); `model` is not modified."""
    ws = Workspace(model)
    for pass_, to_fixed_point in PASSES:
        while pass_(ws) and to_fixed_point:
            pass
    return _build(ws)


def _build(ws: Workspace) -> CanonicalModel:
    src = ws.source
    nodes = topological(ws.nodes)
    used = {o.name for o in src.graph.output}
    for n in nodes:
        used.update(node_inputs(n))
    g = helper.make_graph([], src.graph.name or "canonical", [], [])
    g.node.extend(nodes)
    const_names = [name for name in ws.constants if name in used]
    for name in const_names:
        value = ws.constants[name]
        if isinstance(value, onnx.TensorProto):  # a lazy tensor nothing changed: stays where it is
            g.initializer.add().CopyFrom(value)
        else:
            g.initializer.append(numpy_helper.from_array(np.asarray(value, order="C"), name))  # keeps 0-d
    for vi in src.graph.input:
        if vi.name not in ws.constants:
            g.input.add().CopyFrom(vi)
            _float32_type(g.input[-1])
    for vi in src.graph.output:
        g.output.add().CopyFrom(vi)
        _float32_type(g.output[-1])
    g.sparse_initializer.extend(src.graph.sparse_initializer)
    # the file's shape annotations of what its own nodes, untouched (same op, same inputs), still write:
    # the walker needs them where shapes are dynamic (a Reshape [B, S, -1, head] of an exporter's attention)
    def signature(n):
        return n.domain or "", n.op_type, tuple(n.input)

    file_writes = {o: signature(n) for n in src.graph.node for o in n.output}
    kept = {o for n in nodes for o in n.output if file_writes.get(o) == signature(n)}
    for vi in src.graph.value_info:
        if vi.name in kept:
            g.value_info.add().CopyFrom(vi)
            _float32_type(g.value_info[-1])
    model = helper.make_model(g, opset_imports=list(src.opset_import))
    model.ir_version = src.ir_version
    model.functions.extend(src.functions)
    readers: dict[str, str] = {}
    for n in nodes:
        for i in n.input:
            if i in ws.constants and i not in readers:
                readers[i] = ws.shown.get(n.name, n.name)
    origins = {}
    for name in const_names:
        o = ws.origins.get(name) or WeightOrigin([name], str(ws.dtype(name)))
        o.layer = readers.get(name, "")
        origins[name] = o
    for name in body_names(model):  # weights inside If/Loop/Scan bodies: their storage (bodies.py)
        if name in ws.origins:
            origins[name] = ws.origins[name]
    node_origins = {n.name: ws.shown.get(n.name, n.name) for n in nodes}
    return CanonicalModel(model, origins, node_origins, ws.changes)


def _float32_type(vi: onnx.ValueInfoProto) -> None:
    if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in FLOAT_TYPES:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
