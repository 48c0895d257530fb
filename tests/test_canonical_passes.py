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


def test_fused_ops_inside_if_branches_are_split():
    """ONNX Runtime fuses inside If bodies too (silero_vad_op18_ifless saved at the extended level:
    FusedConv in both rate branches left its convs unaligned, 63.6% compared, a permuted copy 'not
    derived'): FusedConv (Relu; Clip, its bounds Constant nodes in the body) split there as well."""
    def branch(tag: str, w: str) -> onnx.GraphProto:
        nodes = [helper.make_node("FusedConv", ["x", w, "b1"], [f"{tag}_c1"], domain=MS, activation="Relu",
                                  pads=[1, 1, 1, 1], name=f"{tag}_conv1"),
                 helper.make_node("FusedConv", [f"{tag}_c1", "w2", "b2"], [f"{tag}_y"], domain=MS,
                                  activation="Clip", activation_params=[-0.5, 0.5], pads=[1, 1, 1, 1],
                                  name=f"{tag}_conv2")]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT,
                                                                                 [1, 3, 4, 4])])
    nodes = [helper.make_node("ReduceSum", ["flag"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "w1"), else_branch=branch("else", "w3"))]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 3, 4, 4]), ("flag", TensorProto.FLOAT, [1])],
                   [("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                   {"w1": _w(3, 3, 3, 3), "w3": _w(3, 3, 3, 3), "b1": _w(3), "w2": _w(3, 3, 3, 3), "b2": _w(3),
                    "zero": np.float32(0)}, ms=True)
    canon = _canonical(model)
    body_ops = Counter(n.op_type for node in canon.model.graph.node for a in node.attribute
                       if a.type == onnx.AttributeProto.GRAPH for n in a.g.node)
    assert body_ops["FusedConv"] == 0 and body_ops["Conv"] == 4 and body_ops["Relu"] == 2 and body_ops["Clip"] == 2
    assert canon.changes["ONNX Runtime FusedConv split into Conv + activation"] == 4
    for flag in (1.0, -1.0):
        _same(canon, model, {"x": _w(1, 3, 4, 4, scale=1), "flag": np.array([flag], np.float32)})


