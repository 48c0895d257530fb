"""tools/build_zoo.py's order and name transforms on a graph with bodies: every If/Loop body is
reordered and renamed too, a node whose body reads an outer tensor still comes after its producer,
and the copy computes what the source computes (ONNX Runtime, inputs by position)."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def _build_zoo():
    spec = importlib.util.spec_from_file_location("build_zoo", ROOT / "tools" / "build_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model() -> onnx.ModelProto:
    """x -> MatMul W -> Relu -> h; If(cond): then reads h (outer scope) through its own chain, else a
    second chain; several independent nodes on each side so that another order exists."""
    rng = np.random.default_rng(0)

    def branch(tag: str) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["h", f"{tag}_w"], [f"{tag}_a"]),
                 helper.make_node("Sigmoid", ["h"], [f"{tag}_b"]),
                 helper.make_node("Tanh", [f"{tag}_a"], [f"{tag}_c"]),
                 helper.make_node("Add", [f"{tag}_c", f"{tag}_b"], [f"{tag}_out"])]
        w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"{tag}_w")
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT,
                                                                                  None)], [w])

    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Relu", ["m"], ["h"]),
             helper.make_node("Neg", ["x"], ["n"]),
             helper.make_node("Abs", ["n"], ["k"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
             helper.make_node("Add", ["y", "k"], ["out"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(path: Path, cond: bool) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, [x, np.array(cond)])))[0]


def test_bodies_reordered_and_renamed(tmp_path):
    bz = _build_zoo()
    src = tmp_path / "src.onnx"
    onnx.save(_model(), src)
    for transform in ("reordered", "renamed"):
        dst = tmp_path / f"{transform}.onnx"
        getattr(bz, "t_" + transform)(src, dst, "m")
        copy = onnx.load(str(dst))
        onnx.checker.check_model(copy, full_check=True)
        body = next(a.g for n in copy.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
        if transform == "renamed":
            names = {x for n in body.node for x in list(n.input) + list(n.output)}
            assert not names & {"h", "then_w", "then_a", "then_out"}, names  # the body's names changed too
        for cond in (True, False):
            np.testing.assert_array_equal(_run(dst, cond), _run(src, cond))
