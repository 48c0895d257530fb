"""audit/storage.py: the bound of a canonical weight computed from stored tensors is propagated from
each stored operand's storage, never taken from the result's (issue 14.3).

A Conv followed by a BatchNormalization whose variances are unusual (as trained detectors hold them:
PaddleOCR's det head has variances of 1e7..1e8), converted to float16 by onnxconverter-common and by
ONNX Runtime's converter. The canonical form folds the BatchNorm into the Conv: w * gamma /
sqrt(var + eps). A variance in float16's subnormal range is stored a few percent off, and one above
the converter's clamp (1e4 / 65504) is stored as the clamp, which says only "this or more": the
folded weight moves by a few percent there, and by up to 30x at the clamp, while the result's own
rounding (2^-11) explains neither. Measured by moving each stored operand (one ulp; the clamped
values to 0 or inf) and canonicalizing again.

- the identical fp16 copy: "identical" (was "perturbed beyond its float16 storage"), its permuted
  copy: "permuted";
- the same copy with one channel's gamma and beta 1.5x (a variance far from any clamp): "perturbed",
  and the weight named is that conv's: the bound still catches what the storage does not explain.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit import audit
from onnx_resync.audit.storage import _clamps_moved, _float_moved

C_IN, C_MID, C_OUT = 3, 24, 16
EPS = 1e-9  # BatchNormalization's epsilon: small, so that a subnormal variance's rounding shows


def _variances() -> np.ndarray:
    var = np.random.default_rng(1).uniform(0.5, 2.0, C_MID)
    var[:4] = [2e5, 7e6, 3e7, 9e7]  # above both converters' clamps: stored as 1e4 or 65504
    var[4:8] = [3e-7, 8e-7, 1.7e-6, 5e-6]  # float16 subnormals: 1-10% off when stored
    return var.astype(np.float32)


def conv_bn(perm: np.ndarray | None = None, scaled: int | None = None) -> onnx.ModelProto:
    """x -> Conv(3x3) -> BatchNorm -> Relu -> Conv(1x1) -> y; the middle channels in `perm` order;
    `scaled`: that channel's gamma and beta 1.5x (a one-sided change no storage explains)."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(C_MID, C_IN, 3, 3)).astype(np.float32) * 0.3
    b0 = rng.normal(size=C_MID).astype(np.float32) * 0.1
    gamma = rng.uniform(0.5, 1.5, C_MID).astype(np.float32)
    beta = rng.normal(size=C_MID).astype(np.float32) * 0.2
    mean = rng.normal(size=C_MID).astype(np.float32) * 0.1
    var = _variances()
    w1 = rng.normal(size=(C_OUT, C_MID, 1, 1)).astype(np.float32) * 0.3
    if scaled is not None:
        gamma[scaled] *= 1.5
        beta[scaled] *= 1.5
    p = np.arange(C_MID) if perm is None else perm
    w0, b0, gamma, beta, mean, var, w1 = w0[p], b0[p], gamma[p], beta[p], mean[p], var[p], w1[:, p]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w0, "w0"), (b0, "b0"), (gamma, "gamma"), (beta, "beta"),
                                                         (mean, "mean"), (var, "var"), (w1, "w1"))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], epsilon=EPS),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C_OUT, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fp16(model: onnx.ModelProto, converter: str) -> onnx.ModelProto:
    if converter == "onnxconverter-common":
        from onnxconverter_common.float16 import convert_float_to_float16
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number 90000000.0 will be truncated to 10000.0"
        out = convert_float_to_float16(model, keep_io_types=True)
    var = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "var"))
    assert var.dtype == np.float16 and np.isin(var, [1e4, 65504]).sum() == 4, var  # clamped by the tool
    return out


def test_float_probe_moves_one_ulp_towards_zero():
    v = np.array([1.0, -1.0, 0.0, 3e-7, 1.5, -65504], np.float16)
    moved = _float_moved(v)
    assert moved.dtype == np.float16
    np.testing.assert_array_equal(moved[[0, 1, 4]], np.array([1 - 2 ** -10, -1 + 2 ** -10, 1.5 - 2 ** -10], np.float16))
    assert moved[2] == np.float16(2 ** -24) and abs(float(moved[3])) < abs(float(v[3]))
    assert (np.abs(moved.astype(np.float64) - v.astype(np.float64))[[0, 3]] > 0).all()
    clamped = _clamps_moved(np.array([1e4, -65504, 2 ** -23, 2 ** -24, 0.5], np.float16))
    np.testing.assert_array_equal(clamped, np.array([np.inf, -np.inf, 0, 0, 0.5], np.float16))
    assert _clamps_moved(np.array([0.5, 3.0], np.float16)) is None


@pytest.mark.parametrize("converter", ["onnxconverter-common", "onnxruntime"])
def test_fp16_copy_of_a_folded_batchnorm_is_identical(converter):
    reference = conv_bn()
    report = audit(fp16(reference, converter), reference)
    assert report.verdict == "identical" and report.format_change == "float16", report.summary
    assert "converter's clip explains (4 of var at" in report.summary, report.summary  # what "within" rests on
    perm = np.random.default_rng(3).permutation(C_MID)
    report = audit(fp16(conv_bn(perm), converter), reference)
    assert report.verdict == "permuted" and report.moved > 0, report.summary


def test_fp16_copy_rescaled_beyond_its_storage_is_perturbed():
    reference = conv_bn()
    report = audit(fp16(conv_bn(scaled=12), "onnxconverter-common"), reference)
    assert report.verdict == "perturbed" and report.derived, report.summary
    assert report.precision["worst_weight"] == "w0", report.precision
    assert report.precision["beyond"]["elements"] <= C_IN * 9 + 1, report.precision["beyond"]  # that channel only


def test_a_failing_float_probe_keeps_the_integer_steps():
    """int8 weights dequantized with a float16 scale: the scale's ulp counts with the integer step;
    where a probe of the scale fails (a pass reading the constant's value), the integer steps are
    measured alone rather than none."""
    from onnx_resync.audit.canonical import canonicalize
    from onnx_resync.audit.storage import measure_steps

    rng = np.random.default_rng(0)
    q = rng.integers(-100, 100, (16, 8)).astype(np.int8)
    scale = np.array(0.0123, np.float16)
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale"),
             numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float16), "w2")]
    graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    canon = canonicalize(model)
    both = measure_steps(model, canon, list(canon.origins), canonicalize)
    assert both.probes == 2 and not both.failed  # q and its scale moved apart

    def failing(m: onnx.ModelProto):
        if numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "scale")) != scale:
            raise ValueError("a pass that reads the scale's value")
        return canonicalize(m)

    alone = measure_steps(model, canon, list(canon.origins), failing)
    assert alone.probes == 1 and not alone.failed and list(alone.steps) == ["w"]
    step = alone.steps["w"]
    assert np.all(step > 0.9 * float(scale)) and np.all(both.steps["w"] >= step)