def test_gemm_inside_if_branches_is_written_as_matmul():
    """A body's Gemm with constant weights is MatMul (+ Add), as the main graph's (ONNX Runtime's
    quantization pre-processing writes silero_vad_op18_ifless's LSTM-cell Gemms so: the reference's
    Gemms and the copy's MatMuls were left unpaired, 51.5% compared, a permuted copy 'perturbed:
    rescaled'). transB, alpha, beta and a 1 x N bias; a Gemm without C."""
    def branch(tag: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Gemm", ["x", "g1", "c1"], [f"{tag}_h"], transB=1, alpha=0.5, beta=2.0,
                                  name=f"{tag}_gemm1"),
                 helper.make_node("Gemm", [f"{tag}_h", "g2"], [f"{tag}_y"], name=f"{tag}_gemm2")]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT,
                                                                                 [2, 4])])
    nodes = [helper.make_node("ReduceSum", ["flag"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    model = _model(nodes, [("x", TensorProto.FLOAT, [2, 6]), ("flag", TensorProto.FLOAT, [1])],
                   [("y", TensorProto.FLOAT, [2, 4])],
                   {"g1": _w(5, 6), "c1": _w(1, 5), "g2": _w(5, 4), "zero": np.float32(0)})
    canon = _canonical(model)
    body_ops = Counter(n.op_type for node in canon.model.graph.node for a in node.attribute
                       if a.type == onnx.AttributeProto.GRAPH for n in a.g.node)
    assert body_ops["Gemm"] == 0 and body_ops["MatMul"] == 4 and body_ops["Add"] == 2
    for flag in (1.0, -1.0):
        _same(canon, model, {"x": _w(2, 6, scale=1), "flag": np.array([flag], np.float32)})


# ---- transposes.py -----------------------------------------------------------------------------
def test_transpose_before_an_op_of_a_constant_is_moved_after_it():
    """ONNX Runtime's transpose optimizer saves Mul(Transpose(x), c) as Transpose(Mul(x, c')) (Basic
    Pitch's CQT scale: the layer read [309, 1, 1] against [1, 1, 309, 1], exit 3 on every ORT save):
    both files reach one form, with the constant in one shape; Sub keeps its operand order, a chain
    of two ops ends with the Transpose, a scalar operand leaves it where it is."""
    c, d = _w(5, 1, 1), _w(5, 1, 1)
    perm = [0, 2, 1, 3]
    ref = _model([helper.make_node("Transpose", ["x"], ["t"], perm=perm),
                  helper.make_node("Mul", ["t", "c"], ["m"]),
                  helper.make_node("Sub", ["d", "m"], ["s"]),
                  helper.make_node("Transpose", ["s"], ["u"], perm=perm),
                  helper.make_node("Mul", ["u", "two"], ["y"])],
                 [("x", TensorProto.FLOAT, [1, 5, 5, 4])], [("y", TensorProto.FLOAT, [1, 5, 5, 4])],
                 {"c": c, "d": d, "two": np.float32(2)})
    inv = list(np.argsort(perm))
    saved = _model([helper.make_node("Mul", ["x", "c2"], ["m"]),
                    helper.make_node("Sub", ["d2", "m"], ["s"]),
                    helper.make_node("Transpose", ["s"], ["t"], perm=perm),
                    helper.make_node("Transpose", ["t"], ["u"], perm=perm),
                    helper.make_node("Mul", ["u", "two"], ["y"])],
                   [("x", TensorProto.FLOAT, [1, 5, 5, 4])], [("y", TensorProto.FLOAT, [1, 5, 5, 4])],
                   {"c2": c[None].transpose(inv), "d2": d[None].transpose(inv), "two": np.float32(2)})
    forms = []
    for model in (ref, saved):
        canon = _canonical(model)
        _same(canon, model, {"x": _w(1, 5, 5, 4, scale=1)})
        forms.append([(n.op_type, [tuple(canon.model.graph.initializer[[t.name for t in canon.model.graph.initializer]
                                                                        .index(i)].dims)
                                   for i in n.input if i in {t.name for t in canon.model.graph.initializer}])
                      for n in canon.model.graph.node])
    assert forms[0] == forms[1]
    assert forms[0][:2] == [("Mul", [(1, 1, 5, 1)]), ("Sub", [(1, 1, 5, 1)])]
    assert [op for op, _ in forms[0]][2:] == ["Transpose", "Transpose", "Mul"]


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


# ---- contrib.py -------------------------------------------------------------------------------
def _std_only(model: onnx.ModelProto) -> bool:
    return all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def test_fused_elementwise_contrib_ops_are_written_out():
    """BiasGelu (a weighted Add + the erf GELU), FastGelu with a bias (tanh form), QuickGelu (alpha
    1.702 and 1: SiLU), com.microsoft Gelu, FusedMatMul (alpha, a transposed constant B, a
    transposed activation A): standard ops computing the same."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("BiasGelu", ["m1", "b1"], ["g1"], domain=MS),
        helper.make_node("FastGelu", ["g1", "b2"], ["g2"], domain=MS),
        helper.make_node("QuickGelu", ["g2"], ["g3"], domain=MS),
        helper.make_node("QuickGelu", ["g3"], ["g4"], domain=MS, alpha=1.0),
        helper.make_node("Gelu", ["g4"], ["g5"], domain=MS),
        helper.make_node("FusedMatMul", ["g5", "w2"], ["f1"], domain=MS, transB=1, alpha=0.25),
        helper.make_node("FusedMatMul", ["f1", "f1"], ["y"], domain=MS, transA=1),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [2, 3, 4])], [("y", TensorProto.FLOAT, [2, 6, 6])],
                   {"w1": _w(4, 8), "b1": _w(8), "b2": _w(8), "w2": _w(6, 8)}, ms=True)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert _std_only(canon.model) and ops["Erf"] == 2 and ops["Tanh"] == 1 and ops["Sigmoid"] == 2, ops
    assert ops["MatMul"] == 3 and ops["Transpose"] == 1, ops
    adds = [n for n in canon.model.graph.node if n.op_type == "Add" and set(n.input) & {"b1", "b2"}]
    assert len(adds) == 2  # the biases are layers of their own again
    w2t = next(n for n in canon.model.graph.node if n.op_type == "MatMul" and n.input[1] not in ("w1",)
               and n.input[1] in canon.origins)
    assert canon.origins[w2t.input[1]].sources == ["w2"] and not canon.origins[w2t.input[1]].computed
    assert {"ONNX Runtime BiasGelu written as Add + GELU", "ONNX Runtime FastGelu written as Add + GELU",
            "ONNX Runtime FusedMatMul written as MatMul + Mul by alpha", "ONNX Runtime FusedMatMul written as MatMul",
            "com.microsoft Gelu written as its erf formula"} <= set(canon.changes)
    _same(canon, model, {"x": _w(2, 3, 4, scale=1)})


def test_gelu_op_is_the_erf_formula():
    """The standard Gelu op (opset 20, as torch.onnx dynamo writes it), exact and tanh: the same
    formulas as the contrib ops'."""
    nodes = [helper.make_node("Gelu", ["x"], ["g"]), helper.make_node("Gelu", ["g"], ["y"], approximate="tanh")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert "Gelu" not in ops and ops["Erf"] == 1 and ops["Tanh"] == 1, ops
    _same(canon, model, {"x": _w(3, 5, scale=2)})


# ---- norms.py ---------------------------------------------------------------------------------
def test_skip_and_simplified_layer_norms_are_written_out():
    """SkipLayerNormalization with the projection's bias (and its sum output read downstream) and
    without; SimplifiedLayerNormalization (standard domain, as ONNX Runtime registers it) and
    SkipSimplifiedLayerNormalization (with a bias, which ONNX Runtime adds): Add (bias) + Add +
    LayerNormalization / RMSNorm."""
    h = 8
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("SkipLayerNormalization", ["m1", "x", "g1", "be1", "b1"], ["n1", "", "", "s1"], domain=MS,
                         epsilon=1e-5),
        helper.make_node("SkipLayerNormalization", ["n1", "s1", "g2"], ["n2"], domain=MS),
        helper.make_node("SimplifiedLayerNormalization", ["n2", "g3"], ["n3"], epsilon=1e-6),
        helper.make_node("MatMul", ["n3", "w2"], ["m2"]),
        helper.make_node("SkipSimplifiedLayerNormalization", ["m2", "n3", "g4", "b4"], ["y", "", "", "s2"], domain=MS,
                         epsilon=1e-6),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [2, 3, h])],
                   [("y", TensorProto.FLOAT, [2, 3, h]), ("s2", TensorProto.FLOAT, [2, 3, h])],
                   {"w1": _w(h, h), "b1": _w(h), "g1": _w(h) + 1, "be1": _w(h), "g2": _w(h) + 1, "g3": _w(h) + 1,
                    "w2": _w(h, h), "g4": _w(h) + 1, "b4": _w(h)}, ms=True)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert _std_only(canon.model) and ops["LayerNormalization"] == 2 and ops["ReduceMean"] == 2, ops
    assert any(n.op_type == "Add" and "b1" in n.input for n in canon.model.graph.node)
    assert {"ONNX Runtime SkipLayerNormalization written as Add (bias) + Add + LayerNormalization",
            "ONNX Runtime SkipLayerNormalization written as Add + Add + LayerNormalization",
            "SimplifiedLayerNormalization written as RMSNorm",
            "ONNX Runtime SkipSimplifiedLayerNormalization written as Add (bias) + Add + RMSNorm"} <= set(canon.changes)
    _same(canon, model, {"x": _w(2, 3, h, scale=1)})


def test_layer_norm_below_opset_17_is_written_out():
    """No LayerNormalization op before opset 17: the exporters' form (ReduceMean ... Mul, Add)."""
    h = 6
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "x2", "g", "b"], ["y"], domain=MS, epsilon=1e-5)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, h])
                                           for n in ("x", "x2")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, h])],
                              [numpy_helper.from_array(_w(h) + 1, "g"), numpy_helper.from_array(_w(h), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)],
                              ir_version=7)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert "LayerNormalization" not in ops and ops["ReduceMean"] == 2 and ops["Sqrt"] == 1, ops
    feeds = {"x": _w(2, 3, h, scale=1), "x2": _w(2, 3, h, scale=1)}
    _same(canon, model, feeds)


