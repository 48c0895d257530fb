"""Canonicalization passes (onnx_resync/audit/passes/), one small model each: the pass reaches its
form, and the canonical model computes what the file computes under ONNX Runtime (exactly up to
float rounding; up to the quantization steps of activations for a quantized file). After every
pass the workspace's producer and consumer maps are those of its nodes.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit import canonical
from onnx_resync.audit.canonical import canonicalize
from onnx_resync.audit.rewrite import Workspace
from onnx_resync.walk.graph import node_inputs

MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, ms: bool = False) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _canonical(model: onnx.ModelProto):
    """canonicalize(model), checking the workspace's maps after every pass."""
    ws = Workspace(model)
    _check_maps(ws)
    for pass_, to_fixed_point in canonical.PASSES:
        while pass_(ws) and to_fixed_point:
            pass
        _check_maps(ws)
    result = canonical._build(ws)
    again = canonicalize(model)
    assert again.model.SerializeToString() == result.model.SerializeToString()
    onnx.checker.check_model(result.model)
    return result


def _check_maps(ws: Workspace) -> None:
    producer, consumers = {}, defaultdict(list)
    for n in ws.nodes:
        for o in n.output:
            if o:
                producer[o] = n
        for i in node_inputs(n):
            consumers[i].append(id(n))
    assert {k: id(v) for k, v in ws._producer.items()} == {k: id(v) for k, v in producer.items()}
    assert {k: sorted(map(id, v)) for k, v in ws._consumers.items() if v} == \
        {k: sorted(v) for k, v in consumers.items()}


def _same(canon, model, feeds, atol=1e-5, rtol=1e-5, canon_feeds=None):
    for a, b in zip(_run(canon.model, canon_feeds or feeds), _run(model, feeds)):
        np.testing.assert_allclose(a, b.astype(np.float32), rtol=rtol, atol=atol)


def _w(*shape, scale=0.3):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


# ---- constants.py -----------------------------------------------------------------------------
def test_constants_are_folded():
    """Constant nodes, DequantizeLinear / Cast / Transpose / Mul of constants: plain weights."""
    w = _w(6, 4)
    scale = np.abs(w).max(axis=0) / 127
    q = np.round(w / scale).astype(np.int8)
    nodes = [
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(scale.astype(np.float16), "s")),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["q", "s32"], ["wd"], axis=1),
        helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        helper.make_node("Mul", ["wt", "two"], ["w2"]),
        helper.make_node("Gemm", ["x", "w2"], ["y"], transB=1),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [3, 6])], [("y", TensorProto.FLOAT, [3, 4])],
                   {"q": q, "two": np.float32(2)})
    canon = _canonical(model)
    assert _ops(canon.model) == {"MatMul": 1}
    assert canon.changes["Constant node made an initializer"] == 1
    assert {"Cast of constants folded", "DequantizeLinear of constants folded", "Transpose of constants folded",
            "Mul of constants folded"} <= set(canon.changes)
    (w_name,) = [i for i in canon.model.graph.node[0].input if i != "x"]
    assert canon.origins[w_name].sources == ["q", "s", "two"] and canon.origins[w_name].quantized
    _same(canon, model, {"x": _w(3, 6)})


# ---- fused.py ---------------------------------------------------------------------------------
def test_fused_ops_are_split():
    """com.microsoft FusedConv (with its summand Z, and a Clip) and FusedGemm: op, Add, activation."""
    nodes = [
        helper.make_node("FusedConv", ["x", "w1", "b1"], ["c1"], domain=MS, activation="Relu", pads=[1, 1, 1, 1]),
        helper.make_node("FusedConv", ["c1", "w2", "b2", "x"], ["c2"], domain=MS, activation="Clip",
                         activation_params=[-0.5, 0.5], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("FusedGemm", ["f", "g", "gb"], ["y"], domain=MS, activation="LeakyRelu",
                         activation_alpha=0.2, transB=1),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 3, 4, 4])], [("y", TensorProto.FLOAT, [1, 5])],
                   {"w1": _w(3, 3, 3, 3), "b1": _w(3), "w2": _w(3, 3, 3, 3), "b2": _w(3), "g": _w(5, 48),
                    "gb": _w(5)}, ms=True)
    canon = _canonical(model)
    assert _ops(canon.model) == {"Conv": 2, "Relu": 1, "Add": 2, "Clip": 1, "Flatten": 1, "MatMul": 1,
                                 "LeakyRelu": 1}
    assert canon.changes["ONNX Runtime FusedConv split into Conv + activation"] == 2
    assert set(canon.node_origins.values()) <= {n.name or f"<unnamed {n.op_type} #{k}>"
                                                for k, n in enumerate(model.graph.node)}
    _same(canon, model, {"x": _w(1, 3, 4, 4, scale=1)})


