"""Decayed neurons (issue 17): neurons whose weights trained down to nothing.

Constructed groups (conv+BatchNorm, conv+bias, Gemm, depthwise) with some neurons decayed, their
rows and columns at 1e-30, 1e-7 or 1e-4 of the typical norm, with and without distinct 1-D
parameters (bias, BatchNorm scale/shift/statistics). The suspect is permuted, then every weight
tensor gets Gaussian noise (the decayed rows become pure noise) or is quantized (they fall onto one
level). Then:
- a decayed neuron is placed exactly when something distinguishes it (its 1-D parameters);
- where nothing does, it is reported interchangeable (and counts as placed, as twins do);
- decayed neurons are reported (count per group) and never vote: the verdict is that of the live
  neurons, even where most of a group is decayed; an unrelated model with decayed units is still
  not derived.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnx_resync.io import WeightStore
from onnx_resync.match import match
from onnx_resync.permute import apply_permutations, random_permutations
from onnx_resync.resync import decision_statistics, resync
from onnx_resync.walk import walk

C = 48  # neurons of the group under test
IN = 16
KINDS = ["conv_bn", "conv_bias", "gemm", "depthwise"]


def build(kind: str, seed: int, decayed: np.ndarray, scale: float, distinct: bool) -> onnx.ModelProto:
    """A two-layer model whose hidden group of C neurons has `decayed` ones at `scale` x typical in
    every slot of 2+ entries; their 1-D parameters are distinct (random) or all equal."""
    rng = np.random.default_rng(seed)
    conv = kind != "gemm"
    k = (3, 3) if kind in ("conv_bn", "conv_bias") else (1, 1)
    w1 = rng.normal(0, 0.3, (C, IN) + (k if conv else ()))
    w2 = rng.normal(0, 0.3, (10, C) + (k if conv else ()))
    w1[decayed] *= scale
    w2[:, decayed] *= scale
    one_d = {"b1": rng.normal(0, 0.5, C), "gamma": rng.uniform(0.5, 1.5, C), "beta": rng.normal(0, 0.5, C),
             "mean": rng.normal(0, 0.2, C), "var": rng.uniform(0.5, 2, C), "bd": rng.normal(0, 0.5, C)}
    if not distinct:
        for v in one_d.values():
            v[decayed] = v[decayed][0]
    f = lambda a, n: nh.from_array(np.asarray(a, dtype=np.float32), n)  # noqa: E731
    inits = [f(w1, "w1"), f(w2, "w2"), f(rng.normal(0, 0.1, 10), "b2")]
    nodes = []
    if kind == "gemm":
        nodes += [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), oh.make_node("Relu", ["h"], ["a"]),
                  oh.make_node("Gemm", ["a", "w2", "b2"], ["y"], transB=1)]
        inits.append(f(one_d["b1"], "b1"))
        shape_in, shape_out = [4, IN], [4, 10]
    else:
        pads = [1, 1, 1, 1] if k == (3, 3) else [0, 0, 0, 0]
        if kind == "conv_bn":
            nodes += [oh.make_node("Conv", ["x", "w1"], ["c"], pads=pads),
                      oh.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["h"])]
            inits += [f(one_d[n], n) for n in ("gamma", "beta", "mean", "var")]
        else:
            nodes.append(oh.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=pads))
            inits.append(f(one_d["b1"], "b1"))
        nodes.append(oh.make_node("Relu", ["h"], ["a"]))
        if kind == "depthwise":
            wd = rng.normal(0, 0.3, (C, 1, 3, 3))
            wd[decayed] *= scale
            inits += [f(wd, "wd"), f(one_d["bd"], "bd")]
            nodes += [oh.make_node("Conv", ["a", "wd", "bd"], ["d"], group=C, pads=[1, 1, 1, 1]),
                      oh.make_node("Relu", ["d"], ["a2"])]
            nodes.append(oh.make_node("Conv", ["a2", "w2", "b2"], ["y"], pads=pads))
        else:
            nodes.append(oh.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=pads))
        shape_in, shape_out = [1, IN, 6, 6], [1, 10, 6, 6]
    graph = oh.make_graph(nodes, kind, [oh.make_tensor_value_info("x", TP.FLOAT, shape_in)],
                          [oh.make_tensor_value_info("y", TP.FLOAT, shape_out)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def perturbed(model: onnx.ModelProto, kind: str, seed: int) -> onnx.ModelProto:
    """Every weight tensor (2+ dims) with noise (0.05 x its std) or quantized to 8 bits."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    store, rng = WeightStore(out), np.random.default_rng(seed)
    for name in store.names():
        w = store.get(name).astype(np.float64)
        if w.ndim < 2:
            continue
        if kind == "noise":
            w = w + rng.normal(0, 0.05 * w.std(), w.shape)
        else:
            lo, hi = w.min(), w.max()
            w = lo + np.round((w - lo) / (hi - lo) * 255) * (hi - lo) / 255
        store.set(name, w.astype(np.float32))
    return out


