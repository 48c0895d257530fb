"""ONNX Runtime's own files walk (walk/rules/contrib.py): the bundled models saved by ONNX Runtime's
optimizer (contrib ops: FusedConv, FusedGemm, FusedMatMul, QuickGelu, BiasGelu, ...), quantized ones
it rewrote (QLinearConv in NHWC, QLinearAdd on residual streams, DynamicQuantizeMatMul, ...), and
what the rules for attention, rotary embeddings and blocked int4 weights let move.

Every file: the walk knows every op, its coverage is the float model's, and permute (verified by
ONNX Runtime inside api.permute and again here) then undo gives the original bytes. Each coverage
assertion comes with a file where it comes out the other way (an op without a rule, a cache).
The exporter zoo's ORT-saved and BERT-optimizer files are walked the same way (marker zoo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_resync import api
from onnx_resync.verify import verify

from op_cases import CASES, HEADS, MS, G
from quantize_bundled import quantize

MODELS = Path(__file__).resolve().parent.parent / "models"
ZOO = Path(os.environ.get("ONNX_RESYNC_ZOO", Path.home() / ".cache" / "onnx-resync" / "zoo"))


def _ort_saved(src: Path, dst: Path, level: str) -> Path:
    """The model as ONNX Runtime's optimizer writes it (SessionOptions.optimized_model_filepath)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def _like(result, reference) -> None:
    """The walk of an ONNX Runtime file moves (at least) what its float source's walk moves, and pins
    for no reason the source's walk does not give."""
    assert not result.ops_without_rule
    assert result.permutable_channels >= reference.permutable_channels
    assert {p.reason for p in result.pinned} <= {p.reason for p in reference.pinned}


def _round_trip(path: Path, tmp_path: Path, resync: bool = False) -> None:
    """Permute (checked), verify again, undo to the original bytes; resync: the permuted copy resynced
    against the file gives the file back byte for byte."""
    out, back, record = tmp_path / "permuted.onnx", tmp_path / "undone.onnx", tmp_path / "record.json"
    _, info = api.permute(path, out, seed=3, record_path=record)
    assert info.verified and info.neurons_moved > 0
    report = verify(path, out, samples=2, seed=7)
    assert report.equivalent, report.format_text()
    api.permute(out, back, undo=record)
    assert back.read_bytes() == path.read_bytes()
    if resync:
        restored = tmp_path / "restored.onnx"
        _, result = api.resync(out, path, restored)
        assert result.verdict == "permuted", result.verdict
        assert restored.read_bytes() == path.read_bytes()


def _contrib_ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == MS}


# ---- the bundled models as ONNX Runtime saves them -------------------------------------------------
@pytest.mark.parametrize("name, ops", [
    ("transformer", {"FusedMatMul", "BiasGelu"}),
    ("resnet", {"FusedConv"}),
    ("mobilenet", {"FusedConv"}),
    ("csp", {"QuickGelu"}),
    ("vgg", {"FusedConv", "FusedGemm"}),
    ("mlp", {"FusedGemm"}),
])
def test_ort_extended_walks_like_the_float_model(name, ops, tmp_path):
    saved = _ort_saved(MODELS / f"{name}.onnx", tmp_path / "ort.onnx", "extended")
    assert ops <= _contrib_ops(saved)  # ONNX Runtime really wrote its contrib ops
    _like(api.groups(saved), api.groups(MODELS / f"{name}.onnx"))
    _round_trip(saved, tmp_path)


