"""Weights inside If/Loop/Scan bodies are compared (onnx_resync/audit/subgraphs.py): paired by scope
and shape, compared by value up to a permutation of their rows and columns, within the suspect's
storage. A model whose weights all sit in bodies: its exact copy is derived (identical), a copy with
its branch neurons permuted is derived (permuted), a noisy copy derived (perturbed), a fp16 copy
derived; its weights redrawn: not derived, never derived; weights that cannot be paired: cannot
judge."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import cli
from onnx_resync.audit import audit
from onnx_resync.audit.subgraphs import compare_subgraphs

N_IN, N_OUT = 8, 4


def _weights(seed: int, hidden: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(size=(N_IN, hidden)).astype(np.float32),
            "b1": rng.normal(size=(hidden,)).astype(np.float32),
            "w2": rng.normal(size=(hidden, N_OUT)).astype(np.float32)}


def _branch(name: str, w: dict[str, np.ndarray], fp16: bool = False, constants: bool = False) -> onnx.GraphProto:
    """h [1, 8] (outer) -> MatMul w1, Add b1, Relu, MatMul w2 -> [1, 4]; weights as initializers or
    Constant nodes, in float32 or float16 (with Casts back to float32)."""
    nodes, inits = [], []
    names = {}
    for k, v in w.items():
        stored = f"{name}_{k}" + ("_h" if fp16 else "")
        value = v.astype(np.float16) if fp16 else v
        if constants:
            nodes.append(helper.make_node("Constant", [], [stored], value=numpy_helper.from_array(value, stored)))
        else:
            inits.append(numpy_helper.from_array(value, stored))
        if fp16:
            nodes.append(helper.make_node("Cast", [stored], [f"{name}_{k}"], to=TensorProto.FLOAT))
        names[k] = f"{name}_{k}"
    nodes += [helper.make_node("MatMul", ["h", names["w1"]], [f"{name}_a"]),
              helper.make_node("Add", [f"{name}_a", names["b1"]], [f"{name}_b"]),
              helper.make_node("Relu", [f"{name}_b"], [f"{name}_r"]),
              helper.make_node("MatMul", [f"{name}_r", names["w2"]], [f"{name}_y"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                               [1, N_OUT])], inits)


def if_model(seed: int = 0, hidden: int = 16, *, perm: np.ndarray | None = None, noise: float = 0.0,
             fp16: bool = False, constants: bool = False) -> onnx.ModelProto:
    """x [1, 8] -> If(cond) with a two-layer MLP in each branch (its weights drawn from seed, seed + 1);
    perm: the hidden neurons of both branches moved; noise: x weight std added."""
    branches = []
    for k, name in enumerate(("then", "else")):
        w = _weights(seed + k, hidden)
        if perm is not None:
            w = {"w1": w["w1"][:, perm], "b1": w["b1"][perm], "w2": w["w2"][perm]}
        if noise:
            rng = np.random.default_rng(100 + k)
            w = {n: (v + noise * v.std() * rng.normal(size=v.shape)).astype(np.float32) for n, v in w.items()}
        branches.append(_branch(name, w, fp16, constants))
    nodes = [helper.make_node("Identity", ["x"], ["h"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1])]
    graph = helper.make_graph(nodes, "if_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_IN]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N_OUT])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """x [1, 8] -> Loop (3 trips) of h <- tanh(h @ W + b), W [8, 8] and b inside the body."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(N_IN, N_IN)).astype(np.float32), "body_w")
    b = numpy_helper.from_array(rng.normal(size=(N_IN,)).astype(np.float32), "body_b")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "body_w"], ["m"]), helper.make_node("Add", ["m", "body_b"], ["a"]),
         helper.make_node("Tanh", ["a"], ["h_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, N_IN])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, N_IN])], [w, b])
    trips = numpy_helper.from_array(np.array(3, dtype=np.int64), "trips")
    yes = numpy_helper.from_array(np.array(True), "yes")
    graph = helper.make_graph([helper.make_node("Loop", ["trips", "yes", "x"], ["y"], body=body)], "loop_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N_IN])], [trips, yes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _all_compared(report) -> None:
    c = report.compared
    assert c["share"] == 1.0 and c["in_subgraphs_compared"] == c["in_subgraphs"] == c["of"] > 0, c


def test_exact_copy_is_identical():
    report = audit(if_model(0), if_model(0))
    assert report.verdict == "identical" and report.derived and report.exit_code == 0, report.summary
    _all_compared(report)
    # the branches' layers are aligned like the main graph's (audit/bodies.py)
    assert any("inside If/Loop/Scan bodies" in e for e in report.evidence)


def test_redrawn_weights_are_never_derived(tmp_path):
    report = audit(if_model(7), if_model(0))
    assert report.verdict == "not derived" and not report.derived and report.exit_code == 1, report.summary
    _all_compared(report)
    # the same through the CLI
    ref, sus = tmp_path / "ref.onnx", tmp_path / "sus.onnx"
    onnx.save(if_model(0), ref)
    onnx.save(if_model(7), sus)
    assert cli.main(["audit", str(sus), "--reference", str(ref)]) == 1


def test_permuted_branch_neurons_are_derived():
    perm = np.random.default_rng(3).permutation(16)
    report = audit(if_model(0, perm=perm), if_model(0))
    assert report.derived and report.verdict == "permuted" and report.permuted, report.summary
    sub = compare_subgraphs(if_model(0), if_model(0, perm=perm))
    assert sub.moved and sub.equal_parameters == sub.parameters


def test_noisy_copy_is_perturbed_not_identical():
    report = audit(if_model(0, noise=0.02), if_model(0))
    assert report.derived and report.verdict == "perturbed", report.summary
    sub = compare_subgraphs(if_model(0), if_model(0, noise=0.02))
    assert sub.close_parameters > 0 and sub.differing


@pytest.mark.parametrize("constants", [False, True], ids=["initializers", "constant_nodes"])
def test_fp16_copy_is_derived_within_its_storage(constants):
    report = audit(if_model(0, fp16=True, constants=constants), if_model(0))
    assert report.derived and report.verdict == "identical", report.summary
    _all_compared(report)
    # float32 storage has no such slack: the same rounding in a float32 file is a change
    rounded = if_model(0)
    for g in (rounded.graph.node[1].attribute[0].g, rounded.graph.node[1].attribute[1].g):
        for t in g.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))
    assert audit(rounded, if_model(0)).verdict == "perturbed"


def test_weights_that_cannot_be_paired_cannot_be_judged():
    report = audit(if_model(0, hidden=24), if_model(0))
    assert report.verdict == "cannot judge" and report.exit_code == 4, report.summary
    assert report.compared["in_subgraphs_compared"] == 0 and "does not reach" in report.summary


@pytest.mark.parametrize("seed,verdict", [(0, "identical"), (5, "not derived")])
def test_loop_body_weights(seed, verdict):
    report = audit(loop_model(seed), loop_model(0))
    assert report.verdict == verdict, report.summary
    _all_compared(report)


def test_a_body_value_at_a_float16_converters_clamp_is_explained():
    """oww's silero VAD keeps a scalar 2^20 in its branches: both float16 converters store it as 65504
    (their clip), which read 'perturbed beyond its float16 storage' on identical copies. A value at
    the clamp, same sign, where the reference's lies beyond it, is within; one the reference does not
    reach is not."""
    from onnx_resync.audit.subgraphs import SubgraphWeight, _distance

    def d(ref: float, stored: float) -> float:
        r = SubgraphWeight((), "c", TensorProto.FLOAT, np.array([ref, 0.5], np.float32))
        s = SubgraphWeight((), "c", TensorProto.FLOAT16, np.array([stored, 0.5], np.float16).astype(np.float32))
        return _distance(r, s)[0]

    assert d(2.0 ** 20, 65504.0) <= 1.0 and d(-(2.0 ** 20), -65504.0) <= 1.0 and d(3e4, 1e4) <= 1.0
    assert d(1000.0, 65504.0) > 1.0 and d(2.0 ** 20, -65504.0) > 1.0
