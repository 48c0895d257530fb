"""The loader accepts ops that ONNX Runtime registers in the standard domain and onnx does not define
(SimplifiedLayerNormalization, as the onnxruntime-genai builder writes it), with weights inline or in
an external data file; an op neither knows is still refused in one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.errors import LoadError
from onnx_resync.io import load_model


def _rms_model(op: str = "SimplifiedLayerNormalization") -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 2048, dtype=np.float32), "scale")
    node = helper.make_node(op, ["x", "scale"], ["y"], epsilon=1e-5, axis=-1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("external", [False, True])
def test_runtime_standard_domain_op_loads(tmp_path, external):
    import onnxruntime as ort

    path = tmp_path / "rms.onnx"
    onnx.save(_rms_model(), str(path), save_as_external_data=external, size_threshold=0,
              location="rms.onnx.data" if external else None)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # ONNX Runtime runs it ...
    model = load_model(path)  # ... so the loader accepts it
    assert model.graph.node[0].domain == "" and model.graph.node[0].op_type == "SimplifiedLayerNormalization"


def test_unknown_standard_domain_op_is_refused(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_rms_model("NoSuchNormalization"), str(path))
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert "NoSuchNormalization" in str(info.value) and "\n" not in str(info.value)


def _norm_model(op: str, opset: int) -> onnx.ModelProto:
    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "gamma")
    beta = numpy_helper.from_array(np.linspace(-0.2, 0.2, 8, dtype=np.float32), "beta")
    extra = {"num_groups": 2} if op == "GroupNormalization" else {"axis": -1}
    node = helper.make_node(op, ["x", "gamma", "beta"], ["y"], epsilon=1e-5, **extra)
    shape = [2, 8, 3] if op == "GroupNormalization" else [2, 3, 8]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [gamma, beta])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_runtime_op_below_onnx_since_version_loads(tmp_path):
    """LayerNormalization is ONNX's from opset 17; ONNX Runtime registers it in the standard domain
    below that, and its optimizer writes it into opset-12 files (PaddleOCR's recognizer saved at the
    extended level): ONNX Runtime runs it, so the loader accepts it."""
    import onnxruntime as ort

    path = tmp_path / "ln12.onnx"
    onnx.save(_norm_model("LayerNormalization", 12), str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert load_model(path).graph.node[0].op_type == "LayerNormalization"


def test_op_below_since_version_that_runtime_lacks_is_refused(tmp_path):
    """GroupNormalization (ONNX's from opset 18) at opset 12: neither onnx nor ONNX Runtime has it
    there, so it is refused in one line."""
    import onnxruntime as ort

    path = tmp_path / "gn12.onnx"
    onnx.save(_norm_model("GroupNormalization", 12), str(path))
    with pytest.raises(Exception):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert "GroupNormalization" in str(info.value) and "\n" not in str(info.value)
