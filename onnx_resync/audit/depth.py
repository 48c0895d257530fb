"""Depth alignment with gaps: a suspect with layers its reference lacks (issue 16).

A layer inserted into a copy (Net2Net's deepening, then fine-tuning; an attacker's extra layer) that
the reduction cannot fold (reduce/layers.py folds only non-negative linear layers after a Relu)
leaves the suspect with more weighted layers than the reference, and align.py refuses it. Here the
two models' weighted layers (align.py's, canonical form) are put in sequence by depth (the longest
path from the inputs in weighted layers, then kind and shapes: never by name or node order) and
aligned as two sequences with gaps (Needleman-Wunsch):

- a *pair*: a suspect and a reference layer of the same kind and weight shapes; it costs their
  content distance, min(1, |log| of the ratio of their weights' root mean square) x PAIR_CONTENT;
- a *gap*: a suspect layer left unpaired, GAP each (every reference layer must be paired: a layer
  the suspect lacks is another question); more than MAX_INSERTED_SHARE of the reference's count is
  another architecture.

The suspect's gap layers are *inserted*. Each is *bypassed*: the chain that starts at it and goes on
through gap layers and single-reader ops with one activation input (its Relu) is taken out and its
readers read the chain's input; the chain's weights go. The bypassed suspect has the reference's
layers and is aligned as usual (align.py); the audit judges the rest and names the inserted layers.

A bypassed reader's input axis still holds the inserted layer's channel order, not the order of the
channels it now reads (a copy permuted after the insertion moved the two apart). It is put back in
that order through the reference (*realigned*): the reader's input channels and, separately, the
channels' other slots (their producer's rows, bias) are each paired with the paired reference
group's by a linear assignment on what depends neither on the other axes' order nor on a positive
rescale (the direction of: 1-D entries, QUANTILES of the rest); reader channel k then goes where the
producer's channel paired with the same reference neuron is. Resync then solves the group as one.
A chain whose output is a graph output, or a gap alignment that leaves a reference layer unpaired,
keeps the mismatch: the suspect is refused as before.
"""

from __future__ import annotations

import numpy as np
import onnx

from .canonical import CanonicalModel
from .widths import _Layers
from ..errors import ModelMismatchError
from ..walk.graph import node_inputs

GAP = 1.0
PAIR_CONTENT = 0.5  # a pair of one kind and shapes costs at most this: every pair is cheaper than a gap
MAX_INSERTED_SHARE = 0.5  # more inserted layers than this share of the reference's: another architecture


def without_inserted(reference: CanonicalModel, suspect: CanonicalModel, mismatch: ModelMismatchError):
    """(the suspect without its inserted layers, a ReduceReport listing them); `mismatch` is raised
    again (with why) where the sequences do not align with suspect gaps only."""
    from ..reduce.report import ReduceReport

    ref, sus = _Layers(reference.model), _Layers(suspect.model)
    found = _gaps(ref, sus)
    if found is None:
        raise ModelMismatchError(f"{mismatch} (the layer sequences do not align with layers inserted in the "
                                 "suspect only)") from None
    gaps, pairs = found
    if len(gaps) > MAX_INSERTED_SHARE * len(ref.layers):
        raise ModelMismatchError(f"{mismatch} ({len(gaps)} suspect layers would be inserted ones, more than "
                                 f"{MAX_INSERTED_SHARE:.0%} of the reference's {len(ref.layers)}: another "
                                 "architecture, not a deepened copy)") from None
    model = onnx.ModelProto()
    model.CopyFrom(suspect.model)
    inserted, taken, readers = [], set(), []
    for j in gaps:
        layer = sus.layers[j]
        if layer.node.name in taken:
            continue  # already in an earlier gap's chain
        bypassed = _bypass(model, layer.node.name, {sus.layers[g].node.name for g in gaps})
        chain = bypassed[0] if bypassed is not None else None
        if chain is None:
            raise ModelMismatchError(f"{mismatch} (the suspect's layer {suspect.layer_of(layer.node.name)!r} is not "
                                     "in the reference and cannot be left out)") from None
        taken.update(chain)
        inserted.append({"layer": suspect.layer_of(layer.node.name), "kind": layer.kind,
                         "weights": ["x".join(map(str, s)) for s in layer.shapes],
                         "chain": [suspect.layer_of(n) for n in chain]})
        readers += bypassed[1]
    _drop_unused(model)
    weight_map = {sw: rw for i, j in pairs
                  for (_, rw, _), (_, sw, _) in zip(ref.layers[i].weights, sus.layers[j].weights)}
    _realign(model, reference.model, readers, weight_map)
    report = ReduceReport(inserted=inserted)
    return CanonicalModel(model, suspect.origins, suspect.node_origins, suspect.changes), report


