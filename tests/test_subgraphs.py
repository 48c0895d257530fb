"""Honest coverage (issue 15.7) and subgraphs (issue 15.4).

Channels that must line up with a graph input's values (a recurrent state the caller feeds) are
interface, counted apart like channels that reach outputs, and their pin names the input; a model
with nothing to permute says so.
"""

from __future__ import annotations

import numpy as np
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
