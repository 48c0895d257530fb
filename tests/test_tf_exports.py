"""The walker on graphs written the way tf2onnx / jax2tf write them (Google's Magika is one).

jax2tf writes a LayerNorm over the channel axis as ReduceSum (keepdims=0, axes as an input) times
1/C, the mean of squares minus the squared mean, Max(0, .), then a Reshape + Expand (BroadcastTo) of
that per-sample statistic to a shape computed from Shape -> Cast(int32) -> Slice -> Concat ->
Cast(int64) (tf2onnx folds the constant parts into `const_fold_opt__N` tensors), + eps, Sqrt,
Reciprocal, times the scale: `rstd * scale` is computed *before* it meets the channels
(`(x - mean) * (rstd * scale) + bias`). tf2onnx's Keras LayerNormalization is
`x * inv + (beta - mean * inv)` with `inv = rsqrt(var + eps) * gamma`. Dense is MatMul (+ Add of a
[1, C] bias), gelu is the tanh form written out with scalar constants.

The rules these need (walk/rules/elementwise.py `_derive_elementwise`, walker `scaled`):
- a reduction over the whole channel axis is channel-free (a statistic no permutation changes);
  reshaped and broadcast it meets channels without a tie or a pin;
- a weight times a channel-free activation (the scale times the per-sample 1/std) stays indexed by
  the weight along the weight's axes (a slot lands on the stored scale), and varies with the
  activation along the others: such a *scaled* tensor is data (a one-hot Equal(x, arange) stays the
  data operand of its embedding MatMul), and a channel axis that meets it where only the activation
  varies pins.

Each construct: permute + ONNX Runtime equivalent, undo byte-exact (check_properties), and on fixed
cases api.permute / undo / api.resync exact. Magika itself is in tests/test_vendor_walk.py.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from test_unrolled_cells import assert_round_trips
from test_walk_properties import SETTINGS, check_properties
from onnx_resync.walk import walk

BATCH_DIM = "unk__0"


class JaxGraph:
    """Builds a tf2onnx/jax2tf-style graph: names, constant folding and shape arithmetic as they write them."""

    def __init__(self, seed: int = 0, feat: int = 6, seq: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0
        self.seq = seq
        dims = [BATCH_DIM] + ([seq] if seq else []) + [feat]
        self.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, dims))
        self.batch = self._batch_slice("x")

    def name(self, base: str) -> str:
        self.count += 1
        return f"jax2tf_model_/pjit_model_/{base}_{self.count}:0"

    def const(self, value, base: str = "const_fold_opt_") -> str:
        self.count += 1
        name = f"{base}_{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape, scale: float = 0.5, base: str = "Const") -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), base)

    def node(self, op: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        out = self.name(base or op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out.rsplit(":", 1)[0], **attrs))
        return out

    # ---- shape arithmetic as tf2onnx writes it ------------------------------------------------
    def _batch_slice(self, x: str) -> str:
        """strided_slice of Cast(Shape(x), int32): the batch dim, an int32 vector of length 1."""
        shape = self.node("Cast", [self.node("Shape", [x])], "Shape", to=TensorProto.INT32)
        zero = self.const(np.array([0], np.int64), "const_axes_")
        return self.node("Slice", [shape, zero, self.const(np.array([1], np.int64)), zero], "strided_slice")

    def shape_of(self, *dims: int) -> str:
        """(batch, *dims) computed: Concat of the batch slice and folded int32 constants, Cast to int64."""
        parts = [self.batch] + [self.const(np.array([d], np.int32)) for d in dims]
        return self.node("Cast", [self.node("Concat", parts, "shape_Concat", axis=0)], "Reshape_", to=TensorProto.INT64)

    def scalar(self, value: float, base: str = "Const") -> str:
        return self.const(np.array(value, np.float32), base)

    # ---- layers -------------------------------------------------------------------------------
    def dense(self, x: str, cin: int, cout: int) -> str:
        rank = 3 if self.seq else 2
        y = self.node("MatMul", [x, self.weight((cin, cout))], "Dense/einsum/Einsum")
        bias = self.weight((1,) * (rank - 1) + (cout,), 0.1, "Reshape")
        return self.node("Add", [y, bias], "Dense/AddV2")

    def gelu(self, x: str) -> str:
        """jax.nn.gelu(approximate=True) as jax2tf writes it: x * 0.5 * (1 + tanh(c * (x + 0.044715 x^3)))."""
        cube = self.node("Mul", [x, self.node("Mul", [x, self.node("Mul", [self.scalar(0.044715), x])])])
        inner = self.node("Mul", [self.scalar(0.7978845834732056), self.node("Add", [x, cube], "AddV2")])
        half = self.node("Mul", [self.scalar(0.5), self.node("Add", [self.scalar(1.0), self.node("Tanh", [inner])])])
        return self.node("Mul", [x, half])

    def broadcast_stat(self, stat: str, axis: int, c: int, full: bool) -> str:
        """A statistic with the reduced axis dropped, Reshape'd back with a 1 there and Expand'ed
        (BroadcastTo) to the kept shape (full: to the input's whole shape)."""
        dims = [self.seq] if self.seq else []
        kept = list(dims) + [c]
        kept[axis - 1] = 1
        whole = list(dims) + [c]
        target = self.shape_of(*kept)
        reshaped = self.node("Reshape", [stat, target], "LayerNorm/Reshape")
        return self.node("Expand", [reshaped, self.shape_of(*whole) if full else target], "LayerNorm/BroadcastTo")

    def jax_layernorm(self, x: str, c: int, axis: int = -1, full: bool = False) -> str:
        """flax LayerNorm through jax2tf over `axis` (-1: the channels; 1 of a sequence: the positions)."""
        rank = 3 if self.seq else 2
        axis = axis % rank
        n = (self.seq if axis == 1 and self.seq else c)
        axes = self.const(np.array([axis], np.int64))
        recip = self.scalar(1.0 / n, "truediv_recip")
        mean = self.node("Mul", [self.node("ReduceSum", [x, axes], "LayerNorm/Sum", keepdims=0,
                                           noop_with_empty_axes=1), recip], "LayerNorm/truediv")
        square = self.node("Mul", [x, x], "LayerNorm/Square")
        mean2 = self.node("Mul", [self.node("ReduceSum", [square, axes], "LayerNorm/Sum_1", keepdims=0,
                                            noop_with_empty_axes=1), recip], "LayerNorm/truediv_1")
        var = self.node("Max", [self.scalar(0.0), self.node("Sub", [mean2, self.node("Mul", [mean, mean])])],
                        "LayerNorm/Maximum")
        var = self.broadcast_stat(var, axis, c, full)
        rstd = self.node("Reciprocal", [self.node("Sqrt", [self.node("Add", [var, self.scalar(1e-6)])])])
        shape = [1] * rank
        shape[axis] = n
        scale = self.node("Mul", [rstd, self.weight(shape, 0.5, "Reshape_2") + ""], "LayerNorm/Mul")
        centred = self.node("Sub", [x, self.broadcast_stat(mean, axis, c, full)], "LayerNorm/Sub_1")
        return self.node("Add", [self.node("Mul", [centred, scale]), self.weight(shape, 0.1, "Reshape_3")])

    def jax_softmax(self, x: str, c: int) -> str:
        """jax.nn.softmax over the channels through jax2tf: ReduceMax (keepdims=0), Max(-inf, .),
        Reshape + BroadcastTo back, Sub, Exp, ReduceSum, Reshape + BroadcastTo, Div."""
        axes = self.const(np.array([1], np.int64))
        top = self.node("ReduceMax", [x], "softmax/Max", axes=[1], keepdims=0)
        top = self.broadcast_stat(self.node("Max", [self.scalar(-np.inf), top], "softmax/Maximum"), 1, c, False)
        e = self.node("Exp", [self.node("Sub", [x, top], "softmax/Sub")])
        total = self.node("ReduceSum", [e, axes], "softmax/Sum", keepdims=0, noop_with_empty_axes=1)
        return self.node("Div", [e, self.broadcast_stat(total, 1, c, False)], "softmax/truediv")

    def keras_layernorm(self, x: str, c: int) -> str:
        """tf.keras LayerNormalization through tf2onnx: x * inv + (beta - mean * inv)."""
        mean = self.node("ReduceMean", [x], "moments/mean", axes=[-1], keepdims=1)
        diff = self.node("Sub", [x, mean], "moments/SquaredDifference")
        var = self.node("ReduceMean", [self.node("Mul", [diff, diff])], "moments/variance", axes=[-1], keepdims=1)
        rstd = self.node("Reciprocal", [self.node("Sqrt", [self.node("Add", [var, self.scalar(1e-3)])])], "Rsqrt")
        inv = self.node("Mul", [rstd, self.weight((c,), 0.5, "gamma")], "batchnorm/mul")
        shift = self.node("Sub", [self.weight((c,), 0.1, "beta"), self.node("Mul", [mean, inv], "batchnorm/mul_2")])
        return self.node("Add", [self.node("Mul", [x, inv], "batchnorm/mul_1"), shift], "batchnorm/add_1")

    def one_hot_embedding(self, vocab: int, width: int, broadcast_to: bool = False) -> str:
        """jax.nn.one_hot(x) @ table: Equal(x[..., None], arange) -> Cast -> MatMul; broadcast_to: x
        Reshape'd to [-1, L, 1] and BroadcastTo (Expand) to a computed (batch, L, 1), as Magika has it
        (inference names that batch dim apart from the input's: the merging Reshape downstream must
        still see one batch)."""
        ids = self.node("Floor", [self.node("Mul", [self.node("Abs", ["x"]), self.scalar(2.0)])])
        cols = self.const(np.arange(vocab, dtype=np.float32).reshape(1, 1, vocab), "BroadcastTo_1")
        if broadcast_to:
            flat = self.node("Reshape", [ids, self.const(np.array([-1, self.seq, 1], np.int64), "Reshape_shape_")])
            expanded = self.node("Expand", [flat, self.shape_of(self.seq, 1)], "BroadcastTo")
        else:
            expanded = self.node("Unsqueeze", [ids, self.const(np.array([-1], np.int64), "const_axes_")])
        hot = self.node("Cast", [self.node("Equal", [expanded, cols])], "Cast_1", to=TensorProto.FLOAT)
        return self.node("MatMul", [hot, self.weight((vocab, width))], "Dense_0/einsum/Einsum")

    def model(self, out: str, out_dims: list) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_dims)]
        graph = helper.make_graph(self.nodes, "tf2onnx", self.inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="tf2onnx")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


