"""An If whose condition the graph's shapes decide is walked as the branch that runs, with that
branch's shapes.

torch writes `x.squeeze(1)` on a traced tensor as If(shape(x)[1] == 1, Squeeze, Identity) and
`if x.dim() == 2: x = x.unsqueeze(0)` as If(rank == 2, Unsqueeze, Identity) (openwakeword's
silero_vad.onnx, nested in the If on the sample rate). The branches differ in rank, so ONNX shape
inference gives the If's output no shape and every rule after it met 'unknown ranks' (12.2% of
that file). Where the tested dim is a number in the file, the condition is a constant: the If's
outputs take the running branch's shapes (walk/graph.py `_decided_if_shapes`), also for an If inside
another If's branch. Where the dim is symbolic the condition stays open and nothing is assumed.
"""

from __future__ import annotations

import numpy as np
import pytest
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.permute import apply_permutations
from onnx_resync.walk import walk
from test_walk_properties import forced_record


def _squeeze_if(x: str, out: str, p: str, rank_test: bool):
    """x.squeeze(1) as torch writes it (rank_test False), or `if x.dim() == 3: x = x.squeeze(1)`."""
    if rank_test:  # Shape -> Shape -> Gather 0 -> Equal 3
        nodes = [helper.make_node("Shape", [x], [p + "shp"]), helper.make_node("Shape", [p + "shp"], [p + "rk"]),
                 helper.make_node("Gather", [p + "rk", p + "zero"], [p + "rank"], axis=0),
                 helper.make_node("Equal", [p + "rank", p + "three"], [p + "cond"])]
    else:  # Shape -> Gather 1 -> Equal 1
        nodes = [helper.make_node("Shape", [x], [p + "shp"]),
                 helper.make_node("Gather", [p + "shp", p + "one"], [p + "d1"], axis=0),
                 helper.make_node("Equal", [p + "d1", p + "one"], [p + "cond"])]
    then_g = helper.make_graph([helper.make_node("Squeeze", [x, p + "one"], [p + "sq"])], p + "then", [],
                               [helper.make_tensor_value_info(p + "sq", TensorProto.FLOAT, ["N", "T"])])
    else_g = helper.make_graph([helper.make_node("Identity", [x], [p + "id"])], p + "else", [],
                               [helper.make_tensor_value_info(p + "id", TensorProto.FLOAT, ["N", "C", "T"])])
    nodes.append(helper.make_node("If", [p + "cond"], [out], then_branch=then_g, else_branch=else_g))
    inits = [numpy_helper.from_array(np.array([1], np.int64), p + "one"),
             numpy_helper.from_array(np.array([0], np.int64), p + "zero"),
             numpy_helper.from_array(np.array([3], np.int64), p + "three")]
    return nodes, inits


def _block(p: str, rng, rank_test: bool):
    """If(squeeze) -> Unsqueeze 1 -> two Convs added (16 channels) -> Relu -> Conv 4 -> p + 'out'."""
    nodes, inits = _squeeze_if("x", p + "y", p, rank_test)
    nodes += [helper.make_node("Unsqueeze", [p + "y", p + "one"], [p + "y3"]),
              helper.make_node("Conv", [p + "y3", p + "W1", p + "B1"], [p + "c1"], pads=[1, 1]),
              helper.make_node("Conv", [p + "y3", p + "W1b"], [p + "c1b"], pads=[1, 1]),
              helper.make_node("Add", [p + "c1", p + "c1b"], [p + "s"]),
              helper.make_node("Relu", [p + "s"], [p + "r"]),
              helper.make_node("Conv", [p + "r", p + "W2"], [p + "out"])]
    for name, shape in (("W1", (16, 1, 3)), ("B1", (16,)), ("W1b", (16, 1, 3)), ("W2", (4, 16, 1))):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), p + name))
    return nodes, inits


