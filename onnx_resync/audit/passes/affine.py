"""Affine forms of a linear layer: one way to write each.

Canonical form:
- a BatchNormalization, or an Add/Mul/Sub by a per-channel constant, that is the only reader of a
  Conv, ConvTranspose or Gemm is folded into that producer's weight and bias (ONNX Runtime and
  simplifiers fold BatchNorm; a file with the BatchNorm and one without then have the same layer);
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

from ..rewrite import STANDARD, Workspace, WeightOrigin, attr, set_attr
from .floats import is_float


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
        ws.record(f"{node.op_type} folded into {p.op_type}")
        changed = True
    return changed


def _affine(ws: Workspace, node: onnx.NodeProto):
    """(input, scale, shift, constant inputs) of y = x * scale + shift; scale None for Add/Mul/Sub,
    whose constant is read against the producer's channels."""
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