NORMS = ("jax", "jax_full", "keras", "softmax", "none")


def mlp(widths: list[int], norms: list[str], seed: int = 0, gelu: bool = True) -> onnx.ModelProto:
    """Dense -> gelu -> LayerNorm, repeated; the last Dense reaches the output."""
    g = JaxGraph(seed, feat=widths[0])
    x = "x"
    for cin, cout, norm in zip(widths, widths[1:-1], norms):
        x = g.dense(x, cin, cout)
        x = g.gelu(x) if gelu else g.node("Relu", [x])
        if norm in ("jax", "jax_full"):
            x = g.jax_layernorm(x, cout, full=norm == "jax_full")
        elif norm == "keras":
            x = g.keras_layernorm(x, cout)
        elif norm == "softmax":
            x = g.jax_softmax(x, cout)
    return g.model(g.dense(x, widths[-2], widths[-1]), [BATCH_DIM, widths[-1]])


def magika_like(seed: int = 0, vocab: int = 9, embed: int = 4, seq: int = 12, merge: int = 2, filters: int = 6,
                classes: int = 3, broadcast_to: bool = False) -> onnx.ModelProto:
    """Magika's layout: one-hot embedding, gelu, Reshape merging `merge` positions into the channels
    (shape computed), a LayerNorm over the positions with a per-position scale, a Conv1D written as
    Unsqueeze/Transpose/Conv/Squeeze, gelu, GlobalMaxPool, a LayerNorm over the channels, Dense."""
    g = JaxGraph(seed, feat=seq)
    g.seq = seq
    x = g.gelu(g.node("Add", [g.one_hot_embedding(vocab, embed, broadcast_to), g.weight((1, 1, embed), 0.1, "Reshape")]))
    rows, width = seq // merge, merge * embed
    x = g.node("Reshape", [x, g.shape_of(rows, width)], "Reshape")
    g.seq = rows
    x = g.jax_layernorm(x, width, axis=1)  # over the positions: scale [1, rows, 1]
    x = g.node("Unsqueeze", [x, g.const(np.array([3], np.int64), "const_axes_")])
    x = g.node("Transpose", [x], "Conv2D_", perm=[0, 2, 1, 3])
    x = g.node("Conv", [x, g.weight((filters, width, 3, 1))], "Conv2D", kernel_shape=[3, 1])
    x = g.node("Squeeze", [x, g.const(np.array([3], np.int64), "const_axes_")])
    x = g.gelu(g.node("Add", [x, g.weight((1, filters, 1), 0.1, "const_fold_opt_")]))
    x = g.node("Squeeze", [g.node("GlobalMaxPool", [x], "Max"), g.const(np.array([2], np.int64), "const_axes_")])
    g.seq = None
    x = g.jax_layernorm(x, filters)
    return g.model(g.dense(x, filters, classes), [BATCH_DIM, classes])