def test_embed_layer_norm_is_written_out():
    """EmbedLayerNormalization (word, position, segment embeddings, mask): Gathers, Adds,
    LayerNormalization; its mask index (ones per row) and embedding sum outputs computed alike."""
    v, p, h = 11, 7, 8
    nodes = [helper.make_node("EmbedLayerNormalization", ["ids", "seg", "we", "pe", "se", "g", "b", "mask"],
                              ["y", "mask_index", "sum"], domain=MS, epsilon=1e-5)]
    model = _model(nodes, [("ids", TensorProto.INT32, [2, 5]), ("seg", TensorProto.INT32, [2, 5]),
                           ("mask", TensorProto.INT32, [2, 5])],
                   [("y", TensorProto.FLOAT, [2, 5, h]), ("mask_index", TensorProto.INT32, [2]),
                    ("sum", TensorProto.FLOAT, [2, 5, h])],
                   {"we": _w(v, h), "pe": _w(p, h), "se": _w(2, h), "g": _w(h) + 1, "b": _w(h)}, ms=True)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert _std_only(canon.model) and ops["LayerNormalization"] == 1, ops
    assert {n.input[0] for n in canon.model.graph.node if n.op_type == "Gather"} >= {"we", "pe", "se"}
    feeds = {"ids": RNG.integers(0, v, (2, 5)).astype(np.int32), "seg": RNG.integers(0, 2, (2, 5)).astype(np.int32),
             "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}
    for a, b in zip(_run(canon.model, feeds), _run(model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- attention.py -----------------------------------------------------------------------------
def _attention_reference(h: int, heads: int, seq: int, wq, wk, wv, bq, bk, bv) -> onnx.ModelProto:
    """Multi-head attention as torch.onnx writes it (the bundled transformer's layers)."""
    d = h // heads
    nodes = []
    for which in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{which}"], [f"{which}m"]),
                  helper.make_node("Add", [f"b{which}", f"{which}m"], [f"{which}a"]),
                  helper.make_node("Reshape", [f"{which}a", "split"], [f"{which}r"])]
    nodes += [helper.make_node("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qt", "kt"], ["s"]),
              helper.make_node("Div", ["s", "sqrt_d"], ["sd"]),
              helper.make_node("Softmax", ["sd"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "merge"], ["y"])]
    return _model(nodes, [("x", TensorProto.FLOAT, [2, seq, h])], [("y", TensorProto.FLOAT, [2, seq, h])],
                  {"wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
                   "split": np.array([-1, seq, heads, d], np.int64), "merge": np.array([-1, seq, h], np.int64),
                   "sqrt_d": np.float32(np.sqrt(d))})


def test_packed_attention_is_written_out_as_the_reference_writes_it():
    """com.microsoft Attention (packed QKV weight and bias) of onnxruntime.transformers' optimizer:
    the same weighted layers (kinds, shapes) as the unfused attention, computing the same; with a
    2-D key padding mask, what ONNX Runtime computes with it."""
    from onnx_resync.audit.align import weighted_layers

    h, heads, seq = 8, 2, 4
    wq, wk, wv, bq, bk, bv = _w(h, h), _w(h, h), _w(h, h), _w(h), _w(h), _w(h)
    reference = _attention_reference(h, heads, seq, wq, wk, wv, bq, bk, bv)
    fused = _model([helper.make_node("Attention", ["x", "w", "b", ""], ["y"], domain=MS, num_heads=heads)],
                   [("x", TensorProto.FLOAT, [2, seq, h])], [("y", TensorProto.FLOAT, [2, seq, h])],
                   {"w": np.concatenate([wq, wk, wv], axis=1), "b": np.concatenate([bq, bk, bv])}, ms=True)
    canon, ref = _canonical(fused), _canonical(reference)
    assert _std_only(canon.model)
    assert sorted(layer.key for layer in weighted_layers(canon.model)) == \
        sorted(layer.key for layer in weighted_layers(ref.model))
    assert _ops(canon.model) == _ops(ref.model)
    q = next(n for n in canon.model.graph.node if n.op_type == "MatMul" and n.input[1] in canon.origins)
    assert canon.origins[q.input[1]].sources == ["w"] and not canon.origins[q.input[1]].computed
    x = _w(2, seq, h, scale=1)
    _same(canon, fused, {"x": x})
    _same(canon, reference, {"x": x})

    masked = _model([helper.make_node("Attention", ["x", "w", "b", "mask"], ["y"], domain=MS, num_heads=heads)],
                    [("x", TensorProto.FLOAT, [2, seq, h]), ("mask", TensorProto.INT32, [2, seq])],
                    [("y", TensorProto.FLOAT, [2, seq, h])],
                    {"w": np.concatenate([wq, wk, wv], axis=1), "b": np.concatenate([bq, bk, bv])}, ms=True)
    canon = _canonical(masked)
    assert _std_only(canon.model)
    _same(canon, masked, {"x": x, "mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32)})


def test_attention_with_state_is_left_as_it_is():
    """past/present (a decoder's cache): not this canonical form; the node stays whole."""
    h = 8
    nodes = [helper.make_node("Attention", ["x", "w", "b", "", "past"], ["y", "present"], domain=MS, num_heads=2)]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 3, h]), ("past", TensorProto.FLOAT, [2, 1, 2, 0, 4])],
                   [("y", TensorProto.FLOAT, [1, 3, h]), ("present", TensorProto.FLOAT, [2, 1, 2, 3, 4])],
                   {"w": _w(h, 3 * h), "b": _w(3 * h)}, ms=True)
    canon = canonicalize(model)
    assert _ops(canon.model) == {"Attention": 1}


