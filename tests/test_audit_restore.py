"""`audit -o`: the vendor's own file (int8 QDQ, fp16, ONNX Runtime's optimized save) with its neurons
put back in the reference's order (onnx_resync/audit/restore.py).

A bundled model is permuted with a known seed (api.permute's record), the permuted copy converted as
a vendor would, and `audit -o` run against the unpermuted reference. The restored file must keep
the suspect's graph, dtypes and initializer names, compute what the suspect computes (ONNX Runtime),
hold the suspect's stored tensors re-indexed by exactly the inverse of the record (checked tensor by
tensor: the float weights, the int8 weights and their per-channel scales), and be in the reference's
order (audited again: nothing moved, identical within its storage).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_resync import api, cli
from onnx_resync.errors import CheckFailed
from onnx_resync.permute import apply_moves, slot_indices
from onnx_resync.walk import walk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_bundled import quantize  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
SEED = 7


def _convert(src: Path, dst: Path, name: str, kind: str) -> Path:
    if kind == "qdq":
        return quantize(src, dst, name, "qdq")
    if kind == "fp16":
        from onnxconverter_common import float16

        onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)
        return dst
    if kind == "ort_extended":
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return dst
    raise ValueError(kind)


@pytest.fixture(scope="module")
def permuted(tmp_path_factory):
    """name -> (permuted fp32 file, its record)."""
    root = tmp_path_factory.mktemp("permuted")
    cache = {}

    def get(name: str):
        if name not in cache:
            out = root / f"{name}_perm.onnx"
            _, result = api.permute(str(MODELS / f"{name}.onnx"), str(out), seed=SEED)
            cache[name] = (out, result.record)
        return cache[name]
    return get


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _layout(model: onnx.ModelProto) -> tuple:
    return ([(n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in model.graph.node],
            [(t.name, t.data_type, tuple(t.dims)) for t in model.graph.initializer])


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _check_record(permuted_path: Path, record, suspect: onnx.ModelProto, restored: onnx.ModelProto) -> int:
    """Every stored tensor of the suspect that stands for a permuted float weight (same name, or the
    quantizer's `<name>_quantized` with its per-channel `_scale`/`_zero_point`) is, in the restored
    file, the suspect's re-indexed by the inverse of the record. Returns how many were checked."""
    fp32 = onnx.load(permuted_path)
    index = slot_indices(walk(fp32), record.inverse(),
                         lambda w, a: next(t.dims for t in fp32.graph.initializer if t.name == w)[a])
    moves: dict[str, list] = {}
    for (weight, axis, at), idx in index.items():
        moves.setdefault(weight, []).append((axis, at, idx))
    before, after = _initializers(suspect), _initializers(restored)
    checked = 0
    for weight, m in moves.items():
        for name in (weight, weight + "_quantized"):
            if name in before and before[name].shape == after[name].shape:
                np.testing.assert_array_equal(after[name], apply_moves(before[name], m), err_msg=name)
                checked += 1
        for part in ("_scale", "_zero_point"):  # per-channel quantization parameters, along the axis they scale
            name = weight + part
            if name in before and before[name].ndim == 1 and before[name].size > 1:
                (idx,) = [i for axis, at, i in m if at is None and len(i) == before[name].size and axis == 0] or [None]
                if idx is not None:
                    np.testing.assert_array_equal(after[name], before[name][idx], err_msg=name)
                    checked += 1
    return checked


@pytest.mark.parametrize("name,kind", [
    ("mlp", "qdq"), ("resnet", "qdq"),
    ("mlp", "fp16"), ("csp", "fp16"),
    ("mlp", "ort_extended"), ("resnet", "ort_extended"),
])
def test_audit_restores_the_vendors_own_file(name, kind, permuted, tmp_path):
    perm_path, record = permuted(name)
    suspect_path = _convert(perm_path, tmp_path / f"{name}_{kind}.onnx", name, kind)
    out = tmp_path / "restored.onnx"
    report = api.audit(str(suspect_path), str(MODELS / f"{name}.onnx"), output=str(out))
    assert report.derived and report.moved > 0
    r = report.restored
    assert r["written"] and r["output"] == str(out) and r["verified"]
    assert r["restored"] == r["groups"] > 0 and r["moved"] == report.moved, r["not_restored"]
    suspect, restored = onnx.load(suspect_path), onnx.load(out)
    # the suspect's own graph, dtypes, names: only values moved
    assert _layout(restored) == _layout(suspect)
    assert Counter(t.data_type for t in restored.graph.initializer) == \
        Counter(t.data_type for t in suspect.graph.initializer)
    # the same function as the suspect (ONNX Runtime, the bundled test inputs)
    x = np.load(MODELS / f"{name}_test.npz")["input"][:8]
    for a, b in zip(_run(suspect_path, x), _run(out, x)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    # exactly the inverse of the known permutation, tensor by tensor
    checked = _check_record(perm_path, record, suspect, restored)
    if kind == "ort_extended":
        # ONNX Runtime renames the weights it folds: those are checked against its save of the
        # unpermuted reference (its folds are per channel, so they commute with the permutation)
        expected = _initializers(onnx.load(_convert(MODELS / f"{name}.onnx", tmp_path / "ref_opt.onnx", name, kind)))
        got = _initializers(restored)
        assert set(got) == set(expected)
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    else:
        assert checked >= len(record.perms), checked
    # in the reference's order: audited again, nothing moved and every weight within its storage
    again = api.audit(str(out), str(MODELS / f"{name}.onnx"))
    assert again.moved == 0 and again.verdict == "identical" and again.precision["within"], again.summary
    assert again.format_change == report.format_change


def test_restore_is_reported_in_text_and_json(permuted, tmp_path):
    perm_path, _ = permuted("mlp")
    suspect = _convert(perm_path, tmp_path / "mlp_qdq.onnx", "mlp", "qdq")
    out = tmp_path / "restored.onnx"
    report = api.audit(str(suspect), str(MODELS / "mlp.onnx"), output=str(out))
    text = "\n".join(report.summary_lines())
    assert f"restored {out}" in text and "2 of 2 groups" in text and "verified" in text
    data = report.to_dict()["restored"]
    assert data["restored"] == 2 and data["moved"] == report.moved and data["record"]


def test_cli_restores_and_refuses(permuted, tmp_path, capsys):
    perm_path, _ = permuted("mlp")
    suspect = _convert(perm_path, tmp_path / "mlp_fp16.onnx", "mlp", "fp16")
    ref = str(MODELS / "mlp.onnx")
    out = tmp_path / "restored.onnx"
    assert cli.main(["audit", str(suspect), "--reference", ref, "-o", str(out)]) == 0
    assert out.exists() and "restored" in capsys.readouterr().out
    # onto the suspect itself: refused in one line, the suspect untouched
    before = suspect.read_bytes()
    assert cli.main(["audit", str(suspect), "--reference", ref, "-o", str(suspect)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input file" in err and suspect.read_bytes() == before
    # an unrelated model (the same architecture trained from another seed): not derived, nothing written
    other = tmp_path / "other.onnx"
    assert cli.main(["audit", str(MODELS / "variants" / "mlp_seed1.onnx"), "--reference", ref,
                     "-o", str(other)]) == 1
    assert not other.exists() and "nothing written" in capsys.readouterr().out
    # -o with a batch: usage error
    assert cli.main(["audit", str(suspect), str(perm_path), "--reference", ref, "-o", str(other)]) == 2


def test_failed_equivalence_check_writes_nothing(permuted, tmp_path, capsys):
    """A check that cannot pass (zero tolerance on a float copy whose permuted sums round
    differently): exit 7, the verdict still shown, no file."""
    perm_path, _ = permuted("mlp")
    out = tmp_path / "restored.onnx"
    code = cli.main(["audit", str(perm_path), "--reference", str(MODELS / "mlp.onnx"), "-o", str(out),
                     "--tolerance", "0"])
    captured = capsys.readouterr()
    assert code == 7, captured
    assert not out.exists() and not list(tmp_path.glob("*restored*"))
    assert "verdict: derived" in captured.out and "not equivalent" in captured.err
    with pytest.raises(CheckFailed) as info:
        api.audit(str(perm_path), str(MODELS / "mlp.onnx"), output=str(out), verify_options={"tolerance": 0.0})
    assert info.value.exit_code == 7 and info.value.report.derived and not info.value.report.restored["written"]
    assert not out.exists()


def _int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symmetric, as the onnxruntime-genai builder writes int4 (4-bit zero points of an asymmetric
    copy are packed two blocks to a byte, which pins K: see walk/rules/contrib.py)."""
    from test_int4 import int4_copy

    return int4_copy(model, block=32, symmetric=True)


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _undoes(restored_record: dict, known: dict) -> None:
    """The restore's record (suspect group -> the suspect unit at each reference place) undoes the
    known permutation's record (permuted place i holds original unit p[i]) group by group."""
    for key, p in known.items():
        assert restored_record.get(key, list(range(len(p)))) == np.argsort(p).tolist(), key


def test_int4_blocks_are_restored_in_whole_blocks(tmp_path):
    """The vendor's own int4 file (MatMulNBitsQuantizer, blocks of 32) permuted by the package moves
    whole blocks of K: the audit's neuron order maps whole blocks to whole blocks, applied to the
    suspect's block groups: every stored tensor (packed int4 B, scales, zero points) equals the
    unpermuted int4 file's, verified equivalent to the suspect by ONNX Runtime."""
    from test_int4 import _mlp

    reference = tmp_path / "ref.onnx"
    onnx.save(_mlp(0), reference)
    vendor = _int4(_mlp(0))
    suspect = tmp_path / "int4_perm.onnx"
    _, permuted = api.permute(vendor, str(suspect), seed=5)
    known = {k: p for k, p in permuted.record.perms.items()}
    assert len(known) == 2 and all(p != sorted(p) for p in known.values()), known  # both hidden layers' blocks
    assert any(not np.array_equal(a, _tensors(vendor)[k]) for k, a in _tensors(onnx.load(suspect)).items())
    out = tmp_path / "restored.onnx"
    report = api.audit(str(suspect), str(reference), output=str(out))
    r = report.restored
    assert r["written"] and r["verified"] and r["restored"] == 2 and r["moved"] > 0, r
    got, want = _tensors(onnx.load(out)), _tensors(vendor)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    _undoes(r["record"], known)
    assert [n.op_type for n in onnx.load(out).graph.node] == [n.op_type for n in vendor.graph.node]


def test_int4_blocks_cannot_be_restored_in_their_own_format(tmp_path):
    """A float model permuted, then quantized in blocks: its blocks were formed from permuted
    neurons, so the audit's order splits blocks, which MatMulNBits' K (moved in whole blocks only)
    cannot express: each hidden group is refused with that reason, nothing is written (exit 3),
    while the audit itself still finds the copy derived."""
    from test_int4 import _mlp

    reference = tmp_path / "ref.onnx"
    onnx.save(_mlp(0), reference)
    permuted, _ = api.permute(_mlp(0), seed=3)
    suspect = tmp_path / "int4.onnx"
    onnx.save(_int4(permuted), suspect)
    out = tmp_path / "restored.onnx"
    with pytest.raises(CheckFailed) as info:
        api.audit(str(suspect), str(reference), output=str(out))
    assert info.value.exit_code == 3 and info.value.report.derived and not out.exists()
    assert "whole units of 32" in str(info.value) and "\n" not in str(info.value)
    restored = info.value.report.restored
    split = [n for n in restored["not_restored"] if "splits units" in n["reason"]]
    assert not restored["written"] and [n["neurons"] for n in split] == [128, 128], restored["not_restored"]


GENAI = Path.home() / ".cache" / "onnx-resync" / "zoo" / "decoder"


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [None, 3])
def test_genai_int4_decoder_is_restored_to_the_references_order(seed, tmp_path, capsys):
    """The onnxruntime-genai int4 decoder (MatMulNBits, GroupQueryAttention) permuted by the package
    (the zoo's genai_int4.perm, seed 1; and seed 3, which moves the residual stream's blocks too),
    audited against the torch export with -o: the restored file's stored tensors equal the
    unpermuted genai int4 file's, its record undoes the known one, verified equivalent by ORT."""
    source = GENAI / "_seed0" / "genai_int4" / "model.onnx"
    reference = GENAI / "_seed0" / "torch_dynamo.onnx"
    zoo_perm = GENAI / "genai_int4.perm" / "model.onnx"
    if not (source.exists() and reference.exists() and zoo_perm.exists()):
        pytest.skip("no genai decoder in the zoo (python tools/build_decoder.py)")
    cpu = {"device": "cpu"}
    if seed is None:
        suspect = zoo_perm
        known = json.loads((zoo_perm.parent / "genai_int4.perm.record.json").read_text())["groups"]
    else:
        suspect = tmp_path / "perm.onnx"
        _, permuted = api.permute(str(source), str(suspect), seed=seed, verify_options=cpu)
        known = dict(permuted.record.perms)
        assert all(p != sorted(p) for p in known.values()), known
    out = tmp_path / "restored.onnx"
    # as a user runs it: the CLI, no --shape (the input plan sizes the key/value caches)
    assert cli.main(["audit", str(suspect), "--reference", str(reference), "-o", str(out), "--device", "cpu",
                     "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["restored"]
    assert r["written"] and r["verified"] and r["moved"] > 0 and r["restored"] == 3, r
    assert all("pins its neurons" in n["reason"] for n in r["not_restored"]), r["not_restored"]
    got, want = _tensors(onnx.load(str(out))), _tensors(onnx.load(str(source)))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    _undoes(r["record"], known)


def test_a_check_that_cannot_check_writes_nothing(permuted, tmp_path):
    """Inputs on which nothing finite comes out: the check cannot check (exit 4), nothing written."""
    perm_path, _ = permuted("mlp")
    out = tmp_path / "restored.onnx"
    nan = {"input": np.full((1, 256), np.nan, dtype=np.float32)}
    with pytest.raises(CheckFailed) as info:
        api.audit(str(perm_path), str(MODELS / "mlp.onnx"), output=str(out), verify_options={"inputs": nan})
    assert info.value.exit_code == 4 and "cannot check" in str(info.value) and not out.exists()
    assert info.value.report.restored["reason"].startswith("cannot check")


def test_audit_layer_rows_show_live_and_decayed_neurons(tmp_path):
    """Issue 17's decayed neurons in the audit's per-layer rows (JSON, text, HTML): a hidden group
    with 8 of 48 neurons decayed to 1e-30 reads 8 decayed, 40 live; the same model without decayed
    neurons reads 0 decayed, 48 live."""
    from test_decayed import build

    for decayed, want in ((np.arange(8), (40, 8)), (np.array([], dtype=np.int64), (48, 0))):
        reference = tmp_path / f"ref{len(decayed)}.onnx"
        onnx.save(build("gemm", 0, decayed, 1e-30, True), reference)
        suspect = tmp_path / f"perm{len(decayed)}.onnx"
        api.permute(str(reference), str(suspect), seed=2)
        html_path = tmp_path / f"a{len(decayed)}.html"
        report = api.audit(str(suspect), str(reference), html=str(html_path))
        assert report.derived
        (row,) = [r for r in report.to_dict()["layers"] if r["neurons"] == 48]
        assert (row["live"], row["decayed"]) == want, row
        lines = report.summary_lines()
        head = next(line for line in lines if line.startswith("suspect layer"))
        assert head.split()[5:7] == ["live", "decayed"]
        # columns from the right (a layer name may hold spaces): ... neurons matched moved live decayed + 5
        (text,) = [line for line in lines[lines.index(head) + 1:] if line.split()[-10:-9] == ["48"]]
        assert text.split()[-7:-5] == [str(want[0]), str(want[1])], text
        assert f"{want[0]} live, {want[1]} decayed" in html_path.read_text()


@pytest.mark.zoo
def test_genai_decoder_permuted_then_quantized_is_refused_per_group(tmp_path):
    """The genai fp32 decoder permuted by the package (the zoo's genai_fp32.perm), then quantized to
    int4 (MatMulNBitsQuantizer, blocks of 32): its blocks were formed from permuted neurons, so the
    audit's order splits them: derived, each group refused with its reason (the residual stream and
    both MLPs split units, the head groups pinned by the KV cache), exit 3, nothing written."""
    from test_int4 import int4_copy

    perm = GENAI / "genai_fp32.perm" / "model.onnx"
    reference = GENAI / "_seed0" / "torch_dynamo.onnx"
    if not (perm.exists() and reference.exists()):
        pytest.skip("no genai decoder in the zoo (python tools/build_decoder.py)")
    suspect = tmp_path / "int4.onnx"
    onnx.save(int4_copy(onnx.load(str(perm)), block=32, symmetric=True), suspect)
    out = tmp_path / "restored.onnx"
    with pytest.raises(CheckFailed) as info:
        api.audit(str(suspect), str(reference), output=str(out), verify_options={"device": "cpu"})
    assert info.value.exit_code == 3 and info.value.report.derived and not out.exists()
    reasons = Counter("splits units" if "splits units" in n["reason"] else "pins" if "pins its neurons" in n["reason"]
                      else n["reason"] for n in info.value.report.restored["not_restored"])
    # pinned by the KV cache: each layer's kv-head group and, since per-head dims (walk/heads.py), the
    # dims of each of its 2 kv heads (query/key dims and value dims): 2 x (1 + 2 x 2)
    assert reasons == {"splits units": 3, "pins": 10}, reasons
    assert sum("~head" in n["group"] for n in info.value.report.restored["not_restored"]) == 8