# ---- floats.py --------------------------------------------------------------------------------
def test_half_precision_becomes_float32():
    """fp16 weights, input, output and a Cast to fp16: all float32; the origin keeps float16."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Cast", ["m"], ["m64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["m64"], ["m16"], to=TensorProto.FLOAT16),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                         value=numpy_helper.from_array(np.array([1], np.float16), "v")),
        helper.make_node("Add", ["m16", "ones"], ["y"]),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT16, [2, 4])], [("y", TensorProto.FLOAT16, [2, 3])],
                   {"w": _w(4, 3).astype(np.float16), "shape": np.array([2, 3], np.int64)})
    canon = _canonical(model)
    assert canon.changes["float16 weight cast to float32"] == 1 and canon.origins["w"].dtype == "float16"
    assert {i.type.tensor_type.elem_type for i in list(canon.model.graph.input) + list(canon.model.graph.output)} \
        == {TensorProto.FLOAT}
    assert _ops(canon.model) == {"MatMul": 1, "ConstantOfShape": 1, "Add": 1}  # the Casts became no-ops
    x = _w(2, 4, scale=1)
    _same(canon, model, {"x": x.astype(np.float16)}, canon_feeds={"x": x.astype(np.float16).astype(np.float32)},
          atol=1e-2, rtol=1e-2)


# ---- cleanup.py -------------------------------------------------------------------------------
def test_noops_and_unused_nodes_are_removed():
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Dropout", ["i", "ratio", "training"], ["d"]),
        helper.make_node("Cast", ["d"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("CastLike", ["c", "x"], ["cl"]),
        helper.make_node("Relu", ["cl"], ["y"]),
        helper.make_node("MatMul", ["x", "w"], ["unused"]),
        helper.make_node("Identity", ["y"], ["out2"]),  # writes a graph output: stays
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [2, 4])],
                   [("y", TensorProto.FLOAT, [2, 4]), ("out2", TensorProto.FLOAT, [2, 4])],
                   {"ratio": np.float32(0.5), "training": np.bool_(False), "w": _w(4, 4)})
    canon = _canonical(model)
    assert _ops(canon.model) == {"Relu": 1, "Identity": 1}
    assert canon.model.graph.node[0].input[0] == "x" and "w" not in canon.origins
    assert {"Identity removed", "Dropout removed", "Cast removed", "CastLike removed", "unused node removed"} \
        <= set(canon.changes)
    _same(canon, model, {"x": _w(2, 4, scale=1)})


# ---- affine.py --------------------------------------------------------------------------------
def test_affine_ops_fold_into_producers():
    """BatchNorm after Conv, Mul after a grouped ConvTranspose, Add and Sub after a Gemm (alpha,
    beta, transB), to a fixed point; Gemm as MatMul + Add; a zero bias for a Conv without one."""
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("ConvTranspose", ["bn", "wt", "bt"], ["ct"], group=2),
        helper.make_node("Mul", ["ct", "s"], ["ms"]),
        helper.make_node("Conv", ["ms", "w2"], ["c2"]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["gm"], alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Add", ["gm", "a"], ["ga"]),
        helper.make_node("Sub", ["ga", "a"], ["y"]),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 2, 3, 3])], [("y", TensorProto.FLOAT, [1, 5])],
                   {"w": _w(c, 2, 3, 3), "g": _w(c) + 1, "b": _w(c), "mean": _w(c), "var": np.abs(_w(c)) + 0.5,
                    "wt": _w(c, 3, 2, 2), "bt": _w(6), "s": _w(1, 6, 1, 1), "w2": _w(3, 6, 1, 1),
                    "gw": _w(5, 48), "gb": _w(1, 5), "a": _w(5)})
    canon = _canonical(model)
    assert _ops(canon.model) == {"Conv": 2, "ConvTranspose": 1, "Flatten": 1, "MatMul": 1, "Add": 1}
    assert {"BatchNormalization folded into Conv", "Mul folded into ConvTranspose", "Add folded into Gemm",
            "Sub folded into Gemm", "Gemm written as MatMul + Add", "zero bias added"} <= set(canon.changes)
    folded = [o for o in canon.origins.values() if any(s.startswith("folded BatchNormalization") for s in o.steps)]
    assert folded and all(o.computed for o in folded)
    _same(canon, model, {"x": _w(1, 2, 3, 3, scale=1)}, atol=1e-5, rtol=1e-4)


def test_affine_fold_needs_the_only_reader():
    """A Conv output read twice is not folded into (the other reader needs the unfolded value)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["y"])]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 2, 3, 3])], [("y", TensorProto.FLOAT, [1, 4, 3, 3])],
                   {"w": _w(4, 2, 1, 1), "b": _w(4), "s": _w(1, 4, 1, 1)})
    canon = _canonical(model)
    assert _ops(canon.model) == {"Conv": 1, "Mul": 1, "Add": 1}
    _same(canon, model, {"x": _w(1, 2, 3, 3, scale=1)})


