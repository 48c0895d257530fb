"""ONNX Runtime's contrib ops (domain com.microsoft; SimplifiedLayerNormalization is registered by ONNX
Runtime in the standard domain): what its graph optimizer and transformer tools write.

- *fused* ops are a standard op plus an elementwise tail: FusedConv (activation, optional sum input Z
  added before it), FusedGemm, FusedMatMul (alpha, transposed operands);
- *gelu forms* (QuickGelu, Gelu, BiasGelu, FastGelu) are elementwise; a bias is a slot;
- *skip norms* (SkipLayerNormalization, SkipSimplifiedLayerNormalization) are the residual Add of
  input, skip and bias, then a norm over the last axis whose gamma/beta are slots; their fourth
  output is the sum itself; EmbedLayerNormalization makes the hidden channels of its embeddings;
- *attention* ops split each of Q, K, V into a grid (head, dim), as a Reshape into heads does
  (walk/channels.py products): heads are the same in Q, K and V, Q's dims are K's; the output carries
  V's channels. Packed QKV (Attention) is one producer of Q, K and V. GroupQueryAttention: each
  query head is a cell (kv head, rank in its group), so a kv head moves with the query heads that
  share it. A rotary embedding pairs the dims of a head by frequency: their order is pinned, heads
  still move. A key/value cache fed in or read out has the graph's own layout: pinned;
- MatMulNBits: the output axis N makes channels (rows of B, their blocked scales and zero points,
  bias); the input axis K is stored in blocks with one scale each: pinned.

Shapes: ONNX shape inference does not know these ops; each declaration's `output_shapes` gives its
outputs' dims (registry.py), which walk/graph.py feeds back before walking.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..channels import Label
from ..registry import MICROSOFT, STANDARD, declare
from .base import _inputs, attr, passthrough
from .elementwise import broadcast
from .normalization import _param_slot, layer_norm
from .producers import _bias_slot, _conv, _gemm, _matmul
from .quantized import _per_channel_slots, conv_dims


# ---- fused producers ---------------------------------------------------------------------------
def fused_conv(ctx, node) -> None:
    """Conv + bias + optional sum Z + activation (scalar parameters): Z's channels meet the output's."""
    x, w, b, z = node.input[0], node.input[1], _inputs(node, 2), _inputs(node, 3)
    _conv(ctx, node, x, w, b)
    if z:
        _add_into(ctx, node, node.output[0], z)


def _add_into(ctx, node, out: str, other: str) -> None:
    """out += other (broadcast): an Add of two streams unions their channels, a weight is a slot."""
    proxy = onnx.helper.make_node("Add", [out, other], [out], name=node.name)
    broadcast(ctx, proxy)


def fused_gemm(ctx, node) -> None:
    _gemm(ctx, node, node.input[0], node.input[1], _inputs(node, 2))


def fused_matmul(ctx, node) -> None:
    a, b = node.input[0], node.input[1]
    if int(attr(node, "transBatchA")) or int(attr(node, "transBatchB")):
        for n in (a, b):
            ctx.pin_all(n, "FusedMatMul with transposed batch axes")
        return
    _matmul(ctx, node, a, b, bool(attr(node, "transA")), bool(attr(node, "transB")))


def matmul_nbits(ctx, node) -> None:
    """A [..., K] x B (N rows of K stored in blocks of block_size, one scale and zero point each).

    K may move only in whole blocks (a block is the unit of scales and zero points; inside it, the
    stored values are packed): the input channels form a (block, position in block) grid whose
    positions are pinned, while blocks move with B's block axis and the scales' (and zero points')
    block entries. Zero points packed several blocks to a byte, g_idx, or a partial last block pin K.
    """
    a, b, scales, zps, bias = node.input[0], node.input[1], _inputs(node, 2), _inputs(node, 3), _inputs(node, 5)
    out = node.output[0]
    r = ctx.rank(a)
    n, k, block, bits = int(attr(node, "N")), int(attr(node, "K")), int(attr(node, "block_size")), int(attr(node, "bits"))
    if r is None or not all(ctx.is_weightlike(t) for t in (b, scales) if t) or block <= 0:
        ctx.pin_all(a, "MatMulNBits with unknown rank or computed weights")
        return
    k_blocks = -(-k // block)
    fresh = ctx.new(n, node, out)
    out_labels = {axis: label for axis, label in ctx.get(a).items() if axis != r - 1}
    blocks = _nbits_blocks(ctx, node, ctx.get(a).get(r - 1), k, block, k_blocks, bits, zps)
    if blocks is not None:
        ctx.slot(b, 1, blocks)
    rows = None  # one entry per (row, block) of a flat parameter: cells of both, made once if needed
    ctx.slot(b, 0, fresh)
    for param in (scales, zps):
        if not param:
            continue
        shape = ctx.shape(param)
        if shape and len(shape) == 1 and shape[0] == n * k_blocks:
            if rows is None:
                rows = fresh.repeat_blocks(k_blocks)
                if blocks is not None:
                    cells = ctx.new(n * k_blocks, node, out, kind="product")
                    if ctx.elements.product(cells.elem, fresh, blocks):
                        rows = cells
            ctx.slot(param, 0, rows)
        elif shape and len(shape) == 1 and isinstance(shape[0], int) and shape[0] % n == 0:
            ctx.slot(param, 0, fresh.repeat_blocks(shape[0] // n))  # N rows of packed bytes
        elif shape and len(shape) == 2 and shape[0] == n:
            ctx.slot(param, 0, fresh)
            if blocks is not None and shape[1] == k_blocks:
                ctx.slot(param, 1, blocks)
        else:
            ctx.pin(fresh, f"MatMulNBits parameter {param!r} does not follow the rows of B")
    if bias:
        _bias_slot(ctx, node, bias, fresh, out_rank=r)
    out_labels[r - 1] = fresh
    ctx.set(out, out_labels)


def _nbits_blocks(ctx, node, label, k: int, block: int, k_blocks: int, bits: int, zps: str):
    """The block factor of MatMulNBits' input channels (their positions inside a block pinned), or
    None (the channels pinned where they cannot move, or there are none)."""
    if label is None:
        return None
    zshape = ctx.shape(zps) if zps else None
    n = int(attr(node, "N"))
    packed = zps and ctx.view.stored_tensor(zps) is not None and bits < 8 and k_blocks > 1 and (
        zshape is None or int(np.prod(zshape)) != n * k_blocks)
    if k % block or _inputs(node, 4) or packed or len(label) != k:
        ctx.pin(label, "MatMulNBits input axis K is stored in blocks with one scale each (a partial "
                       "block, g_idx or zero points packed across blocks)")
        return None
    if k_blocks == 1:
        ctx.pin(label, "MatMulNBits input axis K is one block")
        return None
    grid = _grid(ctx, node, label, k_blocks, "input")
    if grid is None:
        return None
    ctx.pin(grid[1], "MatMulNBits input channels move only in whole blocks of K")
    return grid[0]


def dynamic_quantize_matmul(ctx, node) -> None:
    # inputs: A (float), B (int8), b_scale, b_zero_point, bias; B's scale/zp may be per column
    _matmul(ctx, node, node.input[0], node.input[1])
    _per_channel_slots(ctx, node, [_inputs(node, 2), _inputs(node, 3)], axis=-1)
    _matmul_bias(ctx, node, _inputs(node, 4))


def matmul_integer_to_float(ctx, node) -> None:
    # inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias
    _matmul(ctx, node, node.input[0], node.input[1])
    _per_channel_slots(ctx, node, [_inputs(node, 3), _inputs(node, 5)], axis=-1)
    _matmul_bias(ctx, node, _inputs(node, 6))


def _matmul_bias(ctx, node, bias: str) -> None:
    label = ctx.get(node.output[0]).get((ctx.rank(node.output[0]) or 0) - 1)
    if bias and label is not None:
        _bias_slot(ctx, node, bias, label, out_rank=ctx.rank(node.output[0]))
    elif bias:
        ctx.pin_all(node.output[0], f"{node.op_type} bias on unlabelled columns")


# ---- elementwise ------------------------------------------------------------------------------
def biased(ctx, node) -> None:
    """X + bias, then an elementwise function (BiasGelu, FastGelu): the bias is a slot."""
    broadcast(ctx, onnx.helper.make_node("Add", [i for i in node.input if i], [node.output[0]], name=node.name))


# ---- norms ------------------------------------------------------------------------------------
def skip_layer_norm(ctx, node) -> None:
    """input + skip (+ bias), normalized over the last axis with gamma (and beta)."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    x, skip, gamma = node.input[0], node.input[1], node.input[2]
    beta, bias = ("", _inputs(node, 3)) if simplified else (_inputs(node, 3), _inputs(node, 4))
    total = node.output[0]
    broadcast(ctx, onnx.helper.make_node("Add", [t for t in (x, skip, bias) if t], [total], name=node.name))
    labels = ctx.get(total)
    r = ctx.rank(total)
    if r is None:
        for label in labels.values():
            ctx.pin(label, f"{node.op_type} with unknown rank")
        return
    last = labels.get(r - 1)
    if last is not None:
        for p in (gamma, beta):
            if p:
                pr = ctx.rank(p)
                if pr is None or pr < 1:
                    ctx.pin(last, f"{node.op_type} parameter {p!r} of unknown shape")
                else:
                    _param_slot(ctx, node, p, pr - 1, last)
    outputs = list(node.output) + [""] * 4
    if outputs[3]:
        ctx.set(outputs[3], labels)  # the sum input + skip + bias, before the norm
    for stat in outputs[1:3]:  # mean, inverse std: one value per row, whatever the order of the last axis
        if stat:
            ctx.set(stat, {a: l for a, l in labels.items() if a != r - 1})


def embed_layer_norm(ctx, node) -> None:
    """Word + position (+ segment) embeddings, summed and normalized: their last axis makes channels."""
    ids = node.input[0]
    word, pos, seg = node.input[2], _inputs(node, 3), _inputs(node, 4)
    gamma, beta = _inputs(node, 5), _inputs(node, 6)
    for name in node.input:
        if name:
            ctx.pin_all(name, "EmbedLayerNormalization reads channels as ids or masks")
    tables = [t for t in (word, pos, seg) if t]
    shape = ctx.shape(word)
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int) or not all(ctx.is_weightlike(t) for t in tables):
        return  # the outputs carry no channels; the weights read unslotted stay put
    fresh = ctx.new(shape[1], node, node.output[0])
    for table in tables:
        ctx.slot(table, 1, fresh)
    for p in (gamma, beta):
        if p:
            _param_slot(ctx, node, p, 0, fresh)
    r = ctx.rank(ids)
    if r is None:
        ctx.pin(fresh, "EmbedLayerNormalization with ids of unknown rank")
        return
    outputs = list(node.output) + [""] * 3
    for out in (outputs[0], outputs[2]):  # the normalized output, the embedding sum
        ctx.set(out, {r: fresh})


