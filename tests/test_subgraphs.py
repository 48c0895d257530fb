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


# ---- generated Loop/Scan graphs: initial states x bodies x nesting (issue 15.4) ---------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

STEPS, UNITS = 3, 6


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _loop_body(op, branch_in_body, prefix=""):
    """One RNN step h' = act(x_t Wx + h Wh) as a Scan or Loop body; act is Tanh, or an If on `cond`
    between Gemm(s, Wt) -> Tanh and Sigmoid(s) (branch_in_body)."""
    p = prefix
    nodes = [helper.make_node("MatMul", ["xt", "wx"], [p + "a"]), helper.make_node("MatMul", [p + "hin", "wh"], [p + "b"]),
             helper.make_node("Add", [p + "a", p + "b"], [p + "s"])]
    if branch_in_body:
        then_g = helper.make_graph([helper.make_node("Gemm", [p + "s", "wt"], [p + "tg"], transB=1),
                                    helper.make_node("Tanh", [p + "tg"], [p + "tt"])], p + "then", [], [_vi(p + "tt", [2, UNITS])])
        else_g = helper.make_graph([helper.make_node("Sigmoid", [p + "s"], [p + "ee"])], p + "else", [],
                                   [_vi(p + "ee", [2, UNITS])])
        nodes.append(helper.make_node("If", ["cond"], [p + "hout"], then_branch=then_g, else_branch=else_g))
    else:
        nodes.append(helper.make_node("Tanh", [p + "s"], [p + "hout"]))
    nodes.append(helper.make_node("Identity", [p + "hout"], [p + "yt"]))
    state, outs = _vi(p + "hin", [2, UNITS]), [_vi(p + "hout", [2, UNITS]), _vi(p + "yt", [2, UNITS])]
    if op == "scan":
        nodes[0].input[0] = p + "xt"
        return helper.make_graph(nodes, p + "body", [state, _vi(p + "xt", [2, 4])], outs)
    nodes[0].input[0] = p + "xt"
    nodes = [helper.make_node("Gather", ["x", p + "it"], [p + "xt"], axis=0),
             helper.make_node("Identity", [p + "cin"], [p + "cout"])] + nodes
    return helper.make_graph(nodes, p + "body", [_vi(p + "it", [], TensorProto.INT64), _vi(p + "cin", [], TensorProto.BOOL),
                                                 state], [_vi(p + "cout", [], TensorProto.BOOL)] + outs)


def _rnn_node(op, h0, hT, ys, body):
    if op == "scan":
        return helper.make_node("Scan", [h0, "x"], [hT, ys], body=body, num_scan_inputs=1)
    return helper.make_node("Loop", ["trips", "", h0], [hT, ys], body=body)


