"""Every audit verdict, and a test that shows it can come out the other way (issue 14.3).

- int8 (QDQ, per channel, onnxruntime.quantization) copy of a bundled model: "derived with a format
  change" (identical, stored as int8 per channel: every weight within half a step of the file's own
  scale); the same from a copy with noise 0.05 x std added before quantizing: "perturbed", noise
  named, computed on what lies beyond the bound;
- int4 weights in blocks of 16 (DequantizeLinear block_size): a format change; one stored value two
  steps off: "perturbed", that weight named;
- fp16 copy (as onnxconverter-common writes it: |w| < 1e-7 clamped to 1e-7): "derived with a
  format change" (float16); one weight moved beyond its fp16 rounding: "perturbed", and the worst
  weight named is that one (worst ratio to its bound), not the one with the largest relative
  difference;
- a model whose weights all sit inside If branches: "cannot judge" (exit 4) whether its weights were
  redrawn or not: the canonical form does not reach subgraphs, so nothing of the reference is
  compared, and a verdict is never stronger than its evidence (unchanged: "cannot judge" too, rather
  than "identical", because nothing was compared). The same model with most of its weights outside
  the If: judged (identical), and redrawn there: not derived;
- the unrelated twin (models/variants/<name>_seed1.onnx), plain and int8: "not derived".

Models are built with onnx.helper (ir_version 8, opset 17); quantized copies with quantize_static,
calibrated on models/<name>_test.npz (tests/quantize_bundled.py), made once per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit import audit
from onnx_resync.audit.html import VERDICT_COLOURS
from onnx_resync.audit.report import EXIT_CANNOT_JUDGE, MIN_COMPARED_SHARE
from quantize_bundled import quantize

MODELS = Path(__file__).resolve().parent.parent / "models"
NAME = "mlp"


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _noisy(model: onnx.ModelProto, strength: float, seed: int = 0) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size > 1:
            a = a + rng.normal(size=a.shape) * strength * a.std()
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
    return out


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """name -> a test file, built on first use and kept for the session."""
    folder = tmp_path_factory.mktemp("verdicts")
    cache: dict[str, Path] = {}

    def get(what: str) -> Path:
        if what in cache:
            return cache[what]
        reference = MODELS / f"{NAME}.onnx"
        if what == "int8":
            path = quantize(reference, folder / "int8.onnx", NAME, "qdq")
        elif what == "int8_noisy":
            noisy = _save(_noisy(onnx.load(str(reference)), 0.05), folder / "noisy.onnx")
            path = quantize(noisy, folder / "int8_noisy.onnx", NAME, "qdq")
        elif what == "twin_int8":
            path = quantize(MODELS / "variants" / f"{NAME}_seed1.onnx", folder / "twin_int8.onnx", NAME, "qdq")
        else:
            raise KeyError(what)
        cache[what] = path
        return path

    return get


# ---- int8: a format change, unless perturbed beyond the storage -----------------------------------
def test_int8_copy_is_derived_with_a_format_change(made):
    path = made("int8")
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node)
    report = audit(str(path), str(MODELS / f"{NAME}.onnx"))
    assert report.verdict == "identical" and report.derived and report.exit_code == 0, report.summary
    assert report.format_change.startswith("int8 per channel"), report.format_change
    assert "derived with a format change" in report.summary and "within half a step" in report.summary
    assert report.precision["within"] and report.precision["worst_ratio"] <= 1.0
    assert not report.perturbation["kinds"], report.perturbation
    assert report.compared["share"] == 1.0 and report.matched_fraction >= 0.99


def test_int8_copy_of_a_noisy_model_is_perturbed(made):
    report = audit(str(made("int8_noisy")), str(MODELS / f"{NAME}.onnx"))
    assert report.verdict == "perturbed" and report.derived and report.exit_code == 0, report.summary
    assert not report.precision["within"] and report.precision["worst_ratio"] > 10
    kinds = report.perturbation["kinds"]
    assert any(k.startswith("noise") for k in kinds), kinds
    # measured beyond the bound: a fraction of the 0.05 x std that was added, not the rounding
    assert 0.005 < report.perturbation["noise_relative_std"] < 0.05, report.perturbation
    assert "beyond its int8 per channel" in report.summary, report.summary


def _int4_blocked(quantized: bool, moved: int = 0) -> onnx.ModelProto:
    """Two MatMul layers; quantized: weights int4 behind DequantizeLinear with blocks of 16 along the
    input axis (opset 21, ir_version 10: int4 needs them); moved: the first stored value moved by
    that many steps."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(64, 32)).astype(np.float32), "w2": rng.normal(size=(32, 8)).astype(np.float32)}
    inits, nodes = [], []
    for name, w in weights.items():
        if not quantized:
            inits.append(numpy_helper.from_array(w, name))
            continue
        blocks = w.reshape(w.shape[0] // 16, 16, w.shape[1])
        scale = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)
        q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).reshape(w.shape).astype(np.int8)
        if name == "w1" and moved:
            q[0, 0] = q[0, 0] - moved if q[0, 0] > 0 else q[0, 0] + moved
        inits += [helper.make_tensor(name + "_q", TensorProto.INT4, w.shape, q.reshape(-1).tolist()),
                  numpy_helper.from_array(scale, name + "_scale")]
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_scale"], [name], axis=0, block_size=16))
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21 if quantized else 17)])
    model.ir_version = 10 if quantized else 8
    return model


