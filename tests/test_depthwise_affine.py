"""A per-channel affine written three ways meets in one canonical form (audit/passes/affine.py): a
BatchNormalization that no producer can take (it follows an activation), the same as a depthwise 1x1
Conv (ONNX Runtime's NCHWc layout writes an unfolded BatchNormalization so: openWakeWord's embedding
model saved at the 'all' level), and as Mul and Add by per-channel constants. Each becomes Mul + Add
by [C, 1, 1] constants; a depthwise 1x1 Conv right after a Conv is folded into it like a BatchNorm.
Every rewrite is run with ONNX Runtime against the file; the audits of the three forms say identical /
permuted, and an unrelated twin stays not derived (exit 3 'cannot align the reference's layer
BatchNormalization' before).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import api
from onnx_resync.audit.canonical import canonicalize

C = 24  # not a multiple of 16: ONNX Runtime pads it in NCHWc with blocks of 16


def _w(rng, *shape, scale=0.3):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _reference(seed: int = 0, rank: int = 4) -> onnx.ModelProto:
    """Conv -> Relu -> BatchNormalization (unfoldable) -> Conv -> Relu -> Conv; rank 3 is Conv1d."""
    rng = np.random.default_rng(seed)
    k = [3] * (rank - 2)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1] * 2 * (rank - 2)),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("BatchNormalization", ["r0", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("Conv", ["bn", "w1", "b1"], ["c1"], pads=[1] * 2 * (rank - 2)),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    inits = {"w0": _w(rng, C, 3, *k), "b0": _w(rng, C), "g": _w(rng, C) + 1, "beta": _w(rng, C),
             "mean": _w(rng, C), "var": np.abs(_w(rng, C)) + 0.5, "w1": _w(rng, 16, C, *k), "b1": _w(rng, 16),
             "w2": _w(rng, 8, 16, *[1] * (rank - 2)), "b2": _w(rng, 8)}
    spatial = [12] * (rank - 2)
    graph = helper.make_graph(nodes, "bn_after_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     [1, 3] + spatial)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8] + spatial)],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _bn_rewritten(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """`model` with its BatchNormalization written as a depthwise 1x1 Conv ('conv') or as Mul + Add
    by per-channel constants ('muladd'): the same function, up to float32 rounding."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    k = next(i for i, n in enumerate(g.node) if n.op_type == "BatchNormalization")
    bn = g.node[k]
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    scale, beta, mean, var = (inits[i] for i in bn.input[1:5])
    s = scale / np.sqrt(var + eps)
    t = beta - mean * s
    rank = len(g.input[0].type.tensor_type.shape.dim)
    ones = [1] * (rank - 2)
    if form == "conv":
        new = [helper.make_node("Conv", [bn.input[0], "dw_w", "dw_b"], list(bn.output), group=len(s))]
        extra = [numpy_helper.from_array(s.reshape([len(s), 1] + ones).astype(np.float32), "dw_w"),
                 numpy_helper.from_array(t.astype(np.float32), "dw_b")]
    else:
        new = [helper.make_node("Mul", [bn.input[0], "aff_s"], ["aff_m"]),
               helper.make_node("Add", ["aff_m", "aff_t"], list(bn.output))]
        extra = [numpy_helper.from_array(s.reshape([len(s)] + ones).astype(np.float32), "aff_s"),
                 numpy_helper.from_array(t.reshape([len(s)] + ones).astype(np.float32), "aff_t")]
    del g.node[k]
    for j, n in enumerate(new):
        g.node.insert(k + j, n)
    keep = [t for t in g.initializer if t.name not in bn.input[1:5]]
    del g.initializer[:]
    g.initializer.extend(keep + extra)
    return out


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type if n.op_type != "Conv" else f"Conv(group={_group(n)})" for n in model.graph.node)


def _group(n: onnx.NodeProto) -> int:
    return next((a.i for a in n.attribute if a.name == "group"), 1)


@pytest.mark.parametrize("rank", [4, 3])
@pytest.mark.parametrize("form", ["bn", "conv", "muladd"])
def test_an_unfolded_per_channel_affine_is_mul_add(form, rank):
    """The three forms reach one canonical graph (Mul + Add by [C, 1(, 1)] constants, no depthwise
    Conv, no BatchNormalization) with the same constants, and ONNX Runtime computes what the file does."""
    ref = _reference(rank=rank)
    model = ref if form == "bn" else _bn_rewritten(ref, form)
    x = np.random.default_rng(1).normal(size=[1, 3] + [12] * (rank - 2)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(ref, x), rtol=1e-4, atol=1e-4)
    canon = canonicalize(model)
    assert _ops(canon.model) == {"Conv(group=1)": 3, "Relu": 2, "Mul": 1, "Add": 1}, _ops(canon.model)
    np.testing.assert_allclose(_run(canon.model, x), _run(model, x), rtol=1e-4, atol=1e-4)
    values = {t.name: numpy_helper.to_array(t) for t in canon.model.graph.initializer}
    mul = next(n for n in canon.model.graph.node if n.op_type == "Mul")
    add = next(n for n in canon.model.graph.node if n.op_type == "Add")
    s, t = values[mul.input[1]], values[add.input[1]]
    assert s.shape == t.shape == (C,) + (1,) * (rank - 2)
    g = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in ref.graph.initializer}
    want = g["g"] / np.sqrt(g["var"] + 1e-3)
    np.testing.assert_allclose(s.reshape(-1), want, rtol=1e-6)
    np.testing.assert_allclose(t.reshape(-1), g["beta"] - g["mean"] * want, rtol=1e-5, atol=1e-6)


