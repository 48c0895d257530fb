"""Neurons with a constant output folded into their readers' biases.

A neuron whose incoming weights (every slot of two or more dimensions on its producer's side, the
producer's rows and the kernel inside a normalization) are all zero computes the same value c for
every input: its bias, through the normalization and the activation. Each reader W then adds
W[:, i] * c, which its bias can hold instead: for a Gemm exactly, for a Conv exactly where nothing
is padded (the ORT check decides). c is read, not derived: the model is run once in ONNX Runtime
on the planned inputs with the readers' inputs as extra outputs, and a neuron counts only where
that value is the same everywhere. Candidates only: the pass proves the folded model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..io import WeightStore
from ..walk import Group
from .widths import Widths

SAME = 1e-6  # relative spread of a channel's values still counted constant


def zero_incoming(widths: Widths, group: Group) -> np.ndarray:
    """Neurons whose incoming entries of 2+-dimensional slots are all zero (none: no such slot)."""
    sides = group.sides()
    rows = [np.moveaxis(np.take(widths._array(s.weight), s.positions.reshape(-1), axis=s.axis), s.axis, 0)
            .reshape(group.size, -1) for side, s in zip(sides, group.slots)
            if side in (0, 1) and widths._array(s.weight).ndim >= 2]
    if not rows:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.all(np.concatenate(rows, axis=1) == 0, axis=1))


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def readers(model: onnx.ModelProto, group: Group) -> list[tuple[int, object]] | None:
    """(node index, slot) of every reader slot (-1) of the group: a Gemm or Conv (group 1) whose
    weight's input axis is the slot, one position per neuron; None when a reader is anything else."""
    by_weight = {}
    for k, n in enumerate(model.graph.node):
        if len(n.input) > 1:
            by_weight.setdefault(n.input[1], []).append(k)
    out = []
    for side, slot in zip(group.sides(), group.slots):
        if side != -1:
            continue
        nodes = by_weight.get(slot.weight, [])
        if len(nodes) != 1 or slot.positions.shape[1] != 1 or slot.at is not None:
            return None
        node = model.graph.node[nodes[0]]
        if node.op_type == "Gemm" and not _attr(node, "transA", 0):
            axis = 1 if _attr(node, "transB", 0) else 0
        elif node.op_type == "Conv" and _attr(node, "group", 1) == 1:
            axis = 1
        else:
            return None
        if slot.axis != axis:
            return None
        out.append((nodes[0], slot))
    return out or None


def channel_values(model: onnx.ModelProto, tensors: list[str], verify_options: dict) -> dict[str, np.ndarray]:
    """Each tensor's values per channel (axis 1) over the planned inputs: {name: (channels, values)}."""
    from ..runtime import make_session, run
    from ..verify import plan_report

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in known:
            probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    options = {k: v for k, v in verify_options.items() if k in ("shapes", "device")}
    _, feed = plan_report(probe, **options)
    session = make_session(probe, options.get("device", "auto"))
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, run(session, feed)))
    return {t: np.moveaxis(np.asarray(values[t], dtype=np.float64), 1, 0).reshape(values[t].shape[1], -1)
            for t in tensors}


def fold(model: onnx.ModelProto, group: Group, neurons: list[int], reader_slots, values) -> None:
    """Add W[:, i] * c of each constant neuron to its readers' biases (the model changes in place;
    the neurons are removed by the caller)."""
    store = WeightStore(model)
    for k, slot in reader_slots:
        node = model.graph.node[k]
        w = store.get(node.input[1]).astype(np.float64)
        x = values[node.input[0]]
        out_axis = 0 if slot.axis == 1 else 1
        added = np.zeros(w.shape[out_axis])
        for i in neurons:
            p = int(slot.positions[i, 0])
            c = float(x[p].mean())
            column = np.take(w, p, axis=slot.axis)  # (out, *kernel) or (out,)
            added += c * (column.reshape(column.shape[0], -1).sum(axis=1) if column.ndim > 1 else column)
        if len(node.input) > 2 and node.input[2]:
            store.set(node.input[2], store.get(node.input[2]).astype(np.float64) + added)
        else:
            name = f"{node.input[1]}.folded_bias"
            model.graph.initializer.append(numpy_helper.from_array(added.astype(np.float32), name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name


def constant(values: np.ndarray) -> bool:
    return bool(values.size) and float(np.ptp(values)) <= SAME * max(1.0, float(np.abs(values).max()))
