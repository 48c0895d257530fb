"""Recurrent cells' zero initial states (audit/passes/recurrent.py): torch.onnx writes them as
ConstantOfShape of the batch's shape, onnxslim folds that into a zero initializer once the batch is
fixed (ddddocr's LSTM: 'cannot align LSTM_79 ... the suspect's has weights 2x1x512, 2x1x512 too').
Both are the op's default: the canonical cell has no initial_h / initial_c, computes what the file
computes, and the audit of the simplified copy says derived; a learned (non-zero) state stays a weight.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import api
from onnx_resync.audit.canonical import canonicalize

RNG = np.random.default_rng(5)
T, I, H = 5, 6, 8


def _w(*shape):
    return (RNG.normal(size=shape) * 0.4).astype(np.float32)


def _exported(initial=None) -> onnx.ModelProto:
    """A bidirectional LSTM as torch.onnx writes it: zero states of the batch's shape (or `initial`,
    a constant state), Y's directions moved next to the hidden axis, a projection."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch1"]),
        helper.make_node("Concat", ["two", "batch1", "hidden"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], ["h0"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("ConstantOfShape", ["state_shape"], ["c0"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0" if initial is None else "h_init",
                                  "c0" if initial is None else "c_init"], ["y", "", ""],
                         direction="bidirectional", hidden_size=H),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "flat"], ["yf"]),
        helper.make_node("MatMul", ["yf", "P"], ["out"]),
    ]
    inits = {"one": np.array(1, np.int64), "zero_axis": np.array([0], np.int64), "two": np.array([2], np.int64),
             "hidden": np.array([H], np.int64), "W": _w(2, 4 * H, I), "R": _w(2, 4 * H, H), "B": _w(2, 8 * H),
             "flat": np.array([0, 0, 2 * H], np.int64), "P": _w(2 * H, 3)}
    if initial is not None:
        inits["h_init"], inits["c_init"] = initial, initial
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, 1, I])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [T, 1, 3])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    onnxslim = pytest.importorskip("onnxslim")
    return onnxslim.slim(model)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _lstm(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "LSTM")


def test_zero_states_are_the_default_in_both_forms():
    ref = _exported()
    slim = _slim(ref)
    inits = {t.name for t in slim.graph.initializer}
    assert _lstm(slim).input[5] in inits and _lstm(slim).input[6] in inits  # onnxslim folded the states
    x = RNG.normal(size=(T, 1, I)).astype(np.float32)
    for model in (ref, slim):
        canon = canonicalize(model).model
        assert list(_lstm(canon).input)[4:] == [], list(_lstm(canon).input)
        assert not any(n.op_type == "ConstantOfShape" for n in canon.graph.node)
        np.testing.assert_allclose(_run(canon, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_simplified_copy_is_derived():
    ref = _exported()
    slim = _slim(ref)
    report = api.audit(slim, ref)
    assert report.derived and report.verdict == "identical", report.summary
    permuted, info = api.permute(slim, seed=3)
    assert info.verified and info.neurons_moved > 0
    report = api.audit(permuted, ref)
    assert report.derived and report.verdict == "permuted", report.summary


def test_a_learned_initial_state_stays_a_weight():
    model = _exported(initial=_w(2, 1, H))
    canon = canonicalize(model).model
    inputs = list(_lstm(canon).input)
    assert len(inputs) == 7 and inputs[5] and inputs[6], inputs
    x = RNG.normal(size=(T, 1, I)).astype(np.float32)
    np.testing.assert_allclose(_run(canon, x), _run(model, x), rtol=1e-5, atol=1e-5)
