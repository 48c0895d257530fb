"""Inputs the graph implies (issue 19): shapes and values a model accepts, read from the graph and
tried in ONNX Runtime; checks that know their model (quantized graphs, near-zero outputs); resync's
verdict shown when its check fails; `onnx-resync inputs --save` then `--inputs`.

Every model here is built with onnx.helper (ir_version 8, opset 17), except the QDQ one (ORT's
quantize_static on the bundled ResNet, cached per session). Commands run through the CLI's main in the
shared worker (tests/cli_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import cli_worker
from onnx_resync import api, cli
from onnx_resync.errors import CheckFailed, ResyncError
from onnx_resync.verify import explain, verify, walker_blamed

OPSET = [helper.make_opsetid("", 17)]
ROOT = Path(__file__).resolve().parent.parent


def _model(nodes, inputs, outputs, weights: dict, name="m") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET)


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def cli_run(*args, cwd=None) -> subprocess.CompletedProcess:
    """The command through the CLI's main in the shared worker (tests/cli_worker.py); with a working
    directory, as `python -m onnx_resync` run there."""
    if cwd is None:
        return cli_worker.run(*args, timeout=300)
    return subprocess.run([sys.executable, "-m", "onnx_resync", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


# --- integer inputs: ids, token types, positions ----------------------------------------------------

def embedding_model(vocab=50, types=2, positions=6, hidden=16) -> onnx.ModelProto:
    """input_ids, token_type_ids and position_ids [batch, seq] index three tables; their sum goes
    through a two-layer MLP (a permutable hidden layer of 32)."""
    rng = np.random.default_rng(0)
    w = {"word": _f32(rng, vocab, hidden), "type": _f32(rng, types, hidden), "pos": _f32(rng, positions, hidden),
         "W1": _f32(rng, hidden, 32), "b1": _f32(rng, 32), "W2": _f32(rng, 32, 8)}
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["e1"]),
        helper.make_node("Gather", ["type", "token_type_ids"], ["e2"]),
        helper.make_node("Gather", ["pos", "position_ids"], ["e3"]),
        helper.make_node("Sum", ["e1", "e2", "e3"], ["e"]),
        helper.make_node("MatMul", ["e", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["y"]),
    ]
    ins = [helper.make_tensor_value_info(n, T.INT64, ["batch", "seq"])
           for n in ("input_ids", "token_type_ids", "position_ids")]
    return _model(nodes, ins, [helper.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 8])], w)


def test_integer_inputs_stay_below_the_tables_they_index(tmp_path):
    src = tmp_path / "emb.onnx"
    onnx.save(embedding_model(), src)
    _, result = api.permute(str(src), tmp_path / "p.onnx", verify_options={"device": "cpu", "samples": 3})
    assert result.verified
    plan = {d["name"]: d for d in result.verify["input_plan"]}
    assert plan["input_ids"]["range"] == "ints 0..49" and "50-row table" in plan["input_ids"]["why"]
    assert plan["token_type_ids"]["range"] == "ints 0..1"
    assert plan["position_ids"]["range"] == "ints 0..5"
    assert plan["input_ids"]["shape"] == [1, 16]  # a length of 16, not 1
    # the feed itself: inside the tables (a seeded draw of 16 from 0..49 reaches past 9)
    report = api.inputs(str(src), device="cpu", save=tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz") as feed:
        assert feed["token_type_ids"].max() <= 1 and feed["position_ids"].max() <= 5
        assert 9 < feed["input_ids"].max() <= 49
    assert report.runs and not report.tries


def test_integer_inputs_that_index_nothing_keep_zero_to_nine(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Cast", ["n"], ["f"], to=T.FLOAT), helper.make_node("MatMul", ["f", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("n", T.INT64, [1, 4])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [1, 3])], {"W1": _f32(rng, 4, 8), "W2": _f32(rng, 8, 3)})
    src = tmp_path / "n.onnx"
    onnx.save(model, src)
    (d,) = api.inputs(str(src), device="cpu").inputs
    assert d["range"] == "ints 0..9" and d["shape"] == [1, 4]


def test_a_positional_table_caps_the_length(tmp_path):
    """Positions made by Range over the sequence index a 6-row table: the length is at most 6."""
    rng = np.random.default_rng(2)
    w = {"word": _f32(rng, 50, 8), "pos": _f32(rng, 6, 8), "W1": _f32(rng, 8, 16), "W2": _f32(rng, 16, 4),
         "zero": np.array(0, np.int64), "one": np.array(1, np.int64), "idx1": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Shape", ["ids"], ["shape"]), helper.make_node("Gather", ["shape", "idx1"], ["len1"]),
        helper.make_node("Squeeze", ["len1"], ["len"]), helper.make_node("Range", ["zero", "len", "one"], ["positions"]),
        helper.make_node("Gather", ["word", "ids"], ["e1"]), helper.make_node("Gather", ["pos", "positions"], ["e2"]),
        helper.make_node("Add", ["e1", "e2"], ["e"]), helper.make_node("MatMul", ["e", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("ids", T.INT64, [1, "seq"])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [1, "seq", 4])], w)
    src = tmp_path / "pos.onnx"
    onnx.save(model, src)
    (d,) = api.inputs(str(src), device="cpu").inputs
    assert d["shape"] == [1, 4] and "positional table has 6 rows" in d["why"]
    _, result = api.permute(str(src), None, verify_options={"device": "cpu"})
    assert result.verified


# --- a scalar compared inside an If ----------------------------------------------------------------

def sample_rate_model(rates=(16000, 8000), failing=None) -> onnx.ModelProto:
    """x -> MLP -> h2; If(sr == rates[0]) h2 else If(sr == rates[1]) 2*h2 else a Reshape that fails.
    `failing`: the rate whose branch fails too (a Reshape to 7x7)."""
    rng = np.random.default_rng(3)
    w = {"W1": _f32(rng, 16, 32), "b1": _f32(rng, 32), "W2": _f32(rng, 32, 8),
         "r0": np.array(rates[0], np.int64), "r1": np.array(rates[1], np.int64),
         "two": np.array(2.0, np.float32), "bad": np.array([7, 7], np.int64)}
    out = [helper.make_tensor_value_info("out", T.FLOAT, ["d0", "d1"])]

    def branch(name, value):
        if value == "fail":
            return helper.make_graph([helper.make_node("Reshape", ["h2", "bad"], ["out"])], name, [], out)
        if value == "twice":
            return helper.make_graph([helper.make_node("Mul", ["h2", "two"], ["out"])], name, [], out)
        return helper.make_graph([helper.make_node("Identity", ["h2"], ["out"])], name, [], out)

    inner = helper.make_graph([
        helper.make_node("Equal", ["sr", "r1"], ["c1"]),
        helper.make_node("If", ["c1"], ["out"], then_branch=branch("t1", "fail" if failing == rates[1] else "twice"),
                         else_branch=branch("e1", "fail")),
    ], "inner", [], out)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["h2"]),
        helper.make_node("Equal", ["sr", "r0"], ["c0"]),
        helper.make_node("If", ["c0"], ["y"], then_branch=branch("t0", "fail" if failing == rates[0] else "same"),
                         else_branch=inner),
    ]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, [1, 16]), helper.make_tensor_value_info("sr", T.INT64, [])]
    return _model(nodes, ins, [helper.make_tensor_value_info("y", T.FLOAT, ["d0", "d1"])], w)


def test_a_scalar_compared_in_an_if_takes_the_constants(tmp_path):
    src = tmp_path / "vad.onnx"
    onnx.save(sample_rate_model(), src)
    _, result = api.permute(str(src), tmp_path / "p.onnx", verify_options={"device": "cpu"})
    assert result.verified
    sr = next(d for d in result.verify["input_plan"] if d["name"] == "sr")
    assert sr["range"] == "= 16000" and "compared with 16000, 8000" in sr["why"]
    # the branch variation still runs on top: 8000 takes the other branch, the others fail and are skipped
    assert 8000 in result.verify["varied"]["sr"] and result.verify["skipped_feeds"] > 0


def test_a_scalar_takes_the_next_constant_when_the_first_fails(tmp_path):
    src = tmp_path / "vad8k.onnx"
    onnx.save(sample_rate_model(failing=16000), src)
    report = api.inputs(str(src), device="cpu")
    sr = next(d for d in report.inputs if d["name"] == "sr")
    assert report.runs and sr["range"] == "= 8000" and len(report.tries) == 1
    assert "Reshape" in report.tries[0]["error"]
    _, result = api.permute(str(src), None, verify_options={"device": "cpu"})
    assert result.verified


# --- dynamic spatial dims behind Resize and a strided Concat ----------------------------------------

def unet(fixed_bottleneck: int | None = None) -> onnx.ModelProto:
    """A tiny UNet: two stride-2 convs down, Resize x2 and Concat with the skip, twice. At 1x1 the
    first Concat meets 2x2 and 1x1 and fails. `fixed_bottleneck`: an Add of a constant map of that
    size at stride 4 (only one input size works)."""
    rng = np.random.default_rng(4)
    w = {"w1": _f32(rng, 8, 3, 3, 3), "w2": _f32(rng, 16, 8, 3, 3), "w3": _f32(rng, 16, 16, 3, 3),
         "w4": _f32(rng, 8, 32, 3, 3), "w5": _f32(rng, 2, 16, 1, 1),
         "scales": np.array([1, 1, 2, 2], np.float32)}
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a1"], **conv), helper.make_node("Relu", ["a1"], ["c1"]),
        helper.make_node("Conv", ["c1", "w2"], ["a2"], strides=[2, 2], **conv), helper.make_node("Relu", ["a2"], ["c2"]),
        helper.make_node("Conv", ["c2", "w3"], ["a3"], strides=[2, 2], **conv), helper.make_node("Relu", ["a3"], ["c3"]),
    ]
    bottom = "c3"
    if fixed_bottleneck:
        w["map"] = _f32(rng, 1, 16, fixed_bottleneck, fixed_bottleneck)
        nodes.append(helper.make_node("Add", ["c3", "map"], ["c3m"]))
        bottom = "c3m"
    nodes += [
        helper.make_node("Resize", [bottom, "", "scales"], ["u1"], mode="nearest"),
        helper.make_node("Concat", ["u1", "c2"], ["k1"], axis=1),
        helper.make_node("Conv", ["k1", "w4"], ["a4"], **conv), helper.make_node("Relu", ["a4"], ["d"]),
        helper.make_node("Resize", ["d", "", "scales"], ["u2"], mode="nearest"),
        helper.make_node("Concat", ["u2", "c1"], ["k2"], axis=1),
        helper.make_node("Conv", ["k2", "w5"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, "height", "width"])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 2, "height", "width"])], w)


def test_image_inputs_take_a_size_their_resize_and_concat_accept(tmp_path):
    src = tmp_path / "unet.onnx"
    onnx.save(unet(), src)
    _, result = api.permute(str(src), tmp_path / "p.onnx", verify_options={"device": "cpu"})
    assert result.verified
    (x,) = result.verify["input_plan"]
    assert x["shape"] == [1, 3, 224, 224] and "smallest of the sizes detectors and classifiers use" in x["why"]
    assert "224x224" in api.verify(str(src), str(tmp_path / "p.onnx"), device="cpu").format_text()


def test_the_next_size_is_tried_when_one_fails(tmp_path):
    src = tmp_path / "unet80.onnx"
    onnx.save(unet(fixed_bottleneck=80), src)  # stride 4: only 320x320 works
    report = api.inputs(str(src), device="cpu")
    (x,) = report.inputs
    assert report.runs and x["shape"] == [1, 3, 320, 320]
    assert "the first of the sizes tried that its Add accepts" in x["why"] and len(report.tries) >= 3
    _, result = api.permute(str(src), None, verify_options={"device": "cpu"})
    assert result.verified and result.verify["input_tries"]


def test_a_shape_that_fails_names_the_input_the_error_and_the_options(tmp_path):
    src = tmp_path / "unet.onnx"
    onnx.save(unet(), src)
    proc = cli_run("verify", src, src, "--shape", "x:1,3,30,30", "--device", "cpu")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    err = proc.stderr
    assert "x 1x3x30x30" in err and "Concat" in err and "Status Message" in err  # ORT's message, whole
    assert "--shape" in err and "--inputs" in err


# --- quantized graphs ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def resnet_qdq(tmp_path_factory) -> Path:
    from quantize_bundled import quantize

    dst = tmp_path_factory.mktemp("qdq") / "resnet_qdq.onnx"
    return quantize(ROOT / "models" / "resnet.onnx", dst, "resnet", "qdq")


def test_a_qdq_model_permutes_and_verifies(resnet_qdq, tmp_path):
    """At the basic level QDQ runs in float and a reordered sum flips roundings at quantization
    boundaries (twenty samples find one); the check runs it quantized, with a floor that knows it."""
    _, result = api.permute(str(resnet_qdq), tmp_path / "p.onnx", seed=1,
                            verify_options={"device": "cpu", "samples": 20})
    assert result.verified and result.verify["optimization"].startswith("all")


def test_a_changed_qdq_model_still_fails(resnet_qdq, tmp_path):
    model = onnx.load(resnet_qdq)
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight_quantized")
    arr = numpy_helper.to_array(weight).copy()
    arr[3] = -arr[3]  # one class's row, negated
    weight.CopyFrom(numpy_helper.from_array(arr, weight.name))
    report = verify(str(resnet_qdq), model, device="cpu", samples=4)
    assert not report.equivalent and walker_blamed(report.outputs[0])
    assert "a walker rule is wrong" in explain(report)


# --- an output near zero --------------------------------------------------------------------------------

def near_zero_model(change: float = 0.0) -> onnx.ModelProto:
    """y = conv_a(h) - conv_b(h) with conv_b within 1e-6 of conv_a: y is ~1e-5 of what its terms are,
    so a permutation's reordered sums show as a large normalized error. `change`: added to one
    weight of conv_a (a real change)."""
    rng = np.random.default_rng(0)
    wa = _f32(rng, 1, 32, 3, 3)
    wb = (wa * (1 + 1e-6 * rng.standard_normal(wa.shape))).astype(np.float32)
    wa = wa.copy()
    wa[0, 0, 1, 1] += change
    w = {"w1": _f32(rng, 32, 3, 3, 3), "b1": _f32(rng, 32), "w2": _f32(rng, 32, 32, 3, 3), "wa": wa, "wb": wb}
    conv = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], **conv), helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wa"], ["ya"], **conv), helper.make_node("Conv", ["r2", "wb"], ["yb"], **conv),
        helper.make_node("Sub", ["ya", "yb"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 32, 32])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 1, 32, 32])], w)


def test_an_output_near_zero_is_judged_against_its_rounding_floor(tmp_path):
    src = tmp_path / "nz.onnx"
    onnx.save(near_zero_model(), src)
    _, result = api.permute(str(src), None, verify_options={"device": "cpu"})
    (out,) = result.verify["outputs"]
    assert result.verified and out["normalized_error"] > 1e-5 and "rounding floor" in out["note"]
    assert out["max_abs_error"] <= 4 * out["noise_floor"]


def test_a_real_change_of_a_near_zero_output_fails_and_is_blamed(tmp_path):
    src = tmp_path / "nz.onnx"
    onnx.save(near_zero_model(), src)
    report = verify(str(src), near_zero_model(change=1e-2), device="cpu")
    (out,) = report.outputs
    assert not report.equivalent and walker_blamed(out)
    text = explain(report)
    assert "output 'y'" in text and "rounding floor" in text and "x 1x3x32x32" in text and "--shape" in text


def test_the_walker_is_not_blamed_without_evidence():
    from onnx_resync.verify import OutputComparison

    near = OutputComparison("y", [1], 1e-6, 0.5, 1.0, 1, 1, 1, False, noise_floor=5e-7)
    assert not walker_blamed(near)  # within 100x a floor: rounding could do it
    assert walker_blamed(OutputComparison("y", [1], 1.0, 0.5, 1.0, 1, 1, 1, False, noise_floor=1e-7))


# --- inputs --save, then --inputs --------------------------------------------------------------------------

def test_inputs_save_then_verify_inputs(tmp_path):
    src = tmp_path / "emb.onnx"
    onnx.save(embedding_model(), src)
    perm = tmp_path / "perm.onnx"
    assert cli_run("permute", src, "-o", perm, "--device", "cpu").returncode == 0
    feeds = tmp_path / "feeds.npz"
    proc = cli_run("inputs", src, "--save", feeds, "--json", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [d["name"] for d in data["inputs"]] == ["input_ids", "token_type_ids", "position_ids"]
    assert data["inputs"][1]["declared"] == ["batch", "seq"] and data["inputs"][1]["range"] == "ints 0..1"
    text = cli_run("inputs", src, "--device", "cpu").stdout
    assert "token_type_ids: declared [batch, seq] int64, chosen 1x16 ints 0..1" in text and "why:" in text
    ok = cli_run("verify", src, perm, "--inputs", feeds, "--device", "cpu")
    assert ok.returncode == 0 and f"inputs {feeds}" in ok.stdout
    ok = cli_run("permute", src, "-o", tmp_path / "p2.onnx", "--inputs", feeds, "--device", "cpu")
    assert ok.returncode == 0, ok.stderr


def test_inputs_refuses_bad_saves_and_verify_refuses_short_feeds(tmp_path):
    src = tmp_path / "emb.onnx"
    onnx.save(embedding_model(), src)
    proc = cli_run("inputs", src, "--save", src)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    short = tmp_path / "short.npz"
    np.savez(short, input_ids=np.zeros((1, 4), np.int64))
    proc = cli_run("verify", src, src, "--inputs", short, "--device", "cpu")
    assert proc.returncode == 2 and "token_type_ids" in proc.stderr


# --- resync -o shows its verdict when the check fails ---------------------------------------------------------

@pytest.fixture
def permuted_pair(tmp_path):
    src = tmp_path / "emb.onnx"
    onnx.save(embedding_model(), src)
    perm = tmp_path / "perm.onnx"
    api.permute(str(src), perm, seed=3, verify_options={"device": "cpu"})
    return src, perm


def test_resync_shows_its_verdict_when_the_check_cannot_check(permuted_pair, tmp_path):
    src, perm = permuted_pair
    nan = tmp_path / "nan.npz"
    np.savez(nan, input_ids=np.zeros((1, 0), np.int64), token_type_ids=np.zeros((1, 0), np.int64),
             position_ids=np.zeros((1, 0), np.int64))
    out = tmp_path / "r.onnx"
    proc = cli_run("resync", perm, "--reference", src, "-o", out, "--inputs", nan, "--device", "cpu")
    assert proc.returncode == 4 and not out.exists()
    assert "verdict: permuted" in proc.stdout and "nothing written" in proc.stdout
    assert "cannot check" in proc.stderr


def test_resync_shows_its_verdict_when_the_check_fails(permuted_pair, tmp_path, monkeypatch, capsys):
    import onnx_resync.verify as verify_module

    real = verify_module.verify

    def failing(*args, **kwargs):
        report = real(*args, **kwargs)
        report.verdict, report.equivalent, report.reason = "not equivalent", False, "made to fail by the test"
        report.outputs[0].passed = False
        return report

    monkeypatch.setattr(verify_module, "verify", failing)
    src, perm = permuted_pair
    out = tmp_path / "r.onnx"
    code = cli.main(["resync", str(perm), "--reference", str(src), "-o", str(out), "--device", "cpu",
                     "--report", str(tmp_path / "rep.json")])
    captured = capsys.readouterr()
    assert code == 7 and not out.exists()
    assert "verdict: permuted" in captured.out and "not equivalent" in captured.err
    assert json.loads((tmp_path / "rep.json").read_text())["verdict"] == "permuted"
    with pytest.raises(CheckFailed) as info:
        api.resync(str(perm), str(src), out, verify_options={"device": "cpu"})
    assert info.value.report.verdict == "permuted" and info.value.exit_code == 7


def test_resync_help_lists_its_exit_codes():
    text = " ".join(cli_run("resync", "--help").stdout.split())
    assert "4 the restored model's check cannot check" in text and "7 the restored model is not equivalent" in text


def test_run_errors_keep_onnx_runtimes_message_whole():
    class Boom:
        def run(self, *_):
            raise RuntimeError("first line\nsecond line: " + "x" * 400)

    from onnx_resync import runtime

    with pytest.raises(ResyncError) as info:
        runtime.run(Boom(), {})
    assert "second line" in str(info.value) and str(info.value).endswith("x" * 400)


def test_half_precision_and_quantized_graphs_are_recognized(resnet_qdq):
    from onnx_resync.inputs import half_precision, is_quantized

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=T.FLOAT16), helper.make_node("MatMul", ["h", "W"], ["m"]),
             helper.make_node("Cast", ["m"], ["y"], to=T.FLOAT)]
    half = _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [1, 3])], {"W": _f32(rng, 4, 3).astype(np.float16)})
    assert half_precision(half) == "float16" and not is_quantized(half)
    assert half_precision(near_zero_model()) is None and not is_quantized(near_zero_model())
    assert is_quantized(onnx.load(resnet_qdq))


def test_a_given_shape_binds_the_dims_of_the_same_name(tmp_path):
    src = tmp_path / "emb.onnx"
    onnx.save(embedding_model(), src)
    report = api.inputs(str(src), shapes={"input_ids": [2, 5]}, device="cpu")
    assert [d["shape"] for d in report.inputs] == [[2, 5]] * 3
    assert "given with --shape" in report.inputs[0]["why"]
    # before, each input took its own: the others stayed 1x1 and the model could not run
    assert verify(str(src), str(src), shapes={"input_ids": [2, 5]}, device="cpu").equivalent


# --- sizes an op's schema requires of an input (registry input_dims): KV caches, recurrent states ----

MS = helper.make_opsetid("com.microsoft", 1)


def gqa_decoder(head_sizes=(8,), rotary: bool = False) -> onnx.ModelProto:
    """A genai-style decoder block: x -> packed QKV MatMul -> GroupQueryAttention (num_heads 4,
    kv_num_heads 2) reading KV-cache graph inputs declared [batch, 2, past, kv_cache_dim], its lengths
    from attention_mask -> out projection. Several head sizes: one GQA each, all reading the same cache
    (a contradiction no feed satisfies). rotary: do_rotary with cos/sin caches that are graph inputs
    declared [max_sequence_length, rotary_half]."""
    rng = np.random.default_rng(5)
    w = {"one": np.array([1], np.int64), "idx1": np.array(1, np.int64)}
    nodes = [helper.make_node("ReduceSum", ["attention_mask", "one"], ["sum"], keepdims=0),
             helper.make_node("Sub", ["sum", "one"], ["seqlens64"]),
             helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=T.INT32),
             helper.make_node("Shape", ["attention_mask"], ["mshape"]),
             helper.make_node("Gather", ["mshape", "idx1"], ["total64"]),
             helper.make_node("Cast", ["total64"], ["total"], to=T.INT32)]
    outs = []
    for k, head in enumerate(head_sizes):
        w[f"Wqkv{k}"] = _f32(rng, 32, (4 + 2 * 2) * head)
        w[f"Wo{k}"] = _f32(rng, 4 * head, 32)
        nodes += [helper.make_node("MatMul", ["x", f"Wqkv{k}"], [f"qkv{k}"]),
                  helper.make_node("GroupQueryAttention", [f"qkv{k}", "", "", "past_key", "past_value", "seqlens_k",
                                                           "total"] + (["cos_cache", "sin_cache"] if rotary else []),
                                   [f"att{k}", f"present_key{k}", f"present_value{k}"],
                                   name=f"gqa{k}", domain="com.microsoft", num_heads=4, kv_num_heads=2,
                                   do_rotary=int(rotary)),
                  helper.make_node("MatMul", [f"att{k}", f"Wo{k}"], [f"y{k}"])]
        outs.append(helper.make_tensor_value_info(f"y{k}", T.FLOAT, ["batch", "seq", 32]))
    cache = ["batch", 2, "past_sequence_length", "kv_cache_dim"]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 32]),
           helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total_sequence_length"]),
           helper.make_tensor_value_info("past_key", T.FLOAT, cache),
           helper.make_tensor_value_info("past_value", T.FLOAT, cache)]
    ins += [helper.make_tensor_value_info(n, T.FLOAT, ["max_sequence_length", "rotary_half"])
            for n in ("cos_cache", "sin_cache") if rotary]
    graph = helper.make_graph(nodes, "gqa", ins, outs, [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET + [MS])


def test_a_kv_cache_takes_the_head_size_its_attention_needs(tmp_path):
    """kv_cache_dim is named only: GroupQueryAttention's entry says head size = 64 / (4 + 2*2) = 8, an
    empty past (length 0, a first step); no --shape needed to permute and verify."""
    src = tmp_path / "gqa.onnx"
    onnx.save(gqa_decoder(), src)
    report = api.inputs(str(src), device="cpu")
    plan = {d["name"]: d for d in report.inputs}
    assert report.runs and not report.tries
    assert plan["past_key"]["shape"] == plan["past_value"]["shape"] == [1, 2, 0, 8]
    assert "GroupQueryAttention 'gqa0' needs head size 8" in plan["past_key"]["why"]
    assert "empty cache" in plan["past_key"]["why"]
    assert plan["x"]["shape"] == [1, 16, 32] and plan["attention_mask"]["shape"] == [1, 16]
    _, result = api.permute(str(src), tmp_path / "p.onnx", seed=1, verify_options={"device": "cpu"})
    assert result.verified
    proc = cli_run("verify", src, tmp_path / "p.onnx", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


def rotary_block(rotary_dim: int = 0) -> onnx.ModelProto:
    """x [batch, seq, 96] -> MatMul -> RotaryEmbedding (num_heads 4: head size 24) with position_ids,
    cos_cache and sin_cache graph inputs, every dim named only -> MatMul."""
    rng = np.random.default_rng(8)
    attrs = {"rotary_embedding_dim": rotary_dim} if rotary_dim else {}
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]),
             helper.make_node("RotaryEmbedding", ["q", "position_ids", "cos_cache", "sin_cache"], ["r"],
                              name="rot", domain="com.microsoft", num_heads=4, **attrs),
             helper.make_node("MatMul", ["r", "Wo"], ["y"])]
    table = ["max_sequence_length", "rotary_half"]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 96]),
           helper.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
           helper.make_tensor_value_info("cos_cache", T.FLOAT, table),
           helper.make_tensor_value_info("sin_cache", T.FLOAT, table)]
    graph = helper.make_graph(nodes, "rot", ins, [helper.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 8])],
                              [numpy_helper.from_array(v, k) for k, v in {"Wq": _f32(rng, 96, 96),
                                                                            "Wo": _f32(rng, 96, 8)}.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET + [MS])


@pytest.mark.parametrize("build,half,words", [
    (lambda: rotary_block(), 12, "RotaryEmbedding 'rot' needs half the head size 24"),
    (lambda: rotary_block(rotary_dim=16), 8, "RotaryEmbedding 'rot' needs rotary_embedding_dim / 2 = 8"),
    (lambda: gqa_decoder((16,), rotary=True), 8, "GroupQueryAttention 'gqa0' needs half the head size 16")],
    ids=["RotaryEmbedding", "RotaryEmbedding-rotary_dim", "GroupQueryAttention"])
def test_rotary_tables_fed_as_inputs_are_sized_by_their_op(build, half, words, tmp_path):
    """cos_cache/sin_cache graph inputs [max_sequence_length, rotary_half]: the op's entry sizes them
    (rows past every position fed, columns half the rotated dims); ORT runs the first try, no --shape
    (before: rotary_half took a length of 16 and max_sequence_length a batch of 1, every try refused)."""
    src = tmp_path / "rot.onnx"
    onnx.save(build(), src)
    report = api.inputs(str(src), device="cpu")
    plan = {d["name"]: d for d in report.inputs}
    assert report.runs and not report.tries, report.format_text()
    assert plan["cos_cache"]["shape"] == plan["sin_cache"]["shape"] == [256, half]
    assert words in plan["cos_cache"]["why"] and "a table of 256 positions" in plan["cos_cache"]["why"]
    _, result = api.permute(str(src), tmp_path / "p.onnx", seed=1, verify_options={"device": "cpu"})
    assert result.verified


def test_a_kv_cache_two_attentions_disagree_on_gets_onnx_runtimes_message(tmp_path):
    """The cache feeds a GQA of head size 8 and one of 16: no shape serves both; the first
    requirement is tried, ORT refuses, and its message comes whole on one line."""
    src = tmp_path / "gqa2.onnx"
    onnx.save(gqa_decoder((8, 16)), src)
    proc = cli_run("verify", src, src, "--device", "cpu")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "Status Message" in ln]
    assert "gqa1" in line and "1x2x0x8" in proc.stderr


def test_a_recurrent_state_takes_its_directions_and_hidden_size(tmp_path):
    """A bidirectional LSTM whose X, initial_h and initial_c name every dim: features 4 from W, states
    [2 directions, batch, hidden 8] from the LSTM's attributes."""
    rng = np.random.default_rng(6)
    w = {"W": _f32(rng, 2, 32, 4), "R": _f32(rng, 2, 32, 8)}
    nodes = [helper.make_node("LSTM", ["X", "W", "R", "", "", "h0", "c0"], ["Y"], name="lstm", hidden_size=8,
                              direction="bidirectional")]
    ins = [helper.make_tensor_value_info("X", T.FLOAT, ["seq", "batch", "features"]),
           helper.make_tensor_value_info("h0", T.FLOAT, ["dirs", "batch", "hidden"]),
           helper.make_tensor_value_info("c0", T.FLOAT, ["dirs", "batch", "hidden"])]
    src = tmp_path / "lstm.onnx"
    onnx.save(_model(nodes, ins, [helper.make_tensor_value_info("Y", T.FLOAT, None)], w), src)
    report = api.inputs(str(src), device="cpu")
    plan = {d["name"]: d for d in report.inputs}
    assert report.runs and not report.tries
    assert plan["X"]["shape"][2] == 4 and "LSTM 'lstm' needs 4 input features" in plan["X"]["why"]
    assert plan["h0"]["shape"] == plan["c0"]["shape"] == [2, plan["X"]["shape"][1], 8]
    assert "needs hidden size 8" in plan["h0"]["why"] and "needs 2 directions" in plan["h0"]["why"]


