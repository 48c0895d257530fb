"""ONNX Runtime's fused contrib ops back to standard ones.

Canonical form: com.microsoft FusedConv / FusedGemm (written by ONNX Runtime's extended offline
optimizer) become the Conv / Gemm, the Add of FusedConv's summand Z, then the activation, as the
unoptimized file has them. An activation this pass does not know leaves the node as it is
(alignment will then name it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..rewrite import Workspace, WeightOrigin, attr

MS = "com.microsoft"
_PLAIN = ("Relu", "Sigmoid", "Tanh", "HardSwish")  # activations without parameters


def split_fused(ws: Workspace) -> bool:
    changed = False
    for node in ws.nodes:
        if node.domain != MS or node.op_type not in ("FusedConv", "FusedGemm"):
            continue
        act = attr(node, "activation", b"")
        act = act.decode() if isinstance(act, bytes) else str(act)
        if node.op_type == "FusedGemm":
            params = [attr(node, k, None) for k in ("activation_alpha", "activation_beta", "activation_gamma")]
            params = [p for p in params if p is not None]
        else:
            params = list(attr(node, "activation_params", []) or [])
        act_nodes = activation(ws, act, params, node)
        if act_nodes is None:
            continue
        base = "Conv" if node.op_type == "FusedConv" else "Gemm"
        y = node.output[0]
        z = node.input[3] if base == "Conv" and len(node.input) > 3 and node.input[3] else ""
        mid = ws.new_name(y + "/pre_activation") if act_nodes or z else y
        core = helper.make_node(base, list(node.input[:3]), [mid], name=node.name)
        core.attribute.extend(a for a in node.attribute if not a.name.startswith("activation"))
        new = [core]
        if z:
            summed = ws.new_name(y + "/sum") if act_nodes else y
            new.append(ws.name_node(helper.make_node("Add", [mid, z], [summed]), node.name + "/sum", node))
            mid = summed
        for op, attrs, extra in act_nodes:
            new.append(ws.name_node(helper.make_node(op, [mid] + extra, [y], **attrs), f"{node.name}/{op}", node))
        ws.replace(node, new)
        ws.record(f"ONNX Runtime {node.op_type} split into {base} + activation")
        changed = True
    return changed


def activation(ws: Workspace, act: str, params: list, node: onnx.NodeProto) -> list | None:
    """[(op, attributes, extra constant inputs)] for a fused activation; [] for none; None if unknown."""
    if act in ("", "Identity"):
        return []
    if act in _PLAIN:
        return [(act, {}, [])]
    if act == "LeakyRelu":
        return [(act, {"alpha": float(params[0]) if params else 0.01}, [])]
    if act == "HardSigmoid":
        return [(act, {"alpha": float(params[0]), "beta": float(params[1])} if len(params) >= 2 else {}, [])]
    if act == "Clip" and len(params) >= 2:
        names = [ws.add_constant(f"{node.name}/clip_{which}", np.array(value, dtype=np.float32),
                                 WeightOrigin([], "float32", ["synthetic clip bound"]))
                 for which, value in zip(("min", "max"), params[:2])]
        return [("Clip", {}, names)]
    return None