def suspect_of(model, w, perturbation: str, seed: int = 5):
    truth = random_permutations(w, seed)
    sus = onnx.ModelProto()
    sus.CopyFrom(model)
    apply_permutations(sus, w, truth)
    return perturbed(sus, perturbation, seed), truth


def hidden(result, w):
    """The group of the C hidden neurons (the one whose slots include w1)."""
    return next(gm for gm in result.groups if gm.size == C and any(n.startswith("w1") for n in gm.slot_names))


def placed(gm, truth) -> np.ndarray:
    """Per reference neuron: matched to its own suspect neuron, or to one of its interchangeable class."""
    true = np.asarray(truth.perms[gm.key])
    origin = true[gm.perm]
    i = np.arange(gm.size)
    return (origin == i) | ((gm.ref_class >= 0) & (gm.ref_class[origin] == gm.ref_class))


DECAYED = np.array([3, 7, 11, 20, 30, 41])


@pytest.mark.parametrize("perturbation", ["noise", "quant"])
@pytest.mark.parametrize("scale", [1e-30, 1e-7, 1e-4])
@pytest.mark.parametrize("kind", KINDS)
def test_decayed_neurons_are_placed_by_their_1d_parameters(kind, scale, perturbation):
    ref = build(kind, 0, DECAYED, scale, distinct=True)
    w = walk(ref)
    sus, truth = suspect_of(ref, w, perturbation)
    gm = hidden(match(WeightStore(ref), WeightStore(sus), w), w)
    assert sorted(np.flatnonzero(gm.decayed)) == sorted(DECAYED)
    ok = placed(gm, truth)
    assert ok.all(), f"misplaced: {np.flatnonzero(~ok)}"
    # placed for real: no decayed neuron is interchangeable (its 1-D parameters tell it apart)
    assert not gm.interchangeable[DECAYED].any()
    assert gm.live.sum() == C - len(DECAYED)


@pytest.mark.parametrize("scale", [1e-30, 1e-4])
@pytest.mark.parametrize("kind", KINDS)
def test_decayed_neurons_nothing_distinguishes_are_interchangeable(kind, scale):
    ref = build(kind, 0, DECAYED, scale, distinct=False)
    w = walk(ref)
    sus, truth = suspect_of(ref, w, "noise")
    gm = hidden(match(WeightStore(ref), WeightStore(sus), w), w)
    assert gm.decayed[DECAYED].all() and gm.decayed.sum() == len(DECAYED)
    classes = gm.ref_class[DECAYED]
    assert (classes >= 0).all() and len(set(classes)) == 1  # one class: nothing tells them apart
    assert placed(gm, truth).all()  # live neurons placed; decayed ones within their class
    assert not gm.interchangeable[np.setdiff1d(np.arange(C), DECAYED)].any()


def test_decayed_neurons_with_distinct_1d_parameters_at_a_tiny_scale_are_not_interchangeable():
    """Decayed but told apart by their bias: not one class (placing them is a claim, and it is right)."""
    ref = build("conv_bias", 0, DECAYED, 1e-30, distinct=True)
    w = walk(ref)
    sus, truth = suspect_of(ref, w, "quant")
    gm = hidden(match(WeightStore(ref), WeightStore(sus), w), w)
    assert (gm.ref_class[DECAYED] < 0).all()
    true = np.asarray(truth.perms[gm.key])
    assert (true[gm.perm][DECAYED] == DECAYED).all()


MOSTLY = np.setdiff1d(np.arange(C), np.arange(0, C, 4))  # 36 of 48 decayed, 12 live