def _contrib_model(nodes, ins, w) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "c", ins, [helper.make_tensor_value_info("y", T.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=OPSET + [MS])


def _mha(rng):
    w = {"Wq": _f32(rng, 32, 32), "Wk": _f32(rng, 32, 32), "Wv": _f32(rng, 32, 32)}
    nodes = [helper.make_node("MatMul", ["x", n], [n.lower()]) for n in w] + [
        helper.make_node("MultiHeadAttention", ["wq", "wk", "wv", "", "", "", "past_key", "past_value"],
                         ["y", "pk", "pv"], name="mha", domain="com.microsoft", num_heads=4)]
    cache = ["batch", "heads", "past", "head_size"]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 32]),
           helper.make_tensor_value_info("past_key", T.FLOAT, cache),
           helper.make_tensor_value_info("past_value", T.FLOAT, ["batch", "heads", "past", "v_head_size"])]
    return _contrib_model(nodes, ins, w), {"past_key": [1, 4, 0, 8], "past_value": [1, 4, 0, 8]}, "needs head size 8"


def _attention(rng):
    nodes = [helper.make_node("Attention", ["x", "W", "B", "", "past"], ["y", "present"], name="att",
                              domain="com.microsoft", num_heads=4, unidirectional=1)]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", "hidden"]),
           helper.make_tensor_value_info("past", T.FLOAT, ["two", "batch", "heads", "past", "head_size"])]
    return (_contrib_model(nodes, ins, {"W": _f32(rng, 32, 96), "B": _f32(rng, 96)}),
            {"x": [1, 16, 32], "past": [2, 1, 4, 0, 8]}, "needs 32 features")


