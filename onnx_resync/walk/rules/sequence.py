"""Sequences: SequenceEmpty, SequenceConstruct, SequenceInsert, SequenceAt, SequenceErase,
SequenceLength, ConcatFromSequence, SplitToSequence.

A sequence carries the labels its tensors share: one axis -> label map for every element, keyed by
the elements' axes, as a tensor's is. TorchScript writes a list built in a loop this way
(SequenceEmpty carried by the Loop, SequenceInsert in the body, ConcatFromSequence after): the empty
sequence has no order, so the Loop state takes the layout its body inserts (walker._learn_state).

An *empty* sequence (SequenceEmpty, seen through `is_empty`) takes the labels of what is inserted. A
sequence without labels that may hold tensors (a Loop state before the walk has learnt its layout)
pins the channels inserted into it, and still hands their labels on, so the state learns them.
"""

from __future__ import annotations

import numpy as np

from .base import attr
from ..registry import declare

MIXED = "a sequence holds tensors with and without these channels"


def is_empty(ctx, name: str) -> bool:
    """`name` is made by SequenceEmpty (an empty sequence: no order along any axis)."""
    node = ctx.view.producer.get(name)
    return node is not None and node.op_type == "SequenceEmpty" and node.domain in ("", "ai.onnx")


def sequence_empty(ctx, node) -> None:
    """Nothing in it: no labels (a Loop state that starts so learns them, see is_empty)."""


def _joined(ctx, parts: list[dict], empty: bool) -> dict:
    """Per axis, the labels of tensors that meet in one sequence unioned; an axis some part carries
    and another does not pins (unless the only part without it is an empty sequence)."""
    out = {}
    axes = sorted(set().union(*parts)) if parts else []
    for a in axes:
        labels = [p.get(a) for p in parts]
        present = [l for l in labels if l is not None]
        first = present[0]
        missing = len(present) != len(labels) and not (empty and labels[0] is None and None not in labels[1:])
        if missing or any(len(l) != len(first) or not np.array_equal(l.sub, first.sub) for l in present):
            for l in present:
                ctx.pin(l, MIXED)
        for l in present[1:]:
            if len(l) == len(first):
                ctx.union(first, l)
        out[a] = first  # (pinned or not: a Loop state learns the layout from it)
    return out


def _element_rank(ctx, name: str) -> int | None:
    """The rank of the tensors in sequence `name` (ctx.sequence_ranks, else its declared shape)."""
    return ctx.sequence_ranks.get(name)


def sequence_construct(ctx, node) -> None:
    ctx.set(node.output[0], _joined(ctx, [ctx.get(n) for n in node.input if n], empty=False))
    ranks = {ctx.rank(n) for n in node.input if n}
    if len(ranks) == 1 and None not in ranks:
        ctx.sequence_ranks[node.output[0]] = ranks.pop()


def sequence_insert(ctx, node) -> None:
    seq, tensor = node.input[0], node.input[1]
    ctx.set(node.output[0], _joined(ctx, [ctx.get(seq), ctx.get(tensor)], empty=is_empty(ctx, seq)))
    if ctx.rank(tensor) is not None:
        ctx.sequence_ranks[node.output[0]] = ctx.rank(tensor)


def same_labels(ctx, node) -> None:
    """SequenceAt (one element), SequenceErase (the others): the sequence's labels."""
    ctx.set(node.output[0], ctx.get(node.input[0]))
    if node.op_type == "SequenceErase" and node.input[0] in ctx.sequence_ranks:
        ctx.sequence_ranks[node.output[0]] = ctx.sequence_ranks[node.input[0]]


def sequence_length(ctx, node) -> None:
    """A count: no channels."""


def concat_from_sequence(ctx, node) -> None:
    """Elements joined along `axis` (a new one with new_axis=1): the labels keep their axes (shifted
    past a new axis); joining along a channel axis repeats its label an unknown number of times: pins."""
    labels = ctx.get(node.input[0])
    if not labels:
        return
    new = int(attr(node, "new_axis"))
    r_out = ctx.rank(node.output[0])
    if r_out is None and _element_rank(ctx, node.input[0]) is not None:
        r_out = _element_rank(ctx, node.input[0]) + (1 if new else 0)
    if r_out is None:
        for l in labels.values():
            ctx.pin(l, "ConcatFromSequence of unknown rank")
        return
    axis = int(attr(node, "axis"))
    if not -r_out <= axis < r_out:
        for l in labels.values():
            ctx.pin(l, "ConcatFromSequence axis out of range")
        return
    axis %= r_out
    out = {}
    for a, l in labels.items():
        if new:
            out[a + (a >= axis)] = l
        elif a == axis:
            ctx.pin(l, "ConcatFromSequence joins along a channel axis")
        else:
            out[a] = l
    ctx.set(node.output[0], out)


def split_to_sequence(ctx, node) -> None:
    """Pieces along `axis`: the other axes keep their labels (keepdims=0 without split drops the axis);
    a channel axis cut into pieces pins."""
    labels = ctx.get(node.input[0])
    r = ctx.rank(node.input[0])
    if not labels:
        return
    if r is None:
        for l in labels.values():
            ctx.pin(l, "SplitToSequence of unknown rank")
        return
    axis = int(attr(node, "axis"))
    if not -r <= axis < r:
        for l in labels.values():
            ctx.pin(l, "SplitToSequence axis out of range")
        return
    axis %= r
    drop = not int(attr(node, "keepdims")) and not (len(node.input) > 1 and node.input[1])
    ctx.sequence_ranks[node.output[0]] = r - (1 if drop else 0)
    out = {}
    for a, l in labels.items():
        if a == axis:
            ctx.pin(l, "SplitToSequence cuts a channel axis")
        else:
            out[a - (drop and a > axis)] = l
    ctx.set(node.output[0], out)


# ---- declarations ---------------------------------------------------------------------------
declare("SequenceEmpty", sequence_empty, attributes={"dtype": None})
declare("SequenceConstruct", sequence_construct)
declare("SequenceInsert", sequence_insert)
declare("SequenceAt", same_labels)
declare("SequenceErase", same_labels)
declare("SequenceLength", sequence_length)
declare("ConcatFromSequence", concat_from_sequence, attributes={"axis": None, "new_axis": 0})
declare("SplitToSequence", split_to_sequence, attributes={"axis": 0, "keepdims": 1})
