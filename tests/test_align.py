"""Alignment cannot depend on node order, names or exporter (issue 14.1).

A tiny YOLO-like head (a stem Conv feeding two branches of the same shapes, each to its own output)
is the hard case: its two branches read the same tensor and have equal shapes, so only their
content tells them apart. Written in the other valid node order, with every name changed, permuted
and noised, or redrawn (the unrelated twin), it must be judged as what it is. The bundled models
shuffled into a random valid topological order and renamed must come out identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.api import audit, permute
from onnx_resync.audit.align import align
from onnx_resync.audit.canonical import canonicalize

MODELS = Path(__file__).resolve().parent.parent / "models"
BUNDLED = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]


# ---- a tiny YOLO-like head --------------------------------------------------------------------
def yolo_head(seed: int = 0, swap: bool = False) -> onnx.ModelProto:
    """x -> Conv 3x3 -> Relu -> [box: Conv 1x1 -> Relu -> Conv 1x1 -> boxes,
    cls: Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid -> classes]; the two branches have equal shapes.
    swap: the class branch's nodes written before the box branch's (another valid order)."""
    rng = np.random.default_rng(seed)

    def he(*shape):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bias(n):
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    inits = {
        "stem.w": he(16, 8, 3, 3), "stem.b": bias(16),
        "box1.w": he(24, 16, 1, 1), "box1.b": bias(24), "box2.w": he(6, 24, 1, 1), "box2.b": bias(6),
        "cls1.w": he(24, 16, 1, 1), "cls1.b": bias(24), "cls2.w": he(6, 24, 1, 1), "cls2.b": bias(6),
    }
    stem = [helper.make_node("Conv", ["x", "stem.w", "stem.b"], ["s"], name="stem", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["s"], ["sr"], name="stem_relu")]
    box = [helper.make_node("Conv", ["sr", "box1.w", "box1.b"], ["b1"], name="box1"),
           helper.make_node("Relu", ["b1"], ["b1r"], name="box1_relu"),
           helper.make_node("Conv", ["b1r", "box2.w", "box2.b"], ["boxes"], name="box2")]
    cls = [helper.make_node("Conv", ["sr", "cls1.w", "cls1.b"], ["c1"], name="cls1"),
           helper.make_node("Relu", ["c1"], ["c1r"], name="cls1_relu"),
           helper.make_node("Conv", ["c1r", "cls2.w", "cls2.b"], ["c2"], name="cls2"),
           helper.make_node("Sigmoid", ["c2"], ["classes"], name="cls_sigmoid")]
    nodes = stem + (cls + box if swap else box + cls)
    graph = helper.make_graph(
        nodes, "yolo_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 6, 12, 12]),
         helper.make_tensor_value_info("classes", TensorProto.FLOAT, [1, 6, 12, 12])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def rename_everything(model: onnx.ModelProto, prefix: str = "v") -> onnx.ModelProto:
    """Every node, tensor, input and output renamed (a vendor's exporter's own names)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    assert not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for n in g.node for a in n.attribute)
    names: dict[str, str] = {}

    def new(name: str) -> str:
        if not name:
            return name
        if name not in names:
            names[name] = f"{prefix}{len(names)}"
        return names[name]

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = new(vi.name)
    for t in g.initializer:
        t.name = new(t.name)
    for k, node in enumerate(g.node):
        node.name = f"{prefix}_node{k}"
        for i, name in enumerate(node.input):
            node.input[i] = new(name)
        for i, name in enumerate(node.output):
            node.output[i] = new(name)
    return out


def shuffled(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The nodes in a random valid topological order (each step takes a random ready node)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{produced[x] for x in n.input if x in produced} for n in nodes]
    rng = np.random.default_rng(seed)
    order, placed = [], set()
    while len(order) < len(nodes):
        ready = [i for i in range(len(nodes)) if i not in placed and deps[i] <= placed]
        i = ready[int(rng.integers(len(ready)))]
        order.append(nodes[i])
        placed.add(i)
    del out.graph.node[:]
    out.graph.node.extend(order)
    return out


def noised(model: onnx.ModelProto, strength: float, seed: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.dtype == np.float32 and w.size > 1:
            w = w + rng.standard_normal(w.shape).astype(np.float32) * strength * float(w.std())
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
    return out


def _node_pairs(alignment) -> dict[str, str]:
    return dict(alignment.node_map)


# ---- the head in the other order ------------------------------------------------------------
def test_other_node_order_is_identical():
    report = audit(yolo_head(swap=True), yolo_head())
    assert report.derived and report.verdict == "identical", report.summary


def test_other_node_order_pairs_the_branches_by_content():
    reference, suspect = canonicalize(yolo_head()), canonicalize(yolo_head(swap=True))
    alignment = align(reference, suspect)
    assert alignment.node_map == {n: n for n in alignment.node_map}  # node names kept by canonicalize
    assert alignment.confidence == 1.0 and not alignment.notes, alignment.notes
    data = alignment.to_dict()
    assert data["confidence"] == 1.0 and data["notes"] == []


def test_other_order_and_every_name_changed_is_identical():
    suspect = rename_everything(yolo_head(swap=True))
    report = audit(suspect, yolo_head())
    assert report.derived and report.verdict == "identical", report.summary


def test_permuted_and_noised_branches_are_perturbed():
    permuted, result = permute(yolo_head(swap=True), seed=3)
    assert result.neurons_moved > 0
    suspect = rename_everything(noised(permuted, 0.02, seed=5))
    report = audit(suspect, yolo_head())
    assert report.derived and report.verdict == "perturbed", report.summary


def test_unrelated_twin_is_not_derived():
    report = audit(yolo_head(seed=1, swap=True), yolo_head(seed=0))
    assert not report.derived and report.verdict == "not derived", report.summary
    assert any(e.startswith("alignment: ") for e in report.to_dict()["evidence"])  # low confidence shown


def test_unrelated_twin_alignment_has_low_confidence():
    alignment = align(canonicalize(yolo_head(seed=0)), canonicalize(yolo_head(seed=1)))
    assert alignment.confidence < 1.0 and alignment.notes


def test_cross_wired_branches_are_reported_inconsistent():
    """The second conv of each branch reads the other branch's first conv: content pairs every layer
    with its namesake, and the layers feeding the second convs are then not paired with each other."""
    suspect = yolo_head(swap=True)
    for node in suspect.graph.node:
        if node.name in ("box2", "cls2"):
            node.input[0] = {"b1r": "c1r", "c1r": "b1r"}[node.input[0]]
    alignment = align(canonicalize(yolo_head()), canonicalize(suspect))
    assert alignment.inconsistent > 0 and alignment.confidence < 1.0
    assert any("not paired with each other" in note for note in alignment.notes), alignment.notes
    assert alignment.to_dict()["inconsistent"] == alignment.inconsistent


def test_original_order_still_identical():
    report = audit(yolo_head(), yolo_head())
    assert report.verdict == "identical", report.summary


# ---- the bundled models shuffled and renamed ------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_shuffled_and_renamed_is_identical(name):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing (run tools/build_models.py)")
    reference = onnx.load(str(path))
    suspect = rename_everything(shuffled(reference, seed=sum(map(ord, name))))
    onnx.checker.check_model(suspect)
    report = audit(suspect, reference)
    assert report.derived and report.verdict == "identical", report.summary
    assert report.matched_fraction == 1.0