# ---- dequantize.py ----------------------------------------------------------------------------
def _q(x, scale, zp, dtype):
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dtype)


def _close(canon, model, feeds, step):
    """Outputs within a few quantization steps of the file's."""
    for a, b in zip(_run(canon.model, feeds), _run(model, feeds)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 4 * step, np.abs(a - b).max()


def test_static_qoperator_graph_is_dequantized():
    """QuantizeLinear, QLinearConv (per-channel int8, int32 bias, output range from 0: the Relu put
    back), MaxPool on int8 values, QLinearAdd, QLinearSigmoid, QLinearGlobalAveragePool, Shape of a
    quantized tensor, DequantizeLinear writing the graph output."""
    sx, sy, so = np.float32(0.02), np.float32(0.05), np.float32(1 / 255)
    w = _w(4, 3, 3, 3)
    ws = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    wq = _q(w, ws.reshape(4, 1, 1, 1), 0, np.int8)
    bias = np.round(_w(4) / (sx * ws)).astype(np.int32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("QLinearConv", ["xq", "sx", "zx", "wq", "ws", "zw", "sy", "zy", "bias"], ["yq"],
                         pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["yq"], ["pq"], kernel_shape=[2, 2]),
        helper.make_node("QLinearAdd", ["pq", "sy", "zy", "pq", "sy", "zy", "sy", "zy"], ["aq"], domain=MS),
        helper.make_node("QLinearSigmoid", ["aq", "sy", "zy", "so", "zo"], ["gq"], domain=MS),
        helper.make_node("QLinearGlobalAveragePool", ["gq", "so", "zo", "so", "zo"], ["vq"], domain=MS,
                         channels_last=0),
        helper.make_node("Shape", ["vq"], ["shape"]),
        helper.make_node("Reshape", ["vq", "shape"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "so", "zo"], ["y"]),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 3, 6, 6])], [("y", TensorProto.FLOAT, [1, 4, 1, 1])],
                   {"sx": sx, "zx": np.uint8(128), "wq": wq, "ws": ws, "zw": np.zeros(4, np.int8), "sy": sy,
                    "zy": np.uint8(0), "bias": bias, "so": so, "zo": np.uint8(0)}, ms=True)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert ops == {"Conv": 1, "Relu": 1, "MaxPool": 1, "Add": 1, "Sigmoid": 1, "GlobalAveragePool": 1,
                   "Shape": 1, "Reshape": 1}, ops
    assert canon.model.graph.node[-1].output[0] == "y"
    assert canon.changes["Relu made explicit (folded into the quantization range)"] == 1
    assert canon.origins[canon.model.graph.node[0].input[1]].sources == ["wq", "ws", "zw"]
    _close(canon, model, {"x": _w(1, 3, 6, 6, scale=1)}, float(so))


