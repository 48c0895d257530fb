"""Affine forms of a linear layer: one way to write each.

Canonical form:
- a BatchNormalization, an Add/Mul/Sub by a per-channel constant, or a depthwise 1x1 Conv (group =
  channels, one weight per channel, stride 1, no padding: y = x * w[c] + b[c]) that is the only
  reader of a Conv, ConvTranspose or Gemm is folded into that producer's weight and bias (ONNX
  Runtime and simplifiers fold BatchNorm; a file with the BatchNorm and one without then have the
  same layer);
- a per-channel affine left unfolded (after an activation, a residual Add, ...) is Mul by its scale
  then Add of its shift, both shaped [C, 1, ...] against the channel axis: a BatchNormalization
  and a depthwise 1x1 Conv are written so (ONNX Runtime's NCHWc layout writes an unfolded
  BatchNormalization as a depthwise 1x1 Conv; an exporter may write it as Mul and Add), where the
  input's rank is known (`_rank`);
- a Gemm with a constant B is MatMul (+ Add of the bias), as exporters write Linear both ways;
- a Conv or ConvTranspose without a bias gets a zero bias (so a folded and an unfolded copy have
  the same weights).
Folding is exact arithmetic on the weights (in float64, stored as float32): the function is kept
up to that rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..rewrite import STANDARD, Expansion, Workspace, WeightOrigin, attr, set_attr
from .floats import is_float
from ...walk.rules.elementwise import BINARY, UNARY


def fold_into_producers(ws: Workspace) -> bool:
    """One sweep in order; a later node sees an earlier fold (run to a fixed point all the same)."""
    changed = False
    for node in ws.nodes:
        if node.domain not in STANDARD or not node.input:
            continue
        found = _affine(ws, node)
        if found is None:
            continue
        x, s, t, params = found
        p = ws.producer(x)
        if p is None or p.op_type not in _CHANNELS or p.domain not in STANDARD:
            continue
        if ws.sole_consumer(x) is not node or len(p.input) < 2 or p.input[1] not in ws.constants:
            continue
        if len(p.input) > 2 and p.input[2] and p.input[2] not in ws.constants:
            continue
        if p.op_type == "Gemm" and attr(p, "transA"):
            continue
        W = ws.const(p.input[1])
        channels = _CHANNELS[p.op_type](p, W)
        if s is None:  # Add / Mul / Sub by a constant
            vec = _per_channel(ws.const(params[0]), p, W, channels)
            if vec is None:
                continue
            s = vec if node.op_type == "Mul" else np.ones(channels)
            t = np.zeros(channels) if node.op_type == "Mul" else (vec if node.op_type == "Add" else -vec)
        if s.shape != (channels,) or t.shape != (channels,):
            if any(v.size != 1 and v.shape != (channels,) for v in (s, t)):
                continue  # parameters that do not match the producer's channels
            s, t = np.broadcast_to(s, (channels,)), np.broadcast_to(t, (channels,))
        _fold(ws, p, W, s, t, node, params)
        ws.remove(node)
        ws.set_output(p, 0, node.output[0])
        ws.record(f"{_what(node)} folded into {p.op_type}")
        changed = True
    return changed


def _what(node: onnx.NodeProto) -> str:
    return "depthwise 1x1 Conv" if node.op_type == "Conv" else node.op_type


def unfolded_as_mul_add(ws: Workspace) -> bool:
    """A BatchNormalization or depthwise 1x1 Conv that no producer took (run after
    fold_into_producers) written as Mul by its per-channel scale and Add of its shift."""
    changed = False
    for node in ws.nodes:
        if node.domain not in STANDARD or node.op_type not in ("BatchNormalization", "Conv"):
            continue
        found = _affine(ws, node)
        if found is None:
            continue
        x, s, t, params = found
        conv = node.op_type == "Conv"
        rank = ws.const(node.input[1]).ndim if conv else _rank(ws, x)
        if rank is None or rank < 2 or s.shape != t.shape or s.ndim != 1:
            continue
        shape = (len(s),) + (1,) * (rank - 2)
        e = Expansion(ws, node)
        scale = e.weight("scale", s.reshape(shape).astype(np.float32), params[:1] if conv else [params[0], params[3]],
                         "view depthwise 1x1 Conv weight as Mul" if conv else "computed BatchNormalization scale")
        if conv and len(params) < 2:
            shift = e.ws.add_constant(f"{node.name}/shift", np.zeros(shape, np.float32),
                                      WeightOrigin([], "float32", ["synthetic zero bias"]))
        else:
            shift = e.weight("shift", t.reshape(shape).astype(np.float32), params[1:] if conv else params,
                             "view depthwise 1x1 Conv bias as Add" if conv else "computed BatchNormalization shift")
        e.op("Add", [e.op("Mul", [x, scale]), shift], output=node.output[0])
        e.commit(f"{_what(node)} written as Mul + Add")
        changed = True
    return changed


# ops whose output has their first input's rank (the walk back to a known rank in _rank): the
# walker's unary elementwise ops, and per-channel ops, normalizations, pools, resizes
_SAME_RANK = set(UNARY) | {"Clip", "PRelu", "BatchNormalization", "InstanceNormalization", "LRN", "MaxPool",
                           "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "Softmax", "LogSoftmax",
                           "Resize", "Upsample"}
_BROADCAST = set(BINARY)  # the walker's binary elementwise ops: the larger rank of the two


def _rank(ws: Workspace, name: str) -> int | None:
    """The rank of tensor `name` as the file says it: declared (an input, value_info), a constant, or
    the output of a convolution (its weight's rank) reached back through ops that keep their
    input's rank; None if not known."""
    declared = {vi.name: vi for vi in list(ws.graph.input) + list(ws.graph.value_info) + list(ws.graph.output)}
    known: dict[str, int | None] = {}

    def rank(t: str) -> int | None:
        if t not in known:
            known[t] = None  # while it is looked for: a cycle knows nothing
            known[t] = _rank_of(ws, t, declared, rank)
        return known[t]

    return rank(name)


def _rank_of(ws: Workspace, t: str, declared: dict, rank) -> int | None:
    if t in ws.constants:
        return ws.const(t).ndim
    vi = declared.get(t)
    if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
        return len(vi.type.tensor_type.shape.dim)
    p = ws.producer(t)
    if p is None or p.domain not in STANDARD or not p.input:
        return None
    if p.op_type in ("Conv", "ConvTranspose") and len(p.input) > 1 and p.input[1] in ws.constants:
        return ws.const(p.input[1]).ndim
    if p.op_type in _SAME_RANK:
        return rank(p.input[0])
    if p.op_type in _BROADCAST:
        ranks = [rank(i) for i in p.input if i]
        return None if None in ranks else max(ranks)
    return None


def _affine(ws: Workspace, node: onnx.NodeProto):
    """(input, scale, shift, constant inputs) of y = x * scale + shift; scale None for Add/Mul/Sub,
    whose constant is read against the producer's channels."""
    if node.op_type == "Conv":
        if not _depthwise_1x1(ws, node):
            return None
        W = ws.const(node.input[1]).astype(np.float64)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        t = ws.const(bias).astype(np.float64).reshape(-1) if bias else np.zeros(W.shape[0])
        return node.input[0], W.reshape(-1), t, [node.input[1]] + ([bias] if bias else [])
    if node.op_type == "BatchNormalization":
        if len(node.input) < 5 or not all(i in ws.constants for i in node.input[1:5]):
            return None
        if any(o for o in node.output[1:]) or attr(node, "training_mode", 0):
            return None
        scale, bias, mean, var = (ws.const(i).astype(np.float64) for i in node.input[1:5])
        if len({p.shape for p in (scale, bias, mean, var)}) != 1 or scale.ndim != 1:
            return None  # not one value per channel: a malformed node, left to the graph
        denominator = var + float(attr(node, "epsilon", 1e-5))
        if not (denominator > 0).all():
            return None  # a variance below -epsilon computes NaN: not folded, compared as stored
        s = scale / np.sqrt(denominator)
        return node.input[0], s, bias - mean * s, list(node.input[1:5])
    if node.op_type in ("Add", "Mul", "Sub") and len(node.input) == 2:
        a, b = node.input
        if b in ws.constants and a not in ws.constants:
            return a, None, None, [b]
        if a in ws.constants and b not in ws.constants and node.op_type != "Sub":
            return b, None, None, [a]
    return None


def _depthwise_1x1(ws: Workspace, node: onnx.NodeProto) -> bool:
    """A Conv that scales each channel by its own weight and adds its bias: group = channels, a
    [C, 1, 1, ...] float weight, a [C] bias (or none), stride 1 and no padding (dilation is moot)."""
    if node.op_type != "Conv" or node.domain not in STANDARD or len(node.input) < 2 or len(node.output) != 1:
        return False
    bias = node.input[2] if len(node.input) > 2 else ""
    if node.input[1] not in ws.constants or (bias and bias not in ws.constants):
        return False
    W = ws.const(node.input[1])
    if W.ndim < 3 or W.shape[1] != 1 or any(d != 1 for d in W.shape[2:]) or int(attr(node, "group", 1)) != W.shape[0]:
        return False
    if not is_float(W.dtype) or (bias and ws.const(bias).shape != (W.shape[0],)):
        return False
    spatial = W.ndim - 2
    return (all(int(k) == 1 for k in attr(node, "kernel_shape", None) or [1] * spatial)
            and all(int(k) == 1 for k in attr(node, "strides", None) or [1] * spatial)
            and not any(int(k) for k in attr(node, "pads", None) or []))


_CHANNELS = {  # output channels of a producer that folding knows, from its weight
    "Conv": lambda p, W: W.shape[0],
    "ConvTranspose": lambda p, W: W.shape[1] * int(attr(p, "group")),
    "Gemm": lambda p, W: W.shape[0] if attr(p, "transB") else W.shape[1],
}


def _per_channel(c: np.ndarray, p: onnx.NodeProto, W: np.ndarray, channels: int) -> np.ndarray | None:
    """The constant as one value per output channel, or None if it is not broadcast that way."""
    if not is_float(c.dtype):
        return None
    rank = W.ndim if p.op_type in ("Conv", "ConvTranspose") else 2
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()


def _fold(ws: Workspace, p, W, s, t, node, params) -> None:
    op = p.op_type
    W64 = W.astype(np.float64)
    if op == "Conv":
        Wn = W64 * s.reshape((-1,) + (1,) * (W.ndim - 1))
    elif op == "ConvTranspose":
        g = int(attr(p, "group"))
        cin, cout_g = W.shape[0], W.shape[1]
        Wn = (W64.reshape((g, cin // g, cout_g) + W.shape[2:])
              * s.reshape((g, 1, cout_g) + (1,) * (W.ndim - 2))).reshape(W.shape)
    else:  # Gemm: Y = alpha * A @ B' + beta * C
        Wn = W64 * (s[:, None] if attr(p, "transB") else s[None, :])
    b_name = p.input[2] if len(p.input) > 2 and p.input[2] else ""
    if op == "Gemm":
        beta = float(attr(p, "beta", 1.0))
        C = ws.const(b_name).astype(np.float64) * beta if b_name else np.zeros(len(s))
        if C.ndim == 2 and C.shape[1] == 1 and len(s) > 1:
            C = np.broadcast_to(C, (C.shape[0], len(s)))
        bn = C * s + t
        set_attr(p, "beta", 1.0)
    else:
        b = ws.const(b_name).astype(np.float64) if b_name else np.zeros(len(s))
        bn = b * s + t
    step = f"folded {node.op_type} {ws.shown.get(node.name, node.name)}"
    w_name = ws.add_constant(p.input[1] + "/folded", Wn.astype(np.float32), ws.origin_of([p.input[1]] + params, step))
    b_new = ws.add_constant((b_name or p.input[1]) + ("/folded" if b_name else "/bias"), np.asarray(bn, dtype=np.float32),
                            ws.origin_of(([b_name] if b_name else []) + params, step))
    ws.set_input(p, 1, w_name)
    ws.set_input(p, 2, b_new)


def gemm_as_matmul(ws: Workspace) -> bool:
    changed = False
    for p in ws.nodes:
        if (p.op_type != "Gemm" or p.domain not in STANDARD or attr(p, "transA")
                or len(p.input) < 2 or p.input[1] not in ws.constants
                or (len(p.input) > 2 and p.input[2] and p.input[2] not in ws.constants)):
            continue
        alpha, beta, trans_b = float(attr(p, "alpha", 1.0)), float(attr(p, "beta", 1.0)), attr(p, "transB")
        B = ws.const(p.input[1])
        Bn = B.T if trans_b else B
        if alpha != 1.0:
            Bn = (Bn.astype(np.float64) * alpha).astype(B.dtype)
        origin = ws.origin_of([p.input[1]], "view Gemm transB" if trans_b else "view Gemm")
        if alpha != 1.0:
            origin.steps.append("computed Gemm alpha")
        w_name = ws.add_constant(p.input[1] + "/matmul", np.ascontiguousarray(Bn), origin)
        c_name = p.input[2] if len(p.input) > 2 and p.input[2] else ""
        out = p.output[0]
        if c_name:
            C = ws.const(c_name)
            if C.ndim == 2 and C.shape[0] == 1:
                C = C.reshape(-1)
            if beta != 1.0:
                C = (C.astype(np.float64) * beta).astype(np.float32)
            cn = ws.add_constant(c_name + "/bias", C, ws.origin_of([c_name], "view Gemm bias"))
            mid = ws.new_name(out + "/matmul")
            add = ws.name_node(helper.make_node("Add", [mid, cn], [out]), p.name + "/bias", p)
            new = [helper.make_node("MatMul", [p.input[0], w_name], [mid], name=p.name), add]
        else:
            new = [helper.make_node("MatMul", [p.input[0], w_name], [out], name=p.name)]
        ws.replace(p, new)
        ws.record("Gemm written as MatMul + Add")
        changed = True
    return changed


def zero_biases(ws: Workspace) -> bool:
    changed = False
    for p in ws.nodes:
        if p.op_type not in ("Conv", "ConvTranspose") or p.domain not in STANDARD:
            continue
        if len(p.input) < 2 or p.input[1] not in ws.constants or (len(p.input) > 2 and p.input[2]):
            continue
        zeros = np.zeros(_CHANNELS[p.op_type](p, ws.const(p.input[1])), dtype=np.float32)
        ws.set_input(p, 2, ws.add_constant(p.input[1] + "/zero_bias", zeros,
                                           WeightOrigin([], "float32", ["synthetic zero bias"])))
        ws.record("zero bias added")
        changed = True
    return changed

