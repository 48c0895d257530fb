"""Inserted layers that fold into their readers: a linear layer with non-negative weights and no
bias, followed by a Relu, reading a Relu's output.

Its input x is non-negative, so its output M x is too and the Relu after it is the identity there:
the pair computes x -> M x, and every reader W of it (Conv with group 1, Gemm, MatMul with a stored
weight) computes W M x. Folding replaces each reader's weight by W M along its input axis, points
the readers at x and drops the pair and its weights. An identity (Net2Net's deepening) and a
monomial layer (a permuted, positively scaled identity) are such layers; the kind is reported.
Candidates only: the pass that folds proves the result with ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..io import WeightStore

NON_NEGATIVE_INPUT = ("Relu",)  # producers whose output is never negative


@dataclass
class Fold:
    layer: int  # index of the inserted linear layer in graph.node
    relu: int  # index of the Relu after it
    source: str  # x: the tensor the layer reads
    matrix: np.ndarray  # M (out, in): y = M x
    readers: list[tuple[int, str, int]]  # (node index, weight name, input axis of the weight)
    kind: str  # identity | monomial | non-negative linear
    name: str = ""  # the layer's name (its op type when unnamed)
    reader_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"layer": self.name, "kind": self.kind, "width": int(self.matrix.shape[0]),
                "readers": list(self.reader_names)}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _matrix(node: onnx.NodeProto, store: WeightStore) -> np.ndarray | None:
    """M of a bias-free (or zero-bias) linear layer on a channel axis, or None."""
    if len(node.input) < 2 or node.input[1] not in store:
        return None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in store or np.any(store.get(node.input[2]) != 0):
            return None
    w = store.get(node.input[1]).astype(np.float64)
    if node.op_type == "Conv":
        if (w.ndim < 3 or any(d != 1 for d in w.shape[2:]) or _attr(node, "group", 1) != 1
                or any(s != 1 for s in _attr(node, "strides", [1])) or any(_attr(node, "pads", [0]))
                or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")):
            return None
        return w.reshape(w.shape[0], w.shape[1])
    if node.op_type == "Gemm" and w.ndim == 2 and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0:
        return w if _attr(node, "transB", 0) else w.T
    if node.op_type == "MatMul" and w.ndim == 2 and len(node.input) == 2:
        return w.T
    return None


def _reader_axis(node: onnx.NodeProto, tensor: str, store: WeightStore) -> tuple[str, int] | None:
    """(weight, axis holding the input channels) of a linear reader of `tensor`, or None."""
    if not node.input or node.input[0] != tensor or len(node.input) < 2 or node.input[1] not in store:
        return None
    if tensor in node.input[1:]:
        return None
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        return node.input[1], 1
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        return node.input[1], 1 if _attr(node, "transB", 0) else 0
    if node.op_type == "MatMul" and len(store.shape(node.input[1])) == 2:
        return node.input[1], 0
    return None


def _kind(m: np.ndarray) -> str:
    if m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(m.shape[0])):
        return "identity"
    if m.shape[0] == m.shape[1] and np.all((m > 0).sum(axis=0) == 1) and np.all((m > 0).sum(axis=1) == 1):
        return "monomial"
    return "non-negative linear"


def find(model: onnx.ModelProto) -> list[Fold]:
    """Every foldable inserted layer of the model's top graph."""
    graph = model.graph
    store = WeightStore(model)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    index = {id_: k for k, id_ in enumerate(n.output[0] if n.output else "" for n in graph.node)}
    folds = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        source = node.input[0]
        before = producer.get(source)
        if before is None or before.op_type not in NON_NEGATIVE_INPUT or uses.get(node.input[1], 0) != 1:
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu" or node.output[0] in outputs:
            continue
        relu = after[0]
        m = _matrix(node, store)
        if m is None or np.any(m < 0) or relu.output[0] in outputs:
            continue
        readers = []
        for r in consumers.get(relu.output[0], []):
            found = _reader_axis(r, relu.output[0], store)
            if found is None or uses.get(found[0], 0) != 1 or store.shape(found[0])[found[1]] != m.shape[0]:
                readers = None
                break
            readers.append((index[r.output[0]], *found))
        if readers:
            folds.append(Fold(index[node.output[0]], index[relu.output[0]], source, m, readers, _kind(m),
                              node.name or node.op_type,
                              tuple(graph.node[k].name or graph.node[k].op_type for k, _, _ in readers)))
    return folds


def apply(model: onnx.ModelProto, fold: Fold) -> None:
    """Fold one layer into its readers (the model changes in place)."""
    store = WeightStore(model)
    nodes = model.graph.node
    for k, weight, axis in fold.readers:
        w = np.moveaxis(store.get(weight).astype(np.float64), axis, -1)
        store.set(weight, np.moveaxis(w @ fold.matrix, -1, axis))
        nodes[k].input[0] = fold.source
    dropped = set(nodes[fold.layer].input[1:])
    for k in sorted((fold.layer, fold.relu), reverse=True):
        del nodes[k]
    used = {i for n in nodes for i in n.input}
    inits = model.graph.initializer
    for k in reversed(range(len(inits))):
        if inits[k].name in dropped and inits[k].name not in used:
            del inits[k]
