"""Align a suspect's canonical layers with the reference's, by structure and content (never by node
order or names).

Both models are first put in canonical form (canonical.py). A *weighted layer* is a node that reads
a float weight of two or more elements: producers (Conv, ConvTranspose, MatMul with a weight, GRU,
LSTM, RNN, embedding Gather) and the nodes that carry parameters next to them (bias Add, LayerNorm,
PRelu, a BatchNorm that had no conv to fold into, ...). Two layers are *compatible* when they have
the same kind (op type, a conv's group count, a recurrent layer's direction) and weights of the
same shapes in the same input slots (leading 1s ignored for broadcast operands). Within each class
of compatible layers the suspect's layers are paired with the reference's as one linear assignment
(scipy's linear_sum_assignment) on

    cost(r, s) = STRUCT_WEIGHT * structure(r, s) + CONTENT_WEIGHT * content(r, s)

*structure* (0: the same place in the graph, 1: nothing in common) is the mean of three terms, none
of which depends on node order or names:

- depth: the longest path from the graph's inputs to the layer and from the layer to its outputs,
  counted in weighted layers: min(1, (|d_in(r) - d_in(s)| + |d_out(r) - d_out(s)|) / DEPTH_SCALE);
- neighbours: the weighted layers it reads from and feeds at 1..HOPS hops (the nearest ones, through
  any unweighted ops), as multisets of (kind, weight shapes): 1 - multiset Jaccard, averaged over
  the 2 x HOPS rings;
- role: the first ops with a structural meaning found downstream (a MatMul of two activations and
  which input it feeds, Softmax, a residual Add, Concat, a graph output, ...), seen through views,
  activations and constant arithmetic (_Roles): 1 - Jaccard of the two sets.

*content* (0: an exact copy, about 1: unrelated weights of that class) compares signatures that
permutations of the layer's neurons on both axes cannot change and that noise and quantization
barely move. Every weight is viewed as a matrix (out, in x rest) (a recurrent weight as
(directions x gates x hidden, in), a ConvTranspose weight as (in, out x rest)) and gives its sorted
row norms, its sorted column norms and, for a matrix of at most SVD_MAX_ENTRIES entries with a
shorter side of at most SVD_MAX_SIDE, its TOP_SINGULAR largest singular values (computed only in a
class whose structure leaves some layer with two candidates within STRUCT_TIE); a vector gives its
sorted values. Each profile is compared as a *shape* (over its own root mean square) and each
weight adds one *scale* term (the log of its profile's root mean square): storage scales every
norm of a weight alike (int4 rounding adds energy: +0.3% on a 1024 x 1024 projection, more than
same-distribution twins such as q, k and v differ by), and a shape cancels that, so a twin whose
norms happen to be larger no longer looks more like the suspect's copy than the layer itself. A
term's distance is ||a - b|| (|log a - log b| for scale) over the median distance between the
class's reference layers (what unrelated weights of that class differ by; at least FLOOR_REL x a
unit-RMS profile's norm for a shape, SCALE_FLOOR for a scale), clipped at CONTENT_CLIP; content is
the mean over terms. Where the twins' content differs by less than storage moves it, every
candidate costs alike and structure decides (q, k and v reach the attention MatMuls in different
input slots: the role term). A weight past
SAMPLE_ENTRIES entries gives its norms read a block of rows at a time (exact, never held whole); one
that has no such matrix view is read as an evenly spread sub-grid (match/sampling.py; a mapped
tensor is read only there): its signature is then approximate. Same-shape twins that read the same tensor (a
detector's box and class branches) are thus told apart by content. Content is computed only in
classes of two or more layers (a single pair is forced).

*Consistency*, before neurons are matched: the weighted layers feeding each reference layer must be
paired with those feeding its partner. Where some are not, the assignment is solved again with
NEIGHBOUR_WEIGHT x (the share of neighbours, feeding and fed, that disagree under the current
pairing) added to the cost, at most REFINE_ROUNDS times, and the pairing with the fewest
inconsistencies is kept; those left are reported.

*Confidence*: a pair is *contested* when its class has two or more layers that are not exact twins
(same structure and content signatures on both sides). A contested pair is *clear* when every
assignment that does not pair it costs at least MIN_MARGIN more (exactly, for classes of up to
EXACT_RUNNER_UP_MAX layers; beyond, the cheapest exchange of two partners) and its content cost is
at most MAX_CONTENT or below that margin (weights far from their partner's, but farther still from
every other candidate: a strong perturbation, not an ambiguous pairing). `Alignment.confidence` is the share of contested or inconsistent pairs that are
clear and consistent (1.0 when nothing was contested); `Alignment.notes` says which are not.

*Alternatives*: a doubtful pair (not clear, above) is a guess that neuron evidence can settle.
`alternatives()` gives, for each doubtful pair (the smallest margin first), its class's runner-up
assignment: solved again with that pair forbidden, the rest of the alignment unchanged; distinct
ones only (both pairs of a swap give the same), at most MAX_ALTERNATIVES. The audit (report.py) resyncs
them only when the alignment it was given leaves the suspect not derived, adopts the first derived
one with a higher decision statistic and tries its runner-ups in turn, MAX_ALTERNATIVES resyncs in
all (none derived: the first alignment stands).

*Bodies*: layers inside If/Loop/Scan bodies are layers like the others (bodies.flattened: the
bodies' nodes inline, linked to the control node's inputs and outputs; their weights are the
bodies' Constant nodes and initializers as well as outer-scope ones). A layer inside a body may
stay unpaired (a branch the other file does not have, or writes with other ops): it is left out,
its weights count as not compared (report._compared); a main-graph layer never is.

The result is the reference's canonical graph carrying the suspect's weights (same names and
shapes as the reference), which walk, match and resync take as they are. A reference layer without
a counterpart, or a suspect layer left over, is a ModelMismatchError naming it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
import math

import numpy as np
import onnx
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from .bodies import LINK_DOMAIN, flattened
from .canonical import CanonicalModel, topological
from ..errors import ModelMismatchError, UnsupportedError
from ..io import WeightStore
from ..match.sampling import sub_grid
from ..walk import registry
from ..walk.graph import node_inputs

COMMUTATIVE = registry.having("commutative")
# ops that do not change what a tensor *is* (for roles): views, pointwise activations, pooling
TRIVIAL = registry.having("trivial")
ROLE_DEPTH = 3
ROLE_FANOUT = 16  # a role keeps its first entries in sorted order (never in visiting order)
ROLE_VISIT_MAX = 4096  # tensors one role looks at through trivial ops

STRUCT_WEIGHT = 1.0
CONTENT_WEIGHT = 1.0
NEIGHBOUR_WEIGHT = 1.0  # consistency rounds: share of disagreeing neighbours
HOPS = 2  # neighbour rings each way
DEPTH_SCALE = 4.0  # a depth difference (in plus out) this large costs as much as any structure
SAMPLE_ENTRIES = 1 << 20  # past this, a weight's signature reads an evenly spread sub-grid
SVD_MAX_ENTRIES = 1 << 20  # singular values for a matrix view of at most this many entries
SVD_MAX_SIDE = 256  # ... and a shorter side of at most this (a 256 x 4096 gram costs a few ms)
TOP_SINGULAR = 32
STRUCT_TIE = 0.05  # a structural cost this close to a row's best leaves a tie for content to break
FLOOR_REL = 1e-3  # a shape term's distance scale at least this x a unit-RMS profile's norm
SCALE_FLOOR = 0.05  # a scale term's distance scale at least this |log ratio| (storage moves norms less)
CONTENT_CLIP = 2.0
MIN_MARGIN = 0.1  # the runner-up assignment must cost at least this much more
MAX_CONTENT = 0.5  # a contested pair whose content costs more is doubtful
EXACT_RUNNER_UP_MAX = 64  # classes up to this size: runner-up by re-solving without each pair
REFINE_ROUNDS = 2
REFINE_MAX = 256  # classes larger than this keep their first assignment
NOTES_MAX = 6
MAX_ALTERNATIVES = 4  # runner-up alignments resynced in all by one audit (report._by_neuron_evidence)
_FORBIDDEN = 1e6


@dataclass
class Layer:
    node: onnx.NodeProto
    index: int  # position in topological order
    kind: str
    weights: list[tuple[int, str, tuple[int, ...]]]  # (input slot, weight name, normalized shape)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s for _, _, s in self.weights]

    @property
    def key(self) -> tuple:
        """Layers with equal keys are compatible (_compatible)."""
        return (self.kind, tuple((k, sh) for k, _, sh in self.weights))


@dataclass
class LayerPair:
    reference: str  # canonical reference node
    suspect: str  # canonical suspect node
    kind: str
    weights: list[tuple[str, str]]  # (reference canonical weight, suspect canonical weight)
    cost: float = 0.0  # the assignment's cost of this pair (0 where the class had one layer)
    content: float | None = None  # content cost; None where the pair was forced
    margin: float | None = None  # runner-up cost minus best; None where not contested


@dataclass
class Alignment:
    model: onnx.ModelProto  # the reference's canonical graph with the suspect's weights
    pairs: list[LayerPair]
    weight_map: dict[str, str]  # reference canonical weight -> suspect canonical weight
    node_map: dict[str, str]  # reference canonical node -> suspect canonical node
    kept: list[str] = field(default_factory=list)  # reference constants kept (structure, not weights)
    confidence: float = 1.0  # share of contested or inconsistent pairs that are clear (module docstring)
    notes: list[str] = field(default_factory=list)  # why the confidence is below 1, inconsistencies
    contested: int = 0
    inconsistent: int = 0
    doubtful: list[int] = field(default_factory=list, repr=False)  # reference layers paired doubtfully
    solver: tuple | None = field(default=None, repr=False, compare=False)  # what alternatives() re-solves

    def doubtful_pairs(self) -> list[LayerPair]:
        """The pairs made with low confidence (module docstring, *Confidence*)."""
        if self.solver is None or not self.doubtful:
            return []
        ref = self.solver[2]
        names = {ref.layers[i].node.name for i in self.doubtful}
        return [p for p in self.pairs if p.reference in names]

    def to_dict(self) -> dict:
        return {"layers": len(self.pairs), "weights": len(self.weight_map), "kept_constants": len(self.kept),
                "confidence": round(float(self.confidence), 4), "contested": self.contested,
                "inconsistent": self.inconsistent, "notes": list(self.notes)}


def align(reference: CanonicalModel, suspect: CanonicalModel) -> Alignment:
    """Pair the layers and rebuild the suspect's weights into the reference's canonical structure."""
    ref, sus = _Graph(reference.model, "reference"), _Graph(suspect.model, "suspect")
    classes: dict[tuple, tuple[list[int], list[int]]] = {}
    for i, layer in enumerate(ref.layers):
        classes.setdefault(layer.key, ([], []))[0].append(i)
    for j, layer in enumerate(sus.layers):
        if layer.key in classes:
            classes[layer.key][1].append(j)
    solved = {key: _Class(ref, sus, rows, cols) for key, (rows, cols) in classes.items() if rows and cols}
    mapping = {}
    for c in solved.values():
        mapping.update(c.solve())
    _raise_unmatched(reference, suspect, ref, sus, mapping)
    mapping = _make_consistent(ref, sus, solved, mapping)
    return _assemble(reference, suspect, ref, sus, solved, mapping)


def alternatives(alignment: Alignment, limit: int = MAX_ALTERNATIVES) -> list[tuple[str, Alignment]]:
    """Runner-up alignments for the doubtful pairs (module docstring, *Alternatives*): at most
    `limit` distinct ones, the doubtful pair with the smallest margin first; each with a phrase
    naming the pairs it changes."""
    solver = alignment.solver
    if solver is None or not alignment.doubtful:
        return []
    reference, suspect, ref, sus, classes, mapping = solver
    order = sorted(alignment.doubtful, key=lambda i: (classes[ref.layers[i].key].margin.get(i, float("inf")), i))
    out, seen = [], set()
    for i in order:
        if len(out) >= limit:
            break
        c = classes[ref.layers[i].key]
        other = c.runner_up(i, mapping)
        if other is None:
            continue
        changed = dict(mapping)
        changed.update(other)
        moved = tuple(r for r in c.rows if changed[r] != mapping[r])
        key = tuple((r, changed[r]) for r in moved)
        if not moved or key in seen:  # two doubtful pairs of one swap give the same runner-up
            continue
        seen.add(key)
        what = ", ".join(f"{reference.layer_of(ref.layers[r].node.name)!r} with "
                         f"{suspect.layer_of(sus.layers[changed[r]].node.name)!r}" for r in moved[:4])
        out.append((what + (f" (+{len(moved) - 4} more)" if len(moved) > 4 else ""),
                    _assemble(reference, suspect, ref, sus, classes, changed)))
    return out


def _assemble(reference: CanonicalModel, suspect: CanonicalModel, ref: _Graph, sus: _Graph, solved: dict,
              mapping: dict[int, int]) -> Alignment:
    bad = _inconsistent(ref, sus, mapping)
    confidence, notes, contested, doubtful = _confidence(reference, suspect, ref, sus, solved, mapping, bad)

    model = onnx.ModelProto()
    model.CopyFrom(reference.model)
    out = WeightStore(model)
    sus_store = sus.store
    weight_map, node_map, result_pairs = {}, {}, []
    for i, r in enumerate(ref.layers):
        if i not in mapping:  # a layer inside a body, left unpaired (bodies.py)
            continue
        s = sus.layers[mapping[i]]
        c = solved[r.key]
        node_map[r.node.name] = s.node.name
        ws = []
        for (_, rw, _), (_, sw, _) in zip(r.weights, s.weights):
            if out.is_lazy(rw) and sus_store.is_lazy(sw):  # a huge model: read when used, never held
                own = sus_store.reader(sw)
                if own.shape == out.shape(rw) and own.dtype == np.float32:  # its parts read as it allows
                    out.set_lazy(rw, own)
                else:
                    out.set_lazy(rw, lambda sw=sw, shape=out.shape(rw):
                                 np.asarray(sus_store.get(sw), dtype=np.float32).reshape(shape))
            else:
                out.set(rw, sus_store.get(sw).astype(np.float32, copy=False).reshape(out.shape(rw)))
            weight_map[rw] = sw
            ws.append((rw, sw))
        cost, content, margin = c.about(i, mapping[i])
        result_pairs.append(LayerPair(r.node.name, s.node.name, r.kind, ws, cost, content, margin))
    kept = [n for n in out.names() if n not in weight_map]
    return Alignment(model, result_pairs, weight_map, node_map, kept, confidence, notes, contested, len(bad),
                     doubtful, (reference, suspect, ref, sus, solved, mapping))


def weighted_layers(model: onnx.ModelProto) -> list[Layer]:
    return _layers_of(topological(list(model.graph.node)), {t.name: t for t in model.graph.initializer})


def _layers_of(nodes: list[onnx.NodeProto], weights: dict[str, onnx.TensorProto]) -> list[Layer]:
    layers = []
    for index, node in enumerate(nodes):
        found = []
        for slot, name in enumerate(node.input):
            t = weights.get(name)
            if t is None or t.data_type not in _FLOAT or _size(t.dims) < 2:
                continue
            shape = tuple(int(d) for d in t.dims)
            if node.op_type in COMMUTATIVE or node.op_type in ("Sub", "Div", "Pow", "Where"):
                shape = _strip_ones(shape)
            found.append((slot, name, shape))
        if found:
            if node.op_type in COMMUTATIVE:
                found = [(0, n, s) for _, n, s in found]
            layers.append(Layer(node, index, _kind(node), found))
    return layers


_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _size(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    k = 0
    while k < len(shape) - 1 and shape[k] == 1:
        k += 1
    return shape[k:]


def _kind(node: onnx.NodeProto) -> str:
    kind = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    if node.op_type in ("Conv", "ConvTranspose"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group != 1:
            kind += f"(group={group})"
    if node.op_type in ("GRU", "LSTM", "RNN"):
        direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "forward")
        kind += f"({direction})"
    return kind


def _compatible(r: Layer, s: Layer) -> bool:
    return r.key == s.key


def _describe(layer: Layer) -> str:
    return f"{layer.kind} with weights " + ", ".join("x".join(map(str, s)) or "scalar" for s in layer.shapes)


# ---- the graph of weighted layers ----------------------------------------------------------------
def neighbour_rings(i: int, preds, succs, key) -> list[Counter]:
    """The layers 1..HOPS hops up, then 1..HOPS hops down from layer i, one Counter of key[q] per ring."""
    rings = []
    for links in (preds, succs):
        seen, ring = {i}, {i}
        for _ in range(HOPS):
            ring = {q for p in ring for q in links[p]} - seen
            seen |= ring
            rings.append(Counter(key[q] for q in ring))
    return rings


class _Graph:
    """A model's weighted layers, which of them feed which (through any unweighted ops), depths,
    neighbour rings, roles and content signatures (computed when asked)."""

    def __init__(self, model: onnx.ModelProto, role: str = "model"):
        self.model, self.role = model, role
        # every layer, those inside If/Loop/Scan bodies too (bodies.py: `inside` may stay unpaired)
        nodes, weights, inside = flattened(model)
        self.layers = _layers_of(nodes, weights)
        self.inside = {i for i, layer in enumerate(self.layers) if id(layer.node) in inside}
        self.store = WeightStore(model)
        at = {id(layer.node): i for i, layer in enumerate(self.layers)}
        n = len(self.layers)
        self.preds: list[frozenset[int]] = [frozenset()] * n
        frontier: dict[str, frozenset[int]] = {}
        empty: frozenset[int] = frozenset()
        for node in nodes:
            ins = [frontier[x] for x in node_inputs(node) if x in frontier]
            union = ins[0] if len(ins) == 1 else (empty.union(*ins) if ins else empty)
            i = at.get(id(node))
            if i is not None:
                self.preds[i] = union
                union = frozenset((i,))
            for o in node.output:
                if o:
                    frontier[o] = union
        succs: list[set[int]] = [set() for _ in range(n)]
        for i, ps in enumerate(self.preds):
            for p in ps:
                succs[p].add(i)
        self.succs = [frozenset(s) for s in succs]
        self.depth_in = np.ones(n, dtype=np.int64)
        for i in range(n):  # layers are in topological order: predecessors come first
            if self.preds[i]:
                self.depth_in[i] = 1 + max(self.depth_in[p] for p in self.preds[i])
        self.depth_out = np.ones(n, dtype=np.int64)
        for i in reversed(range(n)):
            if self.succs[i]:
                self.depth_out[i] = 1 + max(self.depth_out[c] for c in self.succs[i])
        self.desc = [(layer.kind, tuple(layer.shapes)) for layer in self.layers]
        self.roles = _Roles(model, nodes, weights)
        self._signature: dict[int, tuple] = {}
        self._content: dict[int, dict] = {}

    def signature(self, i: int) -> tuple:
        """(rings up, rings down, role): what structure() compares, hashable."""
        if i not in self._signature:
            rings = tuple(tuple(sorted(r.items())) for r in neighbour_rings(i, self.preds, self.succs, self.desc))
            self._signature[i] = (rings, self.roles.of(self.layers[i].node))
        return self._signature[i]

    def content(self, i: int, singular: bool) -> dict:
        """Component name -> permutation-invariant profile (module docstring)."""
        cached = self._content.get(i)
        if cached is not None and (not singular or cached["singular"]):
            return cached["parts"]
        layer = self.layers[i]
        parts = {}
        for k, (_, name, _) in enumerate(layer.weights):
            profile = _profiles(self.store, name, layer.node.op_type, singular, f"{k}.")
            if not all(np.isfinite(p).all() for p in profile.values()):  # a NaN cost has no assignment
                raise UnsupportedError(f"weight {name!r} of the {self.role} holds NaN or infinite values: its "
                                       "layer cannot be compared")
            parts.update(profile)
        self._content[i] = {"parts": parts, "singular": singular}
        return parts


def _profiles(store: WeightStore, name: str, op: str, singular: bool, prefix: str) -> dict[str, np.ndarray]:
    shape = store.shape(name)
    if len(shape) >= 2 and shape[0] > 1 and 1 not in shape[1:] and math.prod(shape) > SAMPLE_ENTRIES:
        return _streamed_norms(store, name, op, prefix)
    grid = sub_grid(shape, SAMPLE_ENTRIES) if store.is_lazy(name) else None  # in memory: whole is cheaper
    sampled = grid is not None
    w = np.asarray(store.get(name) if not sampled else store.get_grid(name, grid), dtype=np.float32)
    dims = [d for d in w.shape if d != 1]
    if len(dims) <= 1:
        return {prefix + "values": np.sort(w.reshape(-1))}
    w = w.reshape([d for d in w.shape if d != 1]) if len(dims) < w.ndim else w
    if w.ndim == 2 or op in ("Conv", "ConvTranspose"):
        m = w.reshape(w.shape[0], -1)
    else:  # recurrent (directions, gates x hidden, in), stacked or positional tables
        m = w.reshape(-1, w.shape[-1])
    sq = np.square(m)
    out = {prefix + "rows": np.sort(np.sqrt(sq.sum(axis=1, dtype=np.float64))),
           prefix + "cols": np.sort(np.sqrt(sq.sum(axis=0, dtype=np.float64)))}
    if singular and not sampled and m.size <= SVD_MAX_ENTRIES and min(m.shape) <= SVD_MAX_SIDE:
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        ev = np.linalg.eigvalsh(gram.astype(np.float64))[::-1][:TOP_SINGULAR]
        out[prefix + "singular"] = np.sqrt(np.clip(ev, 0, None))
    return out


def _streamed_norms(store: WeightStore, name: str, op: str, prefix: str) -> dict[str, np.ndarray]:
    """_profiles' row and column norms of a large matrix, exact, read a block of rows at a time (a
    lazy weight is never held whole; a sub-grid's norms would differ between a matrix and its
    permuted copy, and between a lazy and an in-memory one)."""
    shape = store.shape(name)
    by_rows = len(shape) == 2 or op in ("Conv", "ConvTranspose")
    rows, cols = [], None
    if store.is_lazy(name) and store.reader(name).kind != "mapped":  # computed: once, not once per block
        whole = store.get(name)
        step = max(1, (1 << 22) // max(1, math.prod(shape[1:])))
        blocks = (whole[a:a + step] for a in range(0, shape[0], step))
    else:
        blocks = store.row_blocks(name)
    for block in blocks:
        m = np.asarray(block, dtype=np.float32)
        m = m.reshape(m.shape[0], -1) if by_rows else m.reshape(-1, shape[-1])
        # (squares added up in float64 without a float64 copy of the block)
        rows.append(np.einsum("ij,ij->i", m, m, dtype=np.float64))
        col = np.einsum("ij,ij->j", m, m, dtype=np.float64)
        cols = col if cols is None else cols + col
    return {prefix + "rows": np.sort(np.sqrt(np.concatenate(rows))), prefix + "cols": np.sort(np.sqrt(cols))}


# ---- one class of compatible layers -----------------------------------------------------------
class _Class:
    """The reference's and the suspect's layers of one kind and shapes, their costs and assignment."""

    def __init__(self, ref: _Graph, sus: _Graph, rows: list[int], cols: list[int]):
        self.ref, self.sus, self.rows, self.cols = ref, sus, rows, cols
        self.at_row = {r: a for a, r in enumerate(rows)}
        self.at_col = {s: b for b, s in enumerate(cols)}
        self.forced = len(rows) == 1 and len(cols) == 1
        self.content = None
        self.margin: dict[int, float] = {}
        self.extra: np.ndarray | None = None  # the consistency costs the margins were computed with
        if self.forced:
            self.cost = np.zeros((1, 1))
            return
        self.structure = self._structure()
        best = self.structure.min(axis=1, keepdims=True)
        tied = bool(((self.structure <= best + STRUCT_TIE).sum(axis=1) >= 2).any())
        self.content, self.twin_rows, self.twin_cols = self._content(singular=tied)
        self.cost = STRUCT_WEIGHT * self.structure + CONTENT_WEIGHT * self.content

    def _structure(self) -> np.ndarray:
        ref, sus = self.ref, self.sus
        rows, cols = np.array(self.rows), np.array(self.cols)
        depth = (np.abs(ref.depth_in[rows][:, None] - sus.depth_in[cols][None, :])
                 + np.abs(ref.depth_out[rows][:, None] - sus.depth_out[cols][None, :]))
        depth = np.minimum(1.0, depth / DEPTH_SCALE)
        sigs: dict[tuple, int] = {}
        r_ids = [sigs.setdefault(ref.signature(r), len(sigs)) for r in self.rows]
        c_ids = [sigs.setdefault(sus.signature(s), len(sigs)) for s in self.cols]
        keys = list(sigs)
        table = np.zeros((len(keys), len(keys)))
        for a in set(r_ids):
            for b in set(c_ids):
                table[a, b] = _signature_distance(keys[a], keys[b])
        self.r_sig, self.c_sig = r_ids, c_ids
        return (depth + table[np.ix_(r_ids, c_ids)]) / 3.0

    def _content(self, singular: bool):
        ref_parts = [self.ref.content(r, singular) for r in self.rows]
        sus_parts = [self.sus.content(s, singular) for s in self.cols]
        names = [n for n in ref_parts[0] if all(n in p for p in ref_parts + sus_parts)]
        total = np.zeros((len(self.rows), len(self.cols)))
        terms = 0
        twin_rows = np.ones((len(self.rows), len(self.rows)), dtype=bool)
        twin_cols = np.ones((len(self.cols), len(self.cols)), dtype=bool)
        for name in names:
            a = np.stack([p[name] for p in ref_parts])
            b = np.stack([p[name] for p in sus_parts])
            twin_rows &= cdist(a, a) == 0
            twin_cols &= cdist(b, b) == 0
            # shape: each profile over its own root mean square (a uniform scaling cancels)
            ra, rb = _rms(a), _rms(b)
            a, b = a / np.where(ra > 0, ra, 1.0)[:, None], b / np.where(rb > 0, rb, 1.0)[:, None]
            total += _scaled_distance(cdist(a, a), cdist(a, b), FLOOR_REL * math.sqrt(a.shape[1]))
            terms += 1
            if name.endswith(("rows", "values")):  # one scale term per weight (rows and cols share it)
                la, lb = _log_scale(ra), _log_scale(rb)
                total += _scaled_distance(np.abs(la[:, None] - la[None, :]), np.abs(la[:, None] - lb[None, :]),
                                          SCALE_FLOOR)
                terms += 1
        content = total / max(terms, 1)
        same_r = np.equal.outer(self.r_sig, self.r_sig)
        same_c = np.equal.outer(self.c_sig, self.c_sig)
        rows, cols = np.array(self.rows), np.array(self.cols)
        twin_rows &= same_r & np.equal.outer(self.ref.depth_in[rows], self.ref.depth_in[rows]) \
            & np.equal.outer(self.ref.depth_out[rows], self.ref.depth_out[rows])
        twin_cols &= same_c & np.equal.outer(self.sus.depth_in[cols], self.sus.depth_in[cols]) \
            & np.equal.outer(self.sus.depth_out[cols], self.sus.depth_out[cols])
        return content, twin_rows, twin_cols

    def solve(self, extra: np.ndarray | None = None) -> dict[int, int]:
        cost = self.cost if extra is None else self.cost + extra
        a, b = linear_sum_assignment(cost)
        return {self.rows[i]: self.cols[j] for i, j in zip(a, b)}

    def margins(self, mapping: dict[int, int], extra: np.ndarray | None = None) -> None:
        """Runner-up cost minus best for each contested pair of a square class (module docstring)."""
        self.margin, self.extra = {}, extra
        if self.forced or len(self.rows) != len(self.cols):
            return
        cost = self.cost if extra is None else self.cost + extra
        k = len(self.rows)
        col = np.array([self.at_col[mapping[r]] for r in self.rows])
        best = float(cost[np.arange(k), col].sum())
        if k <= EXACT_RUNNER_UP_MAX:
            for i in range(k):
                c2 = cost.copy()
                c2[np.ix_(self.twin_rows[i], self.twin_cols[col[i]])] = _FORBIDDEN
                a, b = linear_sum_assignment(c2)
                second = float(c2[a, b].sum())
                self.margin[self.rows[i]] = second - best if second < _FORBIDDEN / 2 else float("inf")
        else:
            diag = cost[np.arange(k), col]
            swapped = cost[:, col]  # [i, j]: row i given j's partner
            delta = swapped + swapped.T - diag[:, None] - diag[None, :]
            delta[self.twin_rows | self.twin_cols[np.ix_(col, col)]] = np.inf
            for i in range(k):
                self.margin[self.rows[i]] = float(delta[i].min())

    def runner_up(self, r: int, mapping: dict[int, int]) -> dict[int, int] | None:
        """The class's cheapest assignment that does not pair r with its partner (nor with a twin of
        it), under the costs its margins were computed with; None where there is none."""
        if self.forced or len(self.rows) != len(self.cols):
            return None
        c2 = self.cost if self.extra is None else self.cost + self.extra
        c2 = c2.copy()
        i, j = self.at_row[r], self.at_col[mapping[r]]
        c2[np.ix_(self.twin_rows[i], self.twin_cols[j])] = _FORBIDDEN
        a, b = linear_sum_assignment(c2)
        if float(c2[a, b].sum()) >= _FORBIDDEN / 2:
            return None
        return {self.rows[x]: self.cols[y] for x, y in zip(a, b)}

    def about(self, r: int, s: int) -> tuple[float, float | None, float | None]:
        a, b = self.at_row[r], self.at_col[s]
        content = None if self.content is None else float(self.content[a, b])
        return float(self.cost[a, b]), content, self.margin.get(r)

    def contested(self, r: int) -> bool:
        if self.forced:
            return False
        m = self.margin.get(r)
        return m is not None and np.isfinite(m)


def _rms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(a, dtype=np.float64), axis=1)) if a.shape[1] else np.zeros(len(a))


def _log_scale(rms: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(rms, 1e-30))


def _scaled_distance(within: np.ndarray, across: np.ndarray, floor: float) -> np.ndarray:
    """across over what the class's reference layers differ by among themselves (the median of
    `within`'s upper triangle, at least `floor`), clipped at CONTENT_CLIP."""
    upper = within[np.triu_indices(len(within), 1)]
    scale = max(float(np.median(upper)) if upper.size else 0.0, floor, 1e-30)
    return np.minimum(CONTENT_CLIP, across / scale)


