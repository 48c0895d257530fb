"""ONNX Runtime's fused normalizations written out as the layers an exporter writes.

Canonical form:

- SkipLayerNormalization(input, skip, gamma, beta, bias) (onnxruntime.transformers' BERT optimizer)
  is Add(input, bias) (the bias of the projection before it: a layer of its own, as in the file
  before fusion), Add(., skip) (the residual), then LayerNormalization over the last axis; the
  optional outputs (mean, inverse std, the sum) are the LayerNormalization's and the Add's;
- SimplifiedLayerNormalization (RMSNorm: ONNX Runtime registers it in the standard domain) is
  x * Reciprocal(Sqrt(ReduceMean(x^2) + eps)) * scale, as torch.onnx writes an RMSNorm module;
  SkipSimplifiedLayerNormalization is the residual Add(s) before it;
- EmbedLayerNormalization is the embedding Gathers (word, position: the given position ids or
  0..S-1, segment), their sum and LayerNormalization (its mask index output, when read, the count of
  ones in each row of the mask, as ONNX Runtime computes it).

- LayerNormalization in the standard domain below opset 17 (ONNX Runtime registers it there, and its
  optimizer writes it into opset-12 files) is written out as below.

Below opset 17 (no LayerNormalization op) the layer norm is written out as exporters write it there
(ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul by gamma, Add of beta). Anything else (a norm
over another axis, outputs that form does not give) stays as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..rewrite import STANDARD, Expansion, Workspace, attr, opset

MS = "com.microsoft"


def expand_norms(ws: Workspace) -> bool:
    changed = False
    version = opset(ws)
    for node in ws.nodes:
        op = node.op_type
        if node.domain == MS and op == "SkipLayerNormalization":
            changed |= _skip_layer_norm(ws, node, version)
        elif node.domain == MS and op == "SkipSimplifiedLayerNormalization":
            changed |= _skip_layer_norm(ws, node, version, simplified=True)
        elif op == "SimplifiedLayerNormalization" and (node.domain in STANDARD or node.domain == MS):
            changed |= _simplified(ws, node, version)
        elif node.domain == MS and op == "EmbedLayerNormalization":
            changed |= _embed_layer_norm(ws, node, version)
        elif op == "LayerNormalization" and node.domain in STANDARD and version < 17:
            changed |= _layer_norm_below_17(ws, node, version)
    return changed


def _get(node: onnx.NodeProto, k: int, where: str = "input") -> str:
    names = node.input if where == "input" else node.output
    return names[k] if len(names) > k else ""


def reduce_mean(e: Expansion, x: str, version: int) -> str:
    """ReduceMean over the last axis, keeping it (the axes an attribute before opset 18, then an input)."""
    if version >= 18:
        return e.op("ReduceMean", [x, e.scalar("last_axis", [-1], np.int64)], keepdims=1)
    return e.op("ReduceMean", [x], axes=[-1], keepdims=1)


def layer_norm(e: Expansion, x: str, gamma: str, beta: str, eps: float, version: int, y: str,
               mean: str = "", inv_std: str = "") -> bool:
    """y = LayerNorm(x) over the last axis; False where the statistics outputs cannot be given."""
    if version >= 17:
        outs = [y, mean, inv_std]
        while outs and not outs[-1]:
            outs.pop()
        inputs = [x, gamma] + ([beta] if beta else [])
        e.op("LayerNormalization", inputs, output=y, outputs=len(outs), axis=-1, epsilon=float(eps))
        for k in range(1, len(outs)):  # the statistics outputs keep the file's names (or stay unnamed)
            e.nodes[-1].output[k] = outs[k]
        return True
    if mean or inv_std:
        return False
    mu = reduce_mean(e, x, version)
    centred = e.op("Sub", [x, mu])
    var = reduce_mean(e, e.op("Pow", [centred, e.scalar("two", 2.0)]), version)
    std = e.op("Sqrt", [e.op("Add", [var, e.scalar("epsilon", eps)])])
    normed = e.op("Div", [centred, std])
    if beta:
        e.op("Add", [e.op("Mul", [normed, gamma]), beta], output=y)
    else:
        e.op("Mul", [normed, gamma], output=y)
    return True


def rms_norm(e: Expansion, x: str, scale: str, eps: float, version: int, y: str, inv_std: str = "") -> None:
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis."""
    ms = reduce_mean(e, e.op("Pow", [x, e.scalar("two", 2.0)]), version)
    inv = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [ms, e.scalar("epsilon", eps)])])], output=inv_std or None)
    e.op("Mul", [e.op("Mul", [x, inv]), scale], output=y)


