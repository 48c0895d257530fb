"""verify: equal models pass, a single changed weight fails, signatures and inputs are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import runtime
from onnx_resync.errors import ModelMismatchError, ResyncError, UsageError
from onnx_resync.verify import VerifyReport, verify

OPSET = [helper.make_opsetid("", 17)]


def mlp_weights(seed: int = 0, hidden: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((16, hidden)).astype(np.float32),
        "b1": rng.standard_normal(hidden).astype(np.float32),
        "W2": rng.standard_normal((hidden, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }


def mlp(weights: dict[str, np.ndarray], batch="N", out_name="y") -> onnx.ModelProto:
    """x[batch,16] -> MatMul/Add/Relu -> MatMul/Add -> y[batch,4]: ~660 weights."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET)


def permuted(weights: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    p = np.random.default_rng(seed).permutation(weights["b1"].size)
    return {"W1": weights["W1"][:, p], "b1": weights["b1"][p], "W2": weights["W2"][p], "b2": weights["b2"]}


@pytest.fixture
def models(tmp_path):
    w = mlp_weights()
    paths = {}
    paths["ref"] = tmp_path / "ref.onnx"
    onnx.save(mlp(w), paths["ref"])
    paths["copy"] = tmp_path / "copy.onnx"
    paths["copy"].write_bytes(paths["ref"].read_bytes())
    paths["perm"] = tmp_path / "perm.onnx"
    onnx.save(mlp(permuted(w)), paths["perm"])
    changed = {k: v.copy() for k, v in w.items()}
    changed["W2"][7, 2] += 1e-3
    paths["changed"] = tmp_path / "changed.onnx"
    onnx.save(mlp(changed), paths["changed"])
    return paths


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_resync", *args], capture_output=True, text=True, timeout=120)


# --- Python API ---------------------------------------------------------------------------------

def test_self_copy_and_permutation_pass(models):
    for other in ("ref", "copy", "perm"):
        report = verify(models["ref"], models[other], samples=3, device="cpu")
        assert report.equivalent, report.format_text()
        assert report.provider == "CPUExecutionProvider"
        (out,) = report.outputs
        assert out.name == "y" and out.shape == [1, 4] and out.numel == 12 and out.mismatches == 0
        assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert verify(models["ref"], models["copy"], device="cpu").outputs[0].max_abs_error == 0.0


def test_one_changed_weight_fails(models):
    report = verify(models["ref"], models["changed"], samples=4, device="cpu")
    assert not report.equivalent
    out = report.outputs[0]
    assert not out.passed and out.mismatches > 0
    assert 1e-5 < out.normalized_error < 1e-2
    assert "NOT EQUIVALENT" in report.format_text()


def test_model_protos_and_auto_device(models):
    ref = onnx.load(models["ref"])
    report = verify(ref, onnx.load(models["perm"]))  # auto: CUDA if it works, else CPU, quietly
    assert report.equivalent and report.device_requested == "auto"
    assert report.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_elementwise_mode(models):
    strict = verify(models["ref"], models["changed"], device="cpu", atol=1e-7, rtol=0)
    loose = verify(models["ref"], models["changed"], device="cpu", atol=1e-2)
    assert strict.mode == "elementwise" and not strict.equivalent
    assert loose.equivalent and loose.rtol == 0.0


def test_report_json_roundtrip(models):
    report = verify(models["ref"], models["changed"], device="cpu")
    data = json.loads(report.to_json())
    assert data["equivalent"] is False and data["outputs"][0]["name"] == "y"
    assert data["input_shapes"] == {"x": [1, 16]}
    assert isinstance(report, VerifyReport) and report.to_dict() == data


def test_signature_mismatch(tmp_path, models):
    other = tmp_path / "renamed.onnx"
    onnx.save(mlp(mlp_weights(), out_name="z"), other)
    with pytest.raises(ModelMismatchError, match="'y'"):
        verify(models["ref"], other, device="cpu")
    fixed = tmp_path / "fixed.onnx"
    onnx.save(mlp(mlp_weights(), batch=2), fixed)
    with pytest.raises(ModelMismatchError, match="dim 0"):
        verify(onnx.load(fixed), mlp(mlp_weights(), batch=3), device="cpu")


def test_npz_inputs(tmp_path, models):
    x = np.random.default_rng(5).standard_normal((7, 16))  # float64: converted to the model's float32
    npz = tmp_path / "in.npz"
    np.savez(npz, x=x)
    report = verify(models["ref"], models["perm"], inputs=npz, device="cpu")
    assert report.equivalent and report.input_shapes == {"x": [7, 16]} and report.outputs[0].shape == [7, 4]
    assert verify(models["ref"], models["perm"], inputs={"x": x}, device="cpu").inputs == "given"

    np.savez(tmp_path / "extra.npz", x=x, mask=x)
    with pytest.raises(UsageError, match="'mask'"):
        verify(models["ref"], models["perm"], inputs=tmp_path / "extra.npz", device="cpu")
    np.savez(tmp_path / "missing.npz", q=x)
    with pytest.raises(UsageError, match="'x'"):
        verify(models["ref"], models["perm"], inputs=tmp_path / "missing.npz", device="cpu")
    np.savez(tmp_path / "shape.npz", x=x[:, :5])
    with pytest.raises(UsageError, match="dim 1"):
        verify(models["ref"], models["perm"], inputs=tmp_path / "shape.npz", device="cpu")


def test_shapes_for_symbolic_dim(models):
    report = verify(models["ref"], models["perm"], shapes={"x": [9, 16]}, device="cpu")
    assert report.input_shapes == {"x": [9, 16]} and report.outputs[0].shape == [9, 4]
    with pytest.raises(UsageError):
        verify(models["ref"], models["perm"], shapes={"x": [9, 15]}, device="cpu")
    with pytest.raises(UsageError, match="'nope'"):
        verify(models["ref"], models["perm"], shapes={"nope": [1]}, device="cpu")


def test_cuda_required_is_clean_or_real(models):
    if runtime.cuda_possible():
        try:
            report = verify(models["ref"], models["perm"], device="cuda")
        except ResyncError:
            return  # driver present but libraries missing: a clean error is the contract
        assert report.provider == "CUDAExecutionProvider" and report.equivalent
    else:
        with pytest.raises(ResyncError, match="CUDA"):
            verify(models["ref"], models["perm"], device="cuda")


# --- comparison rules on hand-made outputs ------------------------------------------------------

def _const_model(values: np.ndarray) -> onnx.ModelProto:
    """Outputs x unchanged and the constant `values`: lets tests plant NaN, inf, ints, bools."""
    elem = helper.np_dtype_to_tensor_dtype(values.dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_out"]), helper.make_node("Identity", ["c"], ["out"])],
        "const",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("out", elem, list(values.shape))],
        [numpy_helper.from_array(values, "c")],
    )
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET)