def simplified_layer_norm(ctx, node) -> None:
    layer_norm(ctx, node)  # RMSNorm: its scale is a slot like LayerNormalization's


# ---- attention --------------------------------------------------------------------------------
def _grid(ctx, node, label: Label, rows: int, what: str):
    """The (rows, columns) factor labels of a channel axis laid out row-major in `rows` rows: the
    existing factors when its channels (as neurons: unioned elements count) already are such cells,
    else fresh ones. None: pinned."""
    count = len(label)
    if rows <= 0 or count % rows:
        ctx.pin(label, f"{node.op_type}: {count} {what} channels do not split into {rows} rows")
        return None
    cols = count // rows
    table = ctx.elements
    recs = _cell_records(table, label.elem)
    if any(r is not None for r in recs):
        if all(r is not None and r[4:] == (rows, cols) and (r[2], r[3]) == divmod(k, cols) for k, r in enumerate(recs)):
            return (Label.of(np.array([recs[i * cols][0] for i in range(rows)])),
                    Label.of(np.array([recs[j][1] for j in range(cols)])))
        ctx.pin(label, f"{node.op_type}: {what} channels are already cells of another grid")
        return None
    if label.sub.any() or len(set(label.elem.tolist())) != count:
        ctx.pin(label, f"{node.op_type}: {what} channels are not one channel per position")
        return None
    heads = ctx.new(rows, node, node.output[0], kind="factor")
    dims = ctx.new(cols, node, node.output[0], kind="factor")
    if not table.product(label.elem, heads, dims):
        ctx.pin(label, f"{node.op_type}: {what} channels cannot form a grid")
        return None
    return heads, dims