@pytest.mark.parametrize("moved,verdict", [(0, "identical"), (2, "perturbed")])
def test_int4_in_blocks(moved, verdict):
    report = audit(_int4_blocked(True, moved), _int4_blocked(False))
    assert report.verdict == verdict and report.derived, report.summary
    assert report.format_change == "int4 in blocks of 16", report.format_change
    if moved:  # two steps off: beyond half a step, and that weight is named
        assert report.precision["worst_weight"] == "w1_q" and 2 < report.precision["worst_ratio"] < 5
    else:
        assert "stored as int4 in blocks of 16: every weight within half a step" in report.summary


# ---- fp16: rounding and the converters' clamp ---------------------------------------------------
def _fp16_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights, inputs and outputs float16, tiny weights clamped as onnxconverter-common does
    (min_positive_val=1e-7: 0 < |w| < 1e-7 stored as +-1e-7, i.e. 1.19e-7 in float16)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            a = np.where((a != 0) & (np.abs(a) < 1e-7), np.sign(a) * 1e-7, a)
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16), t.name))
    for vi in list(out.graph.input) + list(out.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def _with_values(model: onnx.ModelProto, name: str, index: tuple, value: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    t = next(t for t in out.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    a[index] = value
    t.CopyFrom(numpy_helper.from_array(a, name))
    return out


def _matrices(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if len(t.dims) == 2]


def test_fp16_copy_is_derived_with_a_format_change(tmp_path):
    base = onnx.load(str(MODELS / f"{NAME}.onnx"))
    first = _matrices(base)[0]
    reference = _with_values(base, first, (0, 0), 4.4e-8)  # below the clamp: stored as 1.19e-7
    report = audit(_fp16_copy(reference), reference)
    assert report.verdict == "identical" and report.format_change == "float16", report.summary
    assert "within its rounding" in report.summary and report.exit_code == 0


def test_fp16_copy_moved_beyond_its_rounding_is_perturbed_and_names_that_weight():
    base = onnx.load(str(MODELS / f"{NAME}.onnx"))
    small, other = _matrices(base)[:2]
    reference = _with_values(base, small, (0, 0), 1e-4)
    suspect = _fp16_copy(_with_values(reference, small, (0, 0), 1.1e-4))  # 1e-5: ~100x its fp16 bound
    report = audit(suspect, reference)
    assert report.verdict == "perturbed" and report.derived, report.summary
    p = report.precision
    assert p["worst_weight"] == small and p["worst_ratio"] > 10, p
    # the largest relative difference is fp16 rounding elsewhere, within its bound
    assert p["worst_relative_weight"] != small, p


# ---- cannot judge: weights the comparison does not reach -------------------------------------------
def _branch(name: str, rng, n_in: int, n_h: int = 16, n_out: int = 4) -> onnx.GraphProto:
    w1 = numpy_helper.from_array(rng.normal(size=(n_in, n_h)).astype(np.float32), f"{name}_w1")
    b1 = numpy_helper.from_array(rng.normal(size=(n_h,)).astype(np.float32), f"{name}_b1")
    w2 = numpy_helper.from_array(rng.normal(size=(n_h, n_out)).astype(np.float32), f"{name}_w2")
    nodes = [helper.make_node("MatMul", ["h", w1.name], [f"{name}_a"]),
             helper.make_node("Add", [f"{name}_a", b1.name], [f"{name}_b"]),
             helper.make_node("Relu", [f"{name}_b"], [f"{name}_r"]),
             helper.make_node("MatMul", [f"{name}_r", w2.name], [f"{name}_y"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, n_out])],
                             [w1, b1, w2])


def if_model(seed: int, outside: int = 0, outside_seed: int | None = None, hidden: int = 16) -> onnx.ModelProto:
    """x [1, 8] -> (outside > 0: MatMul by an outer weight [8, outside], Relu, MatMul [outside, 8]) ->
    If(cond) with a two-layer MLP of `hidden` neurons in each branch. seed draws the branch weights,
    outside_seed (default seed) the outer ones."""
    rng = np.random.default_rng(seed)
    outer_rng = np.random.default_rng(seed if outside_seed is None else outside_seed)
    nodes, inits = [], []
    if outside:
        a = numpy_helper.from_array(outer_rng.normal(size=(8, outside)).astype(np.float32), "outer_a")
        b = numpy_helper.from_array(outer_rng.normal(size=(outside, 8)).astype(np.float32), "outer_b")
        inits += [a, b]
        nodes += [helper.make_node("MatMul", ["x", "outer_a"], ["u"]), helper.make_node("Relu", ["u"], ["v"]),
                  helper.make_node("MatMul", ["v", "outer_b"], ["h"])]
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["h"]))
    nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=_branch("then", rng, 8, hidden),
                                  else_branch=_branch("else", rng, 8, hidden)))
    graph = helper.make_graph(nodes, "if_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("suspect_seed", [1, 0], ids=["redrawn", "unchanged"])
def test_weights_inside_if_branches_cannot_be_judged(suspect_seed, tmp_path):
    # branch weights are compared where they pair up (test_audit_subgraphs.py); another width does not
    reference = _save(if_model(0), tmp_path / "reference.onnx")
    suspect = _save(if_model(suspect_seed, hidden=24), tmp_path / "suspect.onnx")
    report = audit(str(suspect), str(reference), html=tmp_path / "report.html")
    assert report.verdict == "cannot judge" and not report.derived, report.summary
    assert report.exit_code == EXIT_CANNOT_JUDGE == 4
    c = report.compared
    assert c["parameters"] == 0 and c["of"] == c["in_subgraphs"] == 2 * (8 * 16 + 16 + 16 * 4) and c["share"] == 0.0
    assert "If/Loop/Scan" in report.summary and "0.0%" in report.summary, report.summary
    assert "identical" not in report.summary
    # 0 of 0 is never 100%: no neuron to match is no fraction at all
    data = json.loads(report.to_json())
    assert data["matched_fraction"] is None and data["verdict"] == "cannot judge" and data["compared"]["share"] == 0.0
    assert not any("100.0%" in e for e in report.evidence), report.evidence
    page = (tmp_path / "report.html").read_text()
    assert "CANNOT JUDGE" in page and VERDICT_COLOURS["cannot judge"] in page
    assert len(set(VERDICT_COLOURS.values())) == 4  # its own colour: not a pass's, a warning's or a fail's


def test_cannot_judge_exits_4_on_the_command_line(tmp_path):
    reference = _save(if_model(0), tmp_path / "reference.onnx")
    suspect = _save(if_model(1, hidden=24), tmp_path / "suspect.onnx")
    run = subprocess.run([sys.executable, "-m", "onnx_resync", "audit", str(suspect), "--reference", str(reference)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr
    assert run.stdout.startswith("verdict: cannot judge")


@pytest.mark.parametrize("outside_seed,verdict", [(0, "identical"), (5, "not derived")])
def test_most_weights_outside_the_branches_are_judged(outside_seed, verdict, tmp_path):
    """The other way round: when the weights the comparison reaches are most of the reference's
    parameters, the verdict is judged (and the share is stated)."""
    outside = 64  # 2 x 8 x 64 = 1024 outer parameters against 416 in the branches: 71% compared
    reference = if_model(0, outside)
    suspect = if_model(0, outside, outside_seed=outside_seed, hidden=24)  # branches that cannot be paired
    report = audit(suspect, reference)
    share = report.compared["share"]
    assert MIN_COMPARED_SHARE <= share < 1.0 and report.compared["in_subgraphs"] == 416, report.compared
    assert report.verdict == verdict, report.summary
    assert f"({100 * share:.1f}%)" in report.summary


def test_a_reference_without_parameters_cannot_be_judged():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = audit(model, model)
    assert report.verdict == "cannot judge" and report.compared["share"] is None, report.summary
    assert "no parameters to compare" in report.summary and report.exit_code == 4


# ---- not derived: the unrelated twin ---------------------------------------------------------------
@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_unrelated_twin_is_not_derived(storage, made):
    twin = MODELS / "variants" / f"{NAME}_seed1.onnx"
    if not twin.exists():
        pytest.skip(f"{twin} missing")
    suspect = twin if storage == "float32" else made("twin_int8")
    report = audit(str(suspect), str(MODELS / f"{NAME}.onnx"))
    assert report.verdict == "not derived" and not report.derived and report.exit_code == 1, report.summary
    assert report.compared["share"] == 1.0
