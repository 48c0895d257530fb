"""Structural obfuscation (issue 16): dummy, clique and split neurons, inserted identity/monomial
layers, on the bundled models; the reduction without the reference (every rewrite proven by ONNX
Runtime) and resync/audit on the attacked copies.

The attacks are tests/attacks.py. For each: the attacked copy computes what the original computes
(ORT); reduce gives the reference's widths back, proven equivalent to the attacked copy; resync
says "derived, structurally obfuscated" with the attack's counts and matches >= 99% of the
reference's neurons; the same attack on an unrelated model (the `_seed1` variants) stays not
derived. Counter-cases: a reduction that would change the function is refused, a pruned copy
(the function changes) is not reduced, an unrelated architecture is still refused (exit 3).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402

from onnx_resync import api  # noqa: E402
from onnx_resync.cli import main  # noqa: E402
from onnx_resync.errors import ModelMismatchError  # noqa: E402
from onnx_resync.reduce import neurons, reduce_model  # noqa: E402
from onnx_resync.verify import verify  # noqa: E402
from onnx_resync.walk import walk  # noqa: E402

MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", Path(__file__).resolve().parent.parent / "models"))
KINDS = {"dummies": "dummy", "cliques": "clique", "splits": "split"}


def _path(name: str) -> str:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        path = MODELS / "variants" / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{name} is not bundled")
    return str(path)


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    return {g.key: g.size for g in walk(model).groups}


# ---- the attacks keep the function, and widen every slot -------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_width_attacks_keep_the_function_and_widen_every_slot(kind):
    path = _path("vgg")
    model = onnx.load(path)
    attacked, log = attacks.attack(path, kind, 0.05, seed=3)
    assert log.neurons >= len(attacks.proven_groups(path, kind)) >= 4
    assert verify(model, attacked).equivalent
    before, after = _widths(model), _widths(attacked)
    assert sum(after.values()) == sum(before.values()) + log.neurons  # every slot of each group widened
    assert not attacked.graph.value_info  # stale shapes dropped


def test_pruning_changes_the_function_and_is_not_reduced():
    path = _path("mlp")
    model = onnx.load(path)
    pruned, log = attacks.prune(model, 0.25, seed=0)
    assert log.neurons > 0
    assert not verify(model, pruned).equivalent
    _, report = reduce_model(pruned)
    assert not report.changed


def test_clean_models_reduce_to_themselves():
    for name in ("mlp", "vgg", "resnet", "csp", "transformer", "gru"):
        model = onnx.load(_path(name))
        _, report = reduce_model(model)
        assert not report.changed, (name, report.phrase())


# ---- reduce and resync on attacked copies ----------------------------------------------------
CASES = [("mlp", k, f, s) for k in KINDS for f in (0.05, 0.5) for s in (False, True)] + [
    ("resnet", "splits", 0.5, True),  # residual streams (Add of two producers), BatchNormalization
    ("resnet", "cliques", 0.05, True),
    ("csp", "dummies", 0.5, True),  # concats, SiLU (equal copies only)
    ("transformer", "splits", 0.5, True),  # GELU: splits with a = 1 only; residual stream left alone (LayerNorm)
    ("vgg", "splits", 0.05, True),  # Flatten: a channel is a block of 16 in the reader
]


@pytest.mark.parametrize("name,kind,fraction,shuffle", CASES, ids=[f"{n}-{k}-{f}-{'perm' if s else 'plain'}"
                                                                  for n, k, f, s in CASES])
def test_resync_sees_through_width_obfuscation(name, kind, fraction, shuffle, tmp_path):
    path = _path(name)
    attacked, log = attacks.attack(path, kind, fraction, seed=0, shuffle=shuffle)
    assert log.neurons > 0
    suspect = tmp_path / "attacked.onnx"
    onnx.save(attacked, suspect)
    reference = onnx.load(path)
    restored, report = api.resync(str(suspect), path, tmp_path / "restored.onnx")
    assert report.derived
    assert report.verdict.startswith("derived, structurally obfuscated: ")
    red = report.reduction
    assert red["verified"] and red["verify"]["verdict"] == "equivalent"
    assert red[KINDS[kind]] == log.neurons, red["summary"]  # the attack named, with its count
    # splits rescale by a in [0.5, 2] and the shuffle by another such factor: the matched share is
    # measured once the rescales are undone (resync.matched_as_restored)
    assert report.matched >= 0.99 * report.neurons
    assert report.perturbation["noise_relative_std"] < 1e-5
    assert _widths(restored) == _widths(reference)
    assert report.verified  # the restored (reduced, reordered) model computes what the suspect computes


def test_reduce_on_its_own_gives_the_reference_widths(tmp_path):
    path = _path("resnet")
    attacked, log = attacks.attack(path, "dummies", 0.5, seed=1, shuffle=True)
    reduced, report = reduce_model(attacked)
    assert report.count("dummy") == log.neurons and report.verified
    assert _widths(reduced) == _widths(onnx.load(path))
    assert verify(attacked, reduced).equivalent


@pytest.mark.parametrize("kind", ["identity", "monomial"])
def test_inserted_layers_fold_back(kind, tmp_path):
    path = _path("vgg")
    reference = onnx.load(path)
    attacked, _ = attacks.attack(path, kind, seed=2)
    assert len(attacked.graph.node) == len(reference.graph.node) + 2
    assert verify(reference, attacked).equivalent
    suspect = tmp_path / "deeper.onnx"
    onnx.save(attacked, suspect)
    _, report = api.resync(str(suspect), path)
    assert report.verdict == f"derived, structurally obfuscated: 1 inserted {kind} layer"
    assert report.matched == report.neurons


def test_combined_attacks_and_counts(tmp_path):
    path = _path("mlp")
    model = onnx.load(path)
    step, dummies = attacks.widen_groups(model, "dummies", 0.1, seed=4)
    step, splits = attacks.widen_groups(step, "splits", 0.1, seed=5)
    step, _ = attacks.insert_layer(step, "identity", seed=6)
    step = attacks.permute_rescale(step, seed=7)
    assert verify(model, step).equivalent
    onnx.save(step, tmp_path / "s.onnx")
    _, report = api.resync(str(tmp_path / "s.onnx"), path)
    assert report.derived
    red = report.reduction
    # a split of a dummy is a dummy too (nothing reads either half)
    assert red["dummy"] + red["split"] == dummies.neurons + splits.neurons and red["dummy"] >= dummies.neurons
    assert report.verdict == (f"derived, structurally obfuscated: {red['dummy']} dummy neurons, "
                              f"{red['split']} split, 1 inserted monomial layer")  # permuted: no longer identity


# ---- unrelated models stay unrelated ---------------------------------------------------------
@pytest.mark.parametrize("name,kind", [("resnet", "dummies"), ("mlp", "splits"), ("vgg", "cliques")])
def test_attacked_unrelated_model_stays_not_derived(name, kind, tmp_path):
    reference = _path(name)
    attacked, log = attacks.attack(_path(f"{name}_seed1"), kind, 0.5, seed=0, shuffle=True)
    onnx.save(attacked, tmp_path / "other.onnx")
    _, report = api.resync(str(tmp_path / "other.onnx"), reference)
    assert report.reduction[KINDS[kind]] == log.neurons  # reduced the same way...
    assert not report.derived and report.verdict == "not derived"  # ...and still unrelated


def test_other_architecture_still_refused(tmp_path):
    with pytest.raises(ModelMismatchError, match="architecture mismatch"):
        api.resync(_path("mlp"), _path("vgg"))


# ---- every rewrite is proven -----------------------------------------------------------------
def test_a_rewrite_that_changes_the_function_is_refused(monkeypatch):
    """With 'zero' set absurdly high, live neurons look dead: ORT refuses every such rewrite and the
    model comes back unchanged, the refusals listed."""
    model = onnx.load(_path("mlp"))
    monkeypatch.setattr(neurons, "ZERO_SHARE", 0.9)
    reduced, report = reduce_model(model)
    assert not report.changed and report.refused
    assert all(r["what"] == "removing neurons" for r in report.refused)
    assert _widths(reduced) == _widths(model)
    assert verify(model, reduced).equivalent


# ---- front doors -----------------------------------------------------------------------------
def test_cli_reduce_and_audit(tmp_path, capsys):
    path = _path("resnet")
    attacked, log = attacks.attack(path, "splits", 0.05, seed=8, shuffle=True)
    suspect = tmp_path / "s.onnx"
    onnx.save(attacked, suspect)
    out = tmp_path / "reduced.onnx"
    assert main(["reduce", str(suspect), "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["split"] == log.neurons and data["verified"] and data["output"] == str(out)
    assert verify(attacked, onnx.load(out)).equivalent
    assert main(["resync", str(suspect), "--reference", path]) == 0
    text = capsys.readouterr().out
    assert f"verdict: derived, structurally obfuscated: {log.neurons} split" in text
    assert "/layer3/conv1/Conv: " in text  # per layer
    assert main(["audit", str(suspect), "--reference", path]) == 0
    text = capsys.readouterr().out
    assert f"verdict: derived, structurally obfuscated: {log.neurons} split" in text
    assert main(["reduce", str(suspect), "-o", str(suspect)]) == 2  # never over an input


# ---- structured pruning: a rectangular assignment, judged on the matched neurons -------------
PRUNED = [("mlp", "mlp", 0.5), ("resnet", "resnet", 0.1), ("vgg_ft50", "vgg", 0.5), ("resnet_ft10", "resnet", 0.5)]


@pytest.mark.parametrize("name,reference,fraction", PRUNED, ids=[f"{n}-{f}" for n, _, f in PRUNED])
def test_pruned_copy_is_derived_with_the_map_of_survivors(name, reference, fraction, tmp_path):
    pruned, log = attacks.prune(onnx.load(_path(name)), fraction, seed=0)
    suspect = attacks.permute_rescale(pruned, seed=1, rescale=False)
    onnx.save(suspect, tmp_path / "pruned.onnx")
    _, report = api.resync(str(tmp_path / "pruned.onnx"), _path(reference), tmp_path / "restored.onnx")
    assert report.derived and report.verdict.startswith("derived, pruned: ")
    found = {p["group"]: p for p in report.reduction["pruned"]}
    assert set(found) == set(log.removed)
    for key, removed in log.removed.items():
        assert found[key]["removed"] == len(removed)
        assert sorted(set(range(found[key]["of"])) - set(found[key]["kept"])) == removed  # the map of survivors
        assert f"{len(removed)} of {found[key]['of']} channels of {found[key]['layer']} removed" in report.verdict
    assert report.matched >= 0.99 * report.neurons and report.verified


def test_pruned_unrelated_model_stays_not_derived(tmp_path):
    pruned, _ = attacks.prune(onnx.load(_path("vgg_seed1")), 0.5, seed=0)
    onnx.save(pruned, tmp_path / "other.onnx")
    _, report = api.resync(str(tmp_path / "other.onnx"), _path("vgg"))
    assert report.reduction["pruned"] and not report.derived and report.verdict == "not derived"


# ---- adaptive attackers: noisy copies, nearly silent dummies ---------------------------------
@pytest.mark.parametrize("name,kind", [("vgg", "splits"), ("mlp", "dummies")])
def test_adaptive_attack_is_derived_and_perturbed_with_its_error(name, kind, tmp_path):
    path = _path(name)
    attacked, log = attacks.attack(path, kind, 0.1, seed=0, shuffle=True, noise=0.01)
    assert not verify(onnx.load(path), attacked).equivalent  # the noise changes the function a little
    _, exact = reduce_model(attacked)  # nothing exact to remove (at most a copy the noise missed)
    assert exact.count("dummy") + exact.count("split") < log.neurons // 2
    onnx.save(attacked, tmp_path / "s.onnx")
    _, report = api.resync(str(tmp_path / "s.onnx"), path, tmp_path / "restored.onnx")
    assert report.derived and "perturbed: " in report.verdict
    red = report.reduction
    removed = sum(r["removed"] for r in red["approximate"]) + red["dummy"] + red["split"]
    assert removed == log.neurons and 0 < red["approximate_error"] <= 0.05
    assert f"changing the outputs by {red['approximate_error']:.2g}" in report.verdict
    assert report.matched >= 0.99 * report.neurons and report.verified


def test_adaptive_attack_on_unrelated_model_stays_not_derived(tmp_path):
    attacked, _ = attacks.attack(_path("resnet_seed1"), "splits", 0.1, seed=0, shuffle=True, noise=0.01)
    onnx.save(attacked, tmp_path / "other.onnx")
    _, report = api.resync(str(tmp_path / "other.onnx"), _path("resnet"))
    assert report.reduction["approximate"] and not report.derived


def test_audit_takes_the_same_approximate_step_and_seed1_stays_not_derived(tmp_path, capsys):
    """audit pairs layers by structure (audit/widths.wider), then reduce.against's approximate step
    (the one resync runs): the noisy copy derived and perturbed, the attacked `_seed1` not derived."""
    for name, derived in (("mlp", True), ("mlp_seed1", False)):
        attacked, log = attacks.attack(_path(name), "dummies", 0.1, seed=0, shuffle=True, noise=0.01)
        onnx.save(attacked, tmp_path / f"{name}.onnx")
        report = api.audit(str(tmp_path / f"{name}.onnx"), _path("mlp"))
        red = report.reduction
        assert sum(r["removed"] for r in red["approximate"]) + red["dummy"] == log.neurons
        assert 0 < red["approximate_error"] <= 0.05 and report.derived is derived
        assert report.summary.startswith("derived, perturbed: " if derived else "not derived")
        assert "removed approximately" in " ".join(report.evidence)
    assert main(["audit", str(tmp_path / "mlp.onnx"), "--reference", _path("mlp")]) == 0
    assert "near-copy or near-dummy neurons removed" in capsys.readouterr().out


# ---- constant neurons: zero incoming weights, their output in the readers' biases ------------
def test_constant_neurons_fold_into_biases(tmp_path):
    path = _path("mlp")
    attacked, log = attacks.constants(path, 0.1, seed=0)
    attacked = attacks.permute_rescale(attacked, seed=3)
    assert log.neurons and verify(onnx.load(path), attacked).equivalent
    onnx.save(attacked, tmp_path / "c.onnx")
    _, report = api.resync(str(tmp_path / "c.onnx"), path, tmp_path / "restored.onnx")
    assert report.verdict == f"derived, structurally obfuscated: {log.neurons} constant folded into biases"
    assert report.matched == report.neurons and report.verified


def test_constant_fold_that_padding_breaks_is_refused():
    """A constant channel read by a padded Conv: its border sees zeros, so the bias cannot hold it;
    the fold is refused by the ORT check and the neuron kept."""
    from onnx_resync.reduce.widths import Widths

    model = onnx.load(_path("vgg"))
    group = walk(model).groups[0]  # conv0 -> BN -> Relu -> conv1 (padded)
    w = Widths(model)
    for side, slot in zip(group.sides(), group.slots):
        if side in (0, 1) and w._array(slot.weight).ndim >= 2:
            np.moveaxis(w._array(slot.weight), slot.axis, 0)[slot.positions[0]] = 0.0  # neuron 0: constant
    w.write()
    reduced, report = reduce_model(model)
    assert not report.changed and any(r["what"] == "folding constant neurons" for r in report.refused)
    assert _widths(reduced) == _widths(model)


# ---- audit on a pruned copy: layers paired regardless of width (audit/widths.py) -------------
@pytest.mark.parametrize("name,reference", [("mlp", "mlp"), ("resnet_ft10", "resnet")])
def test_audit_pruned_copy_is_derived_with_the_map_of_survivors(name, reference, tmp_path):
    pruned, log = attacks.prune(onnx.load(_path(name)), 0.3, seed=0)
    suspect = attacks.permute_rescale(pruned, seed=1, rescale=False)
    onnx.save(suspect, tmp_path / "pruned.onnx")
    report = api.audit(str(tmp_path / "pruned.onnx"), _path(reference), json_path=tmp_path / "a.json")
    assert report.derived and report.summary.startswith("derived, pruned: ")
    data = json.loads((tmp_path / "a.json").read_text())["reduction"]["pruned"]
    # the map of survivors: the reference neurons kept, per pruned group (canonical keys: compared by content)
    found = sorted((p["of"], sorted(set(range(p["of"])) - set(p["kept"]))) for p in data)
    groups = {g.key: g.size for g in walk(onnx.load(_path(reference))).groups}
    assert found == sorted((groups[k], removed) for k, removed in log.removed.items())
    assert report.matched >= 0.99 * report.neurons
    assert "a pruned copy" in report.evidence[0]


def test_audit_pruned_unrelated_model_stays_not_derived(tmp_path, capsys):
    pruned, _ = attacks.prune(onnx.load(_path("vgg_seed1")), 0.5, seed=0)
    onnx.save(pruned, tmp_path / "other.onnx")
    assert main(["audit", str(tmp_path / "other.onnx"), "--reference", _path("vgg")]) == 1
    assert "verdict: not derived" in capsys.readouterr().out


def test_audit_refuses_a_narrower_model_of_another_architecture(tmp_path, capsys):
    """Layers that do not pair whatever their widths: not a pruned copy, the mismatch stands (exit 3)."""
    from onnx_resync.audit.canonical import canonicalize
    from onnx_resync.audit.widths import narrow

    pruned, _ = attacks.prune(onnx.load(_path("mlp")), 0.3, seed=0)
    with pytest.raises(ModelMismatchError, match="not a pruned copy"):
        narrow(canonicalize(onnx.load(_path("mlp"))), canonicalize(onnx.load(_path("vgg"))))
    onnx.save(pruned, tmp_path / "p.onnx")
    assert main(["audit", str(tmp_path / "p.onnx"), "--reference", _path("vgg")]) == 3


# ---- attention heads: a dummy head, a split dim in every head (Reshape targets follow) --------
@pytest.mark.parametrize("kind,count", [("dummy heads", "dummy"), ("split heads", "split")])
def test_head_attacks_are_reduced_with_their_reshape_targets(kind, count, tmp_path):
    path = _path("transformer")
    attacked, log = attacks.heads(path, kind, seed=0)
    if not log.per_group:
        pytest.skip("the walker gives no per-head groups here")
    assert verify(onnx.load(path), attacked).equivalent and _widths(attacked) != _widths(onnx.load(path))
    onnx.save(attacks.permute_rescale(attacked, seed=2), tmp_path / "heads.onnx")
    restored, report = api.resync(str(tmp_path / "heads.onnx"), path, tmp_path / "restored.onnx")
    # a dummy head is one neuron of the head group (its dims go with it, counted once)
    assert report.verdict == f"derived, structurally obfuscated: {log.neurons} {count}" + (
        f" neuron{'s' * (log.neurons > 1)}" if count == "dummy" else "")
    assert report.matched == report.neurons and report.verified
    assert _widths(restored) == _widths(onnx.load(path))


def test_reshape_target_refit_follows_the_heads():
    """targets.refit: 4 heads of 16 -> 3 heads (split: the heads axis, by the group's stride), and
    the merge back 64 -> 48; a stride that fits neither axis leaves the target alone."""
    from onnx_resync.reduce.targets import _fit

    split = np.array([-1, 16, 4, 16])
    assert _fit((2, 16, 64), (2, 16, 48), (2, 16, 4, 16), split, {16}).tolist() == [-1, 16, 3, 16]
    assert _fit((2, 16, 64), (2, 16, 48), (2, 16, 4, 16), split, {1}).tolist() == [-1, 16, 4, 12]
    assert _fit((2, 16, 64), (2, 16, 48), (2, 16, 4, 16), split, {7}) is None  # ambiguous: left to ORT
    assert _fit((2, 16, 4, 16), (2, 16, 3, 16), (2, 16, 64), np.array([-1, 16, 64]), {16}).tolist() == [-1, 16, 48]


def test_matched_share_is_measured_once_the_rescales_are_undone(tmp_path):
    """Permuted and rescaled twice (compound scales 0.25x-4x): before the rescales are undone some
    margins are lost to the scaling alone (366 of 384 were reported); measured on the restored model,
    every neuron is matched. The same on an unrelated model stays about half."""
    for name, least in (("mlp", 1.0), ("mlp_seed1", 0.0)):
        twice = attacks.permute_rescale(attacks.permute_rescale(onnx.load(_path(name)), seed=1), seed=2)
        onnx.save(twice, tmp_path / "twice.onnx")
        _, report = api.resync(str(tmp_path / "twice.onnx"), _path("mlp"))
        assert report.matched >= least * report.neurons and report.derived == (least == 1.0)
        if least < 1.0:
            assert report.matched < 0.8 * report.neurons


# ---- depth: a layer that does not fold, found by aligning the layer sequences with gaps --------
@pytest.mark.parametrize("name,derived", [("resnet_ft10", True), ("vgg_seed1", False)])
def test_audit_reports_an_inserted_layer_that_does_not_fold(name, derived, tmp_path):
    reference = _path(name.split("_")[0])
    deeper, log = attacks.insert_layer(onnx.load(_path(name)), "random", seed=0)
    onnx.save(attacks.permute_rescale(deeper, seed=1), tmp_path / "deeper.onnx")
    with pytest.raises(ModelMismatchError):  # resync pairs weights by name: the extra layer is refused
        api.resync(str(tmp_path / "deeper.onnx"), reference)
    report = api.audit(str(tmp_path / "deeper.onnx"), reference, json_path=tmp_path / "a.json")
    inserted = json.loads((tmp_path / "a.json").read_text())["reduction"]["inserted"]
    assert [i["layer"] for i in inserted] == log.layers  # the inserted layer found, by structure
    assert report.derived == derived
    if derived:
        assert report.summary.startswith(f"derived, deepened: 1 inserted layer that does not fold (left out): "
                                         f"{log.layers[0]}")
        assert report.matched >= 0.99 * report.neurons
    else:
        assert report.summary.startswith("not derived")


def test_reshape_target_built_at_run_time_is_refit():
    """An exporter's target: Concat(Unsqueeze(Gather(Shape(x))), 4, Unsqueeze(2), 4) splits 8 channels
    into 2 heads of 4, and Concat(..., 4, 8) merges them back. One more head (12 channels): the
    constants 2 and 8 become 3 and 12, where they are, and ONNX Runtime runs the widened graph."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_resync.reduce.targets import refit

    def build(width: int) -> onnx.ModelProto:
        rng = np.random.default_rng(0)
        def c(name, v):
            return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))

        nodes = [
            c("zero", 0), c("axes", [0]), c("four", [4]), c("heads", width // 4), c("dim", [4]), c("width", [width]),
            helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["batch"]),
            helper.make_node("Unsqueeze", ["batch", "axes"], ["b1"]),
            helper.make_node("Unsqueeze", ["heads", "axes"], ["h1"]),
            helper.make_node("Concat", ["b1", "four", "h1", "dim"], ["split"], axis=0),
            helper.make_node("Concat", ["b1", "four", "width"], ["merge"], axis=0),
            helper.make_node("MatMul", ["x", "w1"], ["y"]), helper.make_node("Reshape", ["y", "split"], ["y4"]),
            helper.make_node("Relu", ["y4"], ["r4"]), helper.make_node("Reshape", ["r4", "merge"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["out"])]
        weights = [numpy_helper.from_array(rng.normal(size=(8, width)).astype(np.float32), "w1"),
                   numpy_helper.from_array(rng.normal(size=(width, 8)).astype(np.float32), "w2")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 8])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # (what the bundled ONNX Runtime reads)
        return model

    before, after = build(8), build(8)
    wide = build(12)
    for name in ("w1", "w2"):  # the weights widened, the targets still the old ones
        next(t for t in after.graph.initializer if t.name == name).CopyFrom(
            next(t for t in wide.graph.initializer if t.name == name))
    assert refit(before, after, {4}, {"x": (2, 4, 8)}) == 2
    values = {n.output[0]: numpy_helper.to_array(n.attribute[0].t).tolist() for n in after.graph.node
              if n.op_type == "Constant"}
    assert values["heads"] == 3 and values["width"] == [12] and values["four"] == [4]
    from onnx_resync.runtime import make_session

    out = make_session(after, "cpu").run(None, {"x": np.ones((2, 4, 8), np.float32)})[0]
    assert out.shape == (2, 4, 8)
