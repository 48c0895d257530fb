"""Audit on real files whose layers sit inside If bodies (issue 14, items 1 and 3).

silero-vad 6.2.3 ships the same network written four ways: `silero_vad_op15` (torch.onnx opset 15:
the decoder LSTM inside an If, its weights sliced into ONNX's gate order inside the branch),
`silero_vad_openvino` (the same weights, the LSTM in the main graph), `silero_vad_if` (every weight
a Constant node inside an If on the sample rate, a 16 kHz and an 8 kHz branch) and
`silero_vad_ifless` (dynamo opset 18: both rates' weights as initializers, the LSTM written as
Gemm cells). faster-whisper 1.2.1 ships `silero_vad_v6`, another version's weights.

Layers inside bodies are aligned like the main graph's (audit/bodies.py: constants folded inside
bodies, one flat view of every layer), weights no group reaches are compared up to their order
(audit/unreached.py), and a "cannot judge" report states only what was measured.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from onnx_resync import api
from onnx_resync.audit import report as audit_report
from onnx_resync.io import WeightStore, load_model
from vendor_models import vendor_model

pytestmark = pytest.mark.vendor


def _load(key: str) -> onnx.ModelProto:
    return load_model(vendor_model(key))


def _redrawn(key: str, seed: int) -> tuple[onnx.ModelProto, int]:
    """Every float tensor of two or more elements, in every scope (If bodies included), redrawn
    with the same shape and spread; and how many."""
    model = _load(key)
    store, rng, n = WeightStore(model), np.random.default_rng(seed), 0
    for name in store.names():
        v = store.get(name)
        if v.dtype.kind == "f" and v.size >= 2:
            store.set(name, (rng.standard_normal(v.shape) * (float(v.std()) or 1.0)).astype(v.dtype))
            n += 1
    return model, n


def _consistent(report) -> None:
    """No line contradicts the verdict or another line."""
    text = "\n".join([report.summary] + report.evidence)
    # "only 962 of 962 neurons (100.0%) ... do not stand out" was the contradiction
    assert "(100.0%) are their" not in text and not re.search(r"only ([\d,]+) of \1\b", text), text
    if report.verdict == "cannot judge":
        assert all(not e.startswith(("evidence", "decision")) for e in report.evidence[:2]), text


@pytest.mark.parametrize("suspect,reference", [("silero_vad_openvino", "silero_vad_op15"),
                                               ("silero_vad_op15", "silero_vad_openvino")])
def test_lstm_inside_or_outside_an_if_is_the_same_model(suspect, reference):
    # before: exit 3, "cannot align the suspect's layer ...LSTM ... the reference has no layer left of that kind"
    report = api.audit(_load(suspect), _load(reference))
    assert report.derived and report.verdict == "identical" and report.exit_code == 0, report.summary
    assert report.compared["share"] > 0.99, report.compared
    _consistent(report)


@pytest.mark.parametrize("suspect,reference", [("silero_vad_openvino", "silero_vad_op15"),
                                               ("silero_vad_op15", "silero_vad_openvino")])
def test_permuted_copy_is_derived_permuted(suspect, reference):
    permuted, info = api.permute(_load(suspect), seed=11)
    assert info.verified and info.neurons_moved > 0
    report = api.audit(permuted, _load(reference))
    assert report.derived and report.verdict == "permuted" and report.permuted, report.summary
    assert report.exit_code == 0
    _consistent(report)


def test_weights_as_constants_inside_if_against_the_ifless_export():
    # before: "cannot judge: 0 of 545,283 compared", with "evidence inf" and "only 962 of 962 neurons (100.0%)"
    report = api.audit(_load("silero_vad_if"), _load("silero_vad_ifless"))
    # the truth, read from the tensors: the 16 kHz weights are the same, the 8 kHz ones differ
    # (cosine ~0.996: another training of that branch), so "derived, perturbed" is the right verdict
    a, b = WeightStore(_load("silero_vad_if")), WeightStore(_load("silero_vad_ifless"))
    same = a.get("If_0_then_branch__Inline_0__encoder.0.reparam_conv.weight")
    assert np.array_equal(same, b.get("model.encoder.0.reparam_conv.weight"))
    assert not np.allclose(a.get("If_0_else_branch__Inline_0__encoder.0.reparam_conv.weight"),
                           b.get("model_8k.encoder.0.reparam_conv.weight"), atol=1e-3)
    assert report.derived and report.verdict == "perturbed" and report.exit_code == 0, report.summary
    # the LSTM is an LSTM op in one file and Gemm cells in the other: not paired, not counted as compared
    assert 0.5 <= report.compared["share"] < 0.6, report.compared
    _consistent(report)


def test_cannot_judge_states_what_was_measured(monkeypatch):
    # the same real pair with the bar raised above its 51.5%: the text under "cannot judge"
    monkeypatch.setattr(audit_report, "MIN_COMPARED_SHARE", 0.6)
    report = api.audit(_load("silero_vad_if"), _load("silero_vad_ifless"))
    assert report.verdict == "cannot judge" and report.exit_code == 4 and not report.derived, report.summary
    assert all("on the compared part only" in e for e in report.evidence[:2]), report.evidence
    _consistent(report)


def test_another_versions_weights_are_not_derived():
    report = api.audit(_load("silero_vad_v6"), _load("silero_vad_op15"))
    assert report.verdict == "not derived" and not report.derived and report.exit_code == 1, report.summary
    assert report.compared["share"] > 0.99, report.compared


@pytest.mark.parametrize("key", ["silero_vad_op15", "silero_vad_if"])
def test_redrawn_weights_are_never_derived(key):
    redrawn, n = _redrawn(key, seed=3)
    assert n >= 14
    report = api.audit(redrawn, _load(key))
    assert not report.derived and report.verdict in ("not derived", "cannot judge"), report.summary
    assert report.exit_code in (1, 4)
    _consistent(report)
