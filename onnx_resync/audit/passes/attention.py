"""ONNX Runtime's Attention (packed QKV, written by onnxruntime.transformers' optimizer) written out
as the attention an exporter writes.

Canonical form, the layers and shapes of a multi-head attention module as torch.onnx writes it (the
bundled transformer): the packed weight [hidden, q + k + v] (`qkv_hidden_sizes`, else thirds) and
bias are split into three projections, each MatMul + Add (the bias); then

    Q: Reshape [0, 0, heads, -1], Transpose (0, 2, 1, 3)
    K: Reshape [0, 0, heads, -1], Transpose (0, 2, 3, 1)
    V: Reshape [0, 0, heads, -1], Transpose (0, 2, 1, 3)
    MatMul(Q, K) -> Div by sqrt(head size) (Mul by `scale` when the file sets one)
      (+ the mask: 0 where mask_index > 0, mask_filter_value elsewhere) (+ attention_bias)
    -> Softmax(-1) -> MatMul(., V) -> Transpose (0, 2, 1, 3) -> Reshape [0, 0, -1]

so that alignment pairs the file's q, k and v with the reference's three projections, and the
walker sees the heads split and merged as it does in the reference. The split weights are views of
the packed one (their origin keeps its name). Supported: no mask or a 2-D key padding mask
(batch, total length), an attention_bias; not (left as they are): past/present state, rotary
embeddings, unidirectional (causal) masks, 1-D and 3-D mask indices.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto

from ..rewrite import Expansion, Workspace, attr
from .contrib import MS, _Ranks


def expand_attention(ws: Workspace) -> bool:
    changed = False
    ranks = _Ranks(ws)
    for node in ws.nodes:
        if node.domain == MS and node.op_type == "Attention":
            changed |= _attention(ws, node, ranks)
    return changed


def _get(names, k: int) -> str:
    return names[k] if len(names) > k else ""


def _attention(ws: Workspace, node: onnx.NodeProto, ranks) -> bool:
    x, w, b, mask, past, attn_bias, past_len = (_get(node.input, k) for k in range(7))
    if not x or w not in ws.constants or (b and b not in ws.constants) or past or past_len:
        return False
    if any(node.output[1:]) or not node.output[0]:
        return False
    if attr(node, "unidirectional", 0) or attr(node, "do_rotary", 0) or attr(node, "past_present_share_buffer", 0):
        return False
    heads = int(attr(node, "num_heads", 0))
    W = ws.const(w)
    B = ws.const(b) if b else None
    if heads <= 0 or W.ndim != 2 or (B is not None and B.shape != (W.shape[1],)):
        return False
    sizes = [int(s) for s in (attr(node, "qkv_hidden_sizes", None) or [])] or [W.shape[1] // 3] * 3
    if len(sizes) != 3 or sum(sizes) != W.shape[1] or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        return False
    if mask and ranks.of(mask) != 2:
        return False
    e = Expansion(ws, node)
    projections = []
    start = 0
    for which, size in zip("qkv", sizes):
        cols = slice(start, start + size)
        step = f"view Attention packed QKV weight, {which.upper()} columns {start}:{start + size}"
        wk = e.weight(f"{which}_weight", np.ascontiguousarray(W[:, cols]), [w], step)
        t = e.op("MatMul", [x, wk])
        if B is not None:
            bk = e.weight(f"{which}_bias", np.ascontiguousarray(B[cols]), [b], step.replace("weight", "bias"))
            t = e.op("Add", [t, bk])
        projections.append(t)
        start += size
    split = e.scalar("heads_shape", [0, 0, heads, -1], np.int64)
    q, k, v = (e.op("Reshape", [t, split]) for t in projections)
    q = e.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = e.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = e.op("Transpose", [v], perm=[0, 2, 1, 3])
    scores = e.op("MatMul", [q, k])
    scale = attr(node, "scale", None)
    if scale is None or scale == 0.0:
        scores = e.op("Div", [scores, e.scalar("sqrt_head_size", math.sqrt(sizes[0] // heads))])
    else:
        scores = e.op("Mul", [scores, e.scalar("scale", float(scale))])
    if mask:
        filler = attr(node, "mask_filter_value", None)
        filler = -10000.0 if filler is None else float(filler)
        keep = e.op("Greater", [e.op("Cast", [mask], to=TensorProto.FLOAT), e.scalar("zero", 0.0)])
        add = e.op("Where", [keep, e.scalar("zero_add", 0.0), e.scalar("mask_filter_value", filler)])
        add = e.op("Reshape", [add, e.scalar("mask_shape", [0, 1, 1, -1], np.int64)])
        scores = e.op("Add", [scores, add])
    if attn_bias:
        scores = e.op("Add", [scores, attn_bias])
    probs = e.op("Softmax", [scores], axis=-1)
    out = e.op("Transpose", [e.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    e.op("Reshape", [out, e.scalar("merge_shape", [0, 0, -1], np.int64)], output=node.output[0])
    e.commit("ONNX Runtime Attention written as Q/K/V MatMul + Add and scaled dot-product attention")
    return True