def _slotted(result) -> set[str]:
    return {s.weight.split("_")[0] for g in result.groups for s in g.slots}


@pytest.mark.parametrize("norm", NORMS)
def test_layernorm_as_tf2onnx_writes_it_moves_every_channel(norm):
    result = assert_round_trips(mlp([5, 8, 7, 3], [norm, norm]))
    assert result.coverage == 1.0 and len(result.groups) == 2
    if norm not in ("none", "softmax"):  # the scale and bias are slots of the channels they normalize
        scales = {"jax": "Reshape", "jax_full": "Reshape", "keras": "gamma"}[norm]
        assert scales in _slotted(result)


@pytest.mark.parametrize("broadcast_to", [False, True])
def test_magika_layout_moves_embedding_and_conv_channels(broadcast_to):
    result = assert_round_trips(magika_like(broadcast_to=broadcast_to))
    assert result.coverage == 1.0
    # the embedding's channels (embed) and the conv's filters; the one-hot's arange keeps its order
    assert sorted(g.size for g in result.groups) == [4, 6]


@pytest.mark.parametrize("batch", ["unk__0", "batch"])
def test_one_hot_broadcast_to_a_computed_shape_then_merged_into_channels(batch, monkeypatch):
    """Magika's one-hot: x Reshape'd to [-1, L, 1], BroadcastTo a computed (batch, L, 1); the Reshape
    merging positions into channels downstream must see one batch dim. tf2onnx names the input's
    dynamic dims 'unk__N' itself (Magika: unk__214), which are the file's symbols, not inference's
    placeholders (walk/graph.py _own_placeholders): before, 'unk__0' pinned the embedding's channels
    ('Reshape mixes the channel axis with axes of unknown size', coverage 0.6)."""
    monkeypatch.setattr(sys.modules[__name__], "BATCH_DIM", batch)
    result = check_properties(magika_like(broadcast_to=True), full_coverage=True)
    assert sorted(g.size for g in result.groups) == [4, 6]


