"""verify: equal models pass, a single changed weight fails, signatures and inputs are checked.

Command-line tests run the CLI's main in the shared worker (tests/cli_worker.py); the two that check a
fresh process says nothing on stderr (ONNX Runtime's loader noise) run `python -m onnx_resync`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cli_worker
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


def process(*args: str) -> subprocess.CompletedProcess:
    """`python -m onnx_resync *args`, a process of its own."""
    return subprocess.run([sys.executable, "-m", "onnx_resync", *args], capture_output=True, text=True, timeout=120)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The same through the CLI's main in the shared worker."""
    return cli_worker.run(*args, timeout=120)


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
    ok = process("verify", str(models["ref"]), str(models["perm"]), "--device", "cpu", "--samples", "2")
    assert ok.returncode == 0, ok.stderr
    assert "EQUIVALENT" in ok.stdout and "CPUExecutionProvider" in ok.stdout
    assert ok.stderr == ""  # no ORT loader noise
    bad = process("verify", str(models["ref"]), str(models["changed"]), "--device", "cpu")
    assert bad.returncode == 1 and "NOT EQUIVALENT" in bad.stdout and "Traceback" not in bad.stderr


def test_cli_auto_device_is_quiet(models):
    proc = process("verify", str(models["ref"]), str(models["copy"]))
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


# --- checks that cannot pass by accident (issue 18) ---------------------------------------------

from onnx_resync.inputs import MAX_SAMPLES, MAX_VARIED_FEEDS, plan_variations  # noqa: E402


def unrelated(tmp_path):
    path = tmp_path / "unrelated.onnx"
    onnx.save(mlp(mlp_weights(seed=7)), path)
    return path


def test_empty_batch_by_shape_cannot_check(tmp_path, models):
    for other in (models["perm"], unrelated(tmp_path)):  # was EQUIVALENT for both, nothing compared
        report = verify(models["ref"], other, shapes={"x": [0, 16]}, device="cpu")
        assert report.verdict == "cannot check" and not report.equivalent, report.format_text()
        assert report.outputs[0].compared == 0 and report.compared == 0
        assert "empty" in report.reason and "[0, 16]" in report.reason
        assert "CANNOT CHECK" in report.format_text() and "compared 0 finite values" in report.format_text()


def test_empty_batch_by_npz_cannot_check(tmp_path, models):
    npz = tmp_path / "empty.npz"
    np.savez(npz, x=np.zeros((0, 16), np.float32))
    for other in (models["perm"], unrelated(tmp_path)):
        report = verify(models["ref"], other, inputs=npz, device="cpu")
        assert report.verdict == "cannot check" and not report.equivalent
        assert json.loads(report.to_json())["verdict"] == "cannot check"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38])
def test_non_finite_inputs_cannot_pass(tmp_path, models, value):
    x = np.full((3, 16), value, np.float32)
    for other in (models["perm"], unrelated(tmp_path)):
        report = verify(models["ref"], other, inputs={"x": x}, device="cpu")
        assert not report.equivalent and report.verdict in ("cannot check", "not equivalent"), report.format_text()
    assert verify(models["ref"], unrelated(tmp_path), inputs={"x": x}, device="cpu").verdict == "cannot check"


@pytest.mark.parametrize(
    "ref, cand, verdict",
    [
        ([np.nan] * 4, [np.nan] * 4, "cannot check"),  # both all NaN: was equivalent
        ([np.inf, -np.inf, np.inf, np.inf], [np.inf, -np.inf, np.inf, np.inf], "cannot check"),
        ([np.nan, 2.0, 3.0, 4.0], [np.nan, 2.0, 3.0, 4.0], "equivalent"),  # 3 finite values compared
        ([1.0, 2.0, np.inf, 4.0], [1.0, 2.0, 5.0, 4.0], "not equivalent"),  # inf vs a number
        ([1.0, 2.0, 5.0, 4.0], [1.0, 2.0, np.inf, 4.0], "not equivalent"),
        ([1.0, 2.0, np.inf, 4.0], [1.0, 2.0, -np.inf, 4.0], "not equivalent"),
        ([np.nan, 2.0, 3.0, 4.0], [np.inf, 2.0, 3.0, 4.0], "not equivalent"),
        ([np.nan] * 4, [1.0, 2.0, 3.0, 4.0], "not equivalent"),  # a mismatch beats "cannot check"
    ],
)
def test_non_finite_outputs(ref, cand, verdict):
    report = verify(_const_model(np.array(ref, np.float32)), _const_model(np.array(cand, np.float32)), device="cpu")
    assert report.verdict == verdict and report.equivalent is (verdict == "equivalent"), report.format_text()
    assert report.outputs[1].compared == sum(np.isfinite(ref) & np.isfinite(cand))
    json.loads(report.to_json())


