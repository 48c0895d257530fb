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

from ..rewrite import Expansion, Workspace, attr, opset
from .contrib import MS, _Ranks


def expand_attention(ws: Workspace) -> bool:
    changed = False
    ranks = _Ranks(ws)
    tables: dict = {}  # rotary tables written out, shared by the nodes that read the same ones
    for node in ws.nodes:
        if node.domain == MS and node.op_type == "Attention":
            changed |= _attention(ws, node, ranks)
        elif node.domain == MS and node.op_type == "GroupQueryAttention":
            changed |= _group_query_attention(ws, node, tables)
        elif node.domain == MS and node.op_type == "MultiHeadAttention":
            changed |= _multi_head_attention(ws, node, ranks)
        elif node.domain == MS and node.op_type == "RotaryEmbedding":
            changed |= _rotary_embedding(ws, node, ranks, tables)
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


# ---- GroupQueryAttention, MultiHeadAttention, RotaryEmbedding ---------------------------------
# Canonical form of a Llama-style attention as torch.onnx writes it (transformers' eager attention):
#
#     q, k, v projections (a packed QKV MatMul split into three, as views of its weight)
#     Reshape [0, 0, heads, -1], Transpose (0, 2, 1, 3)            (kv heads for k and v)
#     rotary: x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin, with
#             cos, sin = Cos / Sin of Concat(f, f) where f = positions x inv_freq (a weight [D/2])
#     past Concat on the sequence axis (the present outputs)
#     each kv head repeated for its heads // kv_heads query heads
#     MatMul(q, k^T) * scale, causal and padding mask (Where), Softmax, MatMul(., v),
#     Transpose (0, 2, 1, 3), Reshape [0, 0, -1]
#
# ONNX Runtime stores the rotary tables, cos_cache / sin_cache [positions, D/2]; exporters compute
# them from the frequencies (inv_freq, a buffer of the module). The frequencies are read back from
# the tables (f = atan2(sin[1], cos[1]); a scale, such as a rope scaling's attention factor, from row 0)
# and written out only when the tables are exactly that (checked on every row, ROTARY_TOLERANCE), so
# both forms have the same layer: Mul by the frequencies. Interleaved rotary, partial rotary, local
# windows, softcap, explicit position ids or attention bias on GroupQueryAttention: left as they are.

ROTARY_TOLERANCE = 1e-4  # max |table - scale * cos(p * f)| over the table, relative to the scale
NEG = float(np.finfo(np.float32).min)  # a masked score (Softmax gives it weight 0)


def _i64(e: Expansion, hint: str, value) -> str:
    return e.scalar(hint, value, np.int64)


def _unsqueeze(e: Expansion, x: str, axis: int) -> str:
    if opset(e.ws) >= 13:
        return e.op("Unsqueeze", [x, _i64(e, "axes", [axis])])
    return e.op("Unsqueeze", [x], axes=[axis])


def _le(e: Expansion, pair: list[str]) -> str:
    """a <= b, as Not(Greater) (LessOrEqual needs opset 12)."""
    return e.op("Not", [e.op("Greater", pair)])


def _slice_last(e: Expansion, x: str, start: int, end: int) -> str:
    return e.op("Slice", [x, _i64(e, "starts", [start]), _i64(e, "ends", [end]), _i64(e, "axes", [-1])])


def _frequencies(ws: Workspace, cos: str, sin: str) -> tuple[np.ndarray, float] | None:
    """(inv_freq [D/2], scale) such that the tables are scale * cos / sin(position x inv_freq), or None."""
    C, S = ws.const(cos), ws.const(sin)
    if C is None or S is None or C.ndim != 2 or C.shape != S.shape or C.shape[0] < 2 or not C.shape[1]:
        return None
    C, S = C.astype(np.float64), S.astype(np.float64)
    scale = float(C[0, 0])
    if scale <= 0 or np.abs(C[0] - scale).max() > ROTARY_TOLERANCE * scale or np.abs(S[0]).max() > ROTARY_TOLERANCE * scale:
        return None
    f = np.arctan2(S[1], C[1])
    p = np.arange(C.shape[0], dtype=np.float64)[:, None]
    if max(np.abs(scale * np.cos(p * f) - C).max(), np.abs(scale * np.sin(p * f) - S).max()) > ROTARY_TOLERANCE * scale:
        return None
    return f.astype(np.float32), scale