def test_before_the_rule_the_scale_was_pinned():
    """The scale times 1/std is what pinned (Magika: 'Mul mixes channels with an unlabelled tensor');
    an activation that varies along the channel axis still does: the rule is not a blanket pass."""
    g = JaxGraph(0, feat=5)
    other = helper.make_tensor_value_info("side", TensorProto.FLOAT, [BATCH_DIM, 8])
    g.inputs.append(other)
    x = g.node("Relu", [g.dense("x", 5, 8)])
    scaled = g.node("Mul", ["side", g.weight((1, 8))])  # varies along the channels: not a statistic
    x = g.node("Mul", [x, scaled])
    model = g.model(g.dense(x, 8, 3), [BATCH_DIM, 3])
    result = check_properties(model)
    assert result.coverage == 0.0
    assert any("unlabelled tensor" in p.reason for p in result.pinned), [p.reason for p in result.pinned]


def test_a_channel_axis_meeting_a_scaled_tensor_where_only_the_activation_varies_pins():
    """rows = W1 @ data (channels on axis 0); S = side (C, 1) * W (1, K): its axis 0 varies with an
    activation, not a weight, so rows * S cannot be followed (a silent slot there would be wrong)."""
    g = JaxGraph(0, feat=4)
    g.inputs[:] = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4]),
                   helper.make_tensor_value_info("side", TensorProto.FLOAT, [6, 1])]
    rows = g.node("Relu", [g.node("MatMul", [g.weight((6, 5)), "x"])])  # (6, 4), channels on axis 0
    s = g.node("Mul", ["side", g.weight((1, 4))])
    out = g.node("MatMul", [g.weight((3, 6)), g.node("Mul", [rows, s])])
    result = check_properties(g.model(out, [3, 4]))
    assert result.coverage == 0.0
    assert any("varies along this axis with an unlabelled activation" in p.reason for p in result.pinned), \
        [p.reason for p in result.pinned]