# ---- nchwc.py ---------------------------------------------------------------------------------
def _nchwc_file(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """ONNX Runtime's own NCHWc save of `model` (the "all" level, as a vendor saves it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def test_nchwc_layout_is_written_back_in_nchw(tmp_path):
    """A small conv net saved by ONNX Runtime in NCHWc layout: image conv (OIHWBo filter, plain
    input), blocked convs (OIHWBiBo), a depthwise conv, a residual Add fused as the Sum input, an
    activation fused, MaxPool / AveragePool / GlobalAveragePool, a BatchNormalization made a
    depthwise conv, Concat of blocked tensors, nearest Resize (Upsample), convs whose channels are
    not a multiple of the block (padded rows dropped: before a ReorderOutput, and before a conv that
    ONNX Runtime pads the input channels of), a Transpose to NHWC (ReorderOutput channels_last):
    plain NCHW ops again, computing what the file computes."""
    from onnx_resync.audit.passes.nchwc import NCHWC, machine_block_size

    if machine_block_size() is None:
        import pytest

        pytest.skip("this machine's ONNX Runtime writes no NCHWc layout")
    c = 32
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=c),
        helper.make_node("Add", ["cd", "r1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "p1"], ["a2"]),
        helper.make_node("BatchNormalization", ["a2", "g", "beta", "mean", "var"], ["bn"]),
        helper.make_node("AveragePool", ["bn"], ["p2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "w4", "b4"], ["c4"]),
        helper.make_node("Relu", ["c4"], ["r4"]),
        helper.make_node("Conv", ["r4", "w5", "b5"], ["c5"]),
        helper.make_node("Concat", ["p2", "c5"], ["cat"], axis=1),
        helper.make_node("Resize", ["cat", "", "scales"], ["up"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["up", "w3", "b3"], ["c3"]),
        helper.make_node("Sigmoid", ["c3"], ["s3"]),
        helper.make_node("Transpose", ["s3"], ["y1"], perm=[0, 2, 3, 1]),
        helper.make_node("GlobalAveragePool", ["cat"], ["y2"]),
    ]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [("y1", TensorProto.FLOAT, [1, 8, 8, 20]), ("y2", TensorProto.FLOAT, [1, 2 * c, 1, 1])],
                   {"w0": _w(16, 3, 3, 3), "b0": _w(16), "w1": _w(c, 16, 3, 3), "b1": _w(c), "wd": _w(c, 1, 3, 3),
                    "bd": _w(c), "w2": _w(c, c, 1, 1), "b2": _w(c), "g": _w(c) + 1, "beta": _w(c), "mean": _w(c),
                    "var": np.abs(_w(c)) + 0.5, "scales": np.array([1, 1, 2, 2], np.float32),
                    "w3": _w(20, 2 * c, 1, 1), "b3": _w(20), "w4": _w(20, c, 1, 1), "b4": _w(20),
                    "w5": _w(c, 20, 1, 1), "b5": _w(c)})
    saved = _nchwc_file(model, tmp_path / "nchwc.onnx")
    found = {n.op_type for n in saved.graph.node if n.domain == NCHWC}
    assert {"Conv", "ReorderOutput", "MaxPool", "AveragePool", "GlobalAveragePool", "Upsample"} <= found, found
    assert any(n.domain == NCHWC and n.op_type == "Conv" and len(n.input) > 3 for n in saved.graph.node)
    canon = _canonical(saved)
    assert _std_only(canon.model), _ops(canon.model)
    ops = _ops(canon.model)
    # the BatchNormalization after the residual Add: a depthwise 1x1 nchwc Conv, then Mul + Add (affine.py)
    assert ops["Conv"] == 7 and ops["Mul"] == 1 and ops["Resize"] == 1 and ops["Transpose"] == 1, ops
    shapes = sorted(numpy_helper.to_array(t).shape[:2] for t in canon.model.graph.initializer
                    if t.name in {n.input[1] for n in canon.model.graph.node if n.op_type == "Conv"})
    # padded rows dropped (a ReorderOutput's channels; a conv read only by a conv: its zero rows and
    # the reader's zero columns)
    assert shapes == [(16, 3), (20, 32), (20, 64), (32, 1), (32, 16), (32, 20), (32, 32)], shapes
    assert any(what.startswith("NCHWc block size") for what in canon.changes)
    x = _w(1, 3, 8, 8, scale=1)
    _same(canon, saved, {"x": x}, atol=1e-4, rtol=1e-4)
    _same(canon, model, {"x": x}, atol=1e-4, rtol=1e-4)


def test_runtime_layer_norm_below_opset_17_is_written_out():
    """ONNX Runtime's LayerNormalization in the standard domain at opset 12 (its optimizer writes it
    there): the exporters' form, computing what ONNX Runtime computes."""
    h = 6
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, h])],
                              [numpy_helper.from_array(_w(h) + 1, "g"), numpy_helper.from_array(_w(h), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    canon = _canonical(model)
    ops = _ops(canon.model)
    assert "LayerNormalization" not in ops and ops["ReduceMean"] == 2 and ops["Sqrt"] == 1, ops
    assert "ONNX Runtime's LayerNormalization at opset 12 written out" in canon.changes
    _same(canon, model, {"x": _w(2, 3, h, scale=1)})


def test_nchwc_padding_dropped_through_an_activation(tmp_path):
    """Conv (20 channels, padded to a block) -> x * Sigmoid(x) (ONNX Runtime fuses it to QuickGelu,
    which stays between the two nchwc Convs) -> Conv: the padded rows and the reader's zero columns
    are dropped through the activation (PaddleOCR's recognizer saved at the all level)."""
    from onnx_resync.audit.passes.nchwc import machine_block_size

    if machine_block_size() is None:
        import pytest

        pytest.skip("this machine's ONNX Runtime writes no NCHWc layout")
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c0"], ["s0"]), helper.make_node("Mul", ["c0", "s0"], ["g0"]),
             helper.make_node("Conv", ["g0", "w1", "b1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["y"])]
    model = _model(nodes, [("x", TensorProto.FLOAT, [1, 16, 8, 8])], [("y", TensorProto.FLOAT, [1, 32, 8, 8])],
                   {"w0": _w(20, 16, 3, 3), "b0": _w(20), "w1": _w(32, 20, 1, 1), "b1": _w(32)})
    saved = _nchwc_file(model, tmp_path / "nchwc_act.onnx")
    assert any(n.op_type == "QuickGelu" for n in saved.graph.node), _ops(saved)
    canon = _canonical(saved)
    assert _std_only(canon.model), _ops(canon.model)
    shapes = sorted(numpy_helper.to_array(t).shape[:2] for t in canon.model.graph.initializer
                    if t.name in {n.input[1] for n in canon.model.graph.node if n.op_type == "Conv"})
    assert shapes == [(20, 16), (32, 20)], shapes
    x = _w(1, 16, 8, 8, scale=1)
    _same(canon, saved, {"x": x}, atol=1e-4, rtol=1e-4)
    _same(canon, model, {"x": x}, atol=1e-4, rtol=1e-4)


def test_a_gathered_table_read_by_matmulinteger_keeps_its_own_scale(tmp_path):
    """quantize_dynamic on Gather(table) -> Gemm (arabic_gru_decoder): the gathered uint8 codes go to
    MatMulInteger as they are (the table's zero point as A's), the result times Mul(table scale,
    weight scale), folded into one constant before dequantization (exit 3: the embedding Gather
    read an integer table). Canonical: Gather of the table dequantized with its own scale, MatMul
    with the weight with its own: each within half a step of the float model's, ORT agrees."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    table, W, b = _w(40, 8), _w(6, 8), _w(6)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["g"]),
             helper.make_node("Gemm", ["g", "W", "b"], ["y"], transB=1)]
    model = _model(nodes, [("ids", TensorProto.INT64, [5])], [("y", TensorProto.FLOAT, [5, 6])],
                   {"table": table, "W": W, "b": b})
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert _ops(quantized)["MatMulInteger"] == 1 and _ops(quantized)["DynamicQuantizeLinear"] == 0
    canon = _canonical(quantized)
    assert _ops(canon.model) == Counter({"Gather": 1, "MatMul": 1, "Add": 1})
    stored = {t.name: numpy_helper.to_array(t) for t in canon.model.graph.initializer}
    gather = next(n for n in canon.model.graph.node if n.op_type == "Gather")
    matmul = next(n for n in canon.model.graph.node if n.op_type == "MatMul")
    steps = {t.name: float(numpy_helper.to_array(t)) for t in quantized.graph.initializer
             if t.name.endswith("_scale")}
    assert np.abs(stored[gather.input[0]] - table).max() <= steps["table_scale"] / 2 * 1.001
    assert np.abs(stored[matmul.input[1]] - W.T).max() <= steps["W_scale"] / 2 * 1.001
    _same(canon, quantized, {"ids": np.array([0, 3, 7, 39, 3], np.int64)})


def test_a_table_gathered_then_dequantized_is_the_gather_of_the_float_table():
    """quantize_dynamic's embeddings: Gather(int8 table, ids) -> DequantizeLinear(one scale, one zero
    point) -> MatMul. Canonical: Gather of the dequantized table (minilm's dynamic copy could not be
    aligned: its word-embedding Gather read an int8 table), computing the same in ONNX Runtime."""
    table = _w(50, 8)
    scale = np.float32(np.abs(table).max() / 127)
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("Gather", ["table_q", "ids"], ["gq"]),
             helper.make_node("DequantizeLinear", ["gq", "s", "zp"], ["g"]),
             helper.make_node("MatMul", ["g", "W"], ["y"])]
    model = _model(nodes, [("ids", TensorProto.INT64, [1, 5])], [("y", TensorProto.FLOAT, [1, 5, 4])],
                   {"table_q": q, "s": scale, "zp": np.int8(0), "W": _w(8, 4)})
    canon = _canonical(model)
    assert _ops(canon.model) == Counter({"Gather": 1, "MatMul": 1})
    gather = next(n for n in canon.model.graph.node if n.op_type == "Gather")
    stored = {t.name: t for t in canon.model.graph.initializer}
    assert stored[gather.input[0]].data_type == TensorProto.FLOAT
    _same(canon, model, {"ids": np.array([[0, 3, 7, 49, 3]], np.int64)})
    # a scale per row of the table: left as it is (which axis survives the Gather is not checked)
    per_row = _model(nodes, [("ids", TensorProto.INT64, [1, 5])], [("y", TensorProto.FLOAT, [1, 5, 4])],
                     {"table_q": q, "s": np.full(50, scale, np.float32), "zp": np.zeros(50, np.int8), "W": _w(8, 4)})
    assert "DequantizeLinear" in _ops(_canonical(per_row).model)
