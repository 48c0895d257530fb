"""The symbolic shape evaluator (walk/shapes.py) and the walker following computed shapes.

Unit tests of the evaluator's arithmetic, then graphs written the way exporters write them (Paddle's
attention block reshaped back to NCHW through Shape -> Gather -> Concat, torch dynamo's K with batch
and heads merged, SAME pads computed from Shape, a Tile/Expand whose repeats come from Shape): each
is permuted and verified with ONNX Runtime, undone byte for byte and resynced exactly
(tests/test_walk_properties.check_properties + resync). The SAME pads, the Slice into gate chunks
(a GRU cell written out by torch.onnx, arabic_gru_decoder) and the Tile pinned before shapes.py;
the Paddle and dynamo forms pass through ONNX's own data propagation too and guard the rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.api import resync
from onnx_resync.io.store import WeightStore
from onnx_resync.walk import walk
from onnx_resync.walk.graph import GraphView
from onnx_resync.walk.shapes import Term, from_dim, to_dim

from test_walk_properties import check_properties, forced_record
from onnx_resync.permute import apply_permutations

OPSET = 17


# ---- the evaluator ---------------------------------------------------------------------------
def test_terms_are_exact_polynomials():
    b = Term.symbol("batch")
    assert b * 4 == 4 * b and to_dim(b * 4) == "4*batch"
    assert (b + 2) - 2 == b and (b - b) == 0 and isinstance(b - b, int)
    assert from_dim("4*batch") == b * 4 and from_dim(7) == 7
    assert to_dim(b * Term.symbol("h")) in ("batch*h", "h*batch")
    assert to_dim(b + 1).startswith("[")  # a sum: an opaque name of its own, never a product


def _model(nodes, inputs, outputs, inits=(), value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def test_shape_arithmetic_is_evaluated_per_element():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, "h", 8])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Shape", ["x"], ["hw"], start=2),
        helper.make_node("ReduceProd", ["hw"], ["hw_n"], keepdims=1),
        helper.make_node("Mul", ["b", "two"], ["b2"]),
        helper.make_node("Unsqueeze", ["b2", "ax0"], ["b2u"]),
        helper.make_node("Div", ["six", "two"], ["three"]),
        helper.make_node("Concat", ["b2u", "three", "hw_n"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Sub", ["hw", "hw"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["ones"]),
        helper.make_node("Equal", ["b", "b"], ["same"]),
        helper.make_node("Where", ["same", "one", "two"], ["picked"]),
    ]
    inits = [_i64("i0", 0), _i64("two", 2), _i64("six", [6]), _i64("ax0", [0]), _i64("one", [1])]
    outs = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("ones", "picked")]
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)] + outs, inits)
    view = GraphView(model)
    assert view.values.dims("target") == ["2*batch", 3, "8*h"]
    assert view.shape("y") == ["2*batch", 3, "8*h"]
    assert view.constant("ones").tolist() == [1, 1]  # determined although computed from a symbolic shape
    assert view.constant("picked").tolist() == [1]
    assert view.constant("target") is None  # symbolic: not a constant


# ---- graphs as exporters write them -------------------------------------------------------------
def _rng_init(rng, name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _prove(model):
    """Permute + verify with ORT, undo byte-exact (check_properties), resync exact."""
    result = check_properties(model)
    suspect = onnx.ModelProto()
    suspect.CopyFrom(model)
    apply_permutations(suspect, result, forced_record(result, 5))
    restored, report = resync(suspect, model, check=False)
    ref, got = WeightStore(model), WeightStore(restored)
    assert all(ref.get(n).tobytes() == got.get(n).tobytes() for n in ref.names())
    return result


def paddle_attention_block(c=8):
    """NCHW conv -> (B, C, H*W) -> (B, H*W, C) -> MatMul with a weight -> back to (B, C, H, W), the
    target built from Shape -> Gather -> Concat, as paddle2onnx writes it; H, W symbolic."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Shape", ["r0"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["hh"], axis=0),
        helper.make_node("Gather", ["s", "i3"], ["ww"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["nu"]),
        helper.make_node("Unsqueeze", ["hh", "ax0"], ["hu"]),
        helper.make_node("Unsqueeze", ["ww", "ax0"], ["wu"]),
        helper.make_node("Concat", ["nu", "cc", "minus1"], ["t1"], axis=0),
        helper.make_node("Reshape", ["r0", "t1"], ["seq"]),  # (B, C, H*W)
        helper.make_node("Transpose", ["seq"], ["tok"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tok", "wq"], ["q"]),
        helper.make_node("Relu", ["q"], ["qr"]),
        helper.make_node("Transpose", ["qr"], ["back"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["nu", "cc", "hu", "wu"], ["t2"], axis=0),
        helper.make_node("Reshape", ["back", "t2"], ["img"]),  # (B, C, H, W) again
        helper.make_node("Conv", ["img", "w1", "b1"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [_rng_init(rng, "w0", [c, 3, 1, 1]), _rng_init(rng, "b0", [c]), _rng_init(rng, "wq", [c, c]),
             _rng_init(rng, "w1", [4, c, 1, 1]), _rng_init(rng, "b1", [4]),
             _i64("i0", 0), _i64("i2", 2), _i64("i3", 3), _i64("ax0", [0]), _i64("cc", [c]), _i64("minus1", [-1])]
    return _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "h", "w"])], inits)


def test_paddle_reshape_back_to_nchw_is_followed():
    result = _prove(paddle_attention_block())
    assert result.coverage == 1.0, result.pinned
    assert result.permutable_channels == 16  # the conv's 8 and the MatMul's 8


def dynamo_merged_heads(heads=2, dim=4, seq=3, batch=2):
    """torch dynamo's K: (B, S, H*D) -> (B, S, H, D) -> (B, H, D, S) -> (B*H, D, S), the merged
    target computed from Shape (batch * heads); scores and values as batched MatMuls, then back."""
    rng = np.random.default_rng(1)
    d = heads * dim
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "seq", d])
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["sq"], axis=0),
        helper.make_node("Mul", ["b", "nh"], ["bh"]),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Unsqueeze", ["sq", "ax0"], ["su"]),
        helper.make_node("Unsqueeze", ["bh", "ax0"], ["bhu"]),
        helper.make_node("Concat", ["bu", "su", "nhu", "hd"], ["split_t"], axis=0),
        helper.make_node("Concat", ["bhu", "su", "hd"], ["merge_t"], axis=0),
        helper.make_node("Concat", ["bhu", "hd", "su"], ["merge_kt"], axis=0),
        helper.make_node("Reshape", ["q", "split_t"], ["q4"]),
        helper.make_node("Reshape", ["k", "split_t"], ["k4"]),
        helper.make_node("Reshape", ["v", "split_t"], ["v4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["qt", "merge_t"], ["q3"]),
        helper.make_node("Reshape", ["kt", "merge_kt"], ["k3"]),
        helper.make_node("Reshape", ["vt", "merge_t"], ["v3"]),
        helper.make_node("MatMul", ["q3", "k3"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v3"], ["ctx3"]),
        helper.make_node("Concat", ["bu", "nhu", "su", "hd"], ["unmerge_t"], axis=0),
        helper.make_node("Reshape", ["ctx3", "unmerge_t"], ["ctx4"]),
        helper.make_node("Transpose", ["ctx4"], ["ctxt"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["bu", "su", "dd"], ["flat_t"], axis=0),
        helper.make_node("Reshape", ["ctxt", "flat_t"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"]),
    ]
    inits = [_rng_init(rng, n, [d, d]) for n in ("wq", "wk", "wv", "wo")] + [
        _i64("i0", 0), _i64("i1", 1), _i64("nh", heads), _i64("ax0", [0]), _i64("nhu", [heads]),
        _i64("hd", [dim]), _i64("dd", [d])]
    return _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, "seq", d])], inits)


@pytest.mark.parametrize("batch", [2, "batch"])
def test_dynamo_batch_and_heads_merged_is_followed(batch):
    """A symbolic batch merged with the heads: the Q/K dims, the V dims and the heads move as with a
    static batch. A static batch tiles the heads over the merged axis (layout._untile); a symbolic one
    carries them beside the labels (layout batch-merged records) through the batched MatMuls and the
    Softmax to the Reshape that splits the batch back. Before: the heads pinned with a symbolic
    batch ('Reshape merges attention heads into the batch axis'), groups [4, 4]."""
    result = _prove(dynamo_merged_heads(batch=batch))
    assert result.coverage == 1.0, result.pinned
    sizes = sorted(g.size for g in result.groups)
    assert sizes.count(2) == 1 and set(sizes) == {2, 4}, sizes  # the 2 heads; dims (per head where H3's rule splits them)


def test_shapes_downstream_of_a_computed_shape_are_recomputed():
    """ONNX shape inference named the batched MatMul's and Softmax's batch dim 'unk__k' before the
    merged Reshape's target was computed; it kept that name when run again. Now every unknown dim
    downstream of a computed shape is inferred again: [2*batch, seq, seq]."""
    view = GraphView(dynamo_merged_heads(batch="batch"))
    assert view.shape("scores") == ["2*batch", "seq", "seq"]
    assert view.shape("p") == ["2*batch", "seq", "seq"]
    assert view.shape("ctx3") == ["2*batch", "seq", 4]


@pytest.mark.parametrize("reader", ["mask", "output", "reduce"])
def test_heads_merged_into_a_symbolic_batch_pin_where_not_carried(reader):
    """The counter-cases: the merged scores meet a mask fed in a fixed order along [batch * heads]
    ('mask'), the merged context is also a graph output ('output'), or the merged Q is summed over
    its batch axis ('reduce'): the heads pin with the reason and do not move; the rest is exact."""
    model = dynamo_merged_heads(batch="batch")
    g = model.graph
    if reader == "mask":
        g.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["bh", "seq", "seq"]))
        node = next(n for n in g.node if n.op_type == "Softmax")
        g.node.insert(list(g.node).index(node), helper.make_node("Add", ["scores", "mask"], ["masked"]))
        node.input[0] = "masked"
    elif reader == "output":
        g.output.append(helper.make_tensor_value_info("ctx3", TensorProto.FLOAT, ["bh", "seq", 4]))
    else:
        g.node.append(helper.make_node("ReduceSum", ["q3", "ax0"], ["qs"], keepdims=0))
        g.node.append(helper.make_node("MatMul", ["qs", "wq4"], ["y2"]))
        g.initializer.append(_rng_init(np.random.default_rng(2), "wq4", [4, 3]))
        g.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["seq", 3]))
    onnx.checker.check_model(model, full_check=True)
    result = walk(model)
    assert sorted(g.size for g in result.groups).count(2) == 0, [(g.key, g.size) for g in result.groups]
    if reader != "mask":  # (a mask input: check_properties feeds every input [BATCH, ...])
        _prove(model)


