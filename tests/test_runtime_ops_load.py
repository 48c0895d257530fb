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
