"""Recurrent cells (LSTM, GRU, RNN): the inputs the file gives that are the op's defaults.

ONNX's LSTM, GRU and RNN start from zero states and an LSTM has no peepholes unless initial_h,
initial_c and P are given. Exporters write the zero states out (torch.onnx: ConstantOfShape of the
batch's shape; a simplifier such as onnxslim folds that into a zero initializer of 2x1x512 once the
batch is fixed), others leave them out. A zero initializer would count as a weight of the cell, so
the same cell would have other weights in the two files.

Canonical form: an initial_h, initial_c or P that is all zeros (a constant, or a ConstantOfShape of
zero) is left out, as the default says; trailing empty inputs are dropped. A non-zero state (a
learned initial state) stays a weight of the cell.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..rewrite import STANDARD, Workspace
from .cleanup import remove_unused

# op -> input positions whose absence means zeros
DEFAULT_ZERO = {"LSTM": (5, 6, 7), "GRU": (5,), "RNN": (5,)}


def drop_default_inputs(ws: Workspace) -> bool:
    changed = False
    for node in ws.nodes:
        if node.domain not in STANDARD or node.op_type not in DEFAULT_ZERO:
            continue
        for k in DEFAULT_ZERO[node.op_type]:
            if k < len(node.input) and node.input[k] and _zeros(ws, node.input[k]):
                ws.set_input(node, k, "")
                ws.record(f"{node.op_type} zero {_NAMES[k]} left out (the default)")
                changed = True
        while node.input and not node.input[-1]:
            del node.input[-1]
    if changed:
        remove_unused(ws)  # the ConstantOfShape and the shape arithmetic that fed it
    return changed


_NAMES = {5: "initial_h", 6: "initial_c", 7: "peepholes"}


def _zeros(ws: Workspace, name: str) -> bool:
    if name in ws.constants:
        value = ws.const(name)
        return value is not None and value.size > 0 and not np.any(value)
    p = ws.producer(name)
    if p is None or p.domain not in STANDARD or p.op_type != "ConstantOfShape":
        return False
    for a in p.attribute:
        if a.name == "value":
            return not np.any(onnx.numpy_helper.to_array(a.t))
    return True  # no value: float zeros