def same_pads_conv(c=6):
    """SAME padding computed from Shape ((k - 1) - (h - 1) % 1 ... written as pads from Sub/Div of the
    input's spatial dims), then a Pad on H and W only: the channel axis is not padded."""
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[1, 1]),
        helper.make_node("Shape", ["c0"], ["s"]),
        helper.make_node("Slice", ["s", "st2", "en4"], ["hw"]),
        helper.make_node("Sub", ["hw", "hw"], ["z"]),  # (h - h) ...
        helper.make_node("Add", ["z", "kminus1"], ["total"]),  # ... + (k - 1): stride 1
        helper.make_node("Div", ["total", "two"], ["before"]),
        helper.make_node("Sub", ["total", "before"], ["after"]),
        helper.make_node("Concat", ["zero2", "before", "zero2", "after"], ["pads"], axis=0),
        helper.make_node("Pad", ["c0", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "w1"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [_rng_init(rng, "w0", [c, 3, 1, 1]), _rng_init(rng, "w1", [c, c, 3, 3]), _rng_init(rng, "w2", [2, c, 1, 1]),
             _i64("st2", [2]), _i64("en4", [4]), _i64("kminus1", [2, 2]), _i64("two", [2]), _i64("zero2", [0, 0])]
    return _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "h", "w"])], inits)


