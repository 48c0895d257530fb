"""Layers paired across a width change: a structurally pruned suspect audited (issue 16).

align.py pairs layers of the same kind and weight shapes. A pruned copy (Torch-Pruning's way:
channels removed, the rows of their producer and the columns of every reader) has the same graph
with narrower weights, so nothing pairs there. Here the canonical layers are paired regardless of
width, the neurons by a rectangular assignment (match/partial.py), and the reference loses the
neurons left unmatched; the narrowed reference then has the suspect's shapes, align.py pairs it as
usual and the audit judges the suspect on the matched neurons, the unmatched share reported as
pruned.

Vocabulary:

- a layer's *width-free kind*: its kind (align.py: op type, a conv's group count, a recurrent
  layer's direction) with a depthwise conv's group count left out, and per weight its input slot,
  its rank and the dimensions a pruning keeps (a conv's kernel);
- a suspect layer *fits* a reference layer of its width-free kind when none of its weights'
  dimensions is larger;
- layers of one width-free kind are paired by one linear assignment on *structure* (as align.py,
  never by order or names: depth from the inputs and to the outputs in weighted layers, and the
  width-free kinds of the layers 1..align.HOPS hops up and down) plus *content*: |log| of the ratio of the
  two layers' weights' root mean square (a pruned copy keeps its weights' scale); an unfit pair is
  forbidden. Both models must have the same number of layers of each width-free kind (a pruned copy
  has: a depth change is another question).

`narrow(reference, suspect)` gives the narrowed reference (a CanonicalModel: the reference's
origins and names) and, per pruned group, what match/partial.py found: {"layer" (the reference's
own layer names), "group", "removed", "of", "kept" (the reference neurons that survive, in order)}.
ModelMismatchError when the suspect is not a pruned copy of the reference.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from scipy.optimize import linear_sum_assignment

from .align import Layer, neighbour_rings, weighted_layers
from .canonical import CanonicalModel, topological
from ..errors import ModelMismatchError
from ..io import WeightStore
from ..walk.graph import node_inputs

DEPTH_SCALE = 4.0  # a depth difference (in plus out) this large costs as much as any structure
_FORBIDDEN = 1e6


def narrow(reference: CanonicalModel, suspect: CanonicalModel) -> tuple[CanonicalModel, list[dict]]:
    """The reference without the neurons the pruned suspect lacks, and what was pruned (module
    docstring); ModelMismatchError when the suspect is not a pruned copy."""
    from ..match.partial import Unpaired
    from ..reduce.against import narrowed

    renamed = _renamed(reference.model, suspect.model)
    try:
        model, pruned = narrowed(renamed, reference.model, None,
                                 name_of=lambda n: reference.layer_of(n))
    except (Unpaired, ValueError) as exc:
        raise ModelMismatchError(f"cannot align the suspect as a pruned copy of the reference: {exc}") from None
    if not pruned:
        raise ModelMismatchError("cannot align the suspect: its layers pair regardless of width, but no group "
                                 "is narrower than the reference's")
    return CanonicalModel(model, reference.origins, reference.node_origins, reference.changes), pruned


def pair(reference: onnx.ModelProto, suspect: onnx.ModelProto, wider: bool = False) -> list[tuple[Layer, Layer]]:
    """(reference layer, suspect layer) for every weighted layer, regardless of width (module
    docstring; `wider`: the suspect's layers no narrower than the reference's, a padded copy);
    ModelMismatchError naming the first kind whose layers do not pair."""
    ref, sus = _Layers(reference), _Layers(suspect)
    classes: dict[tuple, tuple[list[int], list[int]]] = {}
    for i, key in enumerate(ref.keys):
        classes.setdefault(key, ([], []))[0].append(i)
    for j, key in enumerate(sus.keys):
        classes.setdefault(key, ([], []))[1].append(j)
    out = []
    for key, (rows, cols) in classes.items():
        if len(rows) != len(cols):
            raise ModelMismatchError(
                f"cannot align the suspect: {len(cols)} layers of kind {key[0]} in the suspect, {len(rows)} in the "
                "reference, whatever their widths (not a pruned copy)")
        cost = np.array([[_cost(ref, sus, i, j, wider) for j in cols] for i in rows])
        a, b = linear_sum_assignment(cost)
        if float(cost[a, b].max(initial=0.0)) >= _FORBIDDEN / 2:
            i = rows[a[int(np.argmax(cost[a, b]))]]
            raise ModelMismatchError(f"cannot align the reference's layer {ref.layers[i].node.name!r} with a "
                                     f"suspect layer of its kind no {'narrower' if wider else 'wider'} than it")
        out += [(ref.layers[rows[x]], sus.layers[cols[y]]) for x, y in zip(a, b)]
    return out


def wider(reference: CanonicalModel, suspect: CanonicalModel, model: onnx.ModelProto) -> dict[str, int]:
    """Per walker group of `model` (the suspect `suspect` is the canonical form of) wider than the
    reference group its layers pair with (pair(wider=True)): by how many neurons; what
    reduce.against asks before removing an adaptive attacker's noisy copies. Groups are related
    through their producer-side weights: the raw group's, their canonical forms (origins), the
    paired reference weights. ModelMismatchError when the layers do not pair."""
    from ..walk import walk

    renamed = {s: r for rl, sl in pair(reference.model, suspect.model, wider=True)
               for (_, r, _), (_, s, _) in zip(rl.weights, sl.weights)}

    def produced(groups) -> dict[str, object]:  # producer-side weight -> its group
        return {s.weight: g for g in groups for s, side in zip(g.slots, g.sides()) if side == 1}

    ref_of = produced(walk(reference.model).groups)
    canonical_of: dict[str, set[str]] = {}
    for name, origin in suspect.origins.items():
        for source in origin.sources:
            canonical_of.setdefault(source, set()).add(name)
    sus_of = produced(walk(suspect.model).groups)
    out = {}
    for g in walk(model).groups:
        own = {s.weight for s, side in zip(g.slots, g.sides()) if side == 1}
        canon = {sus_of[c].key: sus_of[c] for w in own for c in canonical_of.get(w, ()) if c in sus_of}
        refs = {ref_of[renamed[s.weight]].key: ref_of[renamed[s.weight]] for c in canon.values()
                for s, side in zip(c.slots, c.sides()) if side == 1 and renamed.get(s.weight) in ref_of}
        if len(canon) == 1 and len(refs) == 1:  # one group each side: the excess is unambiguous
            (c,), (r,) = canon.values(), refs.values()
            if c.size == g.size > r.size:
                out[g.key] = g.size - r.size
    return out


def _renamed(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> onnx.ModelProto:
    """The reference's graph carrying the suspect's weights in their own (narrower) shapes, under
    the reference's names; recorded intermediate shapes dropped (the walker infers them again)."""
    out = onnx.ModelProto()
    out.CopyFrom(reference)
    store, sus_store = WeightStore(out), WeightStore(suspect)
    for r, s in pair(reference, suspect):
        for (_, rw, _), (_, sw, _) in zip(r.weights, s.weights):
            shape = list(store.shape(rw))
            values = sus_store.get(sw).astype(np.float32, copy=False)
            if len(shape) != values.ndim:  # a broadcast operand stored with other leading 1s
                values = values.reshape([1] * (len(shape) - values.ndim) + list(values.shape)) \
                    if len(shape) > values.ndim else values.reshape(values.shape[values.ndim - len(shape):])
            store.set(rw, values)
    del out.graph.value_info[:]
    return out