@pytest.mark.parametrize(
    "ref, cand, equal",
    [
        ([1.0, np.nan, 3.0, 4.0], [1.0, np.nan, 3.0, 4.0], True),  # NaN in the same place
        ([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], False),  # NaN only on one side
        ([1.0, 2.0, np.inf, 4.0], [1.0, 2.0, np.inf, 4.0], True),
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], True),  # all-zero reference: no division by zero
        ([0.0, 0.0, 0.0, 0.0], [0.0, 1e-30, 0.0, 0.0], False),
    ],
)
def test_float_special_values(ref, cand, equal):
    report = verify(_const_model(np.array(ref, np.float32)), _const_model(np.array(cand, np.float32)), device="cpu")
    assert report.equivalent is equal
    json.loads(report.to_json())  # inf/nan never produce invalid JSON


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_and_bool_outputs_exact(dtype):
    ref = np.array([1, 0, 1, 1], dtype=dtype)
    cand = ref.copy()
    assert verify(_const_model(ref), _const_model(cand), device="cpu").equivalent
    cand[2] = 0
    report = verify(_const_model(ref), _const_model(cand), device="cpu", tolerance=1.0)
    assert not report.equivalent and report.outputs[1].mismatches == 1


def test_random_inputs_by_dtype():
    specs = [
        runtime.TensorSpec("x", "tensor(float)", (None, 3)),
        runtime.TensorSpec("input_ids", "tensor(int64)", (2, None)),
        runtime.TensorSpec("attention_mask", "tensor(int32)", (2, 5)),
        runtime.TensorSpec("flag", "tensor(bool)", ()),
    ]
    a = runtime.random_inputs(specs, {"input_ids": [2, 7]}, samples=2, seed=3)
    b = runtime.random_inputs(specs, {"input_ids": [2, 7]}, samples=2, seed=3)
    assert len(a) == 2 and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])  # seeded
    assert not np.array_equal(a[0]["x"], a[1]["x"])  # samples differ
    assert a[0]["x"].shape == (1, 3) and a[0]["x"].dtype == np.float32
    assert a[0]["input_ids"].shape == (2, 7) and a[0]["input_ids"].min() >= 0 and a[0]["input_ids"].max() < 10
    assert set(np.unique(a[0]["attention_mask"])) <= {0, 1} and a[0]["attention_mask"].dtype == np.int32
    assert a[0]["flag"].dtype == np.bool_ and a[0]["flag"].shape == ()


