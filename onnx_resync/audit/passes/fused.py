"""ONNX Runtime's fused contrib ops back to standard ones.

Canonical form: com.microsoft FusedConv / FusedGemm (written by ONNX Runtime's extended offline
optimizer) become the Conv / Gemm, the Add of FusedConv's summand Z, then the activation, as the
unoptimized file has them. An activation this pass does not know leaves the node as it is
(alignment will then name it). The same inside If/Loop/Scan bodies, at any depth (ONNX Runtime's
optimizer fuses there too; a clip bound is then a Constant node in the body).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..rewrite import Workspace, WeightOrigin, attr
from ...walk.graph import subgraphs

MS = "com.microsoft"
_PLAIN = ("Relu", "Sigmoid", "Tanh", "HardSwish")  # activations without parameters


def split_fused(ws: Workspace) -> bool:
    changed = False
    for node in ws.nodes:
        new = _split(ws, node, ws.new_name, None)
        if new is None:
            continue
        for n in new[1:]:
            ws.show_as(n, node)
        ws.replace(node, new)
        changed = True
    for node in ws.nodes:
        for g in subgraphs(node):
            changed |= _split_body(ws, g, _names(g))
    return changed


def _split_body(ws: Workspace, g: onnx.GraphProto, taken: set[str]) -> bool:
    """split_fused inside body `g` and the bodies within it: nodes replaced in place."""

    def new_name(hint: str) -> str:
        name = ws.new_name(hint)
        while name in taken:
            name = ws.new_name(hint)
        taken.add(name)
        return name

    changed, nodes = False, []
    for node in g.node:
        for sub in subgraphs(node):
            changed |= _split_body(ws, sub, taken)
        heads: list[onnx.NodeProto] = []

        def constant(hint: str, value: np.ndarray) -> str:
            name = new_name(hint)
            heads.append(helper.make_node("Constant", [], [name], name=name,
                                          value=numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)))
            return name

        new = _split(ws, node, new_name, constant)
        nodes += heads + new if new is not None else [node]
        changed |= new is not None
    if changed:
        del g.node[:]
        g.node.extend(nodes)
    return changed


def _names(g: onnx.GraphProto) -> set[str]:
    """Every node and tensor name in body `g`, at any depth."""
    names = {i.name for i in g.input} | {t.name for t in g.initializer}
    for node in g.node:
        names.add(node.name)
        names.update(o for o in node.output if o)
        for sub in subgraphs(node):
            names |= _names(sub)
    return names


def _split(ws: Workspace, node: onnx.NodeProto, new_name: Callable[[str], str],
           constant: Callable[[str, np.ndarray], str] | None) -> list[onnx.NodeProto] | None:
    """The standard nodes for one FusedConv / FusedGemm (the first keeps its name); None if `node`
    is none or its activation is unknown."""
    if node.domain != MS or node.op_type not in ("FusedConv", "FusedGemm"):
        return None
    act = attr(node, "activation", b"")
    act = act.decode() if isinstance(act, bytes) else str(act)
    if node.op_type == "FusedGemm":
        params = [attr(node, k, None) for k in ("activation_alpha", "activation_beta", "activation_gamma")]
        params = [p for p in params if p is not None]
    else:
        params = list(attr(node, "activation_params", []) or [])
    act_nodes = activation(ws, act, params, node, constant)
    if act_nodes is None:
        return None
    base = "Conv" if node.op_type == "FusedConv" else "Gemm"
    y = node.output[0]
    z = node.input[3] if base == "Conv" and len(node.input) > 3 and node.input[3] else ""
    mid = new_name(y + "/pre_activation") if act_nodes or z else y
    core = helper.make_node(base, list(node.input[:3]), [mid], name=node.name)
    core.attribute.extend(a for a in node.attribute if not a.name.startswith("activation"))
    new = [core]
    if z:
        summed = new_name(y + "/sum") if act_nodes else y
        new.append(helper.make_node("Add", [mid, z], [summed], name=new_name(node.name + "/sum")))
        mid = summed
    for op, attrs, extra in act_nodes:
        new.append(helper.make_node(op, [mid] + extra, [y], name=new_name(f"{node.name}/{op}"), **attrs))
    ws.record(f"ONNX Runtime {node.op_type} split into {base} + activation")
    return new


def activation(ws: Workspace, act: str, params: list, node: onnx.NodeProto,
               constant: Callable[[str, np.ndarray], str] | None = None) -> list | None:
    """[(op, attributes, extra constant inputs)] for a fused activation; [] for none; None if unknown.
    `constant(hint, value)` stores a clip bound and returns its name (default: a workspace constant)."""
    if constant is None:
        constant = lambda hint, value: ws.add_constant(  # noqa: E731
            hint, value, WeightOrigin([], "float32", ["synthetic clip bound"]))
    if act in ("", "Identity"):
        return []
    if act in _PLAIN:
        return [(act, {}, [])]
    if act == "LeakyRelu":
        return [(act, {"alpha": float(params[0]) if params else 0.01}, [])]
    if act == "HardSigmoid":
        return [(act, {"alpha": float(params[0]), "beta": float(params[1])} if len(params) >= 2 else {}, [])]
    if act == "Clip" and len(params) >= 2:
        names = [constant(f"{node.name}/clip_{which}", np.array(value, dtype=np.float32))
                 for which, value in zip(("min", "max"), params[:2])]
        return [("Clip", {}, names)]
    return None
