"""tools/vendor_zoo.py's unrelated twin redraws every float weight, the ones inside If/Loop/Scan
bodies too: silero_vad_if keeps all its weights in Constant nodes of its branches, and a twin that
redrew only the main graph's was the file itself ('derived, identical weights' counted as a false
verdict on a twin), and a quantized file's int8/uint8 codes (ddddocr's common_old: a twin with its
ConvInteger codes kept shared every neuron's direction with the file: 'derived, perturbed')."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.walk.graph import nested_graphs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _vendor_zoo():
    spec = importlib.util.spec_from_file_location("vendor_zoo", ROOT / "tools" / "vendor_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for g in nested_graphs(model.graph):
        out.update({t.name: numpy_helper.to_array(t) for t in g.initializer})
        out.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    return out


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def branch(tag: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), f"{tag}_w")
        nodes = [helper.make_node("Constant", [], [f"{tag}_w"], value=w),
                 helper.make_node("MatMul", ["x", f"{tag}_w"], [f"{tag}_y"])]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [1, 3])])

    nodes = [helper.make_node("MatMul", ["inp", "main_w"], ["x0"]),
             helper.make_node("Resize", ["x0", "", "scales"], ["x"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [1, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "main_w"),
                               numpy_helper.from_array(rng.integers(-127, 128, size=(4, 4)).astype(np.int8), "codes"),
                               numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
                               numpy_helper.from_array(np.array([1.0, 1.0], np.float32), "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_twin_redraws_the_weights_inside_bodies(tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "twin.onnx"
    onnx.save(_model(), src)
    _vendor_zoo().make_twin(src, dst)
    before, after = _weights(onnx.load(src)), _weights(onnx.load(dst))
    assert set(before) == {"main_w", "then_w", "else_w", "codes", "shape", "scales"} == set(after)
    assert np.array_equal(before["scales"], after["scales"])  # a Resize's scales are no weight
    for name in ("main_w", "then_w", "else_w", "codes"):
        assert not np.allclose(before[name], after[name]), name
    assert after["codes"].dtype == np.int8 and np.array_equal(before["shape"], after["shape"])  # a shape stays