def test_inf_against_a_number_fails_elementwise():
    ref, cand = np.array([1.0, np.inf], np.float32), np.array([1.0, 5.0], np.float32)
    report = verify(_const_model(ref), _const_model(cand), device="cpu", atol=0.0, rtol=0.5)  # rtol*inf = inf
    assert report.verdict == "not equivalent"


def test_equivalent_pair_reports_what_it_compared(models):
    report = verify(models["ref"], models["perm"], samples=3, device="cpu")
    assert report.verdict == "equivalent" and report.equivalent and report.reason == "compared 12 finite values"
    assert report.outputs[0].compared == 12 and report.compared == 12 and report.feeds == 3
    assert report.varied == {}  # nothing decides a branch: nothing varied
    assert "compared 12 finite values" in report.format_text()
    report = verify(models["ref"], models["perm"], shapes={"x": [5, 16]}, device="cpu")
    assert report.equivalent and report.compared == 20


def test_random_inputs_never_empty_from_symbolic_dims():
    specs = [runtime.TensorSpec("x", "tensor(float)", (None, None, 3)), runtime.TensorSpec("n", "tensor(int64)", (None,))]
    (feed,) = runtime.random_inputs(specs)
    assert feed["x"].shape == (1, 1, 3) and feed["n"].shape == (1,)


def test_samples_are_bounded(models):
    with pytest.raises(UsageError, match=str(MAX_SAMPLES)):
        verify(models["ref"], models["perm"], samples=MAX_SAMPLES + 1, device="cpu")
    with pytest.raises(UsageError):
        verify(models["ref"], models["perm"], samples=0, device="cpu")


# If / Loop models: every branch runs, whatever the seed

def if_model(w1: np.ndarray, w2: np.ndarray, cond_input: str = "bool") -> onnx.ModelProto:
    """x[1,16], cond -> If(cond) then x @ W1 else x @ W2 -> y[1,4]; W1, W2 read from the outer scope.
    cond_input "bool": a bool input; "int": an int64 input k and cond = Greater(Cast(k), 5)."""
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["y_else"])], "else", [],
                               [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, 4])])
    nodes, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    if cond_input == "bool":
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        cond = "cond"
    else:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, []))
        inits.append(numpy_helper.from_array(np.array(5, np.int32), "five"))
        nodes += [helper.make_node("Cast", ["k"], ["k32"], to=TensorProto.INT32),
                  helper.make_node("Greater", ["k32", "five"], ["cond"])]
        cond = "cond"
    nodes.append(helper.make_node("If", [cond], ["y"], then_branch=then_g, else_branch=else_g))
    graph = helper.make_graph(nodes, "if", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              inits)
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET)


@pytest.fixture
def branch_weights():
    rng = np.random.default_rng(3)
    w1, w2 = (rng.standard_normal((16, 4)).astype(np.float32) for _ in range(2))
    w1_changed = w1.copy()
    w1_changed[3, 1] += 0.5
    return w1, w2, w1_changed


@pytest.mark.parametrize("kind", ["bool", "int"])
@pytest.mark.parametrize("seed", range(4))
def test_if_branch_change_is_caught_whatever_seed(branch_weights, kind, seed):
    w1, w2, w1_changed = branch_weights
    report = verify(if_model(w1, w2, kind), if_model(w1_changed, w2, kind), seed=seed, device="cpu")
    assert report.verdict == "not equivalent" and not report.equivalent, report.format_text()
    name = "cond" if kind == "bool" else "k"
    assert name in report.varied and report.feeds == 1 + len(report.varied[name])
    if kind == "bool":
        assert report.varied["cond"] == [False, True]
    else:  # both sides of the constant 5 it is compared with
        assert {4, 5, 6} <= set(report.varied["k"]) and "compared with 5" in report.varied_why["k"]


@pytest.mark.parametrize("kind", ["bool", "int"])
def test_if_model_equal_branches_pass(branch_weights, kind):
    w1, w2, _ = branch_weights
    report = verify(if_model(w1, w2, kind), if_model(w1.copy(), w2.copy(), kind), device="cpu")
    assert report.verdict == "equivalent" and report.compared == 4 * report.feeds
    text = report.format_text()
    assert "varied" in text and ("cond in {False, True}" in text or "k in {" in text)