def test_qoperator_matmul_ops_are_dequantized():
    """QLinearMatMul, QGemm, QLinearLeakyRelu, QLinearConcat, QLinearSoftmax."""
    sx, s1, s2, s3 = (np.float32(v) for v in (0.02, 0.05, 0.05, 1 / 255))
    w1, w2 = _w(8, 6), _w(6, 6)
    w1s, w2s = np.float32(np.abs(w1).max() / 127), np.float32(np.abs(w2).max() / 127)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("QLinearMatMul", ["xq", "sx", "zx", "w1", "w1s", "zw", "s1", "z"], ["aq"]),
        helper.make_node("QLinearLeakyRelu", ["aq", "s1", "z", "s1", "z"], ["lq"], domain=MS, alpha=0.1),
        helper.make_node("QGemm", ["lq", "s1", "z", "w2", "w2s", "zw", "b2", "s2", "z"], ["gq"], domain=MS),
        helper.make_node("QLinearConcat", ["s2", "z", "gq", "s2", "z", "lq", "s1", "z"], ["cq"], domain=MS, axis=1),
        helper.make_node("QLinearSoftmax", ["cq", "s2", "z", "s3", "zs"], ["sq"], domain=MS, axis=-1, opset=13),
        helper.make_node("DequantizeLinear", ["sq", "s3", "zs"], ["y"]),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [3, 8])], [("y", TensorProto.FLOAT, [3, 12])],
                   {"sx": sx, "zx": np.uint8(128), "w1": _q(w1, w1s, 0, np.int8), "w1s": w1s, "zw": np.int8(0),
                    "s1": s1, "z": np.uint8(128), "w2": _q(w2, w2s, 0, np.int8), "w2s": w2s,
                    "b2": np.round(_w(6) / (s1 * w2s)).astype(np.int32), "s2": s2, "s3": s3,
                    "zs": np.uint8(0)}, ms=True)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert ops == {"MatMul": 2, "LeakyRelu": 1, "Add": 1, "Concat": 1, "Softmax": 1}, ops
    assert {"QGemm dequantized to Gemm", "QLinearMatMul dequantized to MatMul", "QLinearSoftmax dequantized to Softmax",
            "QLinearLeakyRelu dequantized to LeakyRelu", "QLinearConcat dequantized to Concat"} <= set(canon.changes)
    _close(canon, model, {"x": _w(3, 8, scale=1)}, float(s3))


def test_qlinear_reduce_mean_is_dequantized():
    """com.microsoft QLinearReduceMean (no ONNX Runtime kernel on CPU: checked against numpy)."""
    s = np.float32(0.02)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearReduceMean", ["xq", "s", "z", "s", "z"], ["mq"], domain=MS, axes=[1],
                              keepdims=1),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    model = _model(nodes, [("x", TensorProto.FLOAT, [3, 8])], [("y", TensorProto.FLOAT, [3, 1])],
                   {"s": s, "z": np.uint8(128)}, ms=True)
    canon = _canonical(model)
    assert _ops(canon.model) == {"ReduceMean": 1} and canon.changes["QLinearReduceMean dequantized to ReduceMean"]
    x = _w(3, 8, scale=1)
    np.testing.assert_allclose(_run(canon.model, {"x": x})[0], x.mean(axis=1, keepdims=True), atol=1e-6)


