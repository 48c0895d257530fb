"""Elementwise ops: unary ones pass labels through, binary ones broadcast (and union what meets)."""

from __future__ import annotations


from ..channels import Label
from .base import _is_uniform, passthrough
from ..registry import declare


# ---- elementwise with broadcasting ----------------------------------------------------------
def broadcast(ctx, node, data_inputs=None) -> None:
    """Numpy broadcasting: labels on the same output axis are unioned; weights become slots."""
    names = [n for n in (data_inputs if data_inputs is not None else node.input) if n]
    out = node.output[0]
    out_rank = ctx.rank(out)
    if _stacked_union(ctx, node, names, out_rank):
        return
    for n in names:  # any other stacked operand: its directions (blocks) move together from here on
        ctx.tie_directions(n)
    ranks = [ctx.rank(n) for n in names]
    labelled = [n for n in names if ctx.get(n)]
    for n, r in zip(names, ranks):  # a weight's axis along which it holds one value is read in no order
        if ctx.indexed(n):
            for ia in range(r or 0):
                if _is_uniform(ctx, n, ia):
                    ctx.mark_read(n, ia)
    if out_rank is not None and all(r is not None for r in ranks):
        uniform = {
            oa for oa in range(out_rank)
            if all(oa - (out_rank - r) < 0 or ctx.dim(n, oa - (out_rank - r)) == 1
                   or _is_uniform(ctx, n, oa - (out_rank - r)) for n, r in zip(names, ranks))
        }
        if uniform:
            ctx.uniform[out] = uniform
    if not labelled:
        _derive_elementwise(ctx, node, names, ranks, out_rank)
        return
    if out_rank is None or any(r is None for r in ranks):
        for n in labelled:
            ctx.pin_all(n, f"{node.op_type} with unknown ranks")
        return
    out_labels: dict[int, Label] = {}
    for n, r in zip(names, ranks):
        for axis, label in ctx.get(n).items():
            oa = axis + out_rank - r
            if oa in out_labels:
                ctx.union(out_labels[oa], label)
            else:
                out_labels[oa] = label
    for oa, label in out_labels.items():
        for n, r in zip(names, ranks):
            ia = oa - (out_rank - r)
            if ia < 0 or ia in ctx.get(n):
                continue
            dim = ctx.dim(n, ia)
            if dim == 1 or _is_uniform(ctx, n, ia):
                continue
            if ctx.indexed(n):  # a weight, or a weight scaled by a channel-free activation
                from .selection import weight_chunk_units

                units = weight_chunk_units(ctx, n, ia)  # a chunk of a weight cut into gates
                if units is not None and len(units) == len(label):
                    ctx.union(units, label)
                    ctx.mark_read(n, ia)
                else:
                    ctx.slot(n, ia, label)
            else:
                ctx.pin(label, f"{node.op_type} mixes channels with an unlabelled tensor {n!r}")
    # outputs beyond the first (rare) carry the same labels
    for o in node.output:
        ctx.set(o, out_labels)


def _stacked_union(ctx, node, names, out_rank) -> bool:
    """Operands that carry stacked labels on the same pairs of axes (two bidirectional layers' Y, two
    views of NCHWc blocks) and nothing else, the others one value each: unioned pair by pair, and the
    output keeps the stacked labels (each direction, each block, stays apart). False: not that case."""
    carriers = [n for n in names if ctx.stacked(n)]
    if not carriers or out_rank is None:
        return False
    keys = set(ctx.stacked(carriers[0]))
    for n in names:
        if ctx.get(n) or ctx.rank(n) is None:
            return False
        if n in carriers:
            if set(ctx.stacked(n)) != keys or ctx.rank(n) != out_rank or any(
                    len(ctx.stacked(n)[k]) != len(ctx.stacked(carriers[0])[k]) for k in keys):
                return False
        elif not all(ctx.dim(n, a) == 1 for a in range(ctx.rank(n))):
            return False
    first = ctx.stacked(carriers[0])
    for n in carriers[1:]:
        for k in keys:
            ctx.union(first[k], ctx.stacked(n)[k])
    for o in node.output:
        ctx.set(o, dict(first))
    return True


