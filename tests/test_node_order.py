"""The loader accepts graphs written out of topological order, as ONNX Runtime does (io/order.py):
onnxruntime.transformers' float16 converter with keep_io_types appends the input Cast after its
readers. A sorted file's bytes never change; what neither can read is refused in one whole line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.errors import LoadError
from onnx_resync.io.load import load_model
from onnx_resync.io.order import sort_nodes


def _model(nodes, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, 3]) for o in outputs],
                              [numpy_helper.from_array(np.ones((3, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_unsorted_graph_is_sorted_on_load(tmp_path):
    """The Cast at the end (as the float16 converter writes it), an If whose branch reads a tensor
    written after the If: sorted stably, computing what ONNX Runtime computes from the file."""
    then = helper.make_graph([helper.make_node("Relu", ["m"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["m"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("MatMul", ["xc", "w"], ["m"], name="matmul"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other),
        helper.make_node("Constant", [], ["cond"], name="cond", value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Cast", ["x"], ["xc"], name="cast", to=TensorProto.FLOAT),
    ]
    model = _model(nodes)
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, path)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    loaded = load_model(path)
    assert [n.name for n in loaded.graph.node] == ["cast", "matmul", "cond", "if"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    np.testing.assert_array_equal(_run(loaded, x)[0], _run(model, x)[0])


def test_sorted_graph_keeps_its_bytes():
    """Nodes in a valid order that is not Kahn's first choice stay where they are."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["x"], ["b"], name="b"),
             helper.make_node("Add", ["b", "a"], ["y"], name="y")]
    model = _model(nodes)
    before = model.SerializeToString()
    assert not sort_nodes(model.graph)
    assert model.SerializeToString() == before


def test_cycle_is_refused_in_one_whole_line(tmp_path):
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2"),
             helper.make_node("Add", ["a", "x"], ["y"], name="add")]
    path = tmp_path / "cycle.onnx"
    onnx.save(_model(nodes), path)
    with pytest.raises(LoadError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and "topologically sorted" in message and "r1" in message, message


def test_unsorted_file_round_trips_byte_exact(tmp_path):
    """permute then undo of a file the loader had to sort gives the file's own bytes: a save puts
    the nodes back in the file's order (and drops the loader's note of it)."""
    from onnx_resync import api

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")
    nodes = [  # the input Cast written last, as the float16 converter does
        helper.make_node("MatMul", ["xc", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        helper.make_node("Cast", ["x"], ["xc"], name="cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src, perm, back = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "b.onnx"
    onnx.save(model, src)
    api.permute(src, perm, seed=1, record_path=tmp_path / "r.json")
    assert [n.name for n in onnx.load(perm).graph.node] == ["fc1", "relu", "fc2", "cast"]
    api.permute(perm, back, undo=tmp_path / "r.json")
    assert back.read_bytes() == src.read_bytes()