def loop_graph(op="scan", start="producer", branch_in_body=False, wrap="none"):
    """x [3, 2, 4] -> (an initial state h0 [2, 6]) -> an RNN over the 3 steps as Scan or Loop -> the
    stacked states [3, 2, 6] -> MatMul Wo -> y.

    start: h0 is a Gemm of x[0] ('producer'), ConstantOfShape ('constant_of_shape'), a stored zero
    tensor ('stored_zeros'), a stored learned tensor ('stored'), a zero expanded ('expand').
    wrap: 'none'; 'loop_in_loop': an outer Loop of 2 trips carries the state into the RNN and back,
    stacking its states [2, 3, 2, 6]; 'loop_in_if': the RNN runs in an If's then-branch, the
    else-branch is x Wx with a Tanh (the same channels, no recurrence)."""
    rng = np.random.default_rng(3)
    inits = [_rng_init(rng, "wx", [4, UNITS]), _rng_init(rng, "wh", [UNITS, UNITS]), _rng_init(rng, "wo", [UNITS, 3]),
             numpy_helper.from_array(np.array(STEPS, dtype=np.int64), "trips"),
             numpy_helper.from_array(np.array(2, dtype=np.int64), "trips2"),
             numpy_helper.from_array(np.array(0, dtype=np.int64), "i0")]
    nodes = []
    if start == "producer":
        nodes += [helper.make_node("Gather", ["x", "i0"], ["x0"], axis=0), helper.make_node("Gemm", ["x0", "w0"], ["h0"], transB=1)]
        inits.append(_rng_init(rng, "w0", [UNITS, 4]))
    elif start == "constant_of_shape":
        inits.append(numpy_helper.from_array(np.array([2, UNITS], dtype=np.int64), "hshape"))
        nodes.append(helper.make_node("ConstantOfShape", ["hshape"], ["h0"]))
    elif start == "expand":
        inits += [numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
                  numpy_helper.from_array(np.array([2, UNITS], dtype=np.int64), "hshape")]
        nodes.append(helper.make_node("Expand", ["zero", "hshape"], ["h0"]))
    else:
        value = np.zeros((2, UNITS), np.float32) if start == "stored_zeros" else rng.standard_normal((2, UNITS)).astype(np.float32)
        inits.append(numpy_helper.from_array(value, "h0"))
    if branch_in_body:
        inits.append(_rng_init(rng, "wt", [UNITS, UNITS]))
    body = _loop_body(op, branch_in_body)
    inputs = [_vi("x", [STEPS, 2, 4]), _vi("cond", [], TensorProto.BOOL)]
    if wrap == "loop_in_loop":
        inner = _rnn_node(op, "g", "gT", "ys", body)
        outer = helper.make_graph([helper.make_node("Identity", ["oc"], ["ocout"]), inner], "outer",
                                  [_vi("oit", [], TensorProto.INT64), _vi("oc", [], TensorProto.BOOL), _vi("g", [2, UNITS])],
                                  [_vi("ocout", [], TensorProto.BOOL), _vi("gT", [2, UNITS]), _vi("ys", [STEPS, 2, UNITS])])
        nodes += [helper.make_node("Loop", ["trips2", "", "h0"], ["hT", "yss"], body=outer),
                  helper.make_node("MatMul", ["yss", "wo"], ["y"])]
        y_shape = [2, STEPS, 2, 3]
    elif wrap == "loop_in_if":
        then_g = helper.make_graph([_rnn_node(op, "h0", "hT", "ys", body)], "then", [], [_vi("ys", [STEPS, 2, UNITS])])
        else_g = helper.make_graph([helper.make_node("MatMul", ["x", "wx"], ["xe"]), helper.make_node("Tanh", ["xe"], ["ye"])],
                                   "else", [], [_vi("ye", [STEPS, 2, UNITS])])
        nodes += [helper.make_node("If", ["cond"], ["yb"], then_branch=then_g, else_branch=else_g),
                  helper.make_node("MatMul", ["yb", "wo"], ["y"])]
        y_shape = [STEPS, 2, 3]
    else:
        nodes += [_rnn_node(op, "h0", "hT", "ys", body), helper.make_node("MatMul", ["ys", "wo"], ["y"])]
        y_shape = [STEPS, 2, 3]
    model = _model(nodes, inputs, [_out("y", y_shape)], inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run_loop(model, cond, seed=1):
    feeds = {"x": np.random.default_rng(seed).standard_normal((STEPS, 2, 4)).astype(np.float32), "cond": np.array(cond)}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def prove_loop(model, seed=3):
    """Permute every group (never the identity); ORT agrees on both conditions; exactly the slotted
    weights change; undo byte-exact; resync restores every weight's bytes."""
    result = walk(model)
    record = forced_record(result, seed)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, result, record)
    for cond in (True, False):
        ref, got = _run_loop(model, cond), _run_loop(permuted, cond)
        assert np.max(np.abs(ref - got)) <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), cond
    a, b = WeightStore(model), WeightStore(permuted)
    changed = {n for n in a.names() if a.get(n).tobytes() != b.get(n).tobytes()}
    one_valued = {n for n in a.names() if a.get(n).size and (a.get(n) == a.get(n).reshape(-1)[0]).all()}
    assert changed == {s.weight for g in result.groups for s in g.slots} - one_valued
    again = walk(permuted)
    restored = onnx.ModelProto()
    restored.CopyFrom(permuted)
    apply_permutations(restored, again, record.inverse())
    assert restored.SerializeToString() == model.SerializeToString()
    back, _ = resync(permuted, model, check=False)
    c = WeightStore(back)
    assert all(a.get(n).tobytes() == c.get(n).tobytes() for n in a.names())
    return result


@settings(max_examples=14, deadline=None, derandomize=True)
@given(op=st.sampled_from(["scan", "loop"]),
       start=st.sampled_from(["producer", "constant_of_shape", "stored_zeros", "stored", "expand"]),
       branch_in_body=st.booleans(), wrap=st.sampled_from(["none", "loop_in_loop", "loop_in_if"]))
def test_generated_loops_are_followed(op, start, branch_in_body, wrap):
    """Every initial state (a producer's channels, zeros filled or stored, a learned stored state: its
    slot), with or without an If in the body, alone or in a Loop or an If: the RNN's channels move
    with the state's (coverage 100%), exactly."""
    result = prove_loop(loop_graph(op, start, branch_in_body, wrap))
    assert result.coverage == 1.0, result.pinned
    (g,) = result.groups
    slots = {(s.weight, s.axis) for s in g.slots}
    assert {("wx", 1), ("wh", 0), ("wh", 1), ("wo", 0)} <= slots
    assert (("h0", 1) in slots) == start.startswith("stored")