def test_a_depthwise_1x1_conv_after_a_conv_is_folded_into_it():
    """Conv -> depthwise 1x1 Conv (no bias): folded like a BatchNormalization; one with a stride or a
    kernel wider than 1 is a layer of its own and stays."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"]),
             helper.make_node("Conv", ["c0", "dw"], ["d0"], group=C),
             helper.make_node("Relu", ["d0"], ["r0"]),
             helper.make_node("Conv", ["r0", "dw2", "db2"], ["y"], group=C, strides=[2, 2])]
    inits = {"w0": _w(rng, C, 3, 3, 3), "b0": _w(rng, C), "dw": _w(rng, C, 1, 1, 1), "dw2": _w(rng, C, 1, 1, 1),
             "db2": _w(rng, C)}
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 4, 4])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    canon = canonicalize(model)
    assert _ops(canon.model) == {"Conv(group=1)": 1, "Relu": 1, f"Conv(group={C})": 1}, _ops(canon.model)
    assert canon.changes["depthwise 1x1 Conv folded into Conv"] == 1
    x = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(_run(canon.model, x), _run(model, x), rtol=1e-4, atol=1e-5)


def test_a_batchnorm_of_unknown_rank_is_left_as_it_is():
    """Where the file does not say the input's rank, the [C, 1, ...] shape is not known: left as it is."""
    ref = _reference()
    nodes = ref.graph.node
    nodes.insert(2, helper.make_node("Reshape", ["r0", "shape"], ["r0s"]))
    nodes[3].input[0] = "r0s"
    ref.graph.initializer.append(numpy_helper.from_array(np.array([1, C, 12, 12], np.int64), "shape"))
    canon = canonicalize(ref)
    assert _ops(canon.model)["BatchNormalization"] == 1


def _audit(suspect: onnx.ModelProto, reference, tmp_path, name: str):
    path = tmp_path / f"{name}.onnx"
    onnx.save(suspect, path)
    return api.audit(str(path), str(reference))


@pytest.mark.parametrize("form", ["conv", "muladd"])
def test_audit_of_the_batchnorm_written_another_way(form, tmp_path):
    """The reference's BatchNormalization written as a depthwise 1x1 Conv / Mul + Add: identical; the
    same after a permutation: permuted; an unrelated twin so written: not derived (exit 3 before)."""
    reference = tmp_path / "ref.onnx"
    onnx.save(_reference(), reference)
    report = _audit(_bn_rewritten(_reference(), form), reference, tmp_path, "same")
    assert report.verdict == "identical" and report.exit_code == 0, report.summary
    permuted, _ = api.permute(str(reference), str(tmp_path / "perm.onnx"), seed=3)
    report = _audit(_bn_rewritten(permuted, form), reference, tmp_path, "perm")
    assert report.verdict == "permuted" and report.moved > 0, report.summary
    report = _audit(_bn_rewritten(_reference(seed=9), form), reference, tmp_path, "twin")
    assert report.verdict == "not derived" and not report.derived, report.summary


def test_audit_of_the_nchwc_save(tmp_path):
    """ONNX Runtime's 'all'-level save (NCHWc: the BatchNormalization after the Relu becomes a
    depthwise 1x1 nchwc Conv of 32 padded channels) of the reference and of a permuted copy."""
    import onnxruntime as ort

    from onnx_resync.walk.layouts import NCHWC, machine_block_size

    if machine_block_size() is None:
        pytest.skip("this ONNX Runtime writes no NCHWc layout")
    reference = tmp_path / "ref.onnx"
    onnx.save(_reference(), reference)
    api.permute(str(reference), str(tmp_path / "perm.onnx"), seed=3)

    def saved(src, name):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        return tmp_path / name

    same = saved(reference, "all.onnx")
    model = onnx.load(str(same))
    assert any(n.domain == NCHWC and n.op_type == "Conv" and _group(n) > 1 for n in model.graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    report = api.audit(str(same), str(reference))
    assert report.verdict == "identical", report.summary
    report = api.audit(str(saved(tmp_path / "perm.onnx", "perm_all.onnx")), str(reference))
    assert report.verdict == "permuted" and report.moved > 0, report.summary
