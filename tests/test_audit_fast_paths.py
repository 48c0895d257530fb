"""The audit's shortcuts for big files give the answers of the long way (issue 14 item 5).

- the precision check's float32 screen (report._clearly_within) gives the float64 check's numbers,
  and leaves to it every piece where a difference comes near its bound;
- heatmaps (heatmaps.Heatmaps) are computed only when shown, and are then what they were;
- an audit walks its reference once (resync and the report share the walk).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_resync.api import permute
from onnx_resync.audit import audit, heatmaps, report as audit_report
from onnx_resync.audit.html import render_html
from onnx_resync.audit.rewrite import WeightOrigin
from onnx_resync.audit.storage import allowed
from test_audit import _model_path, quantize_conv_weights, weights_to_fp16


def _noisy(model: onnx.ModelProto, scale: float, seed: int = 3) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.dtype == np.float32 and w.size > 16:
            t.CopyFrom(numpy_helper.from_array((w + scale * np.abs(w) * rng.standard_normal(w.shape)).astype(w.dtype),
                                               t.name))
    return out


@pytest.fixture(scope="module")
def suspects():
    reference = onnx.load(str(_model_path("vgg")))
    permuted, _ = permute(reference, seed=5)
    return reference, {
        "fp16": weights_to_fp16(permuted),
        "int8": quantize_conv_weights(permuted),
        # differences of float16's rounding size: some pieces near or beyond the bound, some not
        "near": weights_to_fp16(_noisy(permuted, 2.0 ** -12)),
        "noisy": _noisy(permuted, 1e-2),
    }


def _without_timings(report) -> dict:
    data = report.to_dict()
    data.pop("timings")
    return data


@pytest.mark.parametrize("kind", ["fp16", "int8", "near", "noisy"])
def test_screen_gives_the_float64_checks_numbers(kind, suspects, monkeypatch):
    reference, copies = suspects
    screened = []
    real = audit_report._clearly_within

    def counted(*args):
        out = real(*args)
        screened.append(out is not None)
        return out

    monkeypatch.setattr(audit_report, "_clearly_within", counted)
    fast = audit(copies[kind], reference)
    monkeypatch.setattr(audit_report, "_clearly_within", lambda *args: None)  # the float64 check everywhere
    slow = audit(copies[kind], reference)
    assert _without_timings(fast) == _without_timings(slow)
    if kind in ("fp16", "int8"):
        assert fast.verdict == "permuted" and all(screened)
    if kind == "noisy":
        assert fast.verdict == "perturbed" and not all(screened)
    if kind == "near":
        assert any(screened) and not all(screened)


def test_screen_leaves_the_margin_to_the_float64_check():
    rng = np.random.default_rng(0)
    r = (rng.standard_normal(4096) * 0.05).astype(np.float32)
    origin = WeightOrigin(["w"], "float16", ["cast float16 -> float32"])
    plain = WeightOrigin(["w"], "float32", [])
    bound = allowed(r.astype(np.float64), origin, plain, None, None, scale=float(np.abs(r).max()))

    def at(fraction: np.ndarray):
        s = (r.astype(np.float64) + fraction * bound).astype(np.float32)
        return s, _clearly_within_or_none(r, s, origin, plain)

    s, clear = at(np.full(r.size, 0.5))
    d = np.abs(s.astype(np.float64) - r.astype(np.float64))
    assert clear == (float((d / bound).max()), float(d.max()))  # the float64 check's numbers
    fraction = np.full(r.size, 0.5)
    fraction[7] = 1 - 1e-4  # inside the margin: only the float64 check may say
    assert at(fraction)[1] is None
    fraction[7] = 1.5  # beyond
    assert at(fraction)[1] is None
    s = r.copy()
    s[3] = np.nan
    assert _clearly_within_or_none(r, s, origin, plain) is None


def _clearly_within_or_none(r, s, so, ro):
    return audit_report._clearly_within(r, s, so, ro, (None, None), float(np.abs(r).max()))


def test_heatmaps_are_computed_when_shown(suspects, monkeypatch):
    reference, copies = suspects
    calls = []
    real = heatmaps.similarity_matrix
    monkeypatch.setattr(heatmaps, "similarity_matrix", lambda *a: calls.append(a[0].key) or real(*a))
    report = audit(copies["fp16"], reference)
    report.to_json()
    assert calls == []  # a verdict, its text and its JSON need none
    page = render_html(report)
    assert sorted(calls) == sorted(r.group for r in report.layers) and "<svg" in page
    group, ref_store, sus_store = report.similarity._groups[calls[0]], *report.similarity._stores
    shown = report.similarity[calls[0]]
    assert np.array_equal(shown, heatmaps.downsample(real(group, ref_store, sus_store), heatmaps.HEATMAP_MAX))
    assert np.diag(real(group, ref_store, sus_store)).min() > 0.99  # matched pairs on the diagonal
    assert len(calls) == len(report.layers)  # kept once computed


def test_an_audit_walks_its_reference_once(suspects, monkeypatch):
    from onnx_resync import resync as resync_module

    reference, copies = suspects
    walked = []
    for module in (audit_report, resync_module):
        real = module.walk
        monkeypatch.setattr(module, "walk", lambda m, _real=real: walked.append(m.graph.name) or _real(m))
    assert audit(copies["fp16"], reference).verdict == "permuted"
    assert len(walked) == 1


def test_a_float_embedding_stays_mapped_through_the_canonical_form(tmp_path):
    """The dequantize pass asks a Gather's table for its type only: a float table is never read (a
    huge model's embedding stays mapped, not copied), an int8 one is still dequantized."""
    from onnx import TensorProto, helper

    from onnx_resync.audit.canonical import canonicalize
    from onnx_resync.io import is_lazy_tensor, load_model

    table = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)  # 2 MiB: mapped
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table[:512, :8].copy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "embedding.onnx"
    onnx.save(model, str(path), save_as_external_data=True, size_threshold=0, location="embedding.onnx.data")
    loaded = load_model(path, lazy=True)
    assert is_lazy_tensor(next(t for t in loaded.graph.initializer if t.name == "table"))
    canon = canonicalize(loaded)
    assert is_lazy_tensor(next(t for t in canon.model.graph.initializer if t.name == "table"))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_points", ["none", "float"])
def test_nbits_codes_unpacked_on_bytes_equal_the_per_column_formula(bits, zero_points):
    """MatMulNBits' weight with its blocks in order (codes shifted and masked out of the bytes) is,
    bit for bit, the per-column formula's (each code unpacked, then (code - zero point) * scale)."""
    from onnx_resync.audit.passes.dequantize import nbits_weight

    rng = np.random.default_rng(bits)
    N, K, block = 5, 40, 16  # K not a multiple of the block: the last block is padded
    blocks = -(-K // block)
    B = rng.integers(0, 256, size=(N, blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.random(N * blocks, dtype=np.float32)
    zp = None if zero_points == "none" else rng.integers(0, 1 << bits, size=(N, blocks)).astype(np.float32)
    in_order = nbits_weight(B, scales, zp, None, bits, block, K, N)
    per_column = nbits_weight(B, scales, zp, np.arange(K) // block, bits, block, K, N)
    assert in_order.shape == (N, K) and np.array_equal(in_order.view(np.uint32), per_column.view(np.uint32))