def _cell_records(table, elems: np.ndarray) -> list:
    """For each element, the grid record (row, col, i, j, rows, cols) of a cell that is the same
    neuron (its own, or one it is unioned with), or None. Vectorized: an LLM has a million cells."""
    elems = np.asarray(elems, dtype=np.int64)
    if not table.products:
        return [None] * len(elems)
    keys = np.fromiter(table.products, dtype=np.int64, count=len(table.products))
    roots = table.roots(np.concatenate([keys, elems]))
    key_roots, elem_roots = roots[:len(keys)], roots[len(keys):]
    order = np.argsort(key_roots, kind="stable")
    sorted_roots = key_roots[order]
    at = np.clip(np.searchsorted(sorted_roots, elem_roots), 0, len(keys) - 1)
    found = sorted_roots[at] == elem_roots
    return [table.products.get(e) or (table.products[int(keys[order[i]])] if f else None)
            for e, i, f in zip(elems.tolist(), at.tolist(), found.tolist())]


OUTPUT_PIN = "reaches a graph output"  # (counted as interface, walker.py)


def _cache_reason(ctx, node, inputs, outputs) -> str | None:
    """Why Q, K, V keep their order when a key/value cache is read or handed on (it has the graph's
    own head layout): a cache fed by the caller is interface (walker.py names the graph input), one
    that is a graph output reaches it; None without a cache."""
    if any(_inputs(node, i) for i in inputs):
        return f"{node.op_type} reads a key/value cache, an unlabelled tensor"
    present = [node.output[o] for o in outputs if len(node.output) > o and node.output[o]]
    if any(name in ctx.view.graph_outputs for name in present):
        return OUTPUT_PIN
    if any(ctx.view.consumers.get(name) for name in present):
        return f"{node.op_type} hands its key/value cache on (its layout is the graph's)"
    return None