def _skip_layer_norm(ws: Workspace, node: onnx.NodeProto, version: int, simplified: bool = False) -> bool:
    x, skip, gamma = _get(node, 0), _get(node, 1), _get(node, 2)
    beta = "" if simplified else _get(node, 3)
    bias = _get(node, 3 if simplified else 4)
    y, mean, inv_std, total = (_get(node, k, "output") for k in range(4))
    if not (x and skip and gamma and y) or (simplified and mean):
        return False
    eps = float(attr(node, "epsilon", 1e-12))
    e = Expansion(ws, node)
    if bias:
        x = e.op("Add", [x, bias])
    s = e.op("Add", [x, skip], output=total or None)
    if simplified:
        rms_norm(e, s, gamma, eps, version, y, inv_std)
    elif not layer_norm(e, s, gamma, beta, eps, version, y, mean, inv_std):
        return False
    form = "RMSNorm" if simplified else "LayerNormalization"
    e.commit(f"ONNX Runtime {node.op_type} written as Add{' (bias)' if bias else ''} + Add + {form}")
    return True


def _simplified(ws: Workspace, node: onnx.NodeProto, version: int) -> bool:
    x, scale, y, inv_std = _get(node, 0), _get(node, 1), _get(node, 0, "output"), _get(node, 1, "output")
    if not (x and scale and y) or attr(node, "axis", -1) != -1:
        return False
    e = Expansion(ws, node)
    rms_norm(e, x, scale, float(attr(node, "epsilon", 1e-5)), version, y, inv_std)
    e.commit("SimplifiedLayerNormalization written as RMSNorm")
    return True


def _layer_norm_below_17(ws: Workspace, node: onnx.NodeProto, version: int) -> bool:
    """ONNX Runtime registers LayerNormalization in the standard domain below opset 17, and its optimizer
    writes it into such files: written out as the exporter wrote it there."""
    x, gamma, beta, y = _get(node, 0), _get(node, 1), _get(node, 2), _get(node, 0, "output")
    mean, inv_std = _get(node, 1, "output"), _get(node, 2, "output")
    if not (x and gamma and y) or attr(node, "axis", -1) != -1:
        return False
    e = Expansion(ws, node)
    if not layer_norm(e, x, gamma, beta, float(attr(node, "epsilon", 1e-5)), version, y, mean, inv_std):
        return False
    e.commit(f"ONNX Runtime's LayerNormalization at opset {version} written out")
    return True


def _embed_layer_norm(ws: Workspace, node: onnx.NodeProto, version: int) -> bool:
    ids, segment_ids, word, position, segment, gamma, beta, mask, position_ids = (_get(node, k) for k in range(9))
    y, mask_index, total = (_get(node, k, "output") for k in range(3))
    if not (ids and word and position and gamma and y) or bool(segment_ids) != bool(segment):
        return False
    e = Expansion(ws, node)
    s = e.op("Gather", [word, ids])
    if not position_ids:
        length = e.op("Gather", [e.op("Shape", [ids]), e.scalar("seq_axis", 1, np.int64)], axis=0)
        position_ids = e.op("Range", [e.scalar("zero", 0, np.int64), length, e.scalar("step", 1, np.int64)])
    s = e.op("Add", [s, e.op("Gather", [position, position_ids])], output=None if segment else (total or None))
    if segment:
        s = e.op("Add", [s, e.op("Gather", [segment, segment_ids])], output=total or None)
    if not layer_norm(e, s, gamma, beta, float(attr(node, "epsilon", 1e-12)), version, y):
        return False
    if mask_index:
        if mask:
            ones = e.op("Cast", [e.op("Equal", [mask, e.scalar("one", 1, np.int32)])], to=TensorProto.INT32)
            if version >= 13:
                e.op("ReduceSum", [ones, e.scalar("seq_axis_1d", [1], np.int64)], output=mask_index, keepdims=0)
            else:
                e.op("ReduceSum", [ones], output=mask_index, axes=[1], keepdims=0)
        else:  # no mask: ONNX Runtime writes zeros
            batch = e.op("Slice", [e.op("Shape", [ids]), e.scalar("b0", [0], np.int64), e.scalar("b1", [1], np.int64)])
            e.op("ConstantOfShape", [batch], output=mask_index,
                 value=onnx.numpy_helper.from_array(np.zeros(1, np.int32), "zero"))
    e.commit("ONNX Runtime EmbedLayerNormalization written as Gather + Add + LayerNormalization")
    return True