def _signature_distance(x: tuple, y: tuple) -> float:
    (rings_x, role_x), (rings_y, role_y) = x, y
    ring = float(np.mean([_multiset_distance(a, b) for a, b in zip(rings_x, rings_y)]))
    sx, sy = set(role_x), set(role_y)
    role = 1.0 - len(sx & sy) / len(sx | sy) if sx | sy else 0.0
    return ring + role  # structure() adds depth and divides by 3


def _multiset_distance(a: tuple, b: tuple) -> float:
    ca, cb = dict(a), dict(b)
    union = sum(max(ca.get(k, 0), cb.get(k, 0)) for k in ca.keys() | cb.keys())
    if not union:
        return 0.0
    return 1.0 - sum(min(v, cb.get(k, 0)) for k, v in ca.items()) / union


# ---- consistency and confidence -----------------------------------------------------------------
def _inconsistent(ref: _Graph, sus: _Graph, mapping: dict[int, int]) -> list[int]:
    """Reference layers whose feeding layers are not paired with those feeding their partner."""
    return [r for r, s in mapping.items() if {mapping.get(p, -1) for p in ref.preds[r]} != set(sus.preds[s])]


def _disagreement(c: _Class, ref: _Graph, sus: _Graph, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros((len(c.rows), len(c.cols)))
    for a, r in enumerate(c.rows):
        mp = {mapping.get(p, -1) for p in ref.preds[r]}
        ms = {mapping.get(q, -1) for q in ref.succs[r]}
        for b, s in enumerate(c.cols):
            ps, ss = sus.preds[s], sus.succs[s]
            total = len(mp) + len(ms) + len(ps) + len(ss)
            if total:
                out[a, b] = (len(mp ^ ps) + len(ms ^ ss)) / total
    return out


def _make_consistent(ref: _Graph, sus: _Graph, classes: dict, mapping: dict[int, int]) -> dict[int, int]:
    best, best_bad, best_extras = mapping, len(_inconsistent(ref, sus, mapping)), {}
    current = mapping
    for _ in range(REFINE_ROUNDS):
        if not best_bad:
            break
        proposal, extras = dict(current), {}
        for key, c in classes.items():
            if c.forced or len(c.rows) > REFINE_MAX:
                continue
            extras[key] = NEIGHBOUR_WEIGHT * _disagreement(c, ref, sus, current)
            proposal.update(c.solve(extras[key]))
        bad = len(_inconsistent(ref, sus, proposal))
        current = proposal
        if bad < best_bad:
            best, best_bad, best_extras = proposal, bad, extras
    for key, c in classes.items():
        c.margins(best, best_extras.get(key))
    return best


def _confidence(reference: CanonicalModel, suspect: CanonicalModel, ref: _Graph, sus: _Graph,
                classes: dict, mapping: dict[int, int], bad: list[int]) -> tuple[float, list[str], int, list[int]]:
    notes: list[str] = []
    doubtful: list[str] = []
    doubtful_layers: list[int] = []
    at_stake = set(bad)
    contested = 0
    clear = 0
    for i, r in enumerate(ref.layers):
        if i not in mapping:  # a layer inside a body, left unpaired (bodies.py)
            continue
        c = classes[r.key]
        if not c.contested(i):
            continue
        contested += 1
        at_stake.add(i)
        _, content, margin = c.about(i, mapping[i])
        why = []
        if margin < MIN_MARGIN:
            why.append(f"the runner-up pairing costs only {margin:.3f} more")
        if content is not None and content > MAX_CONTENT and margin < content:
            why.append(f"its weights resemble its partner's little (content cost {content:.2f})")
        if why:
            doubtful_layers.append(i)
            doubtful.append(f"{reference.layer_of(r.node.name)!r} paired with "
                            f"{suspect.layer_of(sus.layers[mapping[i]].node.name)!r} with low confidence: "
                            + "; ".join(why))
        elif i not in bad:
            clear += 1
    for i in bad:
        r, s = ref.layers[i], sus.layers[mapping[i]]
        notes.append(f"{reference.layer_of(r.node.name)!r} paired with {suspect.layer_of(s.node.name)!r}, "
                     f"but the layers feeding them are not paired with each other")
    if len(notes) > NOTES_MAX:
        notes = notes[:NOTES_MAX] + [f"... {len(notes) - NOTES_MAX} more layers paired inconsistently"]
    if len(doubtful) > NOTES_MAX:
        doubtful = doubtful[:NOTES_MAX] + [f"... {len(doubtful) - NOTES_MAX} more pairs with low confidence"]
    notes += doubtful
    confidence = clear / len(at_stake) if at_stake else 1.0
    if at_stake and confidence < 1.0:
        notes.insert(0, f"alignment confidence {confidence:.2f}: {clear} of {len(at_stake)} layers that could "
                        f"have been paired otherwise are paired clearly")
    return confidence, notes, contested, doubtful_layers


def _raise_unmatched(reference: CanonicalModel, suspect: CanonicalModel, ref: _Graph, sus: _Graph,
                     mapping: dict[int, int]) -> None:
    used = set(mapping.values())
    free = [s for j, s in enumerate(sus.layers) if j not in used and j not in sus.inside]
    for i, r in enumerate(ref.layers):
        if i not in mapping and i not in ref.inside:  # inside a body: may stay unpaired (bodies.py)
            raise ModelMismatchError(_no_match_message(r, reference, free, suspect))
    if free:
        s = free[0]
        raise ModelMismatchError(
            f"cannot align the suspect's layer {suspect.layer_of(s.node.name)!r} ({_describe(s)}): "
            f"the reference has no layer left of that kind and shape"
            + (f" ({len(free) - 1} more suspect layers unmatched)" if len(free) > 1 else ""))


def _no_match_message(r: Layer, reference: CanonicalModel, free: list[Layer], suspect: CanonicalModel) -> str:
    msg = (f"cannot align the reference's layer {reference.layer_of(r.node.name)!r} ({_describe(r)}): "
           f"the suspect has no unmatched layer of that kind and shape")
    same_kind = [s for s in free if s.kind == r.kind]
    nxt = same_kind[0] if same_kind else (free[0] if free else None)
    if nxt is not None:
        msg += f"; next suspect candidate: {suspect.layer_of(nxt.node.name)!r} ({_describe(nxt)})"
    else:
        msg += "; every suspect layer is already paired"
    foreign = Counter(f"{n.domain}.{n.op_type}" for n in suspect.model.graph.node
                      if n.domain not in ("", "ai.onnx") and any(i in _initializers(suspect.model) for i in n.input))
    if foreign:
        ops = ", ".join(f"{op} x{c}" for op, c in sorted(foreign.items()))
        msg += f" (the suspect's weights are read by operators outside the ONNX standard: {ops})"
    return msg


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


class _Roles:
    """What a layer's output is used for, seen through views and pointwise ops (see the docstring).
    Independent of node order: every reachable use is collected, then the first ROLE_FANOUT in
    sorted order are kept."""

    def __init__(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto] | None = None,
                 weights: dict | None = None):
        self.weights = set(weights) if weights is not None else {t.name for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        self.users: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in (nodes if nodes is not None else model.graph.node):
            for k, name in enumerate(node.input):
                if name:
                    self.users[name].append((node, k))
        self.cache: dict[int, tuple] = {}

    def _trivial(self, node: onnx.NodeProto) -> bool:
        if node.op_type in TRIVIAL or node.domain == LINK_DOMAIN:  # a body's boundary (bodies.py)
            return True
        data = [i for i in node.input if i and i not in self.weights]
        return len(data) <= 1 and node.op_type in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")

    def _weighted(self, node: onnx.NodeProto) -> bool:
        return any(i in self.weights for i in node.input) and node.op_type not in ("Reshape", "Expand", "Tile")

    def of(self, node: onnx.NodeProto) -> tuple:
        key = id(node)
        if key not in self.cache:
            self.cache[key] = self._role([o for o in node.output if o], ROLE_DEPTH)
        return self.cache[key]

    def _role(self, tensors: list[str], depth: int) -> tuple:
        found, seen = set(), set()
        stack = list(tensors)
        while stack and len(seen) < ROLE_VISIT_MAX:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.outputs:
                found.add(("output",))
            for user, k in self.users.get(t, []):
                if self._trivial(user):
                    stack.extend(o for o in user.output if o)
                elif self._weighted(user) and user.op_type not in ("Concat", "Split"):
                    found.add(("layer", user.op_type))
                else:
                    sub = self._role([o for o in user.output if o], depth - 1) if depth > 1 else ()
                    found.add((user.op_type, 0 if user.op_type in COMMUTATIVE else k, sub))
        return tuple(sorted(found, key=repr)[:ROLE_FANOUT])