@pytest.mark.parametrize("name, level, ops", [
    ("resnet", "all", {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"}),
    ("transformer", "extended", {"QLinearSoftmax", "QGemm"}),
])
def test_quantized_and_optimized_walks_like_the_float_model(name, level, ops, tmp_path):
    """QDQ files fused by ONNX Runtime: NHWC QLinearConv between Transposes, the residual Add read from
    DequantizeLinear outputs fused into QLinearAdd (a QDQ ResNet at ORT's full level reached 0% of
    its channels before: no rule for com.microsoft QLinearConv, no shapes after it)."""
    qdq = quantize(MODELS / f"{name}.onnx", tmp_path / "qdq.onnx", name, "qdq")
    saved = _ort_saved(qdq, tmp_path / "ort.onnx", level)
    assert ops <= _contrib_ops(saved)
    _like(api.groups(saved), api.groups(MODELS / f"{name}.onnx"))
    _round_trip(saved, tmp_path, resync=True)


def test_fake_quantized_weights_walk_like_the_float_model(tmp_path):
    """QDQ with the weights kept in float behind a QuantizeLinear -> DequantizeLinear pair (onnxruntime's
    AddQDQPairToWeight, TensorRT-style QDQ exports; the residual Add reads DequantizeLinear outputs):
    0 of 0 channels before (every Conv 'with a computed weight', not even counted)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from quantize_bundled import _Calibration

    x = np.load(MODELS / "resnet_test.npz")["input"]
    path = tmp_path / "fake_quant.onnx"
    quantize_static(str(MODELS / "resnet.onnx"), str(path), _Calibration(x), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, extra_options={"AddQDQPairToWeight": True})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") > ops.count("Conv") and "Add" in ops
    _like(api.groups(path), api.groups(MODELS / "resnet.onnx"))
    _round_trip(path, tmp_path, resync=True)


def test_nchwc_layout_walks_like_the_float_model(tmp_path):
    """ONNX Runtime's NCHWc layout (ORT_ENABLE_ALL on a float CNN; walk/rules/nchwc.py): the groups of
    the float model, its blocked filters permuted through their layout, exact."""
    saved = _ort_saved(MODELS / "vgg.onnx", tmp_path / "ort.onnx", "all")
    assert any(n.domain == "com.microsoft.nchwc" for n in onnx.load(str(saved)).graph.node)
    _like(api.groups(saved), api.groups(MODELS / "vgg.onnx"))
    _round_trip(saved, tmp_path)


def test_an_op_without_a_rule_still_pins(tmp_path):
    """The counter-case: an op the registry does not know (the NCHWc save with its convolutions renamed)
    has no walker rule: the walk says so and moves nothing it cannot follow."""
    saved = onnx.load(str(_ort_saved(MODELS / "vgg.onnx", tmp_path / "ort.onnx", "all")))
    for node in saved.graph.node:
        if node.domain == "com.microsoft.nchwc" and node.op_type == "Conv":
            node.op_type = "ConvWithoutRule"
    onnx.save(saved, tmp_path / "unknown.onnx")
    result = api.groups(tmp_path / "unknown.onnx")
    assert "com.microsoft.nchwc.ConvWithoutRule" in result.ops_without_rule
    assert result.permutable_channels < api.groups(MODELS / "vgg.onnx").permutable_channels


# ---- attention: which groups there are --------------------------------------------------------------
def _group_sizes(model: onnx.ModelProto, tmp_path: Path, weight: str, axis: int) -> list[int]:
    path = tmp_path / "case.onnx"
    onnx.save(model, path)
    return sorted(g.size for g in api.groups(path).groups if any(s.weight == weight and s.axis == axis for s in g.slots))


def test_packed_attention_moves_heads_and_dims(tmp_path):
    # Wqkv [8, 24]: its rows are the input's channels; its columns heads (2, in Q, K, V together), Q/K
    # dims (4) and V dims (4) inside each head (issue 15.6: each head its own group)
    sizes = _group_sizes(CASES[(MS, "Attention")].build(), tmp_path, "Wqkv", 1)
    assert sizes == [HEADS] + [4] * 2 * HEADS


def test_group_query_attention_moves_kv_heads_with_their_query_heads(tmp_path):
    # 4 query heads over 2 kv heads (head size 16): kv heads (2), query heads inside each kv group (2,
    # per kv head), Q/K dims per kv head (issue 15.6)
    model = CASES[(MS, "GroupQueryAttention")].build()
    assert _group_sizes(model, tmp_path, "Wq", 1) == [2, 2, 2, 16, 16]
    assert _group_sizes(model, tmp_path, "Wk", 1) == [2, 16, 16]
    assert _group_sizes(model, tmp_path, "Wv", 1) == [2, 16, 16]  # V's dims: their own groups, with W2's rows
    assert _group_sizes(model, tmp_path, "W2", 0) == [2, 2, 2, 16, 16]


def test_rotary_pins_the_dims_inside_a_head(tmp_path):
    model = CASES[(MS, "RotaryEmbedding")].build()
    assert _group_sizes(model, tmp_path, "W1", 1) == [HEADS]  # heads only: no group of dims
    gqa = [c for c in __import__("op_cases").VARIANTS if c.name == "com.microsoft.GroupQueryAttention[rotary]"][0]
    assert _group_sizes(gqa.build(), tmp_path, "Wq", 1) == [2, 2, 2]  # heads; Q/K dims stay
    assert _group_sizes(gqa.build(), tmp_path, "Wv", 1) == [2, 16, 16]  # V's dims still move, per head


def _attention_with_cache(read_present: bool) -> onnx.ModelProto:
    g = G(ms=True)
    x = g.input("X", [1, 4, 6])
    t = g.matmul(x, 6, 8, "W1")
    past = g.input("past", [2, 1, HEADS, 3, 4])
    y, present = g.op("Attention", [t, g.rand("Wqkv", [8, 24]), g.rand("bqkv", [24], 0.1), "", past], outputs=2,
                      domain=MS, num_heads=HEADS)
    g.ranks[y] = 3
    g.output(g.matmul(y, 8, 4, "W2"))
    if read_present:
        g.output(present, rank=5)
    return g.model()


def test_a_key_value_cache_pins_the_heads(tmp_path):
    """A cache fed in has the graph's own head layout: nothing of Q, K, V may move (without the cache
    the same layer moves, test_packed_attention_moves_heads_and_dims)."""
    assert _group_sizes(_attention_with_cache(True), tmp_path, "Wqkv", 1) == []
    path = tmp_path / "cache.onnx"
    onnx.save(_attention_with_cache(True), path)
    assert any("key/value cache" in p.reason for p in api.groups(path).pinned)


def test_matmul_nbits_moves_rows_with_their_blocked_scales(tmp_path):
    model = CASES[(MS, "MatMulNBits")].build()
    assert _group_sizes(model, tmp_path, "Bq", 0) == [5]
    assert _group_sizes(model, tmp_path, "Bs", 0) == [5]  # scales [N * blocks]: a block of 2 per row
    # zero points packed two blocks to a byte: K cannot move, not even in whole blocks
    assert _group_sizes(model, tmp_path, "W1", 1) == []


@pytest.mark.parametrize("variant", ["blocks", "blocks-2d"])
def test_matmul_nbits_moves_whole_blocks_of_k(variant, tmp_path):
    case = next(c for c in __import__("op_cases").VARIANTS if c.name == f"com.microsoft.MatMulNBits[{variant}]")
    model = case.build()
    assert _group_sizes(model, tmp_path, "W1", 1) == [2]  # 32 channels of W1: 2 blocks of 16, whole
    assert _group_sizes(model, tmp_path, "Bq", 1) == [2]
    if variant == "blocks":  # scales [N * blocks]: entry n * 2 + b moves with row n and with block b
        assert _group_sizes(model, tmp_path, "Bs", 0) == [2, 5]
    else:  # scales [N, blocks]
        assert _group_sizes(model, tmp_path, "Bs", 0) == [5] and _group_sizes(model, tmp_path, "Bs", 1) == [2]


# ---- the exporter zoo's files written by ONNX Runtime -----------------------------------------------
KINDS = ("ort_extended", "bert", "bert_fp16", "qop", "dynamic", "qdq_pc", "qdq_pt", "qdq_pre")


def _zoo_files(kinds=KINDS):
    manifest = ZOO / "manifest.json"
    if not manifest.exists():
        return []
    models = json.loads(manifest.read_text()).get("models", {})
    return [pytest.param(Path(v["file"]), id=f"{m}/{k}") for m, entry in sorted(models.items())
            for k, v in sorted(entry.get("variants", {}).items())
            if k in kinds and Path(v["file"]).exists()]


@pytest.mark.zoo
@pytest.mark.parametrize("path", _zoo_files())
def test_zoo_ort_files_walk_like_their_source(path, tmp_path):
    _like(api.groups(path), api.groups(MODELS / f"{path.parent.name}.onnx"))
    _round_trip(path, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("level", ["extended", "all"])
@pytest.mark.parametrize("path", _zoo_files(("qop", "dynamic", "qdq_pc", "qdq_pt", "qdq_pre", "bert")))
def test_zoo_quantized_files_optimized_by_ort(path, level, tmp_path):
    """The zoo's quantized files as ONNX Runtime rewrites them (QLinearConv NHWC, QLinearAdd,
    DynamicQuantizeMatMul, MatMulIntegerToFloat, ...). At its full level a float CNN part gets the
    NCHWc layout, which has no rule (test_an_op_without_a_rule_still_pins): those files are left out."""
    saved = _ort_saved(path, tmp_path / "ort.onnx", level)
    if any(n.domain == "com.microsoft.nchwc" for n in onnx.load(str(saved), load_external_data=False).graph.node):
        pytest.skip("NCHWc layout (no walker rule)")
    _like(api.groups(saved), api.groups(MODELS / f"{path.parent.name}.onnx"))
    _round_trip(saved, tmp_path)


# ---- generated transformer blocks of contrib ops (hypothesis) ------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def contrib_blocks(draw):
    """X [1, 4, 6] -> (EmbedLayerNormalization | MatMul) -> layers of: attention (packed Attention or
    MultiHeadAttention with bias, maybe rotary on Q and K) -> MatMul -> (Simplified)SkipLayerNormalization
    (with or without bias) -> FusedMatMul (weight maybe transposed) -> a gelu form -> MatMul ->
    skip norm; -> MatMul head. Hidden = heads x head size."""
    heads, size = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([2, 4]))
    hidden, inter = heads * size, draw(st.sampled_from([6, 8]))
    g = G(ms=True, seed=draw(st.integers(0, 3)))
    constructs = []
    if draw(st.booleans()):
        ids = g.input("ids", [1, 4], onnx.TensorProto.INT32)
        x, _ = g.op("EmbedLayerNormalization", [ids, "", g.rand("word", [10, hidden]), g.rand("pos", [6, hidden]), "",
                                                g.rand("eg", [hidden]), g.rand("eb", [hidden], 0.1)], outputs=2,
                    domain=MS, epsilon=1e-5)
        constructs.append("embed")
    else:
        x = g.matmul(g.input("X", [1, 4, 6]), 6, hidden, "Win", rank=3)
    for layer in range(draw(st.integers(1, 2))):
        w = lambda name, shape, scale=0.5: g.rand(f"l{layer}_{name}", shape, scale)  # noqa: E731
        if draw(st.booleans()):
            a = g.op("Attention", [x, w("qkv", [hidden, 3 * hidden]), w("qkv_b", [3 * hidden], 0.1)], domain=MS,
                     num_heads=heads)
            constructs.append("attention")
        else:
            q, k, v = (g.op("MatMul", [x, w(n, [hidden, hidden])]) for n in "qkv")
            if draw(st.booleans()) and size % 2 == 0:  # rotary on Q and K (pairs of dims in each head)
                pos = g.const(f"l{layer}_pos", [[0, 1, 2, 3]], np.int64)
                cos, sin = w("cos", [8, size // 2]), w("sin", [8, size // 2])
                q, k = (g.op("RotaryEmbedding", [t, pos, cos, sin], domain=MS, num_heads=heads) for t in (q, k))
                constructs.append("rotary")
            a = g.op("MultiHeadAttention", [q, k, v, w("mha_b", [3 * hidden], 0.1)], domain=MS, num_heads=heads)
            constructs.append("mha")
        o = g.op("MatMul", [a, w("o", [hidden, hidden])])
        op = draw(st.sampled_from(["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"]))
        params = [w("g1", [hidden])] + ([] if "Simplified" in op else [w("b1", [hidden], 0.1)])
        x = g.op(op, [o, x] + params + ([w("sb1", [hidden], 0.1)] if draw(st.booleans()) else []), domain=MS,
                 epsilon=1e-5)
        trans = draw(st.booleans())
        up = g.op("FusedMatMul", [x, w("up", [inter, hidden] if trans else [hidden, inter])], domain=MS,
                  transB=int(trans), alpha=0.7)
        gelu = draw(st.sampled_from(["BiasGelu", "FastGelu", "QuickGelu", "Gelu"]))
        act = g.op(gelu, [up] + ([w("gb", [inter], 0.1)] if gelu in ("BiasGelu", "FastGelu") else []), domain=MS)
        constructs.append(gelu)
        down = g.op("MatMul", [act, w("down", [inter, hidden])])
        x = g.op("SkipLayerNormalization", [down, x, w("g2", [hidden]), w("b2", [hidden], 0.1)], domain=MS,
                 epsilon=1e-5)
    g.ranks[x] = 3
    g.output(g.matmul(x, hidden, 3, "Wout"))
    return g.model(), constructs


ROTARY = "a rotary embedding pairs the dims of a head (ordered by frequency)"


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(contrib_blocks())
def test_generated_contrib_blocks(tmp_path_factory, gen):
    """Every generated block: nothing pinned but the output (and rotary dims), permute verified by ORT,
    undo byte-exact, resync of the permuted copy gives the file back."""
    model, constructs = gen
    tmp = tmp_path_factory.mktemp("gen")
    path = tmp / "model.onnx"
    onnx.save(model, path)
    result = api.groups(path)
    assert not result.ops_without_rule
    # (a rotary embedding pins the dims: with one head nothing of Q/K moves)
    assert {p.reason for p in result.pinned} <= {"reaches a graph output", ROTARY}, (constructs, result.pinned)
    _round_trip(path, tmp, resync=True)


@pytest.mark.vendor
def test_bert_optimizer_on_a_vendor_model(tmp_path):
    """A real BERT (the vendor MiniLM) through onnxruntime.transformers' optimizer: EmbedLayerNormalization,
    packed-QKV Attention, SkipLayerNormalization, BiasGelu. Nothing was counted before (0 of 0: every
    op unknown); now its walk moves what the float file's walk moves, and resync restores its bytes."""
    from onnxruntime.transformers import optimizer
    from vendor_models import vendor_model

    source = vendor_model("minilm")
    path = tmp_path / "minilm_bert_optimized.onnx"
    # opt_level 0: the fusions are the optimizer's own (its ONNX Runtime pass imports torch, a test-only extra)
    optimizer.optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0).save_model_to_file(str(path))
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"} <= _contrib_ops(path)
    _like(api.groups(path), api.groups(source))
    _round_trip(path, tmp_path, resync=True)
