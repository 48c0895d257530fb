"""Honest coverage (issue 15.7) and subgraphs (issue 15.4).

Channels that must line up with a graph input's values (a recurrent state the caller feeds) are
interface, counted apart like channels that reach outputs, and their pin names the input; a model
with nothing to permute says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.cli import main
from onnx_resync.walk import walk

from test_shapes import _prove, _rng_init

OPSET = 17


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def state_cell(h=4, transform_state=False):
    """x -> Gemm A -> Relu -> Gemm z -> Sigmoid; h' = z * state + Gemm n(x): the units of z and n line
    up with the state the caller feeds (interface); A's units are free. transform_state: the state
    goes through Exp first (a computed tensor, not the input's values)."""
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, "batch", h])]
    nodes = [
        helper.make_node("Gemm", ["x", "wa", "ba"], ["a"], transB=1),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Gemm", ["ar", "wz"], ["zl"], transB=1),
        helper.make_node("Sigmoid", ["zl"], ["z"]),
        helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0),  # the layer's state, as torch writes it
    ]
    state = "s0"
    if transform_state:
        nodes.append(helper.make_node("Exp", ["s0"], ["s0e"]))
        state = "s0e"
    nodes += [
        helper.make_node("Mul", ["z", state], ["zs"]),
        helper.make_node("Gemm", ["x", "wn"], ["n"], transB=1),
        helper.make_node("Add", ["zs", "n"], ["hn"]),
        helper.make_node("Gemm", ["hn", "wo"], ["y"], transB=1),
    ]
    inits = [_rng_init(rng, "wa", [6, 3]), _rng_init(rng, "ba", [6]), _rng_init(rng, "wz", [h, 6]),
             _rng_init(rng, "wn", [h, 3]), _rng_init(rng, "wo", [2, h]),
             numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], inits)


def test_channels_that_meet_a_state_input_are_interface():
    result = _prove(state_cell())
    assert result.input_channels == 8  # z's 4 and n's 4 units line up with the caller's state
    assert result.coverage == 1.0 and result.permutable_channels == 6
    reasons = [p.reason for p in result.pinned if p.channels == 8]
    assert reasons and reasons[0].startswith("meets graph input 'state'"), result.pinned


def test_a_computed_tensor_keeps_the_rules_reason():
    """The counter-case: the same cell on Exp(state) (not the input's values) pins as before and
    counts against coverage."""
    result = walk(state_cell(transform_state=True))
    assert result.input_channels == 0
    assert result.coverage < 1.0
    assert any("mixes channels with an unlabelled tensor" in p.reason for p in result.pinned), result.pinned