def test_shapes_computed_from_shape_cast_slice_concat_cast_are_known():
    """The Reshape/Expand targets tf2onnx computes (int32 Shape slices, folded constants) are
    evaluated: the walker knows the broadcast statistic's shape (batch, 1)."""
    from onnx_resync.walk.graph import GraphView

    model = mlp([5, 8, 3], ["jax"])
    view = GraphView(model)
    expands = [n.output[0] for n in model.graph.node if n.op_type == "Expand"]
    assert expands and all(view.shape(e) is not None and view.shape(e)[1] == 1 for e in expands)


@settings(max_examples=12, **SETTINGS)
@given(st.lists(st.integers(2, 7), min_size=3, max_size=5), st.data())
def test_generated_tf2onnx_mlps(widths, data):
    norms = [data.draw(st.sampled_from(NORMS)) for _ in widths[2:]]
    gelu = data.draw(st.booleans())
    model = mlp(widths, norms, seed=len(widths), gelu=gelu)
    check_properties(model, full_coverage=True, constructs=["tf2onnx"] + norms)


@settings(max_examples=6, **SETTINGS)
@given(st.integers(2, 5), st.integers(2, 4), st.sampled_from([1, 2, 4]), st.integers(2, 6), st.booleans())
def test_generated_magika_layouts(vocab, embed, merge, filters, broadcast_to):
    model = magika_like(seed=vocab, vocab=vocab, embed=embed, merge=merge, filters=filters,
                        broadcast_to=broadcast_to)
    result = check_properties(model, full_coverage=True, constructs=["jax2tf"])
    assert sorted(g.size for g in result.groups) == sorted([embed, filters])


# ---- Einsum: Keras MultiHeadAttention as tf2onnx writes it (EinsumDense and attention einsums) ------
def keras_attention(seq: int = 4, feat: int = 5, width: int = 6, heads: int = 2, head_dim: int = 3,
                    classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    g = JaxGraph(seed, feat=feat, seq=seq)
    h = g.node("Relu", [g.dense("x", feat, width)])

    def einsum_dense(x, equation, shape, bias_shape):
        y = g.node("Einsum", [x, g.weight(shape)], "einsum/Einsum", equation=equation)
        return g.node("Add", [y, g.weight(bias_shape, 0.1, "add")])

    q = einsum_dense(h, "abc,cde->abde", (width, heads, head_dim), (heads, head_dim))
    k = einsum_dense(h, "abc,cde->abde", (width, heads, head_dim), (heads, head_dim))
    v = einsum_dense(h, "abc,cde->abde", (width, heads, head_dim), (heads, head_dim))
    q = g.node("Mul", [q, g.scalar(1.0 / np.sqrt(head_dim))])
    scores = g.node("Einsum", [k, q], "einsum/Einsum", equation="aecd,abcd->acbe")
    probs = g.node("Softmax", [scores], axis=-1)
    ctx = g.node("Einsum", [probs, v], "einsum_1/Einsum", equation="acbe,aecd->abcd")
    out = einsum_dense(ctx, "abcd,cde->abe", (heads, head_dim, width), (width,))
    pooled = g.node("ReduceMean", [g.node("Add", [h, out])], axes=[1], keepdims=0)
    g.seq = None
    return g.model(g.dense(pooled, width, classes), [BATCH_DIM, classes])


def test_keras_attention_einsums_move_heads_and_dims():
    result = assert_round_trips(keras_attention())
    assert result.coverage == 1.0
    # the residual stream (6), the heads of q, k, v and the output (2), q/k dims (3), v/output dims (3)
    assert sorted(g.size for g in result.groups) == [2, 3, 3, 6]


def test_einsum_meeting_an_unlabelled_activation_pins():
    g = JaxGraph(0, feat=5, seq=4)
    g.inputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [BATCH_DIM, 4, 6]))
    h = g.node("Relu", [g.dense("x", 5, 6)])
    side = g.node("Mul", ["side", "side"])  # an activation computed from an input, unlabelled
    mixed = g.node("Einsum", [h, side], equation="abc,abc->ab")  # channel c against its c
    model = g.model(mixed, [BATCH_DIM, 4])
    result = check_properties(model)
    assert result.coverage == 0.0
    assert any("Einsum mixes channels with an unlabelled tensor" in p.reason for p in result.pinned)