def test_same_pads_computed_from_shape_are_followed():
    view = GraphView(same_pads_conv())
    assert view.constant("pads").tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    result = _prove(same_pads_conv())
    assert result.coverage == 1.0, result.pinned


def test_computed_pads_on_the_channel_axis_still_pin():
    """The counter-case: pads computed from Shape that pad channels pin with the Pad's reason."""
    model = same_pads_conv()
    for init in model.graph.initializer:
        if init.name == "zero2":
            init.CopyFrom(_i64("zero2", [0, 1]))
    result = walk(model)
    assert any("Pad on the channel axis" in p.reason for p in result.pinned), result.pinned


def test_undetermined_target_still_pins_with_its_reason():
    """A Reshape whose target reads a graph input's values is not determined: it pins."""
    model = paddle_attention_block()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("cc_in", TensorProto.INT64, [1]))
    for node in g.node:
        if node.op_type == "Concat" and "cc" in node.input and "hu" in node.input:
            node.input[1] = "cc_in"
    result = walk(model)
    assert result.coverage < 1.0
    assert any("Reshape" in p.reason for p in result.pinned), result.pinned


def chunked_gemm(hidden=4):
    """A Gemm whose output is cut into its three gate chunks with bounds computed from Shape
    ((n + 2) / 3 * k, as torch.onnx writes a GRU cell); each chunk feeds its own layer."""
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
        helper.make_node("Shape", ["g"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Add", ["n", "two"], ["n2"]),
        helper.make_node("Div", ["n2", "three"], ["chunk"]),
        helper.make_node("Mul", ["chunk", "one1"], ["e0"]),
        helper.make_node("Mul", ["chunk", "two1"], ["e1"]),
        helper.make_node("Mul", ["chunk", "three1"], ["e2"]),
        helper.make_node("Slice", ["g", "zero1", "e0", "one1"], ["c0"]),
        helper.make_node("Slice", ["g", "e0", "e1", "one1"], ["c1"]),
        helper.make_node("Slice", ["g", "e1", "e2", "one1"], ["c2"]),
    ]
    inits = [_rng_init(rng, "w", [3 * hidden, 5]), _rng_init(rng, "b", [3 * hidden]), _i64("one", 1),
             _i64("two", 2), _i64("three", 3), _i64("zero1", [0]), _i64("one1", [1]), _i64("two1", [2]),
             _i64("three1", [3])]
    outs = []
    for k in range(3):
        nodes += [helper.make_node("Tanh", [f"c{k}"], [f"a{k}"]),
                  helper.make_node("Gemm", [f"a{k}", f"v{k}"], [f"y{k}"], transB=1)]
        inits.append(_rng_init(rng, f"v{k}", [2, hidden]))
        outs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["batch", 2]))
    return _model(nodes, [x], outs, inits)


