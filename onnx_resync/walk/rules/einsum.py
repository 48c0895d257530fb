"""Einsum: each subscript letter is one axis that every operand naming it shares.

A *letter* names one axis in each operand (and the output) where it appears. Along a letter, the
operands' values meet position by position (a product, summed when the letter is not in the output),
so the rule is broadcasting's, letter by letter: the labels on a letter are unioned, a weight that
has the letter unlabelled becomes a slot, an activation that has it unlabelled pins (unless it holds
one value along it). A letter that only weights have and the output keeps makes fresh channels, as a
MatMul's columns do (Keras' EinsumDense `abc,cde->abde`: heads and head dims are each their own axis,
so each is its own group; attention `aecd,abcd->acbe` unions Q's and K's heads and dims). A letter
summed away takes its label with it (a sum is order-invariant). An ellipsis stands for the leading
axes, right-aligned across operands; a letter repeated in one operand (a diagonal) pins.
"""

from __future__ import annotations

import string
from collections import Counter

from .base import _is_uniform, attr
from ..registry import declare

UNFOLLOWED = "Einsum with an equation the walker cannot follow"


def subscripts(equation: str, ranks: list[int | None]) -> tuple[list[list[str]], list[str]] | None:
    """The letters of each operand's axes and of the output's (ellipsis axes get spare letters), or
    None when the equation does not fit the ranks or repeats a letter inside one operand."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks) or any(r is None for r in ranks) or any(t.count("...") > 1 for t in terms + [rhs]):
        return None
    spare = [c for c in string.ascii_letters if c not in eq]
    widths = [r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t]
    if any(w < 0 for w in widths):
        return None
    ellipsis = spare[:max(widths, default=0)]
    subs = []
    for term, rank in zip(terms, ranks):
        head, dots, tail = term.partition("...")
        letters = list(head) + (ellipsis[len(ellipsis) - (rank - len(head) - len(tail)):] if dots else []) + list(tail)
        if len(letters) != rank or not all(c in string.ascii_letters for c in letters) or len(set(letters)) != rank:
            return None
        subs.append(letters)
    if arrow:
        head, dots, tail = rhs.partition("...")
        out = list(head) + (ellipsis if dots else []) + list(tail)
    else:  # implicit: the ellipsis axes, then the letters named once, sorted
        counts = Counter(c for s in subs for c in s if c not in ellipsis)
        out = ellipsis + sorted(c for c, k in counts.items() if k == 1)
    named = {c for s in subs for c in s}
    if len(set(out)) != len(out) or not all(c in named for c in out):
        return None
    return subs, out


def einsum(ctx, node) -> None:
    names = list(node.input)
    equation = attr(node, "equation")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    parsed = subscripts(equation, [ctx.rank(n) for n in names])
    if parsed is None or any(not n for n in names):
        for n in names:
            ctx.pin_all(n, UNFOLLOWED)
        return
    subs, outs = parsed
    has_data = any(not ctx.is_weightlike(n) for n in names)
    out_labels = {}
    for letter in dict.fromkeys(c for s in subs for c in s):
        places = [(n, a) for n, s in zip(names, subs) for a, c in enumerate(s) if c == letter]
        found = [(n, a, ctx.get(n).get(a)) for n, a in places]
        present = [l for _, _, l in found if l is not None]
        if present:
            label = present[0]
            if any(len(l) != len(label) for l in present):
                for l in present:
                    ctx.pin(l, "Einsum meets channel axes of different lengths")
                continue
            for other in present[1:]:
                ctx.union(label, other)
        else:
            varying = [(n, a) for n, a in places if ctx.dim(n, a) != 1]
            dim = ctx.dim(*varying[0]) if varying else None
            # an axis only weights have, kept in the output: fresh channels (a MatMul's columns)
            if not (letter in outs and has_data and varying and isinstance(dim, int) and dim > 1
                    and all(ctx.is_weightlike(n) for n, _ in varying)):
                continue
            label = ctx.new(dim, node, node.output[0])
        for n, a, l in found:
            if l is not None or ctx.dim(n, a) == 1 or _is_uniform(ctx, n, a):
                continue
            if ctx.indexed(n):  # a weight (or a weight scaled by a channel-free activation)
                ctx.slot(n, a, label)
            else:
                ctx.pin(label, f"Einsum mixes channels with an unlabelled tensor {n!r}")
        if letter in outs:
            out_labels[outs.index(letter)] = label
    ctx.set(node.output[0], out_labels)


# ---- declarations ---------------------------------------------------------------------------
# (not homogeneous nor a linear producer for rescale: a product of two activations scales by a^2)
declare("Einsum", einsum, attributes={"equation": None})
