"""Recurrent layers (LSTM, GRU, RNN): hidden units are fresh elements, one group per direction;
each unit appears once in every gate block of W, R and B, at the same offset."""

from __future__ import annotations

import numpy as np

from ..channels import Label
from .base import _inputs, _is_uniform, attr
from ..registry import MICROSOFT, declare


def rnn(ctx, node, *, transposed: bool = False) -> None:
    """LSTM/GRU/RNN: input features are a slot of W; hidden units are fresh elements, one set per
    direction.

    A direction's units sit in every gate block of its slice of W, R and B (gate g, unit k at
    g*H + k), on both axes of its recurrence R[d], in its initial states, peepholes and (for
    DynamicQuantizeLSTM) per-row scales: slots `at` (direction axis, d). Each direction is its own
    group, so Y, Y_h and Y_c carry a stacked label over (direction axis, unit axis) (channels.py):
    merging the two axes gives [fwd units | bwd units], picking one direction gives its units, and a
    reader that mixes directions ties them (one permutation for both, the old model; still exact).
    Units are on Y's axis 3 and on axis 2 of Y_h, Y_c and the initial states in both layouts; the
    direction axis is 1 of Y and 0 of the states with layout 0, 2 and 1 with layout 1.
    `transposed`: com.microsoft.DynamicQuantizeLSTM stores W as [dir, input, 4H] and R as
    [dir, H, 4H], with per-direction or per-row scales and zero points (inputs 8-11).
    """
    in_axis, gate_axis = (1, 2) if transposed else (2, 1)
    x, w, r_w = node.input[0], node.input[1], node.input[2]
    b = _inputs(node, 3)
    hidden = int(attr(node, "hidden_size"))
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}[node.op_type]
    dirs = 2 if attr(node, "direction") in (b"bidirectional", "bidirectional") else 1
    layout = int(attr(node, "layout"))
    for l in ctx.stacked(x).values():
        ctx.pin(l, f"{node.op_type} input on a non-feature axis")
    for a, l in ctx.get(x).items():
        if a == 2 and ctx.is_weightlike(w):
            ctx.slot(w, in_axis, l)  # the same features feed both directions
        else:
            ctx.pin(l, f"{node.op_type} input on a non-feature axis")
    weights_ok = all(ctx.is_weightlike(t) for t in (w, r_w)) and (not b or ctx.is_weightlike(b))
    if hidden <= 0 or not weights_ok:
        for t in node.input[4:]:
            ctx.pin_all(t, f"{node.op_type} state")
        units = ctx.new(max(hidden, 1), node, node.output[0] if node.output else "")
        ctx.pin(units, f"{node.op_type} with computed weights or unknown hidden_size")
        return
    units = [ctx.new(hidden, node, node.output[0] if node.output else "") for _ in range(dirs)]
    for d, u in enumerate(units):
        at = (0, d) if dirs > 1 else None  # a single direction keeps plain slots
        gate_label = u.tile(gates)
        ctx.slot(w, gate_axis, gate_label, at)
        ctx.slot(r_w, gate_axis, gate_label, at)
        ctx.slot(r_w, in_axis, u, at)
        if b:
            ctx.slot(b, 1, u.tile(2 * gates), at)
        _rnn_extras(ctx, node, d, u, gate_label, at, layout, gates * hidden)
    stacked = Label.concat(units)
    outs = list(node.output) + [""] * 3
    if dirs == 1:
        ctx.set(outs[0], {3: units[0]})
        ctx.set(outs[1], {2: units[0]})
        ctx.set(outs[2], {2: units[0]})
    else:
        ctx.set(outs[0], {(1 + layout, 3): stacked})
        ctx.set(outs[1], {(layout, 2): stacked})
        ctx.set(outs[2], {(layout, 2): stacked})


def _rnn_extras(ctx, node, d, units, gate_label, at, layout, rows) -> None:
    """Inputs 5 initial_h, 6 initial_c, 7 peepholes P (LSTM: 3 blocks); DynamicQuantizeLSTM: 8-11
    W/R scale and zero point, per direction or per gate row. `d`: the direction of `units`."""
    state_at = (layout, d) if at is not None else None
    for idx, name in enumerate(node.input):
        if idx < 5 or not name:
            continue
        if idx >= 8:
            shape = ctx.shape(name)
            if shape and len(shape) == 2 and shape[1] == rows:
                ctx.slot(name, 1, gate_label, at)
            continue
        stacked = ctx.stacked(name).get((layout, 2)) if at is not None else None
        stacked = stacked if stacked is not None and len(stacked) == 2 * len(units) else None
        if idx == 7:
            ctx.slot(name, 1, units.tile(3), at)
        elif ctx.is_weightlike(name):
            ctx.slot(name, 2, units, state_at)
        elif stacked is not None:
            ctx.union(stacked.take(np.arange(d * len(units), (d + 1) * len(units))), units)
        elif ctx.get(name).get(2) is not None:
            ctx.union(ctx.get(name)[2], units)  # the same state for every direction: they move together
        elif _is_uniform(ctx, name, 2):
            continue  # e.g. zeros from ConstantOfShape
        else:
            ctx.pin(units, f"{node.op_type} initial state from an unlabelled tensor")
    if d == 0:
        for name in node.input[5:7]:
            for key, label in ctx.stacked(name).items():
                if key != (layout, 2) or at is None or len(label) != 2 * len(units):
                    ctx.pin(label, f"{node.op_type} initial state with its units on another axis")


def dynamic_quantize_lstm(ctx, node) -> None:
    rnn(ctx, node, transposed=True)


def _rnn_inputs(node, shape_of):
    """X [.., .., input size] (W's input axis); initial_h/initial_c [directions, B, hidden_size]
    (layout 1: [B, directions, hidden_size])."""
    hidden = int(attr(node, "hidden_size"))
    dirs = 2 if attr(node, "direction") in (b"bidirectional", "bidirectional") else 1
    out = {}
    w = shape_of(1)
    in_axis = 1 if node.op_type == "DynamicQuantizeLSTM" else 2
    if w is not None and len(w) == 3 and isinstance(w[in_axis], int):
        out[0] = {2: (w[in_axis], f"needs {w[in_axis]} input features (its W)")}
    state = {1 if int(attr(node, "layout")) else 0: (dirs, f"needs {dirs} direction{'s' * (dirs > 1)}")}
    if hidden > 0:
        state[2] = (hidden, f"needs hidden size {hidden}")
    out[5] = out[6] = state
    return out


# ---- declarations ---------------------------------------------------------------------------
_RNN = {"hidden_size": 0, "direction": b"forward", "layout": 0}
for _op in ("LSTM", "GRU", "RNN"):
    declare(_op, rnn, attributes=_RNN, stacked=True, input_dims=_rnn_inputs)
declare("DynamicQuantizeLSTM", dynamic_quantize_lstm, domain=MICROSOFT, attributes=_RNN, stacked=True,
        input_dims=_rnn_inputs)