# --- command line -------------------------------------------------------------------------------

def test_cli_pass_and_fail(models):
    ok = cli("verify", str(models["ref"]), str(models["perm"]), "--device", "cpu", "--samples", "2")
    assert ok.returncode == 0, ok.stderr
    assert "EQUIVALENT" in ok.stdout and "CPUExecutionProvider" in ok.stdout
    assert ok.stderr == ""  # no ORT loader noise
    bad = cli("verify", str(models["ref"]), str(models["changed"]), "--device", "cpu")
    assert bad.returncode == 1 and "NOT EQUIVALENT" in bad.stdout and "Traceback" not in bad.stderr


def test_cli_auto_device_is_quiet(models):
    proc = cli("verify", str(models["ref"]), str(models["copy"]))
    assert proc.returncode == 0 and proc.stderr == ""


def test_cli_json(models):
    proc = cli("verify", str(models["ref"]), str(models["changed"]), "--json", "--device", "cpu")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["equivalent"] is False and data["outputs"][0]["mismatches"] > 0


def test_cli_signature_mismatch(tmp_path, models):
    other = tmp_path / "renamed.onnx"
    onnx.save(mlp(mlp_weights(), out_name="logits"), other)
    proc = cli("verify", str(models["ref"]), str(other), "--device", "cpu")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-resync: error:") and "'y'" in lines[0]


def test_cli_inputs_and_shape(tmp_path, models):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((5, 16), np.float32))
    proc = cli("verify", str(models["ref"]), str(models["perm"]), "--inputs", str(npz), "--json", "--device", "cpu")
    assert proc.returncode == 0 and json.loads(proc.stdout)["input_shapes"] == {"x": [5, 16]}
    proc = cli("verify", str(models["ref"]), str(models["perm"]), "--shape", "x:6,16", "--json", "--device", "cpu")
    assert proc.returncode == 0 and json.loads(proc.stdout)["outputs"][0]["shape"] == [6, 4]


@pytest.mark.parametrize("spec", ["x6,16", "x:6,a", ":6", "x:-1,16"])
def test_cli_bad_shape_is_usage_error(models, spec):
    proc = cli("verify", str(models["ref"]), str(models["perm"]), "--shape", spec, "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-resync: error:")


def test_cli_missing_npz(tmp_path, models):
    proc = cli("verify", str(models["ref"]), str(models["perm"]), "--inputs", str(tmp_path / "no.npz"))
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1