def test_nothing_to_permute_is_said(tmp_path, capsys):
    """Only interface channels: coverage is None in JSON and 'nothing to permute' in text, never 0/0 = 100%."""
    model = state_cell()
    g = model.graph
    keep = [n for n in g.node if n.output[0] not in ("a", "ar")]
    for n in keep:
        if n.output[0] == "zl":
            n.input[0] = "x"
    for init in g.initializer:
        if init.name == "wz":
            init.CopyFrom(numpy_helper.from_array(np.ones([4, 3], dtype=np.float32), "wz"))
    del g.node[:]
    g.node.extend(keep)
    result = walk(model)
    assert result.inner_channels == 0 and result.to_dict()["coverage"] is None
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["groups", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "nothing to permute" in out and "meet graph inputs (interface)" in out


# ---- If branches (issue 15.4) ----------------------------------------------------------------------
import onnxruntime as ort  # noqa: E402

from onnx_resync.api import resync  # noqa: E402
from onnx_resync.io.store import WeightStore  # noqa: E402
from onnx_resync.permute import apply_permutations  # noqa: E402
from test_walk_properties import check_slots, forced_record  # noqa: E402


def _out(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _branch(name, nodes, out, inits=()):
    return helper.make_graph(nodes, name, [], [_out(out, [2, 6])], list(inits))


def if_model(constant_cond=None, weights_in_branches=True, else_unlabelled=False):
    """x -> Gemm W1 -> Relu -> h; If(cond): then Gemm(h, Wt) -> Relu, else Gemm(h, We) -> Sigmoid
    (weights as branch initializers, or as Constant nodes inside the branch); z -> Gemm Wo -> y.
    constant_cond: the condition is a Constant (only that branch runs), else a graph input.
    else_unlabelled: the else branch returns a computed tensor with no channels (the counter-case)."""
    rng = np.random.default_rng(7)
    wt, we = _rng_init(rng, "Wt", [6, 5]), _rng_init(rng, "We", [6, 5])
    then_nodes = [helper.make_node("Gemm", ["h", "Wt"], ["tg"], transB=1), helper.make_node("Relu", ["tg"], ["t"])]
    if else_unlabelled:
        else_nodes = [helper.make_node("Constant", [], ["e"], value=_rng_init(rng, "ev", [2, 6]))]
    else:
        else_nodes = [helper.make_node("Gemm", ["h", "We"], ["eg"], transB=1),
                      helper.make_node("Sigmoid", ["eg"], ["e"])]
    if weights_in_branches:
        then_g, else_g = _branch("then", then_nodes, "t", [wt]), _branch("else", else_nodes, "e", [we])
    else:  # as Constant nodes
        then_g = _branch("then", [helper.make_node("Constant", [], ["Wt"], value=wt)] + then_nodes, "t")
        else_g = _branch("else", [helper.make_node("Constant", [], ["We"], value=we)] + else_nodes, "e")
    inputs = [_out("x", [2, 3])]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["g1"], transB=1), helper.make_node("Relu", ["g1"], ["h"])]
    if constant_cond is None:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    else:
        nodes.append(helper.make_node("Constant", [], ["cond"],
                                      value=numpy_helper.from_array(np.array(constant_cond), "c")))
    nodes += [helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g),
              helper.make_node("Gemm", ["z", "Wo"], ["y"], transB=1)]
    inits = [_rng_init(rng, "W1", [5, 3]), _rng_init(rng, "b1", [5]), _rng_init(rng, "Wo", [2, 6])]
    return _model(nodes, inputs, [_out("y", [2, 2])], inits)


def _run(model, cond):
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)}
    if any(i.name == "cond" for i in model.graph.input):
        feeds["cond"] = np.array(cond)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _prove_branches(model):
    """Permute every group; ORT agrees on both conditions; the weights inside branches moved; undo is
    byte-exact; resync restores every weight's bytes."""
    onnx.checker.check_model(model, full_check=True)
    result = walk(model)
    check_slots(model, result) if not any(n.op_type == "If" for n in model.graph.node) else None
    record = forced_record(result, 3)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, result, record)
    for cond in (True, False):
        ref, got = _run(model, cond), _run(permuted, cond)
        assert np.max(np.abs(ref - got)) <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), cond
    again = walk(permuted)
    restored = onnx.ModelProto()
    restored.CopyFrom(permuted)
    apply_permutations(restored, again, record.inverse())
    assert restored.SerializeToString() == model.SerializeToString()
    back, _ = resync(permuted, model, check=False)
    a, b = WeightStore(model), WeightStore(back)
    assert all(a.get(n).tobytes() == b.get(n).tobytes() for n in a.names())
    moved = {s.weight for g in result.groups for s in g.slots}
    changed = {n for n in WeightStore(model).names()
               if WeightStore(model).get(n).tobytes() != WeightStore(permuted).get(n).tobytes()}
    assert changed == moved
    return result


def test_both_branches_are_walked_and_their_outputs_unified():
    result = _prove_branches(if_model())
    assert result.coverage == 1.0, result.pinned
    slotted = {s.weight for g in result.groups for s in g.slots}
    assert {"Wt", "We", "Wo", "W1"} <= slotted  # weights inside both branches move
    (joint,) = [g for g in result.groups if any(s.weight == "Wt" and s.axis == 0 for s in g.slots)]
    assert any(s.weight == "We" and s.axis == 0 for s in joint.slots)  # one channel across the branches


def test_weights_as_constant_nodes_inside_branches():
    result = _prove_branches(if_model(weights_in_branches=False))
    assert result.coverage == 1.0, result.pinned


