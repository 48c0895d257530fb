"""Weights quantized at run time (audit/passes/run_time.py), on copies made by the real tool.

onnxruntime.quantization.quantize_dynamic quantizes a weight stored as a Constant node (as
Paddle2ONNX writes them) like an activation: DynamicQuantizeLinear of the float weight at every run,
ConvInteger with both operands quantized, Cast, Mul by the product of the two run-time scales. An
embedding table it quantizes is gathered in int8 and dequantized after a Transpose. Before the pass,
audit of such a copy of ppocr_cls / arabic_gru_encoder stopped at exit 3 ("cannot align ... Conv",
"cannot align ... Gather"); now a copy of the model is derived with a format change (identical,
or permuted for a permuted copy) and a copy of an unrelated twin is not derived.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.api import permute
from onnx_resync.audit import audit
from onnx_resync.audit.canonical import canonicalize

QUANT_OPS = {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "DequantizeLinear"}


def _model(seed: int, noise: float = 0.0) -> onnx.ModelProto:
    """Conv (no bias) -> BatchNorm -> Relu -> Conv with weights in Constant nodes; an embedding
    table (initializer) gathered, transposed, then a small MLP. noise: relative noise added to the
    second Conv's weight."""
    rng = np.random.default_rng(seed)
    c2w = (rng.standard_normal((6, 8, 3, 3)) * 0.3).astype(np.float32)
    c2w = c2w + (noise * 0.3 * np.random.default_rng(99).standard_normal(c2w.shape)).astype(np.float32)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    nodes = [const("c1w", w(8, 3, 3, 3)), const("s1", 1 + w(8)), const("o1", w(8)), const("mu1", w(8)),
             const("v1", 1 + np.abs(w(8))), const("c2w", c2w),
             const("m1", w(16, 12)), const("b1", w(12)), const("m2", w(12, 5)),
             helper.make_node("Conv", ["x", "c1w"], ["h0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h0", "s1", "o1", "mu1", "v1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Transpose", ["e"], ["et"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["et", "m1"], ["h2"]), helper.make_node("Add", ["h2", "b1"], ["h3"]),
             helper.make_node("Tanh", ["h3"], ["r2"]), helper.make_node("MatMul", ["r2", "m2"], ["z"])]
    graph = helper.make_graph(
        nodes, "run_time", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 1, 5])],
        [numpy_helper.from_array(w(20, 16), "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds() -> dict:
    rng = np.random.default_rng(3)
    return {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "ids": np.array([[0, 5, 19, 7]], np.int64)}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """reference, and quantize_dynamic copies of it, of a permuted copy, of a copy with noise on one
    weight and of an unrelated twin."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = tmp_path_factory.mktemp("run_time")
    onnx.save(_model(0), str(d / "reference.onnx"))
    onnx.save(_model(1), str(d / "twin.onnx"))
    onnx.save(_model(0, noise=0.05), str(d / "noisy.onnx"))
    permuted, info = permute(str(d / "reference.onnx"), seed=1)
    assert info.verified and info.neurons_moved > 0
    onnx.save(permuted, str(d / "permuted.onnx"))
    for name in ("reference", "permuted", "twin", "noisy"):
        quantize_dynamic(str(d / f"{name}.onnx"), str(d / f"{name}_dynamic.onnx"), weight_type=QuantType.QInt8)
    return d


def test_the_copy_quantizes_weights_at_run_time(made):
    """The form under test is what quantize_dynamic writes: each Conv weight (a Constant node) goes
    through DynamicQuantizeLinear; the table is gathered in int8 and dequantized after the Transpose."""
    model = onnx.load(str(made / "reference_dynamic.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "ConvInteger"]
    assert len(convs) == 2
    for conv in convs:
        q = producers[conv.input[1]]
        assert q.op_type == "DynamicQuantizeLinear" and producers[q.input[0]].op_type == "Constant"
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert producers[dq.input[0]].op_type == "Transpose"


def test_canonical_form_reads_the_stored_float_weights(made):
    """Canonical: Conv / Gather of the stored float weights (exactly the reference's canonical
    weights), no quantization op left, and it computes what the quantized file computes up to the
    run-time rounding."""
    model = onnx.load(str(made / "reference_dynamic.onnx"))
    canon = canonicalize(model)
    ops = Counter(n.op_type for n in canon.model.graph.node)
    assert ops["Conv"] == 2 and ops["Gather"] == 1 and not set(ops) & QUANT_OPS, ops
    ref = canonicalize(onnx.load(str(made / "reference.onnx")))
    ref_convs = [n for n in ref.model.graph.node if n.op_type == "Conv"]
    weights = {t.name: numpy_helper.to_array(t) for t in canon.model.graph.initializer}
    ref_weights = {t.name: numpy_helper.to_array(t) for t in ref.model.graph.initializer}
    for ours, theirs in zip([n for n in canon.model.graph.node if n.op_type == "Conv"], ref_convs):
        np.testing.assert_array_equal(weights[ours.input[1]], ref_weights[theirs.input[1]])
        assert "quantized to uint8 per tensor at run time" in " ".join(canon.origins[ours.input[1]].steps)
    feeds = _feeds()
    for a, b in zip(_run(canon.model, feeds), _run(model, feeds)):
        assert float(np.abs(a - b).max() / np.abs(b).max()) < 0.05


@pytest.mark.parametrize("suspect, verdict", [("reference_dynamic", "identical"), ("permuted_dynamic", "permuted"),
                                              ("noisy_dynamic", "perturbed"), ("twin_dynamic", "not derived")])
def test_audit_of_a_run_time_quantized_copy(made, suspect, verdict):
    report = audit(str(made / f"{suspect}.onnx"), str(made / "reference.onnx"))
    assert report.verdict == verdict, report.summary
    if verdict != "not derived":
        assert report.derived and report.matched_fraction >= 0.99, report.summary
        assert "float32 quantized to uint8 per tensor at run time" in report.format_change, report.summary
        assert "derived with a format change" in report.summary


def _integer_matmul(scale_inputs: list[str]) -> onnx.ModelProto:
    """MatMulInteger of two activations, both quantized at run time, times the scales named."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["a"], ["aq", "as", "az"]),
             helper.make_node("DynamicQuantizeLinear", ["b"], ["bq", "bs", "bz"]),
             helper.make_node("MatMulInteger", ["aq", "bq", "az", "bz"], ["p"]),
             helper.make_node("Cast", ["p"], ["pf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", scale_inputs, ["s"]),
             helper.make_node("Mul", ["pf", "s"], ["y"])]
    graph = helper.make_graph(nodes, "mmi", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_two_activations_quantized_at_run_time_and_what_is_left_alone():
    """MatMulInteger of two run-time quantized activations times both scales: MatMul of the two
    floats (the same outputs up to the rounding); times one scale twice: not that product, left."""
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((2, 3, 4)).astype(np.float32),
             "b": rng.standard_normal((2, 4, 5)).astype(np.float32)}
    model = _integer_matmul(["as", "bs"])
    canon = canonicalize(model)
    assert [n.op_type for n in canon.model.graph.node] == ["MatMul"]
    (ours,), (theirs,) = _run(canon.model, feeds), _run(model, feeds)
    np.testing.assert_allclose(ours, feeds["a"] @ feeds["b"], rtol=1e-5, atol=1e-5)
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < 0.05
    wrong = canonicalize(_integer_matmul(["as", "as"]))
    assert "MatMulInteger" in {n.op_type for n in wrong.model.graph.node}


def test_restore_puts_the_weights_quantized_at_run_time_back(made, tmp_path):
    """audit -o of the permuted copy: the suspect's own file (DynamicQuantizeLinear of its Constant
    weights kept) with every group in the reference's order, verified; its stored float weights are
    then the reference copy's, bit for bit (the walker reads a weight through DynamicQuantizeLinear:
    one scale from the whole tensor's min and max, which no permutation changes)."""
    from onnx_resync import api

    out = tmp_path / "restored.onnx"
    report = api.audit(str(made / "permuted_dynamic.onnx"), str(made / "reference.onnx"), output=str(out))
    restored = report.restored
    restored = restored if isinstance(restored, dict) else restored.to_dict()
    assert restored["written"] and restored["verified"] and restored["restored"] == restored["groups"] == 3, restored
    model, expected = onnx.load(str(out)), onnx.load(str(made / "reference_dynamic.onnx"))
    assert Counter(n.op_type for n in model.graph.node)["DynamicQuantizeLinear"] == 4

    def stored(m):
        out = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        out.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"})
        return out

    ours, theirs = stored(model), stored(expected)
    for name in ("c1w", "c2w", "s1", "o1", "mu1", "v1", "m1", "m2", "b1", "table_quantized"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
