"""Weights inside If/Loop/Scan bodies that alignment did not pair: compared by value, up to
permutation, where they can be paired.

Layers inside bodies are aligned like the main graph's (bodies.py: constants folded there, one
flat view of every layer), and their weights counted as compared (report._compared). What is left
(a body weight that no aligned layer reads, a layer of a branch the other file writes another
way) still counts in the reference's parameters; this module compares what it can of it
(`compare_subgraphs(reference, suspect, aligned)`: the alignment's weight map is left out), so
that a model whose weights all sit in branches is judged rather than taken on trust. `unpaired`
also names the main graph's weights that alignment left unfilled (read only by a body layer left
unpaired): groups that touch them compare the reference with itself.

- A *subgraph weight* is a float initializer of a body, or a float Constant node's value there, at
  any depth; its *scope* is the path of (op type, attribute) from the main graph down to its body
  (("If", "then_branch"), ...), the same whatever the nodes are called or in which order they come.
- *Pairing*: the reference's and the suspect's weights of one scope and one shape (leading 1s
  ignored) are paired as one linear assignment on their distance (below); a weight left without a
  partner is not compared.
- *Distance*: the neurons inside a branch may have been permuted, so a matrix (a tensor viewed as
  (first axis, rest)) is compared after its rows, then its columns, are matched to the reference's
  by their sorted values (linear assignment on the distances of the sorted rows and columns), up to
  MATCH_MAX on an axis (beyond it, the axis is compared as it is); a vector by its sorted values.
  The distance is the largest difference in units of the suspect's storage bound (STORAGE_BOUND:
  float32 and float64 rounding, float16 and bfloat16 half a step, relative, with an absolute floor
  for the converters' clamping of tiny values). A float16 value at a converter's clamp
  (storage.FP16_CLAMPED_HIGH / _LOW, same sign) where the reference's lies beyond it is what the
  clamp explains, as for the main graph's weights (oww's silero VAD: a scalar 2^20 in its branches
  stored as 65504 by both converters).
- *Equal*: every element within the bound after that matching (distance <= 1), *moved* when the
  matching is not the identity. An unrelated (redrawn) weight is nowhere near: its elements differ
  by about their own size, millions of bounds.
- *Close*: not equal, but a matrix of at least CLOSE_MIN_SIDE on both sides whose matched difference
  is at most CLOSE_RELATIVE of its norm (a perturbed copy). Matched unrelated matrices differ by
  about sqrt(2) of their norm (independent entries stay independent whatever the matching); a
  vector is never close (sorting alone makes unrelated vectors look alike).

`carry` puts the suspect's paired weights into the aligned model, so that resync matches the neurons
of the branches it walks; groups of the walk that touch only unpaired weights compare the reference
with itself and are left out of the report (report._without_groups).

`looks_derived` (for a model whose main graph compares nothing): at least MIN_EQUAL_SHARE of the
compared subgraph parameters are equal or close. Any weight that is not equal makes the verdict
"perturbed" where derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from .storage import FP16_CLAMP_MIN, FP16_CLAMPED_HIGH, FP16_CLAMPED_LOW

MATCH_MAX = 2048  # rows or columns matched by assignment at most; beyond, that axis is compared as stored
# per-element bound: relative (half a step of the format) and absolute floor (converters clamp tiny values)
STORAGE_BOUND = {
    onnx.TensorProto.FLOAT: (1e-6, 1e-30),
    onnx.TensorProto.DOUBLE: (1e-12, 1e-300),
    onnx.TensorProto.FLOAT16: (2.0 ** -11, 1e-7),
    onnx.TensorProto.BFLOAT16: (2.0 ** -8, 1e-30),
}
MIN_EQUAL_SHARE = 0.5  # of the compared subgraph parameters (equal or close), for looks_derived
CLOSE_RELATIVE = 0.5  # ||matched difference|| / ||reference|| of a close matrix; unrelated: about 1.4
CLOSE_MIN_SIDE = 4
NAMES_MAX = 4


@dataclass
class SubgraphWeight:
    scope: tuple
    name: str
    dtype: int
    values: np.ndarray  # float64

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.values.shape)
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
        return shape


@dataclass
class SubgraphComparison:
    weights: int = 0  # the reference's subgraph weights
    compared: int = 0  # of them, paired with a suspect weight and compared
    parameters: int = 0  # elements of the compared ones
    equal_parameters: int = 0
    close_parameters: int = 0  # not equal, but close matrices (a perturbed copy)
    moved: bool = False  # some equal weight needed its rows or columns matched
    differing: list[str] = field(default_factory=list)  # reference names of compared weights that differ
    worst: float = 0.0  # the largest distance (in storage bounds) among the compared weights
    pairs: dict = field(default_factory=dict, repr=False)  # reference name -> the suspect's values (as stored)
    unpaired: set = field(default_factory=set, repr=False)  # reference names left without a partner

    @property
    def within(self) -> bool:
        return not self.differing

    @property
    def looks_derived(self) -> bool:
        related = self.equal_parameters + self.close_parameters
        return self.parameters > 0 and related >= MIN_EQUAL_SHARE * self.parameters

    def to_dict(self) -> dict:
        return {"weights": self.weights, "compared": self.compared, "parameters": self.parameters,
                "equal_parameters": self.equal_parameters, "close_parameters": self.close_parameters,
                "moved": self.moved,
                "differing": self.differing[:NAMES_MAX], "worst_bounds": self.worst}

    def phrase(self) -> str:
        if not self.weights:
            return ""
        text = (f"weights inside If/Loop/Scan bodies compared by value up to permutation: {self.compared} of "
                f"{self.weights} paired")
        if self.compared:
            text += (f", {self.equal_parameters:,} of {self.parameters:,} parameters equal within the suspect's "
                     "storage")
            if self.close_parameters:
                text += f", {self.close_parameters:,} close (perturbed)"
            if self.differing:
                text += (f"; differing: {', '.join(self.differing[:NAMES_MAX])}"
                         + (" ..." if len(self.differing) > NAMES_MAX else "")
                         + f" (up to {self.worst:.3g} x the storage bound)")
        return text


def subgraph_weights(model: onnx.ModelProto) -> list[SubgraphWeight]:
    """Every float weight inside a body of the model's graph (module docstring), in file order."""
    out: list[SubgraphWeight] = []
    stack = [(g, (node.op_type, a.name)) for node in model.graph.node for a in node.attribute
             for g in _graphs(a)]
    while stack:
        graph, scope = stack.pop(0)
        tensors = [(t.name, t) for t in graph.initializer]
        for node in graph.node:
            for a in node.attribute:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output \
                        and a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    tensors.append((node.output[0], a.t))  # named by its output, as WeightStore does
                for g in _graphs(a):
                    stack.append((g, scope + (node.op_type, a.name)))
        for name, t in tensors:
            if t.data_type in STORAGE_BOUND:
                values = numpy_helper.to_array(t).astype(np.float64)
                out.append(SubgraphWeight(scope, name, t.data_type, values))
    return out