def _rotary_tables(e: Expansion, cos: str, sin: str, positions: str, freq) -> tuple[str, str]:
    """cos, sin [B, S, D] of integer `positions` [B, S] (B may be 1) as exporters compute them."""
    inv_freq, scale = freq
    pos = e.op("Reshape", [e.op("Cast", [positions], to=TensorProto.FLOAT), _i64(e, "pos_shape", [0, 0, 1])])
    f = e.op("Mul", [pos, e.weight("inv_freq", inv_freq, [cos, sin], "rotary frequencies read from the cos/sin tables")])
    emb = e.op("Concat", [f, f], axis=-1)
    c, s = e.op("Cos", [emb]), e.op("Sin", [emb])
    if scale != 1.0:
        c, s = e.op("Mul", [c, e.scalar("rotary_scale", scale)]), e.op("Mul", [s, e.scalar("rotary_scale", scale)])
    return c, s


def _rotate(e: Expansion, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin (x [..., D], cos and sin broadcast to it)."""
    rot = e.op("Concat", [e.op("Neg", [_slice_last(e, x, half, 2 * half)]), _slice_last(e, x, 0, half)], axis=-1)
    return e.op("Add", [e.op("Mul", [x, cos]), e.op("Mul", [rot, sin])])


def _width(ws: Workspace, name: str) -> int | None:
    """The last dimension of a projection's output: the width of the MatMul weight (+ bias) writing it."""
    p = ws.producer(name)
    if p is not None and p.op_type == "Add" and not p.domain:
        for a, b in ((0, 1), (1, 0)):
            if p.input[b] in ws.constants:
                return _width(ws, p.input[a])
        return None
    if p is not None and p.op_type == "MatMul" and not p.domain and p.input[1] in ws.constants:
        shape = _shape(ws, p.input[1])
        return shape[-1] if shape and len(shape) == 2 else None
    return None


def _shape(ws: Workspace, name: str) -> tuple[int, ...] | None:
    value = ws.constants.get(name)
    if isinstance(value, onnx.TensorProto):
        return tuple(int(d) for d in value.dims)
    return None if value is None else tuple(value.shape)


def _split_projection(ws: Workspace, e: Expansion, packed: str, widths: list[int]) -> list[str] | None:
    """A packed projection MatMul (whose only reader is the node) as one MatMul per part, each on a
    view of its weight; None when `packed` is not such a projection."""
    p = ws.producer(packed)
    if p is None or p.op_type != "MatMul" or p.domain or p.input[1] not in ws.constants \
            or ws.sole_consumer(packed) is not e.node:
        return None
    shape = _shape(ws, p.input[1])
    if not shape or len(shape) != 2 or shape[1] != sum(widths):
        return None
    W = ws.const(p.input[1])
    out, start = [], 0
    for which, width in zip("qkv", widths):
        step = f"view packed QKV weight, {which.upper()} columns {start}:{start + width}"
        w = e.weight(f"{which}_weight", np.ascontiguousarray(W[:, start:start + width]), [p.input[1]], step)
        out.append(e.op("MatMul", [p.input[0], w]))
        ws.show_as(e.nodes[-1], p)
        start += width
    e.packed = p
    return out


def _heads(e: Expansion, x: str, heads: int) -> str:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    return e.op("Transpose", [e.op("Reshape", [x, _i64(e, "heads_shape", [0, 0, heads, -1])])], perm=[0, 2, 1, 3])


def _attend(e: Expansion, q: str, k: str, v: str, scale: float, allowed: str | None, output: str,
            repeat: int = 1, heads: int = 0, size: int = 0) -> None:
    """Scaled dot-product attention of q [B, H, S, D] over k, v [B, H / repeat, T, D]; `allowed`
    (bool, broadcast to [B, H, S, T]) masks scores; the result [B, S, H * D] is written to `output`."""
    if repeat > 1:  # kv head j serves query heads j * repeat ... (j + 1) * repeat - 1
        rep = _i64(e, "repeat_shape", [0, heads, -1, size])
        k = e.op("Reshape", [e.op("Concat", [_unsqueeze(e, k, 2)] * repeat, axis=2), rep])
        v = e.op("Reshape", [e.op("Concat", [_unsqueeze(e, v, 2)] * repeat, axis=2), rep])
    scores = e.op("Mul", [e.op("MatMul", [q, e.op("Transpose", [k], perm=[0, 1, 3, 2])]), e.scalar("scale", scale)])
    if allowed:
        scores = e.op("Where", [allowed, scores, e.scalar("masked", NEG)])
    probs = e.op("Softmax", [scores], axis=-1)
    out = e.op("Transpose", [e.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    e.op("Reshape", [out, _i64(e, "merge_shape", [0, 0, -1])], output=output)


def _group_query_attention(ws: Workspace, node: onnx.NodeProto, tables: dict) -> bool:
    """com.microsoft GroupQueryAttention (onnxruntime-genai's decoders): the canonical form above.
    Positions are past length + 0..S-1 (past length = total_sequence_length - S), keys up to
    seqlens_k[b] (the padding mask) and up to the query's own position (causal)."""
    ins = [_get(node.input, k) for k in range(12)]
    q, k, v, past_k, past_v, seqlens, total, cos, sin = ins[:9]
    if any(ins[9:]) or _get(node.output, 3) or not q or not seqlens or not total or not node.output[0]:
        return False
    heads, kv = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    if heads <= 0 or kv <= 0 or heads % kv or bool(k) != bool(v) or bool(past_k) != bool(past_v):
        return False
    if int(attr(node, "local_window_size", -1)) != -1 or float(attr(node, "softcap", 0.0) or 0.0) != 0.0 \
            or int(attr(node, "smooth_softmax", 0)) or int(attr(node, "qk_output", 0)):
        return False
    rotary = bool(attr(node, "do_rotary", 0))
    freq = _frequencies(ws, cos, sin) if rotary else None
    if rotary and (freq is None or attr(node, "rotary_interleaved", 0)):
        return False
    if k:
        size = (_width(ws, q) or 0) // heads or (_width(ws, k) or 0) // kv or (2 * len(freq[0]) if freq else 0)
    else:
        width = _width(ws, q) or 0
        size = width // (heads + 2 * kv) if width % (heads + 2 * kv) == 0 else 0
    if size <= 0 or (freq is not None and 2 * len(freq[0]) != size):
        return False  # head size unknown, or a partial rotary
    e = Expansion(ws, node)
    e.packed = None
    if not k:
        parts = _split_projection(ws, e, q, [heads * size, kv * size, kv * size])
        if parts is None:
            parts = [_slice_last(e, q, a, b) for a, b in
                     ((0, heads * size), (heads * size, (heads + kv) * size), ((heads + kv) * size, (heads + 2 * kv) * size))]
        q, k, v = parts
    key = (total, seqlens)  # nodes reading the same lengths attend over the same tokens
    shared = tables.get(("gqa",) + key)
    if shared is None:  # positions and mask, once for the nodes that read the same lengths
        total_s = e.op("Reshape", [e.op("Cast", [total], to=TensorProto.INT64), _i64(e, "scalar_shape", np.zeros(0))])
        length = e.op("Gather", [e.op("Shape", [q]), _i64(e, "seq_axis", 1)], axis=0)
        one = _i64(e, "one", 1)
        pos = e.op("Range", [e.op("Sub", [total_s, length]), total_s, one])
        j = e.op("Reshape", [e.op("Range", [_i64(e, "zero", 0), total_s, one]), _i64(e, "key_shape", [1, 1, 1, -1])])
        causal = _le(e, [j, e.op("Reshape", [pos, _i64(e, "query_shape", [1, 1, -1, 1])])])
        lengths = e.op("Reshape", [e.op("Cast", [seqlens], to=TensorProto.INT64), _i64(e, "batch_shape", [-1, 1, 1, 1])])
        allowed = e.op("And", [causal, _le(e, [j, lengths])])
        shared = tables[("gqa",) + key] = (e.op("Reshape", [pos, _i64(e, "row_shape", [1, -1])]), allowed)
    positions, allowed = shared
    q, k, v = _heads(e, q, heads), _heads(e, k, kv), _heads(e, v, kv)
    if freq is not None:
        c, s = tables.get(("rotary", cos, sin, positions)) or (None, None)
        if c is None:
            c, s = _rotary_tables(e, cos, sin, positions, freq)
            c, s = _unsqueeze(e, c, 1), _unsqueeze(e, s, 1)
            tables[("rotary", cos, sin, positions)] = (c, s)
        q, k = _rotate(e, q, c, s, size // 2), _rotate(e, k, c, s, size // 2)
    present = []
    for cur, past, out in ((k, past_k, _get(node.output, 1)), (v, past_v, _get(node.output, 2))):
        if past:
            present.append(e.op("Concat", [past, cur], axis=2, output=out or None))
        elif out:
            present.append(e.op("Identity", [cur], output=out))
        else:
            present.append(cur)
    scale = attr(node, "scale", None)
    scale = 1.0 / math.sqrt(size) if not scale else float(scale)
    _attend(e, q, present[0], present[1], scale, allowed, node.output[0], heads // kv, heads, size)
    e.commit("ONNX Runtime GroupQueryAttention written as Q/K/V projections, rotary and attention")
    if e.packed is not None:
        ws.remove(e.packed)
    return True


def _multi_head_attention(ws: Workspace, node: onnx.NodeProto, ranks) -> bool:
    """com.microsoft MultiHeadAttention with separate 3-D query, key and value (the projections'
    outputs), optional packed bias, 2-D key padding mask, attention_bias, unidirectional; without
    past or present state (left as it is)."""
    ins = [_get(node.input, k) for k in range(10)]
    q, k, v, bias, mask, attn_bias = ins[:6]
    if any(ins[6:]) or any(node.output[1:]) or not (q and k and v) or not node.output[0]:
        return False
    heads = int(attr(node, "num_heads", 0))
    if heads <= 0 or ranks.of(k) != 3 or ranks.of(v) != 3 or ranks.of(q) != 3 or (mask and ranks.of(mask) != 2):
        return False
    width = _width(ws, q) or (ws.const(bias).shape[0] // 3 if bias in ws.constants else 0)
    if not width or width % heads or (bias and (bias not in ws.constants or ws.const(bias).shape != (3 * width,))):
        return False  # (the bias must split in three equal parts: q, k and v widths alike)
    size = width // heads
    e = Expansion(ws, node)
    if bias:
        B = ws.const(bias)
        q, k, v = (e.op("Add", [t, e.weight(f"{w}_bias", np.ascontiguousarray(B[i * width:(i + 1) * width]), [bias],
                                            f"view packed bias, {w.upper()} part")])
                   for i, (t, w) in enumerate(zip((q, k, v), "qkv")))
    qh, kh, vh = _heads(e, q, heads), _heads(e, k, heads), _heads(e, v, heads)
    allowed = None
    if mask:
        allowed = e.op("Reshape", [e.op("Greater", [e.op("Cast", [mask], to=TensorProto.FLOAT), e.scalar("zero", 0.0)]),
                                   _i64(e, "mask_shape", [0, 1, 1, -1])])
    if attr(node, "unidirectional", 0):
        n = e.op("Gather", [e.op("Shape", [q]), _i64(e, "seq_axis", 1)], axis=0)
        r = e.op("Range", [_i64(e, "zero", 0), n, _i64(e, "one", 1)])
        causal = _le(e, [e.op("Reshape", [r, _i64(e, "key_shape", [1, 1, 1, -1])]),
                                      e.op("Reshape", [r, _i64(e, "query_shape", [1, 1, -1, 1])])])
        allowed = causal if allowed is None else e.op("And", [allowed, causal])
    scale = attr(node, "scale", None)
    scale = 1.0 / math.sqrt(size) if not scale else float(scale)
    if attn_bias:
        kt = e.op("Transpose", [kh], perm=[0, 1, 3, 2])
        scores = e.op("Add", [e.op("Mul", [e.op("MatMul", [qh, kt]), e.scalar("scale", scale)]), attn_bias])
        if allowed:
            scores = e.op("Where", [allowed, scores, e.scalar("masked", NEG)])
        out = e.op("Transpose", [e.op("MatMul", [e.op("Softmax", [scores], axis=-1), vh])], perm=[0, 2, 1, 3])
        e.op("Reshape", [out, _i64(e, "merge_shape", [0, 0, -1])], output=node.output[0])
    else:
        _attend(e, qh, kh, vh, scale, allowed, node.output[0])
    e.commit("ONNX Runtime MultiHeadAttention written as scaled dot-product attention")
    return True


def _rotary_embedding(ws: Workspace, node: onnx.NodeProto, ranks, tables: dict) -> bool:
    """com.microsoft RotaryEmbedding(input, position_ids, cos_cache, sin_cache) as exporters write
    rotary: input [B, S, H * D] (num_heads set, or D from the tables) or [B, H, S, D]; position ids
    [B, S] (a scalar start: start + 0..S-1); not interleaved, the whole head rotated."""
    x, pos, cos, sin = (_get(node.input, k) for k in range(4))
    if not (x and pos and cos and sin) or any(node.output[1:]) or attr(node, "interleaved", 0) \
            or attr(node, "is_packed_batching", 0) or float(attr(node, "scale", 1.0) or 1.0) != 1.0:
        return False
    freq = _frequencies(ws, cos, sin)
    rank, prank = ranks.of(x), ranks.of(pos)
    if freq is None or rank not in (3, 4) or prank not in (0, 1, 2):
        return False
    size = 2 * len(freq[0])
    rot_dim = int(attr(node, "rotary_embedding_dim", 0) or 0)
    heads = int(attr(node, "num_heads", 0) or 0)
    if rot_dim and rot_dim != size:
        return False
    e = Expansion(ws, node)
    if prank == 2:
        positions = pos
    else:  # start + 0..S-1
        length = e.op("Gather", [e.op("Shape", [x]), _i64(e, "seq_axis", 1 if rank == 3 else 2)], axis=0)
        start = e.op("Reshape", [e.op("Cast", [pos], to=TensorProto.INT64), _i64(e, "scalar_shape", np.zeros(0))])
        positions = e.op("Reshape", [e.op("Range", [start, e.op("Add", [start, length]), _i64(e, "one", 1)]),
                                     _i64(e, "row_shape", [1, -1])])
    c, s = _rotary_tables(e, cos, sin, positions, freq)
    if rank == 4:  # [B, H, S, D]
        c, s = _unsqueeze(e, c, 1), _unsqueeze(e, s, 1)
        e.op("Identity", [_rotate(e, x, c, s, size // 2)], output=node.output[0])
    else:  # [B, S, H * D]: heads on their own axis, rotated, merged again
        c, s = _unsqueeze(e, c, 2), _unsqueeze(e, s, 2)
        split = _i64(e, "heads_shape", [0, 0, heads, -1] if heads else [0, 0, -1, size])
        xh = e.op("Reshape", [x, split])
        e.op("Reshape", [_rotate(e, xh, c, s, size // 2), _i64(e, "merge_shape", [0, 0, -1])], output=node.output[0])
    e.commit("ONNX Runtime RotaryEmbedding written as the rotary of exporters")
    return True