def test_nested_if_and_loop_inputs_are_varied():
    """A bool reaching an inner If through Not, an int trip count of a Loop: both varied; a float
    input that only feeds data is not."""
    inner_then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "t", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    inner_else = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "e", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])])
    outer_then = helper.make_graph(
        [helper.make_node("Not", ["inner"], ["ninner"]),
         helper.make_node("If", ["ninner"], ["o"], then_branch=inner_then, else_branch=inner_else)],
        "ot", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    outer_else = helper.make_graph([helper.make_node("Identity", ["x"], ["oe"])], "oe", [],
                                   [helper.make_tensor_value_info("oe", TensorProto.FLOAT, [1])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["acc", "x"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["outer"], ["y"], then_branch=outer_then, else_branch=outer_else),
         helper.make_node("Loop", ["n", ""], ["z"], body=body)],
        "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("outer", TensorProto.BOOL, []),
         helper.make_tensor_value_info("inner", TensorProto.BOOL, []), helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("z0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
    )
    graph.node[1].input.append("z0")
    model = helper.make_model(graph, ir_version=8, opset_imports=OPSET)
    plan = plan_variations([model], runtime.specs(model)[0])
    assert list(plan.values) == ["outer", "inner", "n"]
    assert plan.values["outer"] == [False, True] and "If condition" in plan.why["inner"]
    assert {0, 1} <= set(plan.values["n"]) and "Loop" in plan.why["n"]
    report = verify(model, model, device="cpu")
    assert report.equivalent and report.feeds == 1 + 2 * 2 * len(plan.values["n"])


def test_many_bool_inputs_each_alone_past_the_cap():
    n = 7  # 2**7 combinations > MAX_VARIED_FEEDS
    assert 2 ** n > MAX_VARIED_FEEDS
    specs = [runtime.TensorSpec(f"b{i}", "tensor(bool)", ()) for i in range(n)]
    plan = plan_variations([], specs)
    assignments, how = plan.assignments()
    assert len(assignments) == 2 * n and "each input alone" in how
    assert sum(1 for a in assignments if a == {"b3": True}) == 1
    few = plan_variations([], specs[:3]).assignments()
    assert len(few[0]) == 8 and few[1] == "every combination"


# command line: exit codes 0 equivalent, 1 not, 4 cannot check; --samples bounded

def test_cli_cannot_check_exit_4(tmp_path, models):
    proc = cli("verify", str(models["ref"]), str(unrelated(tmp_path)), "--shape", "x:0,16", "--device", "cpu")
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    assert "CANNOT CHECK" in proc.stdout and "compared 0 finite values" in proc.stdout and proc.stderr == ""
    npz = tmp_path / "empty.npz"
    np.savez(npz, x=np.zeros((0, 16), np.float32))
    proc = cli("verify", str(models["ref"]), str(models["perm"]), "--inputs", str(npz), "--json", "--device", "cpu")
    assert proc.returncode == 4 and json.loads(proc.stdout)["verdict"] == "cannot check"
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((2, 16), np.nan, np.float32))
    proc = cli("verify", str(models["ref"]), str(unrelated(tmp_path)), "--inputs", str(nan), "--device", "cpu")
    assert proc.returncode == 4
    ok = cli("verify", str(models["ref"]), str(models["perm"]), "--device", "cpu")
    assert ok.returncode == 0 and "compared 4 finite values" in ok.stdout


def test_cli_if_branch_exit_1(tmp_path, branch_weights):
    w1, w2, w1_changed = branch_weights
    ref, cand = tmp_path / "if_ref.onnx", tmp_path / "if_cand.onnx"
    onnx.save(if_model(w1, w2), ref)
    onnx.save(if_model(w1_changed, w2), cand)
    for seed in ("0", "1"):
        proc = cli("verify", str(ref), str(cand), "--seed", seed, "--device", "cpu")
        assert proc.returncode == 1 and "NOT EQUIVALENT" in proc.stdout and "cond in {False, True}" in proc.stdout


def test_cli_samples_bound_and_help(models):
    proc = cli("verify", str(models["ref"]), str(models["perm"]), "--samples", str(MAX_SAMPLES + 1))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    help_text = " ".join(cli("verify", "--help").stdout.split())
    assert f"1..{MAX_SAMPLES}" in help_text and "4 cannot check" in help_text


def test_permute_refuses_to_write_when_it_cannot_check(tmp_path, models):
    out = tmp_path / "p.onnx"
    proc = cli("permute", str(models["ref"]), "-o", str(out), "--shape", "x:0,16", "--device", "cpu")
    assert proc.returncode != 0 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot check" in lines[0] and "Traceback" not in proc.stderr
    from onnx_resync import api
    from onnx_resync.errors import CheckFailed

    with pytest.raises(CheckFailed, match="cannot check"):
        api.permute(str(models["ref"]), out, verify_options={"shapes": {"x": [0, 16]}, "device": "cpu"})
    assert not out.exists()
    _, ok = api.permute(str(models["ref"]), out, verify_options={"device": "cpu"})
    assert ok.verified and out.exists() and ok.verify["compared"] == 4


def test_resync_refuses_to_write_when_it_cannot_check(tmp_path, models):
    from onnx_resync import api
    from onnx_resync.errors import CheckFailed

    out = tmp_path / "r.onnx"
    with pytest.raises(CheckFailed, match="cannot check"):
        api.resync(str(models["perm"]), str(models["ref"]), out, verify_options={"shapes": {"x": [0, 16]}, "device": "cpu"})
    assert not out.exists()
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((2, 16), np.nan, np.float32))
    proc = cli("resync", str(models["perm"]), "--reference", str(models["ref"]), "-o", str(out),
               "--inputs", str(nan), "--device", "cpu")
    assert proc.returncode != 0 and not out.exists() and "cannot check" in proc.stderr


