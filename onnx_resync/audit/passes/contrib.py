"""ONNX Runtime's fused elementwise and matmul contrib ops written out in standard ops.

Canonical form (what an exporter writes for the unoptimized model, before ONNX Runtime's extended
level fuses it):

- GELU is the erf formula as torch.onnx writes it below opset 20, x * (1 + Erf(x / sqrt 2)) * 0.5,
  whatever the file wrote: com.microsoft Gelu, the standard Gelu op (opset 20), BiasGelu (the bias
  Add first, a weighted layer of its own as in the file before fusion); the tanh approximation
  (FastGelu with its optional bias, Gelu approximate="tanh") is the tanh formula. So a dynamo
  export, a TorchScript export and an optimized file have the same activation and the same layers;
- QuickGelu(x) = x * Sigmoid(alpha x) (SiLU when alpha is 1: Sigmoid then Mul, as exporters write
  it);
- FusedMatMul = MatMul of the (transposed) operands, then a Mul by alpha when alpha is not 1 (ONNX
  Runtime folds the attention's division by sqrt(d_head) into alpha); a transposed constant operand
  is transposed as a constant, an activation by a Transpose node (left as it is when its rank is
  not known, or with the batch transposes).

Each expansion computes what the op computes (ONNX Runtime's contrib op documentation); the tests
check it with ONNX Runtime. An op with inputs or attributes outside these forms is left as it is
(alignment then names it).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..rewrite import STANDARD, Expansion, Workspace, attr

MS = "com.microsoft"


def expand_contrib(ws: Workspace) -> bool:
    changed = False
    ranks = _Ranks(ws)
    for node in ws.nodes:
        op, domain = node.op_type, node.domain
        if domain == MS and op in ("Gelu", "BiasGelu", "FastGelu", "QuickGelu", "FusedMatMul"):
            done = _EXPAND[op](ws, node, ranks)
        elif domain in STANDARD and op == "Gelu":
            done = _gelu(ws, node, ranks)
        else:
            continue
        changed |= bool(done)
    return changed


def gelu_formula(e: Expansion, x: str, y: str, tanh: bool = False) -> None:
    """y = GELU(x) in standard ops: the erf form, or the tanh approximation."""
    if not tanh:
        d = e.op("Div", [x, e.scalar("sqrt2", math.sqrt(2.0))])
        inner = e.op("Erf", [d])
    else:
        cube = e.op("Pow", [x, e.scalar("three", 3.0)])
        s = e.op("Add", [x, e.op("Mul", [cube, e.scalar("gelu_c", 0.044715)])])
        inner = e.op("Tanh", [e.op("Mul", [s, e.scalar("sqrt_2_over_pi", math.sqrt(2.0 / math.pi))])])
    a = e.op("Add", [inner, e.scalar("one", 1.0)])
    e.op("Mul", [e.op("Mul", [x, a]), e.scalar("half", 0.5)], output=y)


def _outputs_ok(node: onnx.NodeProto, count: int = 1) -> bool:
    """The node writes its first `count` outputs only (the rest absent or empty)."""
    return len(node.output) >= 1 and node.output[0] != "" and not any(node.output[count:])


def _gelu(ws: Workspace, node: onnx.NodeProto, ranks) -> bool:
    approx = attr(node, "approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    if approx not in ("none", "tanh") or not _outputs_ok(node) or not node.input or not node.input[0]:
        return False
    e = Expansion(ws, node)
    gelu_formula(e, node.input[0], node.output[0], tanh=approx == "tanh")
    where = "com.microsoft Gelu" if node.domain == MS else "Gelu op"
    e.commit(f"{where} written as its {'tanh' if approx == 'tanh' else 'erf'} formula")
    return True


def _bias_gelu(ws: Workspace, node: onnx.NodeProto, ranks, tanh: bool = False) -> bool:
    if not _outputs_ok(node) or not node.input or not node.input[0]:
        return False
    e = Expansion(ws, node)
    x = node.input[0]
    if len(node.input) > 1 and node.input[1]:
        x = e.op("Add", [x, node.input[1]])
    gelu_formula(e, x, node.output[0], tanh=tanh)
    e.commit(f"ONNX Runtime {node.op_type} written as Add + GELU" if x != node.input[0]
             else f"ONNX Runtime {node.op_type} written as GELU")
    return True


def _fast_gelu(ws: Workspace, node: onnx.NodeProto, ranks) -> bool:
    return _bias_gelu(ws, node, ranks, tanh=True)


def _quick_gelu(ws: Workspace, node: onnx.NodeProto, ranks) -> bool:
    if not _outputs_ok(node) or not node.input or not node.input[0]:
        return False
    alpha = float(attr(node, "alpha", 1.702))
    e = Expansion(ws, node)
    x = node.input[0]
    scaled = x if alpha == 1.0 else e.op("Mul", [x, e.scalar("alpha", alpha)])
    e.op("Mul", [x, e.op("Sigmoid", [scaled])], output=node.output[0])
    e.commit("ONNX Runtime QuickGelu written as x * Sigmoid(alpha x)")
    return True


def _fused_matmul(ws: Workspace, node: onnx.NodeProto, ranks) -> bool:
    if not _outputs_ok(node) or len(node.input) < 2 or not all(node.input[:2]):
        return False
    if attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        return False
    e = Expansion(ws, node)
    operands = []
    for k, name in enumerate(node.input[:2]):
        if not attr(node, "transA" if k == 0 else "transB", 0):
            operands.append(name)
            continue
        if name in ws.constants:
            value = ws.const(name)
            if value.ndim < 2:
                return False
            operands.append(e.weight(f"{'AB'[k]}_transposed", np.ascontiguousarray(np.swapaxes(value, -1, -2)),
                                     [name], "view Transpose"))
            continue
        rank = ranks.of(name)
        if rank is None or rank < 2:
            return False
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        operands.append(e.op("Transpose", [name], perm=perm))
    alpha = float(attr(node, "alpha", 1.0))
    if alpha == 1.0:
        e.op("MatMul", operands, output=node.output[0])
    else:
        e.op("Mul", [e.op("MatMul", operands), e.scalar("alpha", alpha)], output=node.output[0])
    e.commit("ONNX Runtime FusedMatMul written as MatMul" + (" + Mul by alpha" if alpha != 1.0 else ""))
    return True


class _Ranks:
    """Ranks of the file's tensors: ONNX shape inference on the file (run the first time one is asked), and
    through the contrib ops it does not know (elementwise ones keep their input's rank, a
    FusedMatMul has its operands' larger rank)."""

    def __init__(self, ws: Workspace):
        self.ws, self.view, self.tried = ws, None, False

    def of(self, name: str, depth: int = 0) -> int | None:
        if not self.tried:
            self.tried = True
            from ...walk.graph import GraphView

            try:
                self.view = GraphView(self.ws.source)
            except Exception:  # no shapes: a transposed activation stays fused
                self.view = None
        if self.view is None:
            return None
        rank = self.view.rank(name)
        p = self.view.producer.get(name)  # the file's node (the workspace's may be rewritten by now)
        if rank is None and depth == 0:
            rank = self._now(name)
        if rank is not None or p is None or depth > 64 or p.domain != MS or not p.input:
            return rank
        if p.op_type in ("Gelu", "BiasGelu", "FastGelu", "QuickGelu"):
            return self.of(p.input[0], depth + 1)
        if p.op_type == "FusedMatMul" and len(p.input) > 1:
            ranks = [self.of(i, depth + 1) for i in p.input[:2]]
            return None if None in ranks else max(ranks)
        return None


    def _now(self, name: str) -> int | None:
        """The rank in the workspace as the earlier passes left it (once, when the file's own view does
        not know it): ONNX Runtime's NCHWc layout written back as standard ops, which shape inference
        follows where it could not follow the nchwc ops."""
        if not hasattr(self, "current"):
            from ...walk.graph import GraphView
            from ..canonical import _build

            try:
                self.current = GraphView(_build(self.ws).model)
            except Exception:  # no shapes there either: the operand stays fused
                self.current = None
        return self.current.rank(name) if self.current is not None else None


_EXPAND = {"Gelu": _gelu, "BiasGelu": _bias_gelu, "FastGelu": _fast_gelu, "QuickGelu": _quick_gelu,
           "FusedMatMul": _fused_matmul}