def test_slice_bounds_computed_from_shape_are_followed():
    result = _prove(chunked_gemm())
    assert result.coverage == 1.0, result.pinned
    assert sorted(g.size for g in result.groups) == [4, 4, 4]


def tiled_conv(c=4):
    """Tile whose repeats come from Shape: 1 on batch and channels, the batch of another input on
    H: the channel axis is not repeated."""
    rng = np.random.default_rng(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[1, 1]),
        helper.make_node("Shape", ["c0"], ["s"]),
        helper.make_node("Slice", ["s", "zero1", "two1"], ["nc"]),
        helper.make_node("Div", ["nc", "nc"], ["ones"]),
        helper.make_node("Concat", ["ones", "two1", "one1"], ["reps"], axis=0),
        helper.make_node("Tile", ["c0", "reps"], ["t"]),
        helper.make_node("Conv", ["t", "w1"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [_rng_init(rng, "w0", [c, 3, 1, 1]), _rng_init(rng, "w1", [2, c, 1, 1]), _i64("zero1", [0]),
             _i64("one1", [1]), _i64("two1", [2])]
    return _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 4])], inits)


def test_tile_repeats_computed_from_shape_are_followed():
    result = _prove(tiled_conv())
    assert result.coverage == 1.0, result.pinned


@pytest.mark.parametrize("op", ["Tile", "Slice", "Pad"])
def test_shape_operands_that_are_not_integers_are_unknown_not_a_crash(op):
    """A float repeats/bounds/pads tensor (ONNX refuses the node; a library caller may still hand
    us the proto): the output shape is unknown, the walker pins what reads it, and nothing raises
    (a fuzz draw found Tile multiplying a symbolic dim by a Fraction)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])
    operands = {"Tile": ["f4"], "Slice": ["f1", "f1"], "Pad": ["f8"]}[op]
    inits = [numpy_helper.from_array(np.full(int(n[1:]), 1.5, np.float32), n) for n in set(operands)]
    inits.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32), "w"))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node(op, ["c", *operands], ["y"])]
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    view = GraphView(model)
    assert view.shapes.get("y") is None
    walk(model)


# ---- weights computed from stored ones by index maps (issue 15.2) -----------------------------------
def reordered_lstm(hidden=4, feat=3, extra_rows=0, direction="forward"):
    """An LSTM whose W/R/B are computed by Slice + Concat of stored tensors in another gate order
    (torch's i, f, g, o -> ONNX's i, o, f, c), as exporters write it; the hidden units feed a Gemm.
    extra_rows: the stored W has rows the LSTM never reads (the counter-case)."""
    rng = np.random.default_rng(5)
    dirs = 2 if direction == "bidirectional" else 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, feat])
    nodes, inits = [], []
    order = [0, 3, 1, 2]

    def reorder(stored, shape, chunks):
        inits.append(_rng_init(rng, stored, shape))
        size = (shape[1] - extra_rows * (stored == "w_t")) // chunks
        pieces = []
        for c in range(chunks):
            k = (c // 4) * 4 + order[c % 4]
            nodes.append(helper.make_node("Slice", [stored, f"{stored}_s{k}", f"{stored}_e{k}", "ax1"], [f"{stored}_{c}"]))
            inits.extend([_i64(f"{stored}_s{k}", [k * size]), _i64(f"{stored}_e{k}", [(k + 1) * size])])
            pieces.append(f"{stored}_{c}")
        nodes.append(helper.make_node("Concat", pieces, [stored + "_onnx"], axis=1))
        return stored + "_onnx"

    w = reorder("w_t", [dirs, 4 * hidden + extra_rows, feat], 4)
    r = reorder("r_t", [dirs, 4 * hidden, hidden], 4)
    b = reorder("b_t", [dirs, 8 * hidden], 8)
    inits.append(_i64("ax1", [1]))
    nodes += [
        helper.make_node("LSTM", ["x", w, r, b], ["y"], hidden_size=hidden, direction=direction),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "flat"], ["yf"]),
        helper.make_node("MatMul", ["yf", "wo"], ["out"]),
    ]
    inits += [_i64("flat", [5, 2, dirs * hidden]), _rng_init(rng, "wo", [dirs * hidden, 2])]
    return _model(nodes, [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 2, 2])], inits)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gates_reordered_by_slice_and_concat_move_the_stored_weights(direction):
    model = reordered_lstm(direction=direction)
    result = _prove(model)
    assert result.coverage == 1.0, result.pinned
    slotted = {s.weight for g in result.groups for s in g.slots}
    assert {"w_t", "r_t", "b_t", "wo"} <= slotted  # the stored tensors move, the computed ones follow


def test_a_weight_read_in_part_pins_with_its_reason():
    result = walk(reordered_lstm(extra_rows=2))
    assert result.permutable_channels == 0
    assert any("read in part" in p.reason for p in result.pinned), result.pinned


def test_a_weight_read_in_part_keeps_its_order_for_every_reader():
    """W is read whole by a Gemm (whose 18 units could move) and in part, rows 0..15, as an LSTM's
    W: the part pins, and W's rows keep their order for the Gemm too (permuting them would change
    what the LSTM reads)."""
    rng = np.random.default_rng(6)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])
    nodes = [
        helper.make_node("Slice", ["w", "s0", "s16", "ax0"], ["w16"]),
        helper.make_node("Unsqueeze", ["w16", "ax0"], ["w_lstm"]),
        helper.make_node("LSTM", ["x", "w_lstm", "r"], ["y"], hidden_size=4),
        helper.make_node("Gemm", ["x2", "w"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["gr"]),
        helper.make_node("Gemm", ["gr", "v"], ["out2"], transB=1),
    ]
    inits = [_rng_init(rng, "w", [18, 3]), _rng_init(rng, "r", [1, 16, 4]), _rng_init(rng, "v", [2, 18]),
             _i64("s0", [0]), _i64("s16", [16]), _i64("ax0", [0])]
    model = _model(nodes, [x, helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 2, 4]),
                    helper.make_tensor_value_info("out2", TensorProto.FLOAT, [2, 2])], inits)
    result = check_properties(model)
    assert not any(s.weight == "w" and s.axis == 0 for g in result.groups for s in g.slots)
    assert any("read in part" in p.reason for p in result.pinned), result.pinned