@pytest.mark.parametrize("build", [_mha, _attention], ids=["MultiHeadAttention", "Attention"])
def test_contrib_inputs_take_the_sizes_their_op_requires(build, tmp_path):
    """Every dim of these inputs is named only; each op's registry entry sizes them and ORT runs the
    first try (caches empty: ORT accepts a past of length 0 for each)."""
    model, shapes, words = build(np.random.default_rng(7))
    src = tmp_path / "c.onnx"
    onnx.save(model, src)
    report = api.inputs(str(src), device="cpu")
    plan = {d["name"]: d for d in report.inputs}
    assert report.runs and not report.tries
    assert {n: plan[n]["shape"] for n in shapes} == shapes
    assert any(words in plan[n]["why"] for n in shapes)


# --- the zoo's onnxruntime-genai decoders (tools/build_decoder.py): KV caches named only -----------------

GENAI = Path.home() / ".cache" / "onnx-resync" / "zoo" / "decoder" / "_seed0"


@pytest.mark.zoo
@pytest.mark.parametrize("variant", ["genai_fp32", "genai_int4"])
def test_genai_decoders_run_end_to_end_with_no_shapes(variant, tmp_path):
    """past_key_values.N.key/value [batch_size, 2, past_sequence_length, kv_cache_dim] are read by
    GroupQueryAttention only: the plan sizes them 1x2x0x16 from its entry (before: kv_cache_dim tried
    at 224.. and refused; every command needed --shape)."""
    src = GENAI / variant / "model.onnx"
    if not src.exists():
        pytest.skip(f"no {src} (python tools/build_decoder.py)")
    proc = cli_run("inputs", src, "--device", "cpu")
    assert proc.returncode == 0 and "refused" not in proc.stdout, proc.stdout + proc.stderr
    assert "1x2x0x16" in proc.stdout and "needs head size 16" in proc.stdout
    cpu = {"device": "cpu"}
    perm = tmp_path / "p.onnx"
    _, result = api.permute(str(src), perm, seed=1, verify_options=cpu)
    assert result.verified and result.neurons_moved
    assert api.verify(str(src), str(perm), device="cpu").equivalent
    _, report = api.resync(str(perm), str(src), tmp_path / "r.onnx", verify_options=cpu)
    assert report.verified
    # audit -o of the int4 file stops at restoring its own file (no group of the suspect's file reads
    # GroupQueryAttention's k weight at the reference's size), not at its inputs: audited without -o
    out = tmp_path / "a.onnx" if variant == "genai_fp32" else None
    audit = api.audit(str(perm), str(src), output=out, verify_options=cpu)
    assert audit.derived and (out is None or out.exists())