def _pin_inputs(ctx, node, reason: str) -> None:
    for name in node.input:
        if name:
            ctx.pin_all(name, reason)


def _attend(ctx, node, q: Label, k: Label, v: Label, heads: int, kv_heads: int, rotary: bool):
    """Q, K, V channel labels -> grids; heads unioned (query heads grouped by kv head), Q/K dims
    unioned. Returns (query head label, V dim label) or None (pinned)."""
    qg = _grid(ctx, node, q, heads, "query")
    kg = _grid(ctx, node, k, kv_heads, "key")
    vg = _grid(ctx, node, v, kv_heads, "value")
    if qg is None or kg is None or vg is None:
        for label in (q, k, v):
            ctx.pin(label, f"{node.op_type}: Q, K and V heads cannot be lined up")
        return None
    (hq, dq), (hk, dk), (hv, dv) = qg, kg, vg
    if len(dq) != len(dk):
        for label in (q, k, v):
            ctx.pin(label, f"{node.op_type}: Q and K heads of different sizes")
        return None
    if heads == kv_heads:
        ctx.union(hq, hk)
    else:  # query head = (kv head, rank in its group): a kv head moves with the query heads sharing it
        group = _grid(ctx, node, hq, kv_heads, "query head")
        if group is None:
            for label in (q, k, v):
                ctx.pin(label, f"{node.op_type}: query heads do not group over key/value heads")
            return None
        ctx.union(group[0], hk)
    ctx.union(hk, hv)
    ctx.union(dq, dk)
    if rotary:
        ctx.pin(dq, "a rotary embedding pairs the dims of a head (ordered by frequency)")
    return hq, dv