def test_einsum_subscripts():
    from onnx_resync.walk.rules.einsum import subscripts

    assert subscripts("abc,cde->abde", [3, 3]) == ([list("abc"), list("cde")], list("abde"))
    assert subscripts("ij,jk", [2, 2]) == ([list("ij"), list("jk")], list("ik"))  # implicit output
    subs, out = subscripts("...ij,jk->...ik", [4, 2])
    assert len(subs[0]) == 4 and subs[1] == list("jk") and out[-2:] == list("ik") and out[:2] == subs[0][:2]
    assert subscripts("ii->i", [2]) is None  # a diagonal
    assert subscripts("abc,cd->abd", [2, 2]) is None  # does not fit the ranks


@settings(max_examples=6, **SETTINGS)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(2, 4), st.integers(2, 5))
def test_generated_keras_attention(seq, heads, head_dim, width):
    model = keras_attention(seq=seq, width=width, heads=heads, head_dim=head_dim, seed=seq)
    check_properties(model, full_coverage=heads > 1, constructs=["keras_attention"])


def test_a_scaled_tensor_that_leaves_the_graph_keeps_its_weight_in_place():
    """S = statistic * W handed out as a graph output reads W as stored: W, slotted by the channels
    elsewhere, must not move (it is fixed, its channels pin) -- else the permuted model's S differs."""
    g = JaxGraph(0, feat=5)
    h = g.node("Relu", [g.dense("x", 5, 6)])
    scale = g.weight((1, 6))
    stat = g.node("Reshape", [g.node("ReduceSum", [h, g.const(np.array([1], np.int64))], keepdims=0,
                                     noop_with_empty_axes=1), g.shape_of(1)])
    scaled = g.node("Mul", [stat, scale], "LayerNorm/Mul")
    y = g.dense(g.node("Mul", [h, scale]), 6, 3)
    model = g.model(y, [BATCH_DIM, 3])
    model.graph.output.append(helper.make_tensor_value_info(scaled, TensorProto.FLOAT, [BATCH_DIM, 6]))
    result = check_properties(model)
    assert result.coverage == 0.0
    assert any("is a graph output" in p.reason for p in result.pinned), [p.reason for p in result.pinned]


def test_a_scaled_tensor_that_leaves_an_if_branch_keeps_its_weight_in_place():
    g = JaxGraph(0, feat=5)
    g.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    h = g.node("Relu", [g.dense("x", 5, 6)])
    scale, other = g.weight((1, 6)), g.weight((1, 6))
    stat = g.node("Reshape", [g.node("ReduceSum", [h, g.const(np.array([1], np.int64))], keepdims=0,
                                     noop_with_empty_axes=1), g.shape_of(1)])
    branches = []
    for k, w in enumerate((scale, other)):
        out = f"branch{k}"
        branches.append(helper.make_graph([helper.make_node("Mul", [stat, w], [out])], f"b{k}", [],
                                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]))
    chosen = g.node("If", ["cond"], "If", then_branch=branches[0], else_branch=branches[1])
    y = g.dense(g.node("Mul", [h, scale]), 6, 3)
    model = g.model(y, [BATCH_DIM, 3])
    model.graph.output.append(helper.make_tensor_value_info(chosen, TensorProto.FLOAT, None))
    result = walk(model)
    assert result.coverage == 0.0
    assert any("is an output of If" in p.reason for p in result.pinned), [p.reason for p in result.pinned]
