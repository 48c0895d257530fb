"""ONNX Runtime's NCHWc save of convolutions whose channel counts are not a multiple of the block
(audit/passes/nchwc.py): the padded channels are dropped again (the reference's shapes), the
canonical model computes what the saved file computes under ONNX Runtime, and padding that a reader
would read is never dropped. The files are ONNX Runtime's own saves at the "all" level (what a vendor
ships when it saves an optimized model on a CPU with AVX2 or AVX-512).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit.canonical import canonicalize
from onnx_resync.audit.passes.nchwc import NCHWC, machine_block_size

RNG = np.random.default_rng(3)


def _w(*shape):
    return (RNG.normal(size=shape) * 0.3).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _saved_all_level(model: onnx.ModelProto, path) -> onnx.ModelProto:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def _padded_net() -> onnx.ModelProto:
    """The forms PaddleOCR's and ddddocr's convolutions take: an image conv of 24 channels, a
    depthwise conv on them (the padded channels go through it), a conv of 20 channels whose output is
    added back after x * Sigmoid(x) and a conv (the Sum input of an nchwc Conv), HardSwish written
    out in Add/Clip/Mul/Div (standard ops: ONNX Runtime reorders out and back in, padding the 20
    input channels of the last conv)."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "wd", "bd"], ["d0"], pads=[1, 1, 1, 1], group=24),
        helper.make_node("Relu", ["d0"], ["r1"]),
        helper.make_node("Conv", ["r1", "w1", "b1"], ["c1"]),
        helper.make_node("Sigmoid", ["c1"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["g1"]),
        helper.make_node("Conv", ["g1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "g1"], ["a2"]),
        helper.make_node("Add", ["a2", "three"], ["h0"]),
        helper.make_node("Clip", ["h0", "zero", "six"], ["h1"]),
        helper.make_node("Mul", ["a2", "h1"], ["h2"]),
        helper.make_node("Div", ["h2", "six"], ["h3"]),
        helper.make_node("Conv", ["h3", "w3", "b3"], ["y"]),
    ]
    inits = {"w0": _w(24, 3, 3, 3), "b0": _w(24), "wd": _w(24, 1, 3, 3), "bd": _w(24), "w1": _w(20, 24, 1, 1),
             "b1": _w(20), "w2": _w(20, 20, 3, 3), "b2": _w(20), "w3": _w(16, 20, 1, 1), "b3": _w(16),
             "three": np.float32(3), "zero": np.float32(0), "six": np.float32(6)}
    graph = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 12])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _conv_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    inits = {t.name: t for t in model.graph.initializer}
    return sorted(tuple(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "Conv")


@pytest.fixture
def saved(tmp_path):
    if machine_block_size() is None:
        pytest.skip("this machine's ONNX Runtime writes no NCHWc layout")
    model = _padded_net()
    saved = _saved_all_level(model, tmp_path / "all.onnx")
    ops = {(n.domain, n.op_type) for n in saved.graph.node}
    assert {(NCHWC, "Conv"), (NCHWC, "ReorderInput"), (NCHWC, "ReorderOutput")} <= ops, ops
    return model, saved


def test_padded_channels_are_dropped_back_to_the_reference_shapes(saved):
    model, saved = saved
    b = machine_block_size()
    padded = {tuple(t.dims) for t in saved.graph.initializer if len(t.dims) == 4}
    assert (-(-24 // b) * b, 1, 3, 3) in padded  # the depthwise conv is stored padded
    canon = canonicalize(saved).model
    assert all(n.domain in ("", "ai.onnx") for n in canon.graph.node)
    assert _conv_shapes(canon) == _conv_shapes(model)
    x = RNG.normal(size=(1, 3, 12, 12)).astype(np.float32)
    for a, b_, c in zip(_run(canon, x), _run(saved, x), _run(model, x)):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


def test_padding_a_reader_reads_is_kept(saved):
    """A padded input column of the conv after x * Sigmoid(x) made non-zero (the padded channels hold
    zeros there, so the file computes the same): dropping the padding would no longer be checked
    exact, so the region is left as it is."""
    _, saved = saved
    b = machine_block_size()
    inits = {t.name: t for t in saved.graph.initializer}
    node = next(n for n in saved.graph.node if n.domain == NCHWC and n.op_type == "Conv" and len(n.input) > 3
                and n.input[3])
    D = numpy_helper.to_array(inits[node.input[1]]).copy()
    O, I, kh, kw = D.shape
    assert I > 20
    blocks = D.reshape(O // b, I // b, kh * kw, b, b)
    blocks[:, -1, :, 21 % b, :] = 0.5  # input channel 21: padding
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(blocks.reshape(D.shape), node.input[1]))
    canon = canonicalize(saved)
    assert any(n.domain == NCHWC for n in canon.model.graph.node)
    assert not any(what.startswith("NCHWc block size") for what in canon.changes)


def test_channels_last_input_and_a_squeeze_excite_block(tmp_path):
    """An NHWC input of 20 channels (ReorderInput channels_last pads it), a depthwise conv, and a
    squeeze-excite block in standard ops (GlobalAveragePool, conv, Sigmoid, Mul: ONNX Runtime reorders
    out and back in around them, each ReorderInput padding 24 channels): the reference's shapes, the
    file's outputs."""
    if machine_block_size() is None:
        pytest.skip("this machine's ONNX Runtime writes no NCHWc layout")
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "wd", "bd"], ["c1"], pads=[1, 1, 1, 1], group=24),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Conv", ["p", "w2", "b2"], ["c2"]), helper.make_node("Sigmoid", ["c2"], ["s2"]),
             helper.make_node("Mul", ["r1", "s2"], ["m"]),
             helper.make_node("Conv", ["m", "w3", "b3"], ["c3"]),
             helper.make_node("Transpose", ["c3"], ["y"], perm=[0, 2, 3, 1])]
    inits = {"w0": _w(24, 20, 3, 3), "b0": _w(24), "wd": _w(24, 1, 3, 3), "bd": _w(24), "w2": _w(24, 24, 1, 1),
             "b2": _w(24), "w3": _w(12, 24, 1, 1), "b3": _w(12)}
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 12])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    saved = _saved_all_level(model, tmp_path / "nhwc.onnx")
    assert any(n.op_type == "ReorderInput" and any(a.name == "channels_last" and a.i for a in n.attribute)
               for n in saved.graph.node)
    canon = canonicalize(saved).model
    assert all(n.domain in ("", "ai.onnx") for n in canon.graph.node)
    assert _conv_shapes(canon) == _conv_shapes(model)
    x = RNG.normal(size=(1, 8, 8, 20)).astype(np.float32)
    np.testing.assert_allclose(_run(canon, x)[0], _run(saved, x)[0], rtol=1e-4, atol=1e-4)
