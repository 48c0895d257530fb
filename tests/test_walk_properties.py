"""Property tests that prove the walker on generated graphs, plus one targeted test per construct.

For every generated graph (tests/graphgen.py): the model passes onnx.checker; `walk` does not crash;
permuting every group with a random (never identity) permutation keeps every output (ONNX Runtime
CPU, max|err| / max|ref| <= 1e-5); the weights that change are exactly the weights the groups slot;
walking the permuted model again and applying the inverse record gives back the original bytes; and
where the structure implies it (no grouped conv, shuffle, slice, or split into single channels),
every hidden channel that does not reach a graph output is permutable (coverage 100%).

Set ONNX_RESYNC_GEN_STATS=1 to print the per-construct coverage observed over the run.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.permute import PermutationRecord, apply_permutations
from onnx_resync.walk import walk

from graphgen import (BATCH, BLOCKS, Builder, T, activation, batchnorm, batchnorm_decomposed, channel_layernorm, cnn_graphs,
                      concat, conv, conv_transpose, depthwise, gemm, grouped, head, instancenorm, mlp_graphs, nhwc, pad,
                      pool, prelu, residual, resize, rnn_graphs, shuffle, slice_channels, split_concat,
                      squeeze_excitation)

TOLERANCE = 1e-5
SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# construct -> [graphs, sum of coverage, min coverage]
STATS: dict[str, list] = defaultdict(lambda: [0, 0.0, 1.0])


@pytest.fixture(scope="module", autouse=True)
def _report_stats():
    yield
    if os.environ.get("ONNX_RESYNC_GEN_STATS") and STATS:
        total = STATS.pop("_all", [0])[0]
        lines = [f"\n{total} generated graphs; coverage by construct (graphs using it, mean, min):"]
        for name, (n, s, lo) in sorted(STATS.items()):
            lines.append(f"  {name:24s} {n:4d}  mean {s / n:6.1%}  min {lo:6.1%}")
        print("\n".join(lines), file=sys.__stderr__)


# ---- helpers ----------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no graph rewrites: this tests the walker against plain kernels (and ORT's Pad fusion turns
    # Pad -> Pad -> MaxPool(pads=1), a valid graph, into a pool with pads >= kernel that it rejects)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else BATCH for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _normalized_errors(a: list, b: list) -> list[float]:
    errs = []
    for x, y in zip(a, b):
        assert x.shape == y.shape
        scale = float(np.max(np.abs(x))) or 1.0
        errs.append(float(np.max(np.abs(x - y))) / scale)
    return errs


def _to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64 (weights, Casts, inputs and outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def widen(tensor):
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))

    for init in m.graph.initializer:
        widen(init)
    for node in m.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                widen(a.t)
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    for v in list(m.graph.input) + list(m.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    del m.graph.value_info[:]
    return m


def assert_same_function(ref: onnx.ModelProto, cand: onnx.ModelProto) -> None:
    """ORT CPU, float32: max|err| / max|ref| <= 1e-5 per output.

    A graph whose outputs cancel (small outputs from large activations) can miss that on float32
    rounding alone; then the verdict comes from both graphs evaluated in float64 (onnx.reference),
    where a correct permutation agrees to ~1e-13 and a wrong one is off by O(1).
    """
    feeds = _feeds(ref)
    # ONNX Runtime has no batch-first (layout=1) recurrent kernels: onnx.reference decides those
    batch_first = any(a.name == "layout" and a.i == 1 for n in ref.graph.node for a in n.attribute)
    errs = [] if batch_first else _normalized_errors(_session(ref).run(None, feeds), _session(cand).run(None, feeds))
    if errs and max(errs) <= TOLERANCE:
        return
    from onnx.reference import ReferenceEvaluator

    feeds64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    errs64 = _normalized_errors(ReferenceEvaluator(_to_float64(ref)).run(None, feeds64),
                                ReferenceEvaluator(_to_float64(cand)).run(None, feeds64))
    names = [o.name for o in ref.graph.output]
    assert max(errs64) <= 1e-9, f"outputs {names}: normalized error float32 {errs}, float64 {errs64}"


def stored_tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    """Every weight's bytes: initializers and Constant-node values."""
    out = {t.name: t.SerializeToString() for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t.SerializeToString()
    return out


def _one_valued(model: onnx.ModelProto) -> set[str]:
    """Stored tensors (initializers, Constant values) whose entries are all equal."""
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    names = [t.name for t in model.graph.initializer] + [
        n.output[0] for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    out = set()
    for name, t in zip(names, tensors):
        value = numpy_helper.to_array(t)
        if value.size and (value == value.reshape(-1)[0]).all():
            out.add(name)
    return out


def forced_record(result, seed: int) -> PermutationRecord:
    """A random permutation of every group, never the identity (so every group moves)."""
    rng = np.random.default_rng(seed)
    perms = {}
    for g in result.groups:
        perm = rng.permutation(g.size)
        if np.array_equal(perm, np.arange(g.size)):
            perm = np.roll(perm, 1)
        perms[g.key] = perm.tolist()
    return PermutationRecord(perms, seed)


def check_slots(model: onnx.ModelProto, result) -> None:
    """Keys are unique; slots are in range; a group touches a position of an axis at most once.

    (Groups on one axis may overlap: the heads and the in-head dims of a channel axis both move it.)
    """
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    assert len({g.key for g in result.groups}) == len(result.groups), "group keys are not unique"
    for g in result.groups:
        assert g.size >= 2
        assert g.slots, f"group {g.key} moves no weight"
        for s in g.slots:
            assert s.positions.shape[0] == g.size
            dim = shapes[s.weight][s.axis]
            pos = s.positions.reshape(-1).tolist()
            assert all(0 <= p < dim for p in pos)
            assert len(set(pos)) == len(pos), f"group {g.key} repeats a position of {s.weight}:{s.axis}"


def check_properties(model: onnx.ModelProto, full_coverage: bool | None = None, constructs=(), seed: int = 1):
    try:
        return _check_properties(model, full_coverage, constructs, seed)
    except Exception as exc:
        exc.add_note(f"constructs: {list(constructs)}\n{onnx.printer.to_text(model.graph)}")
        raise


def _check_properties(model, full_coverage, constructs, seed):
    onnx.checker.check_model(model, full_check=True)
    result = walk(model)
    check_slots(model, result)

    record = forced_record(result, seed)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, result, record)
    assert_same_function(model, permuted)

    # the permutation really moves weights: exactly the slotted ones change
    before, after = stored_tensors(model), stored_tensors(permuted)
    changed = {name for name in before if before[name] != after[name]}
    slotted = {s.weight for g in result.groups for s in g.slots}
    # (a slotted tensor holding one value, such as an unrolled cell's zero initial state, reads the
    # same permuted)
    assert changed == slotted - _one_valued(model)
    if result.groups:
        assert changed, "groups of size >= 2 but no weight moved"

    # undo: walk the permuted model again and apply the inverse
    again = walk(permuted)
    assert [(g.key, g.size) for g in again.groups] == [(g.key, g.size) for g in result.groups]
    restored = onnx.ModelProto()
    restored.CopyFrom(permuted)
    apply_permutations(restored, again, record.inverse())
    assert restored.SerializeToString() == model.SerializeToString()

    if full_coverage:
        assert result.coverage == 1.0, (result.coverage, result.pinned, result.singleton_channels)
    for name in set(constructs) | {"_all"}:
        entry = STATS[name]
        entry[0] += 1
        entry[1] += result.coverage
        entry[2] = min(entry[2], result.coverage)
    return result


# ---- properties on generated graphs ------------------------------------------------------------------


@settings(max_examples=500, **SETTINGS)
@given(cnn_graphs())
def test_generated_cnn(gen):
    check_properties(gen.model, gen.full_coverage, gen.constructs)


@settings(max_examples=100, **SETTINGS)
@given(cnn_graphs(plain=True, max_blocks=4))
def test_generated_plain_cnn_full_coverage(gen):
    assert gen.full_coverage
    check_properties(gen.model, True, gen.constructs)


@settings(max_examples=200, **SETTINGS)
@given(mlp_graphs())
def test_generated_mlp(gen):
    check_properties(gen.model, gen.full_coverage, gen.constructs)


@settings(max_examples=150, **SETTINGS)
@given(rnn_graphs())
def test_generated_rnn(gen):
    check_properties(gen.model, gen.full_coverage, gen.constructs)


@settings(max_examples=10, **SETTINGS)
@given(cnn_graphs(max_blocks=3, blocks=[blk for blk in BLOCKS if blk is not pad]))  # verify runs ORT's fusions
def test_api_permute_checks_and_undoes(gen):
    """The public path: permute(check=True) verifies with ORT; permute(undo=record) restores the bytes."""
    verify = pytest.importorskip("onnx_resync.verify")  # noqa: F841
    from onnx_resync.api import permute

    permuted, result = permute(gen.model, seed=3, check=True)
    assert result.verified
    restored, _ = permute(permuted, undo=result.record, check=False)
    assert restored.SerializeToString() == gen.model.SerializeToString()


# ---- targeted constructs -----------------------------------------------------------------------------


def _cnn(*blocks, c=4, hw=4, head_kind="gap", stem_c=None, **kw):
    """stem conv -> blocks -> head, deterministic choices; returns (model, walk result)."""
    b = Builder()
    b.add_input("x", [BATCH, 3, hw, hw])
    t = conv(b, T("x", 3, hw, hw), cout=stem_c or c, k=1, bias=True)
    for block in blocks:
        t = block(b, t)
    y, n = head(b, t, kind=head_kind)
    b.add_output(y, [BATCH, n])
    model = b.model()
    return model, check_properties(model)


def _groups_by_producer(result) -> dict[tuple, object]:
    return {tuple(sorted(g.producers)): g for g in result.groups}


def _slot(group, weight_prefix):
    return [s for s in group.slots if s.weight.startswith(weight_prefix)]


def test_conv_bn_relu_chain_full_coverage():
    model, r = _cnn(conv, batchnorm, activation, conv, batchnorm, activation)
    assert r.coverage == 1.0 and r.singleton_channels == 0
    assert r.permutable_channels == r.hidden_channels - r.output_channels == 4 + 2 + 2
    bn = [s for g in r.groups for s in g.slots if s.weight.startswith("bn_")]
    assert len(bn) == 8  # scale, bias, mean, var of two BNs


def test_residual_add_makes_one_group_across_producers():
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    x = conv(b, T("x", 3, 4, 4), cout=4, k=1, bias=True)
    y = conv(b, x, cout=4, k=3, bias=True)
    s = T(b.node("Add", [x.name, y.name]), 4, 4, 4)
    out, n = head(b, s, kind="gap")
    b.add_output(out, [BATCH, n])
    r = check_properties(b.model())
    (stream,) = [g for g in r.groups if len(g.producers) == 2]
    assert stream.size == 4 and len(r.groups) == 1


def test_concat_of_two_convs_gives_two_groups_into_one_consumer():
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    x = T("x", 3, 4, 4)
    p, q = conv(b, x, cout=3, k=1), conv(b, x, cout=5, k=1)
    cat = T(b.node("Concat", [p.name, q.name], axis=1), 8, 4, 4)
    out, n = head(b, cat, kind="gap", )
    b.add_output(out, [BATCH, n])
    r = check_properties(b.model())
    assert sorted(g.size for g in r.groups) == [3, 5]
    fc = [s.weight for s in r.groups[0].slots if s.weight.startswith("fc") or s.weight.startswith("logits")]
    fc2 = [s.weight for s in r.groups[1].slots if s.weight.startswith("fc") or s.weight.startswith("logits")]
    assert fc and fc == fc2  # both groups slot the same consumer weight, at disjoint positions


def test_flatten_over_4x4_map_gives_block_16():
    model, r = _cnn(head_kind="flatten", c=3)
    (g,) = r.groups
    (fc,) = [s for s in g.slots if s.weight.startswith("logits")]
    assert fc.positions.shape == (3, 16)
    assert fc.positions[1].tolist() == list(range(16, 32))


def test_nhwc_flatten_head_interleaves_channels():
    model, r = _cnn(head_kind="nhwc_flatten", c=3)
    (g,) = r.groups
    (fc,) = [s for s in g.slots if s.weight.startswith("logits")]
    assert fc.positions.shape == (3, 16)
    assert fc.positions[1].tolist() == list(range(1, 48, 3))


def test_depthwise_conv_passes_the_label():
    model, r = _cnn(depthwise)
    (g,) = r.groups
    assert g.size == 4 and len(g.producers) == 1
    (dw,) = _slot(g, "dw_w")
    assert dw.axis == 0 and dw.positions.shape == (4, 1)


def test_depthwise_with_multiplier_two_makes_blocks():
    model, r = _cnn(lambda b, t: depthwise(b, t, mult=2, bias=True))
    (g,) = r.groups
    (dw,) = _slot(g, "dw_w")
    assert dw.positions.shape == (4, 2) and dw.positions[1].tolist() == [2, 3]


def test_grouped_conv_moves_within_groups_and_pins_its_input():
    model, r = _cnn(lambda b, t: grouped(b, t, cout=8))
    # the stem's channels are the grouped conv's input: pinned
    assert any("grouped Conv" in p.reason for p in r.pinned)
    assert all("gconv" not in " ".join(p.producers) for p in r.pinned)
    gs = [g for g in r.groups if any(s.weight.startswith("gconv_w") for s in g.slots)]
    assert sorted(g.size for g in gs) == [4, 4]
    for g in gs:
        (w,) = _slot(g, "gconv_w")
        rows = set(w.positions.reshape(-1).tolist())
        assert rows in ({0, 1, 2, 3}, {4, 5, 6, 7})  # each group stays inside one conv group


def test_weight_shared_by_two_convs_is_permuted_consistently():
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    x = conv(b, T("x", 3, 4, 4), cout=4, k=1, bias=True)
    w = b.weight((4, 4, 1, 1), "shared_w")
    y1 = b.node("Conv", [x.name, w], kernel_shape=[1, 1])
    y2 = b.node("Conv", [b.node("Relu", [y1]), w], kernel_shape=[1, 1])
    out, n = head(b, T(y2, 4, 4, 4), kind="gap")
    b.add_output(out, [BATCH, n])
    r = check_properties(b.model())
    shared = [g for g in r.groups if _slot(g, "shared_w")]
    # the shared weight's rows and columns must move together: one group over both axes and producers
    assert len(shared) == 1
    assert {s.axis for s in _slot(shared[0], "shared_w")} == {0, 1}


def test_weight_also_read_by_an_op_without_rule_pins():
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    w = b.weight((4, 3, 1, 1), "w")
    y = b.node("Conv", ["x", w], kernel_shape=[1, 1])
    y = conv(b, T(y, 4, 4, 4), cout=4, k=1)
    out, n = head(b, y, kind="gap")
    b.add_output(out, [BATCH, n])
    # CumSum has no rule; it reads the weight through a Reshape view
    flat = b.node("Reshape", [w, b.const(np.array([4, 3], np.int64))])
    b.add_output(b.node("CumSum", [flat, b.const(np.array(0, np.int64))]), [4, 3])
    r = walk(b.model())
    assert r.ops_without_rule == {"CumSum": 1}
    assert all(not any(s.weight == w for s in g.slots) for g in r.groups)
    assert any("CumSum" in p.reason and "unpermuted" in p.reason for p in r.pinned)
    assert len(r.groups) == 1  # the second conv's channels are still free
    check_properties(b.model())


def test_unknown_custom_op_pins_its_inputs_with_a_reason():
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    y = conv(b, T("x", 3, 4, 4), cout=4, k=1)
    z = b.node("MyOp", [y.name], domain="com.example")
    b.add_output(z, [BATCH, 4, 4, 4])
    model = b.model()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    r = walk(model)
    assert r.groups == [] and r.ops_without_rule == {"com.example.MyOp": 1}
    assert [p.reason for p in r.pinned] == ["consumed by MyOp (no rule)"]


def test_if_subgraph_reading_an_outer_tensor_is_walked():
    """Both branches are walked (issue 15.4; they pinned before): the conv's channels reach the If's
    output through Relu in one branch and Sigmoid in the other, and move as one group."""
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    b.add_input("cond", [])
    b.inputs[-1].type.tensor_type.elem_type = TensorProto.BOOL
    y = conv(b, T("x", 3, 4, 4), cout=4, k=1)
    then_g = helper.make_graph([helper.make_node("Relu", [y.name], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [BATCH, 4, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Sigmoid", [y.name], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [BATCH, 4, 4, 4])])
    z = b.node("If", ["cond"], then_branch=then_g, else_branch=else_g)
    out, n = head(b, T(z, 4, 4, 4), kind="gap")
    b.add_output(out, [BATCH, n])
    model = b.model()
    onnx.checker.check_model(model, full_check=True)
    r = walk(model)  # permuted and checked on both conditions in tests/test_subgraphs.py
    (group,) = r.groups
    assert group.size == 4 and r.coverage == 1.0
    assert {x.op_type for x in group.readers} >= {"Relu", "Sigmoid"}


def test_graph_outputs_pin():
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    y = conv(b, T("x", 3, 4, 4), cout=4, k=1)
    z = conv(b, y, cout=5, k=1)
    b.add_output(z.name, [BATCH, 5, 4, 4])
    b.add_output(y.name, [BATCH, 4, 4, 4])
    r = check_properties(b.model())
    assert r.groups == [] and r.output_channels == 9 and r.coverage == 1.0
    assert [p.reason for p in r.pinned] == ["reaches a graph output"]


def test_conv_transpose_both_axes():
    model, r = _cnn(lambda b, t: conv_transpose(b, t, cout=5, bias=True, up=True))
    sizes = sorted(g.size for g in r.groups)
    assert sizes == [4, 5] and r.coverage == 1.0
    (g4,) = [g for g in r.groups if g.size == 4]
    assert [s.axis for s in _slot(g4, "convt_w")] == [0]


@pytest.mark.parametrize("block", [batchnorm, batchnorm_decomposed, instancenorm, prelu, channel_layernorm])
def test_per_channel_params_are_slots(block):
    model, r = _cnn(block)
    assert r.coverage == 1.0
    (g,) = r.groups
    params = [s for s in g.slots if s.weight.split("_")[0] in ("bn", "dbn", "in", "prelu", "ln")]
    assert params and all(s.positions.shape == (4, 1) for s in params)


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Clip", "Tanh"])
def test_activations_pass_through(op):
    model, r = _cnn(lambda b, t: activation(b, t, op=op))
    assert r.coverage == 1.0 and len(r.groups) == 1


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pooling_passes_through(op):
    model, r = _cnn(lambda b, t: pool(b, t, op=op, down=True), hw=8)
    assert r.coverage == 1.0 and len(r.groups) == 1


def test_split_halves_then_concat():
    model, r = _cnn(split_concat)
    # stem halves {0,1} and {2,3} (each half is read by its own conv), and the two half convs
    assert sorted(g.size for g in r.groups) == [2, 2, 2, 2] and r.coverage == 1.0


def test_slice_on_channel_axis_splits_kept_and_dropped():
    def sl(b, t):
        y = b.node("Slice", [t.name, b.const(np.array([1], np.int64)), b.const(np.array([4], np.int64)),
                             b.const(np.array([1], np.int64))])
        return T(y, 3, t.h, t.w)

    model, r = _cnn(sl, c=5)
    assert sorted(g.size for g in r.groups) == [2, 3]  # dropped {0, 4}, kept {1, 2, 3}


def test_channel_shuffle_becomes_a_grid_of_groups():
    # (N, g, C/g, H, W) -> Transpose -> back: each channel is a (group, member) cell, so whole shuffle
    # groups move together and members move the same way in every group; permuting stays exact
    from onnx_resync.api import permute

    model, r = _cnn(shuffle, c=6)
    assert r.coverage == 1.0
    _, info = permute(model, seed=3)
    assert info.verified and info.neurons_moved > 0


def test_nhwc_section_matmul_and_bias():
    model, r = _cnn(nhwc)
    assert r.coverage == 1.0


def test_squeeze_excitation_gate_joins_the_stream():
    model, r = _cnn(squeeze_excitation)
    assert r.coverage == 1.0
    stream = [g for g in r.groups if [s for s in _slot(g, "se_w2") if s.axis == 0]]
    assert len(stream) == 1 and stream[0].size == 4 and len(stream[0].producers) == 2  # stem + excitation conv
    (squeeze,) = [g for g in r.groups if g is not stream[0]]
    assert squeeze.size == 2 and {s.axis for s in _slot(squeeze, "se_w2")} == {1}


def test_resize_and_pad_pass_through():
    model, r = _cnn(lambda b, t: resize(b, t), lambda b, t: pad(b, t, keep_hw=True))
    assert "resize" in " ".join(n.op_type.lower() for n in model.graph.node)
    assert r.coverage == 1.0 and len(r.groups) == 1


def test_concat_of_residual_streams():
    def two_streams(b, t):
        return concat(b, t, pieces=2)

    model, r = _cnn(two_streams)
    assert r.coverage == 1.0


def test_weights_as_constant_identity_cast():
    for mode in ("constant", "identity", "cast"):
        b = Builder()
        b.add_input("x", [BATCH, 3, 4, 4])
        w = b.weight((4, 3, 1, 1), "w", mode=mode)
        y = T(b.node("Conv", ["x", w], kernel_shape=[1, 1]), 4, 4, 4)
        out, n = head(b, y, kind="gap")
        b.add_output(out, [BATCH, n])
        r = check_properties(b.model())
        (g,) = r.groups
        assert g.size == 4 and len(g.slots) >= 2


@pytest.mark.parametrize("trans_b", [0, 1])
def test_mlp_gemm_layernorm_softmax(trans_b):
    b = Builder()
    b.add_input("x", [BATCH, 5])
    h = gemm(b, "x", 5, 6, bias=True, trans_b=trans_b)
    h = b.node("LayerNormalization", [h, b.weight((6,), "ln_s"), b.weight((6,), "ln_b")], axis=-1)
    h = b.node("Softmax", [h], axis=-1)
    h2 = b.node("Add", [b.node("MatMul", [h, b.weight((6, 7), "mm")]), b.weight((7,), "mm_b")])
    y = gemm(b, h2, 7, 3, bias=True, trans_b=trans_b, hint="logits")
    b.add_output(y, [BATCH, 3])
    r = check_properties(b.model())
    assert sorted(g.size for g in r.groups) == [6, 7] and r.coverage == 1.0


# ---- regressions: minimal graphs from failures the properties found ------------------------------------


def test_regression_grouped_conv_blocks_have_distinct_keys():
    # two groups of one grouped conv shared the key "gconv_w:0/4x2": a record could move only one
    model, r = _cnn(lambda b, t: grouped(b, t, cout=8))
    assert len({g.key for g in r.groups}) == len(r.groups)


def test_regression_shuffle_heads_and_dims_of_equal_size_have_distinct_keys():
    # C=4, g=2: the head group and the in-head dim group are both 2 x (same slots) on conv_w:0
    model, r = _cnn(lambda b, t: shuffle(b, t, g=2), c=4)
    assert len(r.groups) == 2 and len({g.key for g in r.groups}) == 2
    assert r.coverage == 1.0


def test_regression_grouped_conv_stream_through_a_shuffle_pins():
    # Add(conv(x), gconv(x)) -> shuffle: head moves crossed the grouped conv's groups (outputs off by O(1))
    def gres(b, t):
        y1, y2 = conv(b, t, cout=4, k=1), grouped(b, t, cout=4)
        return T(b.node("Add", [y2.name, y1.name]), 4, t.h, t.w)

    model, r = _cnn(gres, lambda b, t: shuffle(b, t, g=2), c=4)
    assert r.groups == []
    assert any("grouped conv" in p.reason and p.channels == 8 for p in r.pinned)


def test_regression_two_shuffles_tied_by_a_residual_pin():
    # Add(shuffle(x), shuffle(conv(shuffle(x)))): one channel is two different (group, member) cells;
    # only the first record's factors were pinned and the second shuffle's groups moved (O(1) error)
    def two(b, t):
        s1 = shuffle(b, t, g=2)
        s2 = shuffle(b, conv(b, s1, cout=4, k=1), g=2)
        return T(b.node("Add", [s1.name, s2.name]), 4, t.h, t.w)

    model, r = _cnn(two, lambda b, t: conv(b, t, cout=4, k=1), c=4)
    # the two shuffles' cells meet at the same (group, member) place: their factors are one neuron
    # (channels.close_products) and both shuffles move alike, verified by check_properties in _cnn
    assert sorted(g.size for g in r.groups) == [2, 2, 4]
    assert not any(p.reason == "one channel is two different (head, dim) cells" for p in r.pinned)


def test_regression_shuffle_of_a_shuffle_leaves_no_empty_group():
    # the second split re-split cells: its fresh head/dim elements formed groups that moved nothing
    model, r = _cnn(lambda b, t: shuffle(b, t, g=2), batchnorm, lambda b, t: shuffle(b, t, g=2), c=4)
    assert all(g.slots for g in r.groups)


def test_regression_shuffled_stream_reaching_an_output_counts_as_output():
    # cells whose head and dim reach a graph output were counted as singletons (coverage 0)
    b = Builder()
    b.add_input("x", [BATCH, 3, 4, 4])
    s = shuffle(b, conv(b, T("x", 3, 4, 4), cout=6, k=1), g=2)
    y, n = head(b, s, kind="gap")
    b.add_output(y, [BATCH, n])
    b.add_output(s.name, [BATCH, 6, 4, 4])
    r = check_properties(b.model())
    assert r.coverage == 1.0 and r.output_channels == 8 and r.singleton_channels == 0


def _two_copies(b, t, seam):
    """Concat(x + f(x), x + g(x)): x's channels twice, in two different tensors; then Slice(seam)."""
    r1 = b.node("Add", [t.name, conv(b, t, cout=t.c, k=1).name])
    r2 = b.node("Add", [t.name, conv(b, t, cout=t.c, k=1).name])
    cat = b.node("Concat", [r1, r2], axis=1)
    if seam is None:
        return T(cat, 2 * t.c, t.h, t.w)
    start, end = seam
    y = b.node("Slice", [cat, b.const(np.array([start], np.int64)), b.const(np.array([end], np.int64)),
                         b.const(np.array([1], np.int64))])
    return T(y, end - start, t.h, t.w)


def test_regression_slice_across_two_copies_of_a_stream():
    # the Slice keeps channel 1 of the first copy and channel 0 of the second: with one label for
    # both copies, the stream's group moved values between the copies (outputs off by O(1))
    model, r = _cnn(lambda b, t: _two_copies(b, t, (1, 3)), c=2)
    stream = [g for g in r.groups if len(g.producers) == 3]
    assert stream == []  # the two channels now differ (copy 1 vs copy 2): not one group


def test_two_copies_of_a_stream_consumed_whole_stay_permutable():
    model, r = _cnn(lambda b, t: _two_copies(b, t, None), lambda b, t: conv(b, t, cout=3, k=1), c=2)
    assert r.coverage == 1.0
    (stream,) = [g for g in r.groups if len(g.producers) == 3]
    (cols,) = [s for s in stream.slots if s.axis == 1 and s.positions.shape[1] == 2]
    assert cols.positions.tolist() == [[0, 2], [1, 3]]  # each neuron: its column in both copies