def attention(ctx, node) -> None:
    """Packed QKV: input [B, S, D] x weights [D, Dq + Dk + Dv] + bias; output [B, S, Dv]."""
    x, w, b = node.input[0], node.input[1], _inputs(node, 2)
    heads = int(attr(node, "num_heads"))
    wshape = ctx.shape(w)
    if wshape is None or len(wshape) != 2 or not ctx.is_weightlike(w) or not isinstance(wshape[1], int):
        _pin_inputs(ctx, node, "Attention with computed or unknown weights")
        return
    sizes = [int(s) for s in attr(node, "qkv_hidden_sizes")] or [wshape[1] // 3] * 3
    if sum(sizes) != wshape[1]:
        _pin_inputs(ctx, node, "Attention weights do not match qkv_hidden_sizes")
        return
    r = ctx.rank(x)
    for axis, label in ctx.get(x).items():
        if r is not None and axis == r - 1:
            ctx.slot(w, 0, label)
        else:
            ctx.pin(label, "Attention over a channel-carrying batch or sequence axis")
    for name in node.input[3:]:
        if name:
            ctx.pin_all(name, "Attention mask or cache carries channels")
    qkv = ctx.new(sum(sizes), node, node.output[0])
    ctx.slot(w, 1, qkv)
    if b:
        _param_slot(ctx, node, b, 0, qkv)
    q, k, v = (qkv.take(np.arange(s, s + n)) for s, n in zip(np.cumsum([0] + sizes[:2]).tolist(), sizes))
    cache = _cache_reason(ctx, node, [4], [1])
    if cache:
        ctx.pin(qkv, cache)
        return
    done = _attend(ctx, node, q, k, v, heads, heads, bool(attr(node, "do_rotary")))
    if done is not None and r is not None:
        ctx.set(node.output[0], {r - 1: v})  # output channel h*Dv + d is V's channel h*Dv + d


def _qkv_labels(ctx, node):
    """The channel labels of separate query, key and value inputs [B, S, hidden]; None: pinned."""
    names = [node.input[0], _inputs(node, 1), _inputs(node, 2)]
    if not all(names) or any(ctx.rank(n) != 3 for n in names):
        _pin_inputs(ctx, node, f"{node.op_type} with packed or 4-D query/key/value")
        return None
    labels = [ctx.get(n) for n in names]
    if any(set(l) - {2} for l in labels):
        _pin_inputs(ctx, node, f"{node.op_type} over a channel-carrying batch or sequence axis")
        return None
    if not all(2 in l for l in labels):
        _pin_inputs(ctx, node, f"{node.op_type}: query, key or value without channels")
        return None
    return [l[2] for l in labels]


def _packed_qkv(ctx, node, heads: int, kv_heads: int):
    """Q, K and V channels of a packed input [B, S, (Hq + 2 Hkv) * D], in that order; None: pinned."""
    x = node.input[0]
    labels = ctx.get(x)
    if ctx.rank(x) != 3 or set(labels) - {2}:
        _pin_inputs(ctx, node, f"{node.op_type} over a channel-carrying batch or sequence axis")
        return None
    packed = labels.get(2)
    if packed is None:
        return None
    if len(packed) % (heads + 2 * kv_heads):
        ctx.pin(packed, f"{node.op_type}: packed QKV does not split into the heads")
        return None
    d = len(packed) // (heads + 2 * kv_heads)
    cuts = np.cumsum([0, heads * d, kv_heads * d, kv_heads * d])
    return [packed.take(np.arange(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]


def multi_head_attention(ctx, node) -> None:
    """Query, key, value [B, S, hidden] (+ bias [Dq + Dk + Dv]); output [B, S, Dv] with V's channels."""
    labels = _qkv_labels(ctx, node)
    if labels is None:
        return
    q, k, v = labels
    for name in node.input[4:]:
        if name:
            ctx.pin_all(name, "MultiHeadAttention mask or cache carries channels")
    cache = _cache_reason(ctx, node, [6, 7], [1, 2])
    if cache:
        _pin_inputs(ctx, node, cache)
        return
    bias = _inputs(node, 3)
    if bias:
        _param_slot(ctx, node, bias, 0, Label.concat([q, k, v]))
    heads = int(attr(node, "num_heads"))
    if _attend(ctx, node, q, k, v, heads, heads, False) is not None:
        ctx.set(node.output[0], {2: v})


def group_query_attention(ctx, node) -> None:
    """Query [B, S, Hq*D], key and value [B, S, Hkv*D] (or all three packed in the query input, key
    and value absent); query head h reads kv head h // (Hq/Hkv)."""
    heads, kv_heads = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
    if kv_heads <= 0 or heads % kv_heads:
        _pin_inputs(ctx, node, "GroupQueryAttention heads do not group over key/value heads")
        return
    labels = _qkv_labels(ctx, node) if _inputs(node, 1) else _packed_qkv(ctx, node, heads, kv_heads)
    if labels is None:
        return
    q, k, v = labels
    cache = _cache_reason(ctx, node, [3, 4], [1, 2])
    if cache:
        _pin_inputs(ctx, node, cache)
        return
    for name in node.input[3:]:
        if name:
            ctx.pin_all(name, "GroupQueryAttention mask, cache or rotary table carries channels")
    done = _attend(ctx, node, q, k, v, heads, kv_heads, bool(attr(node, "do_rotary")))
    if done is None:
        return
    hq, dv = done
    cells = ctx.new(len(hq) * len(dv), node, node.output[0], kind="product")
    if ctx.elements.product(cells.elem, hq, dv):
        ctx.set(node.output[0], {2: cells})  # output channel h*Dv + d: query head h, V's dim d
    else:
        ctx.pin(cells, "GroupQueryAttention output cannot form a (head, dim) grid")


def rotary_embedding(ctx, node) -> None:
    """Rotates pairs of dims in every head: heads may move, the dims inside a head may not."""
    x = node.input[0]
    r = ctx.rank(x)
    labels = ctx.get(x)
    if r == 4:  # [B, heads, S, head_size]
        out = {}
        for axis, label in labels.items():
            if axis == 1:
                out[axis] = label
            else:
                ctx.pin(label, "a rotary embedding pairs the dims of a head (ordered by frequency)")
        ctx.set(node.output[0], out)
        return
    heads = int(attr(node, "num_heads"))
    cos = _inputs(node, 2) if node.domain == MICROSOFT else _inputs(node, 1)
    cos_shape = ctx.shape(cos) if cos else None
    if r != 3 or any(a != 2 for a in labels):
        _pin_inputs(ctx, node, "a rotary embedding over a channel-carrying batch or sequence axis")
        return
    label = labels.get(2)
    if label is None:
        return
    if heads <= 0 and cos_shape and isinstance(cos_shape[-1], int) and cos_shape[-1] and not int(
            attr(node, "rotary_embedding_dim")):
        heads = len(label) // (2 * cos_shape[-1])  # head size = twice the table's width
    grid = _grid(ctx, node, label, heads, "rotated") if heads > 0 else None
    if grid is None:
        ctx.pin(label, "a rotary embedding pairs the dims of a head (ordered by frequency)")
    else:
        ctx.pin(grid[1], "a rotary embedding pairs the dims of a head (ordered by frequency)")
    ctx.set(node.output[0], {2: label})


# ---- output shapes (ONNX shape inference does not know these ops) -----------------------------
def _same(node, shape_of):
    return [shape_of(0)]


def _broadcast_dims(*shapes):
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        for i, d in enumerate([1] * (rank - len(s)) + list(s)):
            if d != 1:
                out[i] = d
    return out


def _matmul_dims(node, a, b, trans_a=False, trans_b=False):
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    m = a[-1] if trans_a else a[-2]
    n = b[-2] if trans_b else b[-1]
    batch = _broadcast_dims(list(a[:-2]), list(b[:-2]))
    return batch + [m, n]


def _conv_dims(node, shape_of):
    z = shape_of(3)
    return [z] if z is not None else [conv_dims(node, shape_of(0), shape_of(1))]


def _gemm_dims(node, shape_of):
    a, b = shape_of(0), shape_of(1)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return [None]
    return [[a[1] if attr(node, "transA") else a[0], b[0] if attr(node, "transB") else b[1]]]


def _fused_matmul_dims(node, shape_of):
    if attr(node, "transBatchA") or attr(node, "transBatchB"):
        return [None]
    return [_matmul_dims(node, shape_of(0), shape_of(1), bool(attr(node, "transA")), bool(attr(node, "transB")))]


def _plain_matmul_dims(node, shape_of):
    return [_matmul_dims(node, shape_of(0), shape_of(1))]


def _matmul_to_float_dims(node, shape_of):
    return [(_matmul_dims(node, shape_of(0), shape_of(1)), node.input[2])]  # float like the scale


def _nbits_dims(node, shape_of):
    a = shape_of(0)
    return [None if a is None else list(a[:-1]) + [int(attr(node, "N"))]]


def _skip_norm_dims(node, shape_of):
    x = shape_of(0)
    stats = None if x is None else list(x[:-1]) + [1]
    return [x, stats, stats, x]


def _simplified_norm_dims(node, shape_of):
    x = shape_of(0)
    if x is None:
        return [None, None]
    axis = int(attr(node, "axis")) % len(x)
    return [x, list(x[:axis]) + [1] * (len(x) - axis)]


def _embed_dims(node, shape_of):
    ids, word = shape_of(0), shape_of(2)
    if ids is None or word is None or len(word) != 2:
        return [None]
    out = list(ids) + [word[1]]
    return [(out, node.input[2]), ([ids[0]], onnx.TensorProto.INT32), (out, node.input[2])]


def _attention_dims(node, shape_of):
    x, w = shape_of(0), shape_of(1)
    if x is None or w is None or len(w) != 2 or not isinstance(w[1], int):
        return [None]
    sizes = [int(s) for s in attr(node, "qkv_hidden_sizes")] or [w[1] // 3] * 3
    return [list(x[:-1]) + [sizes[2]]]


def _mha_dims(node, shape_of):
    q, v = shape_of(0), shape_of(2)
    if q is None or v is None or len(q) != 3 or len(v) != 3:
        return [None]
    return [[q[0], q[1], v[2]]]


def _gqa_dims(node, shape_of):
    q, k = shape_of(0), shape_of(1)
    heads, kv_heads = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
    if q is None or len(q) != 3 or kv_heads <= 0 or not isinstance(q[2], int):
        return [None]
    if k is None:  # packed QKV
        return [[q[0], q[1], heads * (q[2] // (heads + 2 * kv_heads))]]
    return [[q[0], q[1], q[2]]]


# ---- activation quantization (verify's exact form: registry.py) --------------------------------
def _nbits_activations(node):
    """accuracy_level 2 (fp16), 3 (bf16) and 4 (int8 in blocks of K) round or quantize input A before
    the product; 0 (unset) and 1 (fp32) compute on A as given: the exact form."""
    return {"accuracy_level": 0} if int(attr(node, "accuracy_level")) >= 2 else None


# ---- input dims (the sizes a graph input fed to these ops must have: inputs.py) ------------------
EMPTY_CACHE = (0, "takes an empty cache (past length 0: a first step)")
# rows of a rotary cos/sin table fed as a graph input: more than any position the input plan feeds
# (lengths up to 16, ids below 10, a start position plus a length); ORT refuses a table shorter than
# the sequence and reads past the end of one shorter than a position id
ROTARY_ROWS = (256, "takes a table of 256 positions (past every position fed)")


def _heads_of(shape, heads: int) -> int | None:
    """Head size of a [B, S, heads * head_size] tensor."""
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int) or heads <= 0 or shape[2] % heads:
        return None
    return shape[2] // heads


def _cache(heads: int, head: int | None, head_axis: int = 3) -> dict:
    """A cache [B, heads, S_past, head_size] (head_axis 3; Attention's [2, B, heads, S_past, head]: 4)."""
    out = {head_axis - 2: (heads, f"needs {heads} heads")} if heads > 0 else {}
    out[head_axis - 1] = EMPTY_CACHE
    if head:
        out[head_axis] = (head, f"needs head size {head}")
    return out


def _rotary_table(half: int | None, words: str) -> dict:
    """A rotary cos or sin table [positions, half]: ROTARY_ROWS rows, `half` columns when known."""
    out = {0: ROTARY_ROWS}
    if half:
        out[1] = (half, words)
    return out


def _gqa_inputs(node, shape_of):
    """past_key/past_value [B, kv_num_heads, S_past, head_size], head_size = query hidden / num_heads
    (packed QKV: / (num_heads + 2 kv_num_heads)); with do_rotary, cos/sin caches fed as inputs
    [ROTARY_ROWS, head_size / 2] (a rotation of the whole head)."""
    heads, kv = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
    head = _heads_of(shape_of(0), heads + 2 * kv if not _inputs(node, 1) else heads)
    out = {3: _cache(kv, head), 4: _cache(kv, head)}
    if int(attr(node, "do_rotary")):
        out[7] = out[8] = _rotary_table(head // 2 if head else None, f"needs half the head size {head}")
    return out


def _rotary_inputs(node, shape_of):
    """cos_cache/sin_cache [ROTARY_ROWS, rotary_embedding_dim / 2], or half the head size without it:
    input [B, S, num_heads * head_size] or [B, num_heads, S, head_size]. With neither num_heads nor
    rotary_embedding_dim ORT reads the head size off the table: its width is left to the plan."""
    x, rot, heads = shape_of(0), int(attr(node, "rotary_embedding_dim")), int(attr(node, "num_heads"))
    if rot > 0:
        half, words = rot // 2, f"needs rotary_embedding_dim / 2 = {rot // 2}"
    else:
        head = x[3] if x is not None and len(x) == 4 and isinstance(x[3], int) else _heads_of(x, heads)
        half, words = (head // 2 if head else None), f"needs half the head size {head}"
    table = _rotary_table(half, words)
    return {2: table, 3: table}


def _mha_inputs(node, shape_of):
    """past_key [B, num_heads, S_past, Q's head size], past_value [..., V's head size]."""
    heads = int(attr(node, "num_heads"))
    head = _heads_of(shape_of(0), heads)
    v_head = _heads_of(shape_of(2), heads) or head
    return {6: _cache(heads, head), 7: _cache(heads, v_head)}


def _attention_inputs(node, shape_of):
    """input [B, S, rows of weights]; past [2, B, num_heads, S_past, head_size]."""
    heads, w = int(attr(node, "num_heads")), shape_of(1)
    if w is None or len(w) != 2 or not all(isinstance(d, int) for d in w):
        return {}
    sizes = [int(s) for s in attr(node, "qkv_hidden_sizes")] or [w[1] // 3] * 3
    head = sizes[1] // heads if heads > 0 and sizes[1] % heads == 0 else None
    past = {0: (2, "needs 2 (key and value)")}
    past.update(_cache(heads, head, head_axis=4))
    return {0: {2: (w[0], f"needs {w[0]} features (the rows of its weights)")}, 4: past}


_CONV = {"group": 1, "kernel_shape": None, "strides": None, "dilations": None, "pads": None,
         "auto_pad": "NOTSET", "activation": None, "activation_params": None}

# ---- declarations ---------------------------------------------------------------------------
# (FusedConv/FusedGemm: not linear_producer, their activation may be any: a row rescale is not neutral)
declare("FusedConv", fused_conv, domain=MICROSOFT, attributes=_CONV, output_shapes=_conv_dims)
declare("FusedGemm", fused_gemm, domain=MICROSOFT, attributes={"transA": 0, "transB": 0}, output_shapes=_gemm_dims)
declare("FusedMatMul", fused_matmul, domain=MICROSOFT,
        attributes={"transA": 0, "transB": 0, "transBatchA": 0, "transBatchB": 0, "alpha": 1.0},
        linear_producer=True, homogeneous=True, output_shapes=_fused_matmul_dims)
declare("MatMulNBits", matmul_nbits, domain=MICROSOFT,
        attributes={"K": None, "N": None, "bits": 4, "block_size": None, "accuracy_level": 0},
        output_shapes=_nbits_dims, quantizes_activations=_nbits_activations)
declare("DynamicQuantizeMatMul", dynamic_quantize_matmul, domain=MICROSOFT, output_shapes=_plain_matmul_dims)
declare("MatMulIntegerToFloat", matmul_integer_to_float, domain=MICROSOFT, output_shapes=_matmul_to_float_dims)
for _op in ("QuickGelu", "Gelu"):
    declare(_op, passthrough, domain=MICROSOFT, attributes={"alpha": 1.702}, trivial=True, output_shapes=_same)
for _op in ("BiasGelu", "FastGelu"):
    declare(_op, biased, domain=MICROSOFT, output_shapes=_same)
for _op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
    declare(_op, skip_layer_norm, domain=MICROSOFT, output_shapes=_skip_norm_dims)
declare("SimplifiedLayerNormalization", simplified_layer_norm, domain=STANDARD, attributes={"axis": -1},
        trivial=True, output_shapes=_simplified_norm_dims)
declare("EmbedLayerNormalization", embed_layer_norm, domain=MICROSOFT, output_shapes=_embed_dims)
declare("Attention", attention, domain=MICROSOFT,
        attributes={"num_heads": None, "qkv_hidden_sizes": [], "do_rotary": 0}, output_shapes=_attention_dims,
        input_dims=_attention_inputs)
declare("MultiHeadAttention", multi_head_attention, domain=MICROSOFT, attributes={"num_heads": None},
        output_shapes=_mha_dims, input_dims=_mha_inputs)
declare("GroupQueryAttention", group_query_attention, domain=MICROSOFT,
        attributes={"num_heads": None, "kv_num_heads": None, "do_rotary": 0}, output_shapes=_gqa_dims,
        input_dims=_gqa_inputs)
declare("RotaryEmbedding", rotary_embedding, domain=MICROSOFT,
        attributes={"num_heads": 0, "rotary_embedding_dim": 0}, output_shapes=_same, input_dims=_rotary_inputs)