def test_dynamic_quantization_is_dequantized():
    """DynamicQuantizeLinear + ConvInteger / MatMulInteger + Cast + Mul by scales (+ a bias quantized
    at run time), and com.microsoft DynamicQuantizeMatMul / MatMulIntegerToFloat: Conv / MatMul."""
    w = _w(4, 2, 3, 3)
    wsc = np.float32(np.abs(w).max() / 127)
    m = _w(16, 6)
    msc = np.float32(np.abs(m).max() / 127)
    m2 = _w(6, 5)
    m2s = np.float32(np.abs(m2).max() / 127)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["ci"]),
        helper.make_node("Mul", ["xs", "wsc"], ["cs"]),
        helper.make_node("Div", ["cb", "cs"], ["cbd"]),
        helper.make_node("Floor", ["cbd"], ["cbf"]),
        helper.make_node("Cast", ["cbf"], ["cbi"], to=TensorProto.INT32),
        helper.make_node("Add", ["ci", "cbi"], ["cib"]),
        helper.make_node("Cast", ["cib"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["cf", "cs"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("DynamicQuantizeLinear", ["f"], ["fq", "fs", "fz"]),
        helper.make_node("MatMulInteger", ["fq", "mq", "fz"], ["mi"]),
        helper.make_node("Cast", ["mi"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["fs", "msc"], ["ms"]),
        helper.make_node("Mul", ["mf", "ms"], ["mm"]),
        helper.make_node("DynamicQuantizeMatMul", ["mm", "m2q", "m2s", "", "m2b"], ["d"], domain=MS),
        helper.make_node("DynamicQuantizeLinear", ["d"], ["dq", "ds", "dz"]),
        helper.make_node("MatMulIntegerToFloat", ["dq", "m3q", "ds", "m3s", "dz", "", "m3b"], ["y"], domain=MS),
    ]
    cb = (_w(4).reshape(1, 4, 1, 1))
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 2, 4, 4])], [("y", TensorProto.FLOAT, [1, 3])],
                   {"wq": _q(w, wsc, 0, np.int8), "wz": np.int8(0), "wsc": wsc, "cb": cb,
                    "mq": _q(m, msc, 0, np.int8), "msc": msc, "m2q": _q(m2, m2s, 0, np.int8), "m2s": m2s,
                    "m2b": _w(5), "m3q": _q(_w(5, 3), np.float32(0.01), 0, np.int8), "m3s": np.float32(0.01),
                    "m3b": _w(3)}, ms=True)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert ops == {"Conv": 1, "Relu": 1, "Flatten": 1, "MatMul": 3, "Add": 2}, ops
    assert {"ConvInteger dequantized to Conv", "MatMulInteger dequantized to MatMul",
            "DynamicQuantizeMatMul dequantized to MatMul", "MatMulIntegerToFloat dequantized to MatMul"} \
        <= set(canon.changes)
    conv = next(n for n in canon.model.graph.node if n.op_type == "Conv")
    assert "dequantized bias (quantized at run time)" in canon.origins[conv.input[2]].steps
    x = _w(1, 2, 4, 4, scale=1)
    a, b = _run(canon.model, {"x": x})[0], _run(model, {"x": x})[0]
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max(), (a, b)


def test_malformed_quantized_node_is_left_as_it_is():
    """A QLinearConv whose weight scale does not broadcast stays (nothing half-rewritten)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "sx", "zx", "wq", "ws", "zw", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 2, 3, 3])], [("y", TensorProto.FLOAT, [1, 4, 3, 3])],
                   {"sx": np.float32(0.02), "zx": np.uint8(128), "wq": np.ones((4, 2, 1, 1), np.int8),
                    "ws": np.full(3, 0.01, np.float32), "zw": np.int8(0), "sy": np.float32(0.02),
                    "zy": np.uint8(128)})
    canon = canonicalize(model)
    assert _ops(canon.model) == {"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1}
    assert not any("QLinearConv" in what for what in canon.changes)


def test_input_is_not_modified():
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    model = _model(nodes, [("x", TensorProto.FLOAT, [2, 3])], [("y", TensorProto.FLOAT, [2, 4])],
                   {"w": _w(4, 3), "b": _w(4)})
    before = model.SerializeToString()
    canonicalize(model)
    assert model.SerializeToString() == before