def body_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, bytes]]:
    """Float weights inside bodies (subgraph_weights, any size): name -> (elements, digest of the
    values). A weight stored twice (a copy in each branch of an If, or folded into each, bodies.py)
    has one digest: the share compared counts it once (report._compared)."""
    import hashlib

    out: dict[str, tuple[int, bytes]] = {}
    stack = [g for node in model.graph.node for a in node.attribute for g in _graphs(a)]
    while stack:
        graph = stack.pop()
        tensors = [(t.name, t) for t in graph.initializer]
        for node in graph.node:
            for a in node.attribute:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output \
                        and a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    tensors.append((node.output[0], a.t))
                stack.extend(_graphs(a))
        for name, t in tensors:
            if t.data_type in STORAGE_BOUND:
                values = np.ascontiguousarray(numpy_helper.to_array(t), dtype=np.float32)
                digest = hashlib.blake2b(values.tobytes() + repr(values.shape).encode(), digest_size=16).digest()
                out[name] = (int(values.size), digest)
    return out


def _graphs(a: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if a.type == onnx.AttributeProto.GRAPH:
        return [a.g]
    if a.type == onnx.AttributeProto.GRAPHS:
        return list(a.graphs)
    return []


def compare_subgraphs(reference: onnx.ModelProto, suspect: onnx.ModelProto,
                      aligned: dict[str, str] | None = None) -> SubgraphComparison:
    """Pair and compare the two models' subgraph weights (module docstring) that the alignment
    (`aligned`: reference weight -> suspect weight, align.Alignment.weight_map) has not paired."""
    aligned = aligned or {}
    taken = set(aligned.values())
    ref = [w for w in subgraph_weights(reference) if w.name not in aligned]
    sus = [w for w in subgraph_weights(suspect) if w.name not in taken]
    result = SubgraphComparison(weights=len(ref))
    # the main graph's weights that alignment left unfilled (read only by a body layer left
    # unpaired): the aligned model holds the reference's own values there, as for unpaired ones
    main = [(t.name, t) for t in reference.graph.initializer] + [
        (n.output[0], a.t) for n in reference.graph.node if n.op_type == "Constant" and n.output
        for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
    result.unpaired.update(name for name, t in main if name not in aligned and t.data_type in STORAGE_BOUND
                           and int(np.prod(t.dims)) >= 2)
    buckets: dict[tuple, tuple[list, list]] = {}
    for w in ref:
        buckets.setdefault((w.scope, w.shape), ([], []))[0].append(w)
    for w in sus:
        if (w.scope, w.shape) in buckets:
            buckets[(w.scope, w.shape)][1].append(w)
    for rs, ss in buckets.values():
        result.unpaired.update(r.name for r in rs)
        if not ss:
            continue
        found = [[_distance(r, s) for s in ss] for r in rs]
        cost = np.array([[min(d, 1e12) + relative for d, _, relative in row] for row in found])
        for i, j in zip(*linear_sum_assignment(cost)):
            r = rs[i]
            d, moved, relative = found[i][j]
            result.unpaired.discard(r.name)
            result.pairs[r.name] = ss[j].values.reshape(r.values.shape)
            result.compared += 1
            result.parameters += int(r.values.size)
            result.worst = max(result.worst, float(min(d, 1e12)))
            if d <= 1.0:
                result.equal_parameters += int(r.values.size)
                result.moved |= moved
                continue
            result.differing.append(r.name)
            if len(r.shape) >= 2 and min(r.shape[0], r.values.size // r.shape[0]) >= CLOSE_MIN_SIDE \
                    and relative <= CLOSE_RELATIVE:
                result.close_parameters += int(r.values.size)
    return result


def carry(model: onnx.ModelProto, comparison: SubgraphComparison) -> None:
    """Put the suspect's paired subgraph weights (as stored) in `model` (the reference's canonical
    graph that align fills with the suspect's weights), so that resync compares the suspect's
    branches, not the reference's with themselves."""
    from ..io import WeightStore

    store = WeightStore(model)
    for name, values in comparison.pairs.items():
        # a scalar is never a neuron's slot (and WeightStore.set would write a 0-d value as [1])
        if values.size >= 2 and name in store and tuple(store.shape(name)) == values.shape:
            store.set(name, values.astype(np.float32))


def _distance(r: SubgraphWeight, s: SubgraphWeight) -> tuple[float, bool, float]:
    """(largest difference in storage bounds, whether rows or columns were matched, ||difference|| /
    ||reference||), comparing as stored first and, when that is not within the bound, after
    matching (module docstring)."""
    a = r.values.reshape(r.shape)
    b = s.values.reshape(r.shape)
    rel, floor = STORAGE_BOUND[s.dtype]

    norm = float(np.linalg.norm(a)) or 1.0

    def bounds(x: np.ndarray) -> tuple[float, float]:
        if not x.size:
            return 0.0, 0.0
        diff = np.abs(x - a)
        if s.dtype == onnx.TensorProto.FLOAT16:
            diff = np.where(_clamped(a, x), 0.0, diff)
        return float(np.max(diff / (rel * np.abs(a) + floor))), float(np.linalg.norm(diff)) / norm

    direct = bounds(b)
    if direct[0] <= 1.0 or a.size < 2:
        return direct[0], False, direct[1]
    if a.ndim == 1:
        order_a = np.argsort(a, kind="stable")
        matched = np.empty_like(b)
        matched[order_a] = np.sort(b, kind="stable")
    else:
        m_a, m_b = a.reshape(a.shape[0], -1), b.reshape(a.shape[0], -1)
        # rows (or columns) alone moved: matched by their values in place; both: by their sorted
        # values first (a DFT basis's rows all have one sorted profile: only the former tells them apart)
        tries = []
        if m_a.shape[0] <= MATCH_MAX:
            tries.append(m_b[_match(m_a, m_b, in_place=True)])
        if m_a.shape[1] <= MATCH_MAX:
            tries.append(m_b[:, _match(m_a.T, m_b.T, in_place=True)])
        if m_a.shape[0] <= MATCH_MAX:
            m_b = m_b[_match(m_a, m_b)]
        if m_a.shape[1] <= MATCH_MAX:
            m_b = m_b[:, _match(m_a.T, m_b.T)]
        tries.append(m_b)
        matched = min(tries, key=lambda t: bounds(t.reshape(a.shape))).reshape(a.shape)
    d, relative = bounds(matched)
    if (d, relative) >= direct:  # the matching did not help (a perturbed copy in place)
        return direct[0], False, direct[1]
    return d, True, relative


def _clamped(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Where float16 value x is a converter's clamp of reference value a (same sign, a beyond it)."""
    ax, aa = np.abs(x.astype(np.float64)), np.abs(a.astype(np.float64))
    same = np.sign(a) * np.sign(x) >= 0
    high = np.isin(ax, FP16_CLAMPED_HIGH) & (aa >= ax)
    low = np.isin(ax, FP16_CLAMPED_LOW) & (aa <= FP16_CLAMP_MIN)
    return same & (high | low)


def _match(a: np.ndarray, b: np.ndarray, in_place: bool = False) -> np.ndarray:
    """idx such that b[idx] lines up with a, row by row, by the rows' sorted values (by their
    values as they stand if `in_place`)."""
    if in_place:
        _, cols = linear_sum_assignment(cdist(a, b))
    else:
        _, cols = linear_sum_assignment(cdist(np.sort(a, axis=1), np.sort(b, axis=1)))
    return cols