def _gaps(ref: _Layers, sus: _Layers) -> tuple[list[int], list[tuple[int, int]]] | None:
    """The suspect layers left unpaired by the cheapest alignment of the two sequences (module
    docstring), in sequence order, and the pairs (reference layer, suspect layer); None when no
    alignment pairs every reference layer."""
    r_order = sorted(range(len(ref.layers)), key=lambda i: _order(ref, i))
    s_order = sorted(range(len(sus.layers)), key=lambda j: _order(sus, j))
    n, m = len(r_order), len(s_order)
    if m <= n:
        return None
    pair = np.full((n, m), np.inf)
    for a, i in enumerate(r_order):
        for b, j in enumerate(s_order):
            if ref.layers[i].key == sus.layers[j].key:
                content = np.mean([abs(np.log(max(x, 1e-30) / max(y, 1e-30))) for x, y in zip(ref.rms[i], sus.rms[j])])
                pair[a, b] = PAIR_CONTENT * min(1.0, float(content))
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0] = GAP * np.arange(m + 1)
    for a in range(1, n + 1):  # cost[a, b] = min(cost[a, b-1] + GAP, cost[a-1, b-1] + pair[a-1, b-1])
        diagonal = np.full(m + 1, np.inf)
        diagonal[1:] = cost[a - 1, :-1] + pair[a - 1]
        shifted = diagonal - GAP * np.arange(m + 1)
        cost[a] = np.minimum.accumulate(shifted) + GAP * np.arange(m + 1)
    if not np.isfinite(cost[n, m]):
        return None
    gaps, pairs, a, b = [], [], n, m
    while b > 0:
        if a > 0 and np.isclose(cost[a, b], cost[a - 1, b - 1] + pair[a - 1, b - 1]):
            pairs.append((r_order[a - 1], s_order[b - 1]))
            a, b = a - 1, b - 1
        else:
            gaps.append(s_order[b - 1])
            b -= 1
    return None if a else (gaps[::-1], pairs)


def _order(layers: _Layers, i: int) -> tuple:
    layer = layers.layers[i]
    return (layers.depth_in[i], layer.kind, tuple(layer.shapes))


