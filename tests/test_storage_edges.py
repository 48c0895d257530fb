"""audit/storage.py: a stored integer at an end of its range may have been clipped there, and its
weight is allowed a whole step (not half). ONNX Runtime's symmetric int4 quantizer (MatMulNBits, the
onnxruntime-genai builder's default) maps each block's largest magnitude to -8 and clips the other
sign's +8 to +7: a weight near +max is one step off. Elsewhere half a step still holds."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit.storage import _edges_moved


def test_edge_codes_are_found_in_every_storage():
    packed = np.array([0x0F, 0x80, 0x37], np.uint8)  # nibbles (low, high): (15, 0), (0, 8), (7, 3)
    np.testing.assert_array_equal(_edges_moved(packed, 4), np.array([0x1E, 0x81, 0x37], np.uint8))
    assert _edges_moved(np.array([0x37, 0x21], np.uint8), 4) is None
    i8 = np.array([-128, 5, 127], np.int8)
    np.testing.assert_array_equal(_edges_moved(i8, None), np.array([-127, 5, 126], np.int8))


def _mlp(w0: np.ndarray, w1: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_symmetric_int4_clip_is_allowed_a_step(tmp_path):
    """Codes 0 and 15 of a MatMulNBits weight (here -8 and +7 steps) get a whole step; the others half."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnx_resync.audit.canonical import canonicalize
    from onnx_resync.audit.storage import measure_steps

    rng = np.random.default_rng(0)
    w0 = (rng.normal(size=(64, 64)) * 0.1).astype(np.float32)
    w1 = (rng.normal(size=(64, 16)) * 0.1).astype(np.float32)
    for w in (w0, w1):  # in every block of 32 along K: the largest magnitude negative, a near twin positive
        w[0::32] = -1.0
        w[1::32] = 0.99  # stored as +7 steps of 1/8 (code 15): 0.115 off, more than half a step
    q = MatMulNBitsQuantizer(_mlp(w0, w1), bits=4, block_size=32, is_symmetric=True)
    q.process()
    model = q.model.model
    canon = canonicalize(model)
    name = next(n for n, o in canon.origins.items() if o.quantized and "w0" in o.sources[0])
    step = measure_steps(model, canon, [name], canonicalize).steps[name]
    dequantized = numpy_helper.to_array(next(t for t in canon.model.graph.initializer if t.name == name))
    np.testing.assert_allclose(dequantized[1], 0.875, rtol=1e-6)  # clipped: 0.115 from 0.99
    plain = step[2:32]
    np.testing.assert_allclose(plain, 0.125, rtol=1e-5)  # a step of 1/8 (the bound is half of it)
    np.testing.assert_allclose(step[[0, 1, 32, 33]], 0.25, rtol=1e-5)  # range ends: a step more
    assert np.abs(dequantized[1] - w0[1]).max() <= 0.5 * step[1].min()