# --- a rewrite's refusal (reduce) says what was refused and why --------------------------------

def test_a_refused_rewrite_names_the_rewrite_not_the_walker(models):
    """reduce checks each rewrite with verify: a rewrite that changes the function is refused with that
    cause, never 'a walker rule is wrong' nor a request for other inputs (the evidence is clear); a
    rewritten model ONNX Runtime cannot open is refused as such; a check that cannot run on the input
    model does not blame the rewrite."""
    from onnx_resync.reduce.pipeline import _Proof
    from onnx_resync.verify import explain

    ref = onnx.load(models["ref"])
    changed = mlp({k: (v + 1.0 if k == "W2" else v) for k, v in mlp_weights().items()})
    ok, why = _Proof(ref, {"device": "cpu"})(changed)
    assert not ok and why.startswith("the rewrite changes the function: output 'y' differs by"), why
    assert "walker" not in why and "--shape" not in why and "far above that floor" in why
    report = verify(ref, changed, device="cpu")
    assert "a walker rule is wrong" in explain(report)  # verify's own message (permute's check) as before
    assert explain(report, rewrite="the fold").startswith("the fold changes the function")

    bad = onnx.load(models["ref"])
    w1 = next(t for t in bad.graph.initializer if t.name == "W1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1)[:, :-1], "W1"))  # one neuron short
    ok, why = _Proof(ref, {"device": "cpu"})(bad)
    assert not ok and why.startswith("the rewritten model is refused: onnxruntime cannot open the candidate"), why

    ok, why = _Proof(ref, {"device": "cpu", "shapes": {"x": [1, 17]}})(onnx.load(models["copy"]))
    assert not ok and why.startswith("the check could not run on the input model (not the rewrite's doing)"), why


def test_a_rewrite_within_rounding_is_not_proven_and_says_so(models):
    """An error the reference's own rounding floor explains: 'not proven', with the floor, never
    'changes the function'."""
    from onnx_resync.verify import explain

    report = verify(models["ref"], models["changed"], device="cpu")
    o = report.outputs[0]
    o.noise_floor = o.max_abs_error  # as if the reference moved this much by itself
    text = explain(report, rewrite="the rewrite")
    assert text.startswith("the rewrite is not proven: output 'y' differs by") and "within what rounding" in text


# ---- an ill-conditioned float32 output: its floor includes a float32 rounding of the inputs ----

def _ill_conditioned(seed: int = 1, width: int = 512, scale: float = 30.0):
    """x -> MatMul(large weights) -> Relu -> MatMul(large weights) + bias -> Sigmoid, the bias set so
    the logit is -14 on the fed x: a probability near 1e-6 whose logit is a sum of large terms that
    cancel, so a correct permutation's reordered sum moves it by up to 15% (silero-vad's speech
    probability after its LSTM moved by 1.3e-5 the same way, with a floor of 0 across ORT levels)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, width)) * scale).astype(np.float32)
    w2 = (rng.standard_normal((width, 1)) * scale).astype(np.float32)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    z = float((np.maximum(x @ w1, 0) @ w2)[0, 0])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["z"]), helper.make_node("Add", ["z", "b"], ["zb"]),
             helper.make_node("Sigmoid", ["zb"], ["y"])]
    graph = helper.make_graph(nodes, "ill", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                               numpy_helper.from_array(np.array([-z - 14.0], np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), x


def test_an_ill_conditioned_float32_output_is_judged_against_a_rounding_of_its_inputs(tmp_path):
    model, x = _ill_conditioned()
    np.savez(tmp_path / "x.npz", x=x)
    from onnx_resync import api

    permuted, _ = api.permute(model, seed=0, check=False)
    report = verify(model, permuted, inputs=str(tmp_path / "x.npz"), device="cpu")
    (out,) = report.outputs
    assert out.normalized_error > 1e-2  # far past the tolerance: the sum's order alone did this
    assert report.equivalent and "float32 rounding" in out.note, out


def test_an_ill_conditioned_output_still_catches_a_wrong_weight(tmp_path):
    model, x = _ill_conditioned()
    np.savez(tmp_path / "x.npz", x=x)
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[:, [0, 1]] = w1[:, [1, 0]]  # two hidden units swapped on one side only
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    report = verify(model, bad, inputs=str(tmp_path / "x.npz"), device="cpu")
    assert not report.equivalent and report.outputs[0].normalized_error > 0.5