def _bypass(model: onnx.ModelProto, start: str, gap_nodes: set[str]) -> tuple[list[str], list] | None:
    """Take out the chain from node `start` (module docstring): its node names and the readers'
    (weight, input axis) that now read the chain's input; None where it cannot be taken out."""
    nodes = {n.name: n for n in model.graph.node}
    weights = {t.name for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in node_inputs(n):
            readers.setdefault(x, []).append(n)
    node = nodes.get(start)
    inputs = [x for x in node.input if x and x not in weights] if node is not None else []
    if len(inputs) != 1:
        return None
    source, chain = inputs[0], [node]
    outputs = {o.name for o in model.graph.output}
    while True:
        out = chain[-1].output[0]
        if out in outputs:
            return None
        after = readers.get(out, [])
        if len(after) != 1:
            break
        nxt = after[0]
        active = [x for x in node_inputs(nxt) if x and x not in weights]
        is_gap = nxt.name in gap_nodes
        if len(nxt.output) != 1 or active != [out] or (not is_gap and any(x in weights for x in nxt.input)):
            break
        if not is_gap and nxt.op_type not in _PASS_THROUGH:
            break
        chain.append(nxt)
    end = chain[-1].output[0]
    readers_out = []
    for n in model.graph.node:
        for k, x in enumerate(n.input):
            if x == end:
                n.input[k] = source
                axis = _input_axis(n, weights)
                if axis is not None:
                    readers_out.append(axis)
    names = [n.name for n in chain]
    kept = [n for n in model.graph.node if n.name not in set(names)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return names, readers_out


def _input_axis(node: onnx.NodeProto, weights: set[str]) -> tuple[str, int] | None:
    """(weight, axis) where a linear reader's weight meets its input's channels."""
    if len(node.input) < 2 or node.input[1] not in weights:
        return None
    if node.op_type == "Conv" and all(a.i == 1 for a in node.attribute if a.name == "group"):
        return node.input[1], 1
    if node.op_type == "MatMul":
        return node.input[1], 0
    return None


QUANTILES = np.linspace(0.05, 0.95, 9)


def _realign(model: onnx.ModelProto, reference: onnx.ModelProto, readers: list[tuple[str, int]],
             weight_map: dict[str, str]) -> None:
    """Each bypassed reader's input axis put in the order of the channels it reads (module
    docstring), in place; a reader whose group does not pair with the reference's is left as it is."""
    from scipy.optimize import linear_sum_assignment

    from ..io import WeightStore
    from ..walk import walk

    if not readers:
        return
    sus_groups, ref_groups = walk(model).groups, walk(reference).groups
    store, ref_store = WeightStore(model), WeightStore(reference)
    for weight, axis in readers:
        g = next((g for g in sus_groups if any((s.weight, s.axis) == (weight, axis) for s in g.slots)), None)
        rg = next((r for r in ref_groups if any((s.weight, s.axis) == (weight_map.get(weight), axis)
                                               for s in r.slots)), None) if g is not None else None
        if rg is None or rg.size != g.size:
            continue
        ref_slots = {(s.weight, s.axis): s for s in rg.slots}
        own = [(s, ref_slots.get((weight_map.get(s.weight), s.axis))) for s in g.slots
               if (s.weight, s.axis) != (weight, axis)]
        own = [(s, r) for s, r in own if r is not None]
        mine = [(s, ref_slots[(weight_map[weight], axis)]) for s in g.slots if (s.weight, s.axis) == (weight, axis)]
        if not own or not mine:
            continue
        at_ref = []
        for slots in (own, mine):  # (directions: a positive rescale of the channels does not move them)
            fs = _unit(np.concatenate([_features(store, s, g.size) for s, _ in slots], axis=1))
            fr = _unit(np.concatenate([_features(ref_store, r, g.size) for _, r in slots], axis=1))
            rows, cols = linear_sum_assignment(np.linalg.norm(fr[:, None] - fs[None], axis=2))
            at = np.empty(g.size, dtype=np.int64)
            at[rows] = cols
            at_ref.append(at)  # at[r] = the suspect neuron paired with reference neuron r
        producer, reader = at_ref
        slot = mine[0][0]
        array = store.get(weight)
        moved = np.moveaxis(array, axis, 0).copy()
        target = moved.copy()
        target[slot.positions[producer].reshape(-1)] = moved[slot.positions[reader].reshape(-1)]
        store.set(weight, np.moveaxis(target, 0, axis))


def _features(store, slot, size: int) -> np.ndarray:
    """Per neuron: its 1-D entries, or QUANTILES of its entries with every other index of the
    weight's first other axis normalized first (a rescale along that axis, another group's, then
    moves no quantile much)."""
    array = np.asarray(store.get(slot.weight), dtype=np.float64)
    if array.ndim > 1:
        other = 1 if slot.axis == 0 else 0
        norms = np.sqrt(np.square(np.moveaxis(array, other, 0)).reshape(array.shape[other], -1).mean(axis=1))
        shape = [1] * array.ndim
        shape[other] = -1
        array = array / np.maximum(norms, 1e-30).reshape(shape)
    rows = np.moveaxis(np.take(array, slot.positions.reshape(-1), axis=slot.axis), slot.axis, 0).reshape(size, -1)
    return rows if array.ndim == 1 else np.quantile(rows, QUANTILES, axis=1).T


# ops an inserted layer's chain may carry on through (its activation)
_PASS_THROUGH = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "HardSigmoid", "HardSwish",
                 "Softplus", "Clip", "Identity", "Dropout", "Mish", "Erf"}


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {x for n in model.graph.node for x in node_inputs(n)} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.value_info[:]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
