"""Per-head dims (issue 15, item 6; walk/heads.py): each attention head its own group of Q/K dims and
of V dims with the output projection's rows, so the dims inside head i move by a permutation of
their own; where a rotary embedding pairs the dims (ordered by frequency) they stay, heads move; in
grouped-query attention the dims go with the kv head that the query heads share.

Graphs written out as plain ONNX (MatMul q/k/v, Reshape into heads, Transpose, MatMul, Softmax,
MatMul, Reshape back, out projection; GQA by Expand of the kv heads; rotary as x*cos + rotate(x)*sin)
and ONNX Runtime's own ops (MultiHeadAttention, packed Attention, GroupQueryAttention with and
without rotary): permute + verify with ONNX Runtime, undo byte-exact, api.permute/undo and
api.resync exact (test_unrolled_cells.assert_round_trips). A drawn permutation differs between
heads and verifies. Counter-cases keep the dims shared, and forcing the split there breaks the
function (the check is what makes it exact): a norm over head_dim with one weight for every head,
a mean over the heads added back.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from op_cases import CASES, MS, VARIANTS
from test_unrolled_cells import assert_round_trips
from test_walk_properties import assert_same_function
from onnx_resync import api
from onnx_resync.permute import PermutationRecord, apply_permutations
from onnx_resync.walk import heads as heads_module
from onnx_resync.walk import walk

E, S, B = 6, 3, 2  # model width, sequence, batch


def attention(heads=2, head=4, kv_heads=None, rotary=False, bias=False, qk_norm=False, mean_heads=False,
              softmax_heads=False, seed=0) -> onnx.ModelProto:
    """x [B, S, E] -> q, k, v projections -> heads -> softmax(q k^T / sqrt(d)) v -> merged -> out
    projection -> y = MatMul Wy. kv_heads < heads: K and V have kv_heads heads, each expanded to the
    query heads that share it (torch's repeat_kv). rotary: q and k rotated, x*cos + rotate_half(x)*sin
    (tables [S, head]). qk_norm: LayerNormalization over head_dim on q and k, one weight for every
    head. mean_heads: the attention output's mean over the heads added to it; softmax_heads: a Softmax
    over the heads axis of the attention output (it keeps both axes, and mixes the heads)."""
    rng = np.random.default_rng(seed)
    kv = kv_heads or heads
    rep = heads // kv
    inits, nodes = [], []

    def w(name, *shape, scale=0.5):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, list(shape), rng.normal(size=int(np.prod(shape))) * scale))
        return name

    def i64(name, values):
        values = np.asarray(values, dtype=np.int64)
        inits.append(helper.make_tensor(name, TensorProto.INT64, list(values.shape), values.reshape(-1).tolist()))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def project(name, n):
        y = node("MatMul", ["x", w(f"W{name}", E, n * head)], f"{name}_p")
        return node("Add", [y, w(f"b{name}", n * head, scale=0.1)], f"{name}_pb") if bias else y

    def split_heads(t, n, name):  # [B, S, n*head] -> [B, n, S, head]
        r = node("Reshape", [t, i64(f"{name}_shape", [B, S, n, head])], f"{name}_r")
        return node("Transpose", [r], f"{name}_h", perm=[0, 2, 1, 3])

    def rotate(t, name):  # x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]
        half = head // 2
        a = node("Slice", [t, i64(f"{name}_s0", [0]), i64(f"{name}_e0", [half]), i64(f"{name}_ax", [3])], f"{name}_x1")
        b = node("Slice", [t, i64(f"{name}_s1", [half]), i64(f"{name}_e1", [head]), f"{name}_ax"], f"{name}_x2")
        rot = node("Concat", [node("Neg", [b], f"{name}_nx2"), a], f"{name}_rot", axis=3)
        c = node("Mul", [t, w(f"{name}_cos", S, head)], f"{name}_c")
        return node("Add", [c, node("Mul", [rot, w(f"{name}_sin", S, head)], f"{name}_sn")], f"{name}_rope")

    def norm(t, name):
        return node("LayerNormalization", [t, w(f"{name}_g", head), w(f"{name}_nb", head, scale=0.1)], f"{name}_n",
                    axis=-1, epsilon=1e-3)

    def expand(t, name):  # [B, kv, S, head] -> [B, heads, S, head], query head h reads kv head h // rep
        if rep == 1:
            return t
        u = node("Unsqueeze", [t, i64(f"{name}_ax2", [2])], f"{name}_u")
        e = node("Expand", [u, i64(f"{name}_to", [B, kv, rep, S, head])], f"{name}_e")
        return node("Reshape", [e, i64(f"{name}_rs", [B, heads, S, head])], f"{name}_rep")

    q = split_heads(project("q", heads), heads, "q")
    k = split_heads(project("k", kv), kv, "k")
    v = split_heads(project("v", kv), kv, "v")
    if qk_norm:
        q, k = norm(q, "qn"), norm(k, "kn")
    if rotary:
        q, k = rotate(q, "qr"), rotate(k, "kr")
    k, v = expand(k, "k"), expand(v, "v")
    kt = node("Transpose", [k], "kt", perm=[0, 1, 3, 2])
    scores = node("Mul", [node("MatMul", [q, kt], "qk"), "scale"], "scores")
    inits.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(head)]))
    p = node("Softmax", [scores], "p", axis=-1)
    ctx = node("MatMul", [p, v], "ctx")
    if mean_heads:
        ctx = node("Add", [ctx, node("ReduceMean", [ctx], "ctx_mean", axes=[1], keepdims=1)], "ctx_mix")
    if softmax_heads:
        ctx = node("Softmax", [ctx], "ctx_soft", axis=1)
    merged = node("Reshape", [node("Transpose", [ctx], "ctx_t", perm=[0, 2, 1, 3]), i64("back", [B, S, heads * head])],
                  "merged")
    o = node("MatMul", [merged, w("Wo", heads * head, E)], "o")
    node("MatMul", [node("Relu", [o], "o_act"), w("Wy", E, 3)], "y")
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, 3])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def per_head(result) -> dict[tuple, list]:
    """(head group key, dims group) -> its per-head groups, in head order."""
    out: dict[tuple, list] = {}
    for g in result.groups:
        if g.within:
            out.setdefault((g.within[0], g.key.rsplit("~head", 1)[0]), []).append(g)
    return {k: sorted(v, key=lambda g: g.within[1]) for k, v in out.items()}


# ---- plain ONNX ------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads", [(2, None), (3, None), (4, 2)])
def test_plain_attention_moves_dims_per_head(heads, kv_heads):
    model = attention(heads=heads, head=4, kv_heads=kv_heads, bias=True)
    result = assert_round_trips(model)
    kv = kv_heads or heads
    groups = per_head(result)
    # Q/K dims and V dims, each one group per (kv) head: Wq's and Wk's columns, Wv's with Wo's rows
    sizes = sorted(len(v) for (h, base), v in groups.items() if all(g.size == 4 for g in v))
    assert sizes == [kv, kv], groups.keys()
    qk = next(v for v in groups.values() if any(s.weight == "Wk" for s in v[0].slots))
    assert {s.weight for s in qk[0].slots} >= {"Wq", "Wk"}
    vo = next(v for v in groups.values() if any(s.weight == "Wv" for s in v[0].slots))
    assert {s.weight for s in vo[0].slots} >= {"Wv", "Wo"}
    assert result.coverage == 1.0


def test_written_out_gqa_moves_kv_heads_with_their_query_heads():
    """torch's repeat_kv (Unsqueeze, Expand, Reshape merging (kv heads, copies)) makes each position a
    cell (kv head, copy) (rules/layout.py _repeated_heads): the query heads that meet it stay neurons,
    cells of their kv head. Before: tied to each other ('tied to another channel of the same layer'),
    the heads stood still. Now the kv heads move with the query heads sharing them (one group over
    Wq, Wk, Wv, Wo), the query heads inside each kv group, and the dims per kv head."""
    result = assert_round_trips(attention(heads=4, head=4, kv_heads=2, bias=True))
    assert not [p for p in result.pinned if p.reason != "reaches a graph output"], result.pinned
    kv = [g for g in result.groups if not g.within and {"Wq", "Wk", "Wv", "Wo"} <= {s.weight for s in g.slots}]
    assert [g.size for g in kv] == [2]
    ranks = [g for g in result.groups if g.within and g.size == 2]  # query heads inside each kv group
    assert sorted(g.within[1] for g in ranks) == [0, 1] and all(g.within[0] == kv[0].key for g in ranks)
    assert {s.weight for g in ranks for s in g.slots} == {"Wq", "bq", "Wo"}


def test_rotary_keeps_qk_dims_in_order_and_v_dims_move_per_head():
    result = assert_round_trips(attention(heads=2, head=4, rotary=True), full_coverage=False)
    groups = per_head(result)
    assert all(not any(s.weight in ("Wq", "Wk") for g in v for s in g.slots) or all(g.size != 4 for g in v)
               for v in groups.values()), "rotary dims moved"
    assert any(any(s.weight == "Wv" for s in v[0].slots) and len(v) == 2 for v in groups.values())
    # the heads still move (Wq's columns in blocks of a head)
    assert any(g.size == 2 and any(s.weight == "Wq" for s in g.slots) for g in result.groups)


def test_gqa_with_rotary():
    result = assert_round_trips(attention(heads=4, head=4, kv_heads=2, rotary=True), full_coverage=False)
    vo = [v for v in per_head(result).values() if any(s.weight == "Wv" for s in v[0].slots)]
    assert vo and len(vo[0]) == 2  # V's dims per kv head


def test_a_drawn_permutation_differs_between_heads_and_verifies():
    """The permutation space grew: api.permute draws each head's dims apart, ORT says equivalent, and
    the permuted Wq is not any shared-dims permutation of the original (its head blocks' columns
    moved differently)."""
    model = attention(heads=3, head=4)
    permuted, done = api.permute(model, seed=11)
    assert done.verified
    result = walk(model)
    for (_, _), parts in per_head(result).items():
        perms = [tuple(done.record.perms[g.key]) for g in parts]
        assert len(set(perms)) > 1, perms  # not the same in every head
    # a record with a different permutation in every head, written by hand: verified, undone exactly
    qk = next(v for v in per_head(result).values() if any(s.weight == "Wk" for s in v[0].slots))
    heads_key = qk[0].within[0]
    perms = {heads_key: [2, 0, 1]}
    perms.update({g.key: np.roll(np.arange(4), i + 1).tolist() for i, g in enumerate(qk)})
    record = PermutationRecord(perms)
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    apply_permutations(moved, result, record)
    assert_same_function(model, moved)
    wq, wq_moved = (onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "Wq")) for m in (model, moved))
    blocks = wq.reshape(E, 3, 4)[:, perms[heads_key]]
    shifts = [np.flatnonzero([np.array_equal(wq_moved.reshape(E, 3, 4)[:, h], np.roll(blocks[:, h], s, axis=1))
                              for s in range(4)]) for h in range(3)]
    assert [s.tolist() for s in shifts] == [[1], [2], [3]]  # each head its own shift, after the heads moved
    back = onnx.ModelProto()
    back.CopyFrom(moved)
    apply_permutations(back, walk(moved), record.inverse())
    assert back.SerializeToString() == model.SerializeToString()
    # resync finds it: the record applied to the moved copy gives the model back byte for byte
    restored, report = api.resync(moved, model)
    assert restored.SerializeToString() == model.SerializeToString(), report.verdict


@pytest.mark.parametrize("kind", ["qk_norm", "mean_heads", "softmax_heads"])
def test_dims_read_without_their_head_stay_shared(kind, monkeypatch):
    """A weight over head_dim shared by every head (q/k norm), the heads' mean added back, a Softmax
    over the heads: the dims move alike in every head. Forcing the split there (the activation check
    off) changes the function."""
    model = attention(heads=2, head=4, **{kind: True})
    result = assert_round_trips(model, full_coverage=False)
    shared = "Wk" if kind == "qk_norm" else "Wv"  # (the Softmax over heads: V's dims meet it)
    assert not any(g.within and any(s.weight == shared for s in g.slots) for g in result.groups)
    assert any(g.size == 4 and not g.within and any(s.weight == shared for s in g.slots) for g in result.groups)
    monkeypatch.setattr(heads_module, "_checked_activations", lambda *a, **k: set())
    forced = walk(model)
    split = [g for g in forced.groups if g.within and any(s.weight == shared for s in g.slots)]
    if kind == "qk_norm":  # the norm weight is a slot over the bare dims: the split is refused there too
        assert not split
        return
    assert split
    record = PermutationRecord({g.key: (np.roll(np.arange(4), 1) if g.within[1] == 0 else np.arange(4)).tolist()
                                for g in split})
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    apply_permutations(moved, forced, record)
    with pytest.raises(AssertionError):
        assert_same_function(model, moved)


# ---- generated -------------------------------------------------------------------------------------
@st.composite
def attention_graphs(draw):
    heads = draw(st.sampled_from([2, 3, 4]))
    kv = draw(st.sampled_from([k for k in (1, 2, heads) if heads % k == 0]))
    head = draw(st.sampled_from([2, 4]))
    return dict(heads=heads, kv_heads=kv, head=head, rotary=draw(st.booleans()), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 3)))


@settings(max_examples=8, deadline=None)
@given(attention_graphs())
def test_generated_attention(params):
    """Every draw: permute + ORT, undo byte-exact, resync exact; V's dims move per (kv) head unless a
    single kv head serves every query head (MQA: its dims are every head's)."""
    result = assert_round_trips(attention(**params), full_coverage=False)
    groups = per_head(result)
    vo = [v for v in groups.values() if any(s.weight == "Wv" for s in v[0].slots)]
    if params["kv_heads"] > 1:
        assert vo and len(vo[0]) == params["kv_heads"], (params, list(groups))
    else:
        assert not vo
    qk = [v for v in groups.values() if any(s.weight == "Wk" for s in v[0].slots) and v[0].size == params["head"]]
    assert bool(qk) == (params["kv_heads"] > 1 and not params["rotary"]), (params, list(groups))


# ---- ONNX Runtime's attention ops ------------------------------------------------------------------
def _gqa_rotary():
    return next(c for c in VARIANTS if c.name == "com.microsoft.GroupQueryAttention[rotary]").build()


@pytest.mark.parametrize("name,build,qk,v", [
    ("MultiHeadAttention", CASES[(MS, "MultiHeadAttention")].build, "Wq", "Wv"),
    ("Attention", CASES[(MS, "Attention")].build, "Wqkv", "Wqkv"),
    ("GroupQueryAttention", CASES[(MS, "GroupQueryAttention")].build, "Wk", "Wv"),
    ("GroupQueryAttention[rotary]", _gqa_rotary, None, "Wv"),
])
def test_contrib_attention_moves_dims_per_head(name, build, qk, v):
    model = build()
    result = assert_round_trips(model, full_coverage=False)
    groups = per_head(result)
    assert any(any(s.weight == v for s in p[0].slots) for p in groups.values()), name
    has_qk = any(any(s.weight == (qk or "Wk") for s in p[0].slots) and p[0].size > 2 for p in groups.values()
                 if p is not None and (qk != v or len(groups) > 1))
    assert has_qk == (qk is not None), (name, list(groups))
    permuted, done = api.permute(model, seed=4)
    assert done.verified
    for parts in groups.values():
        if parts[0].size > 2:
            assert len({tuple(done.record.perms[g.key]) for g in parts}) > 1


# ---- records: ordered, and rewritten into resync's order -------------------------------------------
def test_an_inverse_record_keeps_its_order_through_json():
    """An inverse record undoes the per-head groups first (per_head_first), through its JSON too;
    heads_first(walk) rewrites it into resync's order with the same effect; a bad value is refused."""
    import json

    from onnx_resync.errors import UsageError

    model = attention(heads=3, head=4)
    result = walk(model)
    permuted, done = api.permute(model, seed=2, check=False)
    undo = PermutationRecord.from_dict(json.loads(done.record.inverse().to_json()))
    assert undo.per_head_first and not done.record.per_head_first
    again = walk(permuted)
    outs = []
    for record in (undo, undo.heads_first(again)):
        back = onnx.ModelProto()
        back.CopyFrom(permuted)
        apply_permutations(back, again, record)
        outs.append(back.SerializeToString())
    assert outs[0] == outs[1] == model.SerializeToString()
    # (the same perms in the wrong order do not undo it: the order is what makes the record exact)
    wrong = PermutationRecord(undo.perms)
    back = onnx.ModelProto()
    back.CopyFrom(permuted)
    apply_permutations(back, again, wrong)
    assert back.SerializeToString() != model.SerializeToString()
    data = json.loads(undo.to_json())
    data["per_head_first"] = "yes"
    with pytest.raises(UsageError, match="per_head_first"):
        PermutationRecord.from_dict(data)
    assert result.groups