@pytest.mark.zoo
@pytest.mark.parametrize("variant", ["genai_fp32", "genai_int4"])
def test_genai_decoders_with_rotary_tables_as_inputs_need_no_shapes(variant, tmp_path):
    """The genai decoders with cos_cache/sin_cache moved from initializers to graph inputs declared
    [max_sequence_length, rotary_half] (as builders that share one table across graphs write them):
    GroupQueryAttention's entry sizes them 256x8; inputs runs the first try, permute and verify pass
    with no --shape (before: every try refused)."""
    src = GENAI / variant / "model.onnx"
    if not src.exists():
        pytest.skip(f"no {src} (python tools/build_decoder.py)")
    model = onnx.load(str(src))
    for name in ("cos_cache", "sin_cache"):
        (t,) = [t for t in model.graph.initializer if t.name == name]
        model.graph.initializer.remove(t)
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, ["max_sequence_length",
                                                                                   "rotary_half"]))
    moved = tmp_path / "model.onnx"
    onnx.save(model, str(moved))
    proc = cli_run("inputs", moved, "--device", "cpu")
    assert proc.returncode == 0 and "refused" not in proc.stdout, proc.stdout + proc.stderr
    assert "cos_cache: declared [max_sequence_length, rotary_half] float32, chosen 256x8" in proc.stdout
    _, result = api.permute(str(moved), tmp_path / "p.onnx", seed=1, verify_options={"device": "cpu"})
    assert result.verified and result.neurons_moved
    proc = cli_run("verify", moved, tmp_path / "p.onnx", "--device", "cpu")
    assert proc.returncode == 0 and "verify: EQUIVALENT" in proc.stdout, proc.stdout + proc.stderr