def squeeze_if_model(channels=1, nested=False, rank_test=False) -> onnx.ModelProto:
    """x [N, channels, T]; channels 1: the condition is decided (Squeeze runs), 'C': open."""
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "T"])]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, "T"])
    if nested:  # each branch of an If on a caller's flag holds a block (weights inside)
        branches = {}
        for p in ("a_", "b_"):
            nodes, inits = _block(p, rng, rank_test)
            branches[p] = helper.make_graph(nodes, p + "g", [], [helper.make_tensor_value_info(
                p + "out", TensorProto.FLOAT, ["N", 4, "T"])], inits)
        nodes, inits = [helper.make_node("If", ["flag"], ["out"], then_branch=branches["a_"],
                                         else_branch=branches["b_"])], []
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    else:
        nodes, inits = _block("", rng, rank_test)
    graph = helper.make_graph(nodes, "g", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _runs(model):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 1, 9)).astype(np.float32)
    flags = [True, False] if any(i.name == "flag" for i in model.graph.input) else [None]
    return [sess.run(None, {"x": x} if f is None else {"x": x, "flag": np.array(f)})[0] for f in flags]


def _prove(model):
    """Permuted copy computes the same in ONNX Runtime (every branch); undo is byte-exact."""
    result = walk(model)
    record = forced_record(result, 3)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, result, record)
    for ref, got in zip(_runs(model), _runs(permuted)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    restored = onnx.ModelProto()
    restored.CopyFrom(permuted)
    apply_permutations(restored, walk(permuted), record.inverse())
    assert restored.SerializeToString() == model.SerializeToString()
    return result


def test_an_if_decided_by_a_fixed_dim_takes_its_branchs_shape():
    """Before: 0/32, 'Add with unknown ranks' after the If."""
    result = _prove(squeeze_if_model())
    assert result.coverage == 1.0 and result.permutable_channels == 32, result.pinned


def test_an_if_decided_by_the_rank_takes_its_branchs_shape():
    result = _prove(squeeze_if_model(rank_test=True))
    assert result.coverage == 1.0 and result.permutable_channels == 32, result.pinned


def test_a_decided_if_inside_another_ifs_branch():
    """The inner If's condition reads tensors of the outer branch (before: 0/64; its producers were
    not yet known when the condition was first evaluated, and that None was kept)."""
    result = _prove(squeeze_if_model(nested=True))
    assert result.coverage == 1.0 and result.permutable_channels == 64, result.pinned
    assert len(result.groups) == 2  # one block per outer branch


def test_an_open_condition_assumes_no_branch():
    """The counter-case: the tested dim is symbolic (1 or not, the caller decides): the If's output
    keeps no shape and the channels after it pin; the walk never guesses the branch."""
    result = walk(squeeze_if_model(channels="C"))
    assert result.coverage < 1.0
    assert any("unknown rank" in p.reason for p in result.pinned), result.pinned


# ---- decided by rank: the condition is open, but only one branch lets the graph run -----------------

def rank_if_model(consumer="Gemm", guarded=False) -> onnx.ModelProto:
    """x [N, 3, T] -> Conv 16 -> Relu -> x.squeeze(-1) as If(shape[-1] == 1, Squeeze, Identity), T
    symbolic -> consumer -> out. Gemm takes 2-D input only: only the Squeeze branch runs (silero's
    decoder: an LSTM cell after squeeze(-1)). MatMul takes either rank (the counter-case). guarded: the
    Gemm sits inside an If on the caller's flag (whose else branch takes any rank): a refusal there
    proves nothing, that node may never run."""
    rng = np.random.default_rng(3)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], kernel_shape=[1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["shp"]),
             helper.make_node("Gather", ["shp", "last"], ["t"], axis=0),
             helper.make_node("Equal", ["t", "one"], ["cond"])]
    then_g = helper.make_graph([helper.make_node("Squeeze", ["r", "last"], ["sq"])], "then", [],
                               [helper.make_tensor_value_info("sq", TensorProto.FLOAT, ["N", 16])])
    else_g = helper.make_graph([helper.make_node("Identity", ["r"], ["id"])], "else", [],
                               [helper.make_tensor_value_info("id", TensorProto.FLOAT, ["N", 16, "T"])])
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="squeeze_if", then_branch=then_g, else_branch=else_g))
    inits = [w("W1", 16, 3, 1), w("B1", 16), numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "T"])]
    # a bias added after the If: the Add needs the ranks (broadcast) to follow the channels
    nodes.append(helper.make_node("Add", ["y", "B2"], ["yb"]))
    inits.append(w("B2", 16))
    if consumer == "Gemm":
        head = [helper.make_node("Gemm", ["yb", "W2"], ["out"], name="gemm", transB=1)]
        inits.append(w("W2", 4, 16))
    else:
        head = [helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
                helper.make_node("MatMul", ["yb", "W2t"], ["out"], name="matmul")]
        inits.append(w("W2", 4, 16))
    if guarded:
        g_then = helper.make_graph(head, "gemm", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])])
        g_else = helper.make_graph([helper.make_node("ReduceSum", ["yb"], ["any"], keepdims=0)], "any", [],
                                   [helper.make_tensor_value_info("any", TensorProto.FLOAT, [])])
        head = [helper.make_node("If", ["flag"], ["o"], name="guard", then_branch=g_then, else_branch=g_else)]
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
        outputs = [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 4])]
    else:
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])]
    model = helper.make_model(helper.make_graph(nodes + head, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_an_open_if_that_only_one_branch_lets_run_is_that_branch():
    """Before: the Conv's 16 channels pinned at the Add (unknown rank after the If). The permuted
    copy agrees in ONNX Runtime where the graph runs (T = 1), and both refuse T = 3 alike."""
    model = rank_if_model()
    result = walk(model)
    assert result.coverage == 1.0 and result.permutable_channels == 16, result.pinned
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    record = forced_record(result, 3)
    apply_permutations(permuted, result, record)
    x = np.random.default_rng(1).standard_normal((2, 3, 1)).astype(np.float32)
    ref, got = (_session(m).run(None, {"x": x})[0] for m in (model, permuted))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for m in (model, permuted):
        with pytest.raises(Exception):
            _session(m).run(None, {"x": np.zeros((2, 3, 3), np.float32)})
    restored = onnx.ModelProto()
    restored.CopyFrom(permuted)
    apply_permutations(restored, walk(permuted), record.inverse())
    assert restored.SerializeToString() == model.SerializeToString()


def test_an_open_if_that_both_branches_let_run_stays_open():
    """The counter-case: MatMul takes [N, 16] and [N, 16, T] alike: no branch is assumed."""
    result = walk(rank_if_model(consumer="MatMul"))
    assert result.coverage < 1.0, result.pinned


def test_a_refusal_inside_another_open_if_proves_nothing():
    """The Gemm that refuses 3-D input runs only when the caller's flag is set: the If stays open."""
    result = walk(rank_if_model(guarded=True))
    assert result.coverage < 1.0, result.pinned


def test_trials_are_remembered_across_copies_with_other_weights():
    """by_rank's memo key ignores the values only value-blind ops read (the Conv's weight and bias),
    so a copy with other Conv weights reuses the trials; a float an Add reads (which shapes.py may
    evaluate) keys apart."""
    from onnx_resync.walk.branches import _memo_key
    from onnx_resync.walk.graph import _skeleton

    def changed(model, names):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for t in copy.graph.initializer:
            if t.name in names:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 1, t.name))
        return copy

    model = rank_if_model()
    assert _memo_key(_skeleton(changed(model, {"W1", "B1"}))) == _memo_key(_skeleton(model))
    assert _memo_key(_skeleton(changed(model, {"B2"}))) != _memo_key(_skeleton(model))