def test_a_constant_condition_walks_its_branch_as_if_inlined():
    result = _prove_branches(if_model(constant_cond=True, else_unlabelled=True))
    assert result.coverage == 1.0 and result.hidden_channels == 5 + 6 + 2, result.pinned
    assert "We" not in {s.weight for g in result.groups for s in g.slots}


def test_branches_that_disagree_pin_with_the_reason():
    """The counter-case: one branch returns channels, the other a constant: the If's output pins."""
    result = _prove_branches(if_model(else_unlabelled=True))
    assert result.coverage < 1.0
    assert any("branches carry different channels" in p.reason for p in result.pinned), result.pinned


@pytest.mark.vendor
def test_vendor_decoder_state_channels_are_interface():
    """arabic_gru_decoder (a GRU cell written out by torch.onnx, fed its state `hidden` and the
    encoder's `memory`): the gate chunks sliced at bounds computed from Shape line up with the state,
    interface; before issue 15 they pinned as 'Slice with non-constant bounds' (512/2817)."""
    from onnx_resync.api import permute
    from onnx_resync.io import load_model
    from vendor_models import vendor_model

    model = load_model(vendor_model("arabic_gru_decoder"))
    result = walk(model)
    assert result.input_channels == 3328 and result.permutable_channels == 512, result.pinned
    assert {p.reason.split(" (")[0] for p in result.pinned if p.channels >= 256} >= {
        "meets graph input 'hidden'", "meets graph input 'memory'"}
    assert not any("non-constant bounds" in p.reason for p in result.pinned)
    permuted, info = permute(model, seed=5)
    assert info.verified and info.neurons_moved > 0
    restored, _ = permute(permuted, undo=info.record, check=False)
    assert restored.SerializeToString() == model.SerializeToString()


def test_nested_if_and_a_weight_that_leaves_a_branch():
    """An If inside the then-branch (both walked), and an else-branch that returns a stored weight
    (broadcast against the channels outside): the weight keeps its order, the rest still moves."""
    rng = np.random.default_rng(9)
    inner = helper.make_node("If", ["cond2"], ["ti"], name="inner",
                             then_branch=_branch("t2", [helper.make_node("Relu", ["tg"], ["t2o"])], "t2o"),
                             else_branch=_branch("e2", [helper.make_node("Sigmoid", ["tg"], ["e2o"])], "e2o"))
    then_g = _branch("then", [helper.make_node("Gemm", ["h", "Wt"], ["tg"], transB=1), inner], "ti",
                     [_rng_init(rng, "Wt", [6, 5])])
    else_g = _branch("else", [helper.make_node("Identity", ["We"], ["e"])], "e", [_rng_init(rng, "We", [2, 6])])
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["g1"], transB=1), helper.make_node("Relu", ["g1"], ["h"]),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Gemm", ["z", "Wo"], ["y"], transB=1)]
    inputs = [_out("x", [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("cond2", TensorProto.BOOL, [])]
    model = _model(nodes, inputs, [_out("y", [2, 2])],
                   [_rng_init(rng, "W1", [5, 3]), _rng_init(rng, "b1", [5]), _rng_init(rng, "Wo", [2, 6])])
    onnx.checker.check_model(model, full_check=True)
    result = walk(model)
    slotted = {s.weight for g in result.groups for s in g.slots}
    assert "We" not in slotted and "W1" in slotted  # the weight that leaves a branch stays; h's units move
    assert any("branches carry different channels" in p.reason for p in result.pinned), result.pinned
    record = forced_record(result, 2)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, result, record)
    for c1 in (True, False):
        for c2 in (True, False):
            feeds = {"x": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32),
                     "cond": np.array(c1), "cond2": np.array(c2)}
            runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                    for m in (model, permuted)]
            np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, atol=1e-6)


def test_channels_inside_a_loop_body_are_counted():
    """A Loop body's producers' channels count (the model has something to permute, not nothing).
    Bodies are followed since test_walk_followups: the body's 8 reach the graph output as a scan
    output (interface), fc1's 8 move."""
    from test_walk_safety import _loop_model

    result = walk(_loop_model(False))
    assert result.hidden_channels == 8 + 8 + 3
    assert ("reaches a graph output", 8 + 3) in [(p.reason, p.channels) for p in result.pinned]
    assert result.coverage == 1.0