@pytest.mark.parametrize("wrap", ["none", "loop_in_loop"])
def test_a_loop_state_the_caller_feeds_is_interface(wrap):
    """The counter-case: h0 is a graph input: its order is the caller's, so the state never takes the
    body's channels (not even zeros' way); the RNN's units line up with the input (interface) and
    do not move. Without the input (a ConstantOfShape start) the same graph moves them."""
    model = loop_graph("scan", "constant_of_shape", wrap=wrap)
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "ConstantOfShape"))
    model.graph.input.append(_vi("h0", [2, UNITS]))
    onnx.checker.check_model(model, full_check=True)
    result = walk(model)
    assert result.permutable_channels == 0 and result.input_channels == 12, result.pinned
    assert any(p.reason.startswith("meets graph input 'h0'") for p in result.pinned), result.pinned
    assert walk(loop_graph("scan", "constant_of_shape", wrap=wrap)).permutable_channels == 12


def test_an_inner_state_whose_outer_state_takes_no_channels_pins():
    """The counter-case of speculation: the outer Loop starts its state as zeros but writes back x[0]
    padded (no channels, not one value): from the outer's second trip the inner Scan starts from
    values in a fixed order, so the inner state must not take channels (a last pass without
    speculation); its channels pin, and what moves is exact at every trip."""
    model = loop_graph("scan", "constant_of_shape", wrap="loop_in_loop")
    outer = next(n for n in model.graph.node if n.op_type == "Loop").attribute[0].g
    outer.node.extend([helper.make_node("Gather", ["x", "i0"], ["xg"], axis=0),
                       helper.make_node("Pad", ["xg", "pads"], ["gx"])])
    outer.output[1].name = "gx"
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 2], dtype=np.int64), "pads"))
    onnx.checker.check_model(model, full_check=True)
    result = prove_loop(model)
    assert result.permutable_channels == 0, result.groups
    assert any("does not line up" in p.reason for p in result.pinned), result.pinned


def list_loop(start="empty"):
    """x [3, 2, 4] -> a Loop appending tanh(x_t Wx) to a list (SequenceInsert), stacked after
    (ConcatFromSequence, new axis 0) -> MatMul Wo. start: the list starts empty ('empty') or holding
    x[0] padded to 6 ('input': the caller's values, in their own order)."""
    rng = np.random.default_rng(4)
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "it"], ["xt"], axis=0), helper.make_node("MatMul", ["xt", "wx"], ["a"]),
         helper.make_node("Tanh", ["a"], ["ht"]), helper.make_node("SequenceInsert", ["sin", "ht"], ["sout"]),
         helper.make_node("Identity", ["cin"], ["cout"])], "body",
        [_vi("it", [], TensorProto.INT64), _vi("cin", [], TensorProto.BOOL),
         helper.make_tensor_sequence_value_info("sin", TensorProto.FLOAT, None)],
        [_vi("cout", [], TensorProto.BOOL), helper.make_tensor_sequence_value_info("sout", TensorProto.FLOAT, None)])
    nodes = []
    if start == "empty":
        nodes.append(helper.make_node("SequenceEmpty", [], ["s0"], dtype=TensorProto.FLOAT))
    else:
        nodes += [helper.make_node("Gather", ["x", "i0"], ["x0"], axis=0), helper.make_node("Pad", ["x0", "pads"], ["x0p"]),
                  helper.make_node("SequenceConstruct", ["x0p"], ["s0"])]
    nodes += [helper.make_node("Loop", ["trips", "", "s0"], ["sT"], body=body),
              helper.make_node("ConcatFromSequence", ["sT"], ["ys"], axis=0, new_axis=1),
              helper.make_node("MatMul", ["ys", "wo"], ["y"])]
    inits = [_rng_init(rng, "wx", [4, UNITS]), _rng_init(rng, "wo", [UNITS, 3]),
             numpy_helper.from_array(np.array(STEPS, dtype=np.int64), "trips"),
             numpy_helper.from_array(np.array(0, dtype=np.int64), "i0"),
             numpy_helper.from_array(np.array([0, 0, 0, 2], dtype=np.int64), "pads")]
    model = _model(nodes, [_vi("x", [STEPS, 2, 4])], [_out("y", [2, None, 3])], inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_list_built_in_a_loop_is_followed():
    """An empty list carried by the Loop takes the layout its body appends: Wx's channels move with
    Wo's rows; permute + ORT, undo byte-exact, resync exact."""
    model = list_loop()
    model.graph.input.append(_vi("cond", [], TensorProto.BOOL))  # (prove_loop feeds one)
    result = prove_loop(model)
    assert result.coverage == 1.0 and result.permutable_channels == UNITS, result.pinned


def test_a_list_that_starts_with_the_callers_values_pins():
    """The counter-case: the list starts holding x[0] (in the caller's order), so the channels
    appended to it would sit beside unpermuted values: they pin with the reason."""
    model = list_loop("input")
    model.graph.input.append(_vi("cond", [], TensorProto.BOOL))
    result = prove_loop(model)
    assert result.permutable_channels == 0
    assert any("a sequence holds tensors with and without these channels" in p.reason for p in result.pinned), result.pinned
