"""Doubtful pairings decided by neuron evidence (issue 14 item 1; align.alternatives, report._by_neuron_evidence).

The repro: an attention block whose q and k projections are structural twins (scores = q k^T + k q^T:
each feeds both MatMuls in both slots, so structure cannot tell them apart) and whose weights have
almost the same permutation-invariant content (k: q with its entries' signs redrawn and its rows and
columns shuffled, times 1 + 1e-4 noise: the same sorted row and column norms; hidden > 256, so no
singular values), stored as int4 by onnxruntime.quantization's MatMulNBitsQuantizer. The int4 rounding
moves every norm by more than q and k differ, so the content pairing of q and k is a coin toss: with
SWAP_SEED the alignment pairs them the wrong way round (low confidence), and before the fix the audit
said "not derived". Now the runner-up alignment is resynced and kept on its higher evidence.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit.align import align, alternatives
from onnx_resync.audit.canonical import canonicalize
from onnx_resync.api import audit

HIDDEN = 288  # > align.SVD_MAX_SIDE: content is sorted row and column norms only


def attention(seed: int, twin_qk: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    h = HIDDEN

    def mat():
        return (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)

    wq, wv, wo = mat(), mat(), mat()
    if twin_qk:
        signs = rng.choice([-1.0, 1.0], size=(h, h))
        wk = (wq * signs)[rng.permutation(h)][:, rng.permutation(h)]
        wk = (wk * (1 + 1e-4 * rng.standard_normal((h, h)))).astype(np.float32)
    else:
        wk = mat()
    inits = {"wq": wq, "wk": wk, "wv": wv, "wo": wo, "scale": np.array(1 / np.sqrt(h), np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1], name="qt"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["s1"], name="qk"),
        helper.make_node("MatMul", ["k", "qt"], ["s2"], name="kq"),
        helper.make_node("Add", ["s1", "s2"], ["s"], name="sym"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scaled"),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="ctx"),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", h])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def int4_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    q = MatMulNBitsQuantizer(copy, bits=4, block_size=32, is_symmetric=False)
    q.process()
    return q.model.model


SWAP_SEED = 1  # the int4 rounding pairs q and k the wrong way round (seed 0: the right way; both doubtful)
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def swapped():
    ref = attention(SWAP_SEED)
    return ref, int4_copy(ref)


def _projections(alignment) -> dict:
    return {r: s for r, s in alignment.node_map.items() if r.endswith("_proj")}


def test_the_repro_pairs_q_and_k_the_wrong_way_round_with_low_confidence(swapped):
    ref, sus = swapped
    a = align(canonicalize(ref), canonicalize(sus))
    assert _projections(a)["q_proj"] == "k_proj_Q4" and _projections(a)["k_proj"] == "q_proj_Q4"
    assert a.confidence < 1 and len(a.doubtful) == 2
    assert any("low confidence" in n for n in a.notes)
    alts = alternatives(a)
    assert len(alts) == 1  # one class with doubtful pairs: one runner-up
    what, other = alts[0]
    assert _projections(other) == {"q_proj": "q_proj_Q4", "k_proj": "k_proj_Q4", "v_proj": "v_proj_Q4",
                                   "o_proj": "o_proj_Q4"}
    assert "'q_proj' with 'q_proj_Q4'" in what


def test_the_repro_is_derived_by_neuron_evidence(swapped):
    ref, sus = swapped
    r = audit(sus, ref)
    assert r.derived and r.verdict == "identical" and r.format_change.startswith("int4")
    note = next(e for e in r.evidence if "paired by neuron evidence" in e)
    assert "'q_proj' with 'q_proj_Q4'" in note and "as first aligned" in note
    assert r.matched == r.neurons


def test_the_repro_was_not_derived_without_the_alternatives(swapped, monkeypatch):
    import onnx_resync.audit.report as report

    monkeypatch.setattr(report, "alternatives", lambda alignment, limit=0: [])  # what the audit did before
    r = audit(*swapped)
    assert not r.derived and r.verdict == "not derived"
    assert not any("neuron evidence" in e for e in r.evidence)


@pytest.mark.parametrize("ref_seed, sus_seed", [(SWAP_SEED, 101), (0, 100)])
def test_an_unrelated_twin_stays_not_derived(ref_seed, sus_seed):
    r = audit(int4_copy(attention(sus_seed)), attention(ref_seed))
    assert not r.derived and r.verdict == "not derived" and r.exit_code == 1
    note = next(e for e in r.evidence if "by neuron evidence" in e)  # runner-ups were tried, none derived
    assert "doubtful pairs kept" in note and "not derived either" in note
    assert r.statistic < 0.5


def test_a_right_doubtful_pairing_is_kept():
    ref = attention(0)
    a = align(canonicalize(ref), canonicalize(int4_copy(ref)))
    assert a.doubtful and _projections(a)["q_proj"] == "q_proj_Q4"
    r = audit(int4_copy(ref), ref)  # derived as aligned: no alternative is tried
    assert r.derived and not any("neuron evidence" in e for e in r.evidence)


def test_neuron_evidence_keeps_a_right_pairing_against_its_runner_up(swapped):
    """Given the right pairing first (the repro's runner-up), the wrong one (its own runner-up) loses."""
    from onnx_resync.audit.report import _by_neuron_evidence
    from onnx_resync.audit.subgraphs import compare_subgraphs
    from onnx_resync.resync import resync

    ref, sus = swapped
    ref_c, sus_c = canonicalize(ref), canonicalize(sus)
    right = alternatives(align(ref_c, sus_c))[0][1]
    restored, rs = resync(right.model, ref_c.model, check=False)
    kept, _, kept_rs = _by_neuron_evidence(right, restored, rs, ref_c, compare_subgraphs(ref_c.model, sus_c.model), 8)
    assert kept is right and kept_rs is rs and rs.derived
    assert _projections(kept)["q_proj"] == "q_proj_Q4"
    assert any("doubtful pairs kept by neuron evidence" in n for n in kept.notes)
