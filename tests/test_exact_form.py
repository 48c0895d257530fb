"""verify's exact form: a node that quantizes its activations (MatMulNBits at accuracy_level 4: int8
in blocks of K) turns a correct permutation's float rounding upstream into a whole quantization step.
Both models are checked with activations as given (accuracy_level 0, the same weights), and as written
against how far quantizing the activations moves the reference itself. A wrong permutation still fails.

The fixture: x -> MatMul W1 -> MatMul W2 -> MatMulNBits (K 256 in blocks of 32, accuracy_level 4);
the candidate permutes the hidden channels between W1 and W2 (W2's sum in another order), which moves
some int8 activations by one step (normalized error ~5e-4 as written, far past the 1e-5 tolerance).
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

from onnx_resync import cli
from onnx_resync import verify as verify_module
from onnx_resync.verify import CandidateRefused, explain, verify

MS = "com.microsoft"
HIDDEN, K, N, SEQ, BLOCK = 256, 256, 32, 512, 32


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"W1": r.standard_normal((16, HIDDEN)).astype(np.float32),
            "W2": (r.standard_normal((HIDDEN, K)) / 64).astype(np.float32),
            "B": r.integers(0, 256, (N, K // BLOCK, BLOCK // 2), dtype=np.uint8),  # int4, two a byte
            "S": (r.random(N * K // BLOCK) * 0.1 + 0.01).astype(np.float32)}


def model(w: dict[str, np.ndarray], level: int = 4) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W2"], ["z"], name="mm2"),
             helper.make_node("MatMulNBits", ["z", "B", "S"], ["y"], name="nbits", domain=MS, K=K, N=N, bits=4,
                              block_size=BLOCK, accuracy_level=level)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, N])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid(MS, 1)])


def hidden_permuted(w: dict[str, np.ndarray], seed: int = 100) -> dict[str, np.ndarray]:
    p = np.random.default_rng(seed).permutation(HIDDEN)
    return dict(w, W1=w["W1"][:, p], W2=w["W2"][p])


@pytest.fixture(scope="module")
def pair():
    w = weights()
    return model(w), model(hidden_permuted(w)), w


def test_a_correct_permutation_passes_in_the_exact_form(pair, monkeypatch):
    ref, cand, _ = pair
    before = (ref.SerializeToString(), cand.SerializeToString())
    report = verify(ref, cand)
    assert report.verdict == "equivalent", report.format_text()
    assert report.outputs[0].normalized_error < 1e-5
    assert "1 MatMulNBits with accuracy_level 4 (exact form accuracy_level 0)" in report.exact_form
    (w,) = report.as_written
    # as written the permutation moves some int8 activations by a step: past the float tolerance,
    # far within what quantizing the activations moves the reference itself
    assert w["passed"] and w["normalized_error"] > 1e-5 and w["max_abs_error"] * 5 < w["quantization"], w
    assert "exact form: 1 MatMulNBits" in report.format_text() and "as written: y" in report.format_text()
    assert (ref.SerializeToString(), cand.SerializeToString()) == before  # the models given back as they were
    # without the exact form (before it existed) the same pair failed the float check: the bug
    # (the float32 rounding floor, which came later, also explains one flipped step: left out here)
    monkeypatch.setattr(verify_module, "_exact_form_plan", lambda a, b: (False, None))
    monkeypatch.setitem(verify_module.NUDGE, "float32", 0.0)
    assert verify(ref, cand).verdict == "not equivalent"


@pytest.mark.parametrize("break_", ["two rows of B", "two blocks of B", "W2 without W1"])
def test_a_wrong_permutation_still_fails(pair, break_):
    _, _, w = pair
    bad = hidden_permuted(w)
    if break_ == "two rows of B":  # output rows 0 and 1 of the int4 weight, not their scales
        bad["B"] = bad["B"][[1, 0] + list(range(2, N))]
    elif break_ == "two blocks of B":  # K blocks 0 and 1 of the weight, not the activations
        bad["B"] = bad["B"][:, [1, 0] + list(range(2, K // BLOCK))]
    else:  # one side of the hidden permutation only
        bad["W1"] = w["W1"]
    report = verify(model(w), model(bad))
    assert report.verdict == "not equivalent" and report.exact_form and not report.as_written, report.format_text()
    assert report.outputs[0].normalized_error > 1e-3


def test_models_that_quantize_differently_are_compared_as_written(pair):
    """A candidate at accuracy_level 0 against the reference at 4 is no permutation: no exact form."""
    ref, _, w = pair
    report = verify(ref, model(w, level=0))
    assert report.verdict == "not equivalent"
    assert report.exact_form.startswith("none: the reference has 1 MatMulNBits with accuracy_level 4"), report.exact_form
    assert "the candidate no such node" in report.exact_form and not report.as_written


def test_the_as_written_check_can_fail(pair, monkeypatch):
    """The as-written bound decides too: with no room for the quantization's move it fails."""
    ref, cand, _ = pair
    monkeypatch.setattr(verify_module, "NOISE_FACTOR", 0.0)
    report = verify(ref, cand)
    assert report.verdict == "not equivalent" and not report.as_written[0]["passed"]
    assert report.reason.startswith("as written, output 'y' differs by") and "in the exact form it agrees" in report.reason
    assert report.reason in explain(report)