@pytest.mark.parametrize("kind", KINDS)
def test_verdict_is_decided_by_live_neurons(kind):
    """A group made mostly of decayed neurons (as in real detectors): still derived, and its
    evidence is that of its live neurons whether the decayed ones are distinct or not."""
    evidence = {}
    for distinct in (True, False):
        ref = build(kind, 0, MOSTLY, 1e-30, distinct=distinct)
        w = walk(ref)
        sus, _ = suspect_of(ref, w, "noise")
        result = match(WeightStore(ref), WeightStore(sus), w)
        gm = hidden(result, w)
        assert gm.decayed.sum() == len(MOSTLY) and gm.live.sum() == C - len(MOSTLY)
        ev, _ = decision_statistics(result.groups)
        assert ev >= 1.0, f"{kind} distinct={distinct}: evidence {ev}"
        evidence[distinct] = gm.evidence
    assert evidence[True] == pytest.approx(evidence[False], rel=0.25)


@pytest.mark.parametrize("kind", KINDS)
def test_unrelated_model_with_decayed_neurons_is_not_derived(kind):
    """The same architecture trained apart (other weights), decayed units in the same places:
    decayed neurons do not make it look derived."""
    ref = build(kind, 0, MOSTLY, 1e-30, distinct=True)
    other = build(kind, 1, MOSTLY, 1e-30, distinct=True)
    w = walk(ref)
    truth = random_permutations(w, 2)
    apply_permutations(other, w, truth)
    result = match(WeightStore(ref), WeightStore(other), w)
    ev, _ = decision_statistics(result.groups)
    assert ev < 1.0, f"{kind}: evidence {ev}"


def test_report_shows_live_decayed_and_interchangeable(tmp_path):
    """resync end to end (the restored model checked with ONNX Runtime): the report's text and
    JSON say per group how many neurons are live, decayed and interchangeable."""
    ref = build("conv_bn", 0, DECAYED, 1e-30, distinct=False)
    w = walk(ref)
    sus, _ = suspect_of(ref, w, "noise")
    _, report = resync(sus, ref, tmp_path / "restored.onnx", report_path=tmp_path / "report.json")
    assert report.derived and report.verified
    assert report.decayed == len(DECAYED)
    data = json.loads((tmp_path / "report.json").read_text())
    group = next(g for g in data["groups"] if g["size"] == C)
    assert group["decayed"] == len(DECAYED) and group["live"] == C - len(DECAYED)
    assert sorted(group["interchangeable"]) == sorted(DECAYED.tolist())
    text = "\n".join(report.summary_lines())
    assert f"decayed (functionally inert, not evidence): {len(DECAYED)} neurons in 1 groups" in text


def test_rescale_living_in_1d_slots_is_found_and_undone():
    """A neutral rescale across the ReLU written into BatchNorm's scale and shift (1-D slots) and
    the consumer's columns, the conv rows untouched: the cheap gate (resync._rescales) fires and the
    rescale is undone (before, only slots of 2+ entries counted: rows unchanged, nothing hinted)."""
    from onnx_resync.match.rescale import neutral_groups, undo_rescales

    ref = build("conv_bn", 0, np.array([], dtype=int), 1.0, distinct=True)
    w = walk(ref)
    sus = onnx.ModelProto()
    sus.CopyFrom(ref)
    groups = [g for g in neutral_groups(w) if g.size == C]
    assert groups
    # half up, half down by the same amounts: every slot's median ratio stays 1 (the gate's other cue)
    v = np.random.default_rng(0).uniform(0.3, np.log(4), C // 2)
    log_a = np.random.default_rng(1).permutation(np.concatenate([v, -v]))
    undo_rescales(ref, WeightStore(sus), groups, {groups[0].key: -log_a})
    assert not np.array_equal(WeightStore(sus).get("gamma"), WeightStore(ref).get("gamma"))
    assert np.array_equal(WeightStore(sus).get("w1"), WeightStore(ref).get("w1"))  # rows untouched
    apply_permutations(sus, w, random_permutations(w, 3))
    restored, report = resync(sus, ref)
    assert report.derived and report.perturbation["rescaled_undone"] >= C // 2
    for name in ("gamma", "beta", "w2"):
        np.testing.assert_allclose(WeightStore(restored).get(name), WeightStore(ref).get(name), rtol=1e-4, atol=1e-6)