class _Layers:
    """A model's weighted layers, their width-free kinds, depths and width-free neighbour rings."""

    def __init__(self, model: onnx.ModelProto):
        nodes = topological(list(model.graph.node))
        self.layers = weighted_layers(model)
        self.store = WeightStore(model)
        self.keys = [_width_free(layer) for layer in self.layers]
        at = {layer.index: i for i, layer in enumerate(self.layers)}
        n = len(self.layers)
        preds: list[frozenset[int]] = [frozenset()] * n
        frontier: dict[str, frozenset[int]] = {}
        for k, node in enumerate(nodes):
            union = frozenset().union(*[frontier[x] for x in node_inputs(node) if x in frontier])
            i = at.get(k)
            if i is not None:
                preds[i], union = union, frozenset((i,))
            for o in node.output:
                if o:
                    frontier[o] = union
        succs: list[set[int]] = [set() for _ in range(n)]
        for i, ps in enumerate(preds):
            for p in ps:
                succs[p].add(i)
        self.preds, self.succs = preds, [frozenset(s) for s in succs]
        self.depth_in, self.depth_out = np.ones(n), np.ones(n)
        for i in range(n):
            if preds[i]:
                self.depth_in[i] = 1 + max(self.depth_in[p] for p in preds[i])
        for i in reversed(range(n)):
            if self.succs[i]:
                self.depth_out[i] = 1 + max(self.depth_out[c] for c in self.succs[i])
        self.rings = [neighbour_rings(i, self.preds, self.succs, self.keys) for i in range(n)]
        self.rms = [[_rms(self.store, name) for _, name, _ in layer.weights] for layer in self.layers]


def _width_free(layer: Layer) -> tuple:
    kind = layer.kind
    if layer.node.op_type == "Conv" and "(group=" in kind and layer.shapes[0][1:2] == (1,):
        kind = "Conv(depthwise)"  # the group count is the width
    kept = layer.node.op_type in ("Conv", "ConvTranspose")
    return kind, tuple((slot, len(shape), shape[2:] if kept else ()) for slot, _, shape in layer.weights)


def _fits(r: Layer, s: Layer) -> bool:
    return all(a <= b for (_, _, ss), (_, _, rs) in zip(s.weights, r.weights) for a, b in zip(ss, rs))


def _cost(ref: _Layers, sus: _Layers, i: int, j: int, wider: bool = False) -> float:
    if not (_fits(sus.layers[j], ref.layers[i]) if wider else _fits(ref.layers[i], sus.layers[j])):
        return _FORBIDDEN
    depth = min(1.0, (abs(ref.depth_in[i] - sus.depth_in[j]) + abs(ref.depth_out[i] - sus.depth_out[j]))
                / DEPTH_SCALE)
    rings = float(np.mean([_multiset_distance(a, b) for a, b in zip(ref.rings[i], sus.rings[j])]))
    content = float(np.mean([abs(np.log(max(a, 1e-30) / max(b, 1e-30))) for a, b in zip(ref.rms[i], sus.rms[j])]))
    return depth + rings + min(1.0, content)


def _multiset_distance(a: Counter, b: Counter) -> float:
    union = sum((a | b).values())
    return 1.0 - sum((a & b).values()) / union if union else 0.0


def _rms(store: WeightStore, name: str) -> float:
    w = np.asarray(store.get(name), dtype=np.float64)
    return float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
