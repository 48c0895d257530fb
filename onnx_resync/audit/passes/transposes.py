"""Transposes after the per-element ops that read them with a constant.

ONNX Runtime's transpose optimizer (every level from basic up) pushes a Transpose down through an
element-wise op whose other operand is a constant, transposing the constant instead:
`Mul(Transpose(x, perm), c)` is saved as `Transpose(Mul(x, c'), perm)` with `c'` the constant
(its rank made up with leading 1s) transposed by the inverse of `perm`. Both compute the same
tensor, but the weighted layer reads its constant in another shape ([309, 1, 1] against
[1, 1, 309, 1] in Spotify's Basic Pitch), so alignment cannot pair them.

Canonical form: the optimizer's. A Transpose read only by an Add/Sub/Mul/Div whose other operand
is a constant of more than one value is moved after that op (again after the next such op, so a
chain of them ends with the Transpose); a scalar operand is left alone (its shape says nothing of a
layout). The operands keep their order (Sub and Div).
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..rewrite import STANDARD, Workspace, attr

_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


def sink_transposes(ws: Workspace) -> bool:
    changed = False
    for node in ws.nodes:
        if node.op_type not in _ELEMENTWISE or node.domain not in STANDARD or len(node.input) != 2 \
                or node not in ws:
            continue
        k = next((k for k in (0, 1) if node.input[k] in ws.constants), None)
        if k is None or node.input[1 - k] in ws.constants or node.output[0] in ws.protected:
            continue
        t = node.input[1 - k]
        tr = ws.producer(t)
        if tr is None or tr.op_type != "Transpose" or tr.domain not in STANDARD or ws.sole_consumer(t) is not node:
            continue
        perm = attr(tr, "perm", None)
        c = ws.const(node.input[k])
        if perm is None or c.size < 2 or c.ndim > len(perm):
            continue
        perm = [int(p) for p in perm]
        moved = np.ascontiguousarray(c.reshape((1,) * (len(perm) - c.ndim) + c.shape).transpose(np.argsort(perm)))
        name = ws.add_constant(node.input[k] + "/untransposed", moved,
                               ws.origin_of([node.input[k]], "view Transpose"))
        y = node.output[0]
        mid = ws.new_name(y + "/untransposed")
        inputs = list(node.input)
        inputs[k], inputs[1 - k] = name, tr.input[0]
        op = helper.make_node(node.op_type, inputs, [mid], name=node.name)
        after = ws.name_node(helper.make_node("Transpose", [mid], [y], perm=perm), tr.name, tr)
        ws.remove(tr)
        ws.replace(node, [op, after])
        ws.record(f"Transpose moved after the {node.op_type} of a constant")
        changed = True
    return changed