def _derive_elementwise(ctx, node, names, ranks, out_rank) -> None:
    """An unlabelled elementwise result of weights stays indexed by them. Its other operands are
    channel-free activations (a per-sample LayerNorm statistic, a runtime scale): along each axis
    either the weights vary and every activation holds one value (size 1 or uniform: the axis is
    indexed by the weights' axes), or only activations vary (the axis is indexed by no weight: `[]`,
    a slot there pins). Where both vary (attention scores masked by Where(mask, -inf, scores)) the
    result is an activation, never a weight to slot."""
    if out_rank is None or any(r is None for r in ranks) or not any(ctx.indexed(n) for n in names):
        return
    axis_sources, read = {}, []
    for oa in range(out_rank):
        sources, free = [], False
        for n, r in zip(names, ranks):
            ia = oa - (out_rank - r)
            if ia < 0 or ctx.dim(n, ia) == 1 or _is_uniform(ctx, n, ia):
                continue
            found = ctx.sources(n, ia) if ctx.indexed(n) else []
            if found is None:  # a weight axis that cannot be indexed: so is the result's
                sources = None
                break
            free = free or not found  # an activation (or a result of one) varies along this axis
            sources.extend(found)
            read.append((n, ia))
        if sources is None:
            continue
        if free and sources:  # a weight index times an activation along the same axis
            return
        if sources or free:
            axis_sources[oa] = sources
    if any(not s for s in axis_sources.values()) and not any(axis_sources.values()):
        return  # activations only, times weight scalars (a mask scaled by -10000): an activation
    for n, ia in read:
        if ctx.indexed(n):
            ctx.mark_read(n, ia)
    ctx.derive(node.output[0], axis_sources, names)


def variadic(ctx, node) -> None:
    broadcast(ctx, node)


def where(ctx, node) -> None:
    broadcast(ctx, node)


def prelu(ctx, node) -> None:
    broadcast(ctx, node)


def clip(ctx, node) -> None:
    # min/max are scalars; a per-channel bound would be a weight slot (handled by broadcast)
    broadcast(ctx, node, [node.input[0]] + [n for n in node.input[1:] if n])


# ---- declarations ---------------------------------------------------------------------------
_HOMOGENEOUS_UNARY = {"Relu", "LeakyRelu", "Identity", "Dropout"}
_TRIVIAL_UNARY = set(
    "Identity Cast CastLike Dropout Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus "
    "Softsign Gelu Mish Erf Exp Log Abs Neg Sqrt Swish Reciprocal".split())
_FOLDABLE_UNARY = {"Identity", "Cast", "CastLike", "Neg", "Sqrt", "Reciprocal", "Abs", "Sign", "Floor", "Round"}
UNARY = (
    "Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Gelu Mish Erf Exp Log "
    "Abs Neg Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh "
    "ThresholdedRelu Shrink IsNaN IsInf Not Identity Cast CastLike Dropout Swish BitwiseNot"
).split()
BINARY = "Add Sub Mul Div Pow Max Min Mean Sum Mod Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor BitShift".split()
_BOOL = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}

for _op in UNARY:
    declare(_op, passthrough, homogeneous=_op in _HOMOGENEOUS_UNARY, trivial=_op in _TRIVIAL_UNARY,
            foldable=_op in _FOLDABLE_UNARY, layout=_op in ("Identity", "Cast"),
            weight_view=_op in ("Identity", "Cast"), quantized_view=_op == "Identity",
            output_type="bool" if _op in _BOOL else None)
for _op in BINARY:
    declare(_op, broadcast, stacked=True, homogeneous=_op in ("Add", "Sub", "Mul", "Sum"),
            homogeneous_joint=_op in ("Add", "Sub", "Sum"), foldable=_op in ("Mul", "Add", "Sub", "Div", "Pow"),
            commutative=_op in ("Add", "Mul", "Sum", "Max", "Min", "Mean"), output_type="bool" if _op in _BOOL else None)
declare("Where", where)
declare("PRelu", prelu, homogeneous=True, trivial=True)
declare("Clip", clip, trivial=True, foldable=True)