def test_cli_permute_and_verify_a_file(pair, tmp_path, capsys):
    """As a user runs it: permute writes the file (its check passes), verify says EQUIVALENT (exit 0)
    with the exact form in its JSON; a copy with two rows of one weight swapped exits 1."""
    ref, _, w = pair
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(ref, src)
    assert cli.main(["permute", str(src), "--seed", "3", "-o", str(out)]) == 0
    assert "neurons moved" in capsys.readouterr().out
    assert cli.main(["verify", str(src), str(out), "--json"]) == 0
    assert "MatMulNBits" in json.loads(capsys.readouterr().out)["exact_form"]
    bad = dict(w, B=w["B"][[1, 0] + list(range(2, N))])
    onnx.save(model(bad), tmp_path / "bad.onnx")
    assert cli.main(["verify", str(src), str(tmp_path / "bad.onnx")]) == 1
    assert "verify: NOT EQUIVALENT" in capsys.readouterr().out


def test_a_candidate_ort_refuses_is_named():
    """ONNX Runtime refuses to open the candidate, or to run it where it runs the reference: the error
    (CandidateRefused) says it is the candidate (reduce reports such a rewrite as refused by ORT)."""
    w = weights()
    ref, unopened, unrun = model(w), model(w), model(w)
    unopened.graph.node[2].attribute.append(helper.make_attribute("no_such_attribute", 1))
    unrun.graph.initializer.append(numpy_helper.from_array(np.arange(SEQ, dtype=np.int64) + 1, "rows"))
    unrun.graph.node[1].output[0] = "z0"
    unrun.graph.node.insert(2, helper.make_node("Gather", ["z0", "rows"], ["z"], axis=1))  # a row past the end
    with pytest.raises(CandidateRefused, match="^onnxruntime cannot open the candidate: .*no_such_attribute"):
        verify(ref, unopened)
    with pytest.raises(CandidateRefused, match="^onnxruntime runs the reference but not the candidate .*out of "):
        verify(ref, unrun)


# ---- the real file: the onnxruntime-genai int4 decoder of the zoo (tools/build_decoder.py) ------
GENAI_INT4 = Path.home() / ".cache" / "onnx-resync" / "zoo" / "decoder" / "_seed0" / "genai_int4" / "model.onnx"


@pytest.mark.zoo
def test_genai_int4_decoder_permute_seed_11_and_verify(tmp_path):
    """`permute --seed 11` failed its own check (6.7e-5 > 1e-5: accuracy_level 4); now it writes the
    file, verify says EQUIVALENT, and a copy with two rows of one weight swapped says NOT equivalent."""
    if not GENAI_INT4.exists():
        pytest.skip("no genai decoder in the zoo (python tools/build_decoder.py)")
    out = tmp_path / "out.onnx"
    cmd = [sys.executable, "-m", "onnx_resync"]
    done = subprocess.run(cmd + ["permute", str(GENAI_INT4), "--seed", "11", "-o", str(out), "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    good = subprocess.run(cmd + ["verify", str(GENAI_INT4), str(out), "--device", "cpu"], capture_output=True, text=True)
    assert good.returncode == 0 and "verify: EQUIVALENT" in good.stdout, good.stdout + good.stderr
    assert "11 MatMulNBits with accuracy_level 4" in good.stdout
    broken = onnx.load(str(out))
    (t,) = [t for t in broken.graph.initializer if t.name == "model.layers.0.mlp.down_proj.MatMul.weight_Q4"]
    a = numpy_helper.to_array(t).copy()
    a[[0, 1]] = a[[1, 0]]
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    bad = subprocess.run(cmd + ["verify", str(GENAI_INT4), str(tmp_path / "broken.onnx"), "--device", "cpu"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "verify: NOT EQUIVALENT" in bad.stdout, bad.stdout + bad.stderr
