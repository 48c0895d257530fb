"""Odd inputs that crashed the walker or were guessed at, each a small graph: what the walker cannot
read exactly is pinned (or refused in one line), never an exception and never a guess. Found by
fuzzing random graphs of any op at opsets 7..22 with weights of every dtype (the random_graph
family of tests/fuzz, HYPOTHESIS_PROFILE=explore); a few cases beside them guard the same rule.

The general rules these graphs broke:
* an integer operand (axes, split sizes, pads, Slice bounds, Gather indices, repeats) is a scalar or
  1-D integer tensor whose axes lie in [-rank, rank): any other value makes ONNX refuse the node, so
  the walker reads it as unknown (rules/base.py const_ints, norm_axes), never as a number it
  truncated, flattened or wrapped modulo the rank;
* a dim may be symbolic: a shape is multiplied out only when every dim is a number;
* ONNX's shape inference can disagree with ONNX Runtime (Unsqueeze-1 with a negative axis): a rule
  checks the output rank it is given against the one its op computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import api
from onnx_resync.errors import ResyncError
from onnx_resync.io import check_tensor_data
from onnx_resync.walk import walk

HIDDEN = 6


def _mlp_through(nodes, inits=(), opset=17, ir=8, x_shape=("N", 8)):
    """x -> MatMul W1 -> h -> `nodes` -> t -> MatMul W2 -> y: W1's channels flow through `nodes`."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, HIDDEN)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((HIDDEN, 3)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), *nodes, helper.make_node("MatMul", ["t", "W2"], ["y"])],
        "robust", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x_shape[0], 3])], [w1, w2, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _walk_unchecked(model):
    """What the API does with a ModelProto (no checker): only ResyncError may come out."""
    try:
        check_tensor_data(model)
        return walk(model)
    except ResyncError:
        return None


def _moved(result) -> set[str]:
    return {s.weight for g in result.groups for s in g.slots}


# (name, nodes between h and t, extra initializers, opset): each reads W1's channel axis (axis 1 of
# h, length 6) through an operand ONNX refuses or a form the walker cannot follow exactly
_MALFORMED = [
    ("split sizes 2-D", [helper.make_node("Split", ["h", "sz"], ["a", "b"], axis=1),
                         helper.make_node("Concat", ["a", "b"], ["t"], axis=1)], [_const("sz", [[3, 3]])], 17),
    ("split sizes float", [helper.make_node("Split", ["h", "sz"], ["a", "b"], axis=1),
                           helper.make_node("Concat", ["a", "b"], ["t"], axis=1)],
     [_const("sz", [3.0, 3.0], np.float32)], 17),
    ("split sizes past the axis", [helper.make_node("Split", ["h", "sz"], ["a", "b"], axis=1),
                                   helper.make_node("Concat", ["a", "b"], ["t"], axis=1)], [_const("sz", [4, 4])], 17),
    ("slice step 0", [helper.make_node("Slice", ["h", "s", "e", "ax", "st"], ["t"])],
     [_const("s", [0]), _const("e", [6]), _const("ax", [1]), _const("st", [0])], 17),
    ("slice bounds float", [helper.make_node("Slice", ["h", "s", "e", "ax"], ["t"])],
     [_const("s", [0.5], np.float32), _const("e", [6.0], np.float32), _const("ax", [1])], 17),
    ("slice bounds 2-D", [helper.make_node("Slice", ["h", "s", "e"], ["t"])],
     [_const("s", [[0, 0]]), _const("e", [[5, 6]])], 17),
    ("slice axis out of range", [helper.make_node("Slice", ["h", "s", "e", "ax"], ["t"])],
     [_const("s", [0]), _const("e", [6]), _const("ax", [5])], 17),
    ("slice of a scalar", [helper.make_node("Slice", ["sc", "s", "e", "ax"], ["u"]),
                           helper.make_node("Add", ["h", "u"], ["t"])],
     [_const("sc", 1.0, np.float32), _const("s", [0]), _const("e", [1]), _const("ax", [0])], 17),
    ("pad 2-D pads", [helper.make_node("Pad", ["h", "p"], ["t"])], [_const("p", [[0, 0], [0, 0]])], 17),
    ("pad axis out of range", [helper.make_node("Pad", ["h", "p", "", "ax"], ["t"])],
     [_const("p", [0, 1]), _const("ax", [7])], 18),
    ("pad axis out of range, scalar", [helper.make_node("Pad", ["sc", "p", "", "ax"], ["u"]),
                                       helper.make_node("Add", ["h", "u"], ["t"])],
     [_const("sc", 1.0, np.float32), _const("p", [0, 0]), _const("ax", [0])], 18),
    ("gather float indices", [helper.make_node("Gather", ["h", "i"], ["t"], axis=1)],
     [_const("i", [0, 1, 2, 3, 4, 5], np.float32)], 17),
    ("gather indices out of range", [helper.make_node("Gather", ["h", "i"], ["t"], axis=1)],
     [_const("i", [0, 1, 2, 3, 4, 9])], 17),
    ("tile repeats 2-D", [helper.make_node("Tile", ["h", "r"], ["t"])], [_const("r", [[1, 1]])], 17),
    ("reduce axes out of range", [helper.make_node("ReduceMean", ["h"], ["t"], axes=[5], keepdims=1)], [], 13),
    ("reduce axes float", [helper.make_node("ReduceSum", ["h", "ax"], ["t"], keepdims=1)],
     [_const("ax", [0.0], np.float32)], 17),
    ("squeeze axis out of range", [helper.make_node("Unsqueeze", ["h", "a0"], ["u"]),
                                   helper.make_node("Squeeze", ["u", "a9"], ["t"])],
     [_const("a0", [0]), _const("a9", [9])], 17),
    ("unsqueeze axes repeated", [helper.make_node("Unsqueeze", ["h", "a"], ["u"]),
                                 helper.make_node("Squeeze", ["u", "a"], ["t"])], [_const("a", [0, 0])], 17),
]


@pytest.mark.parametrize("name,nodes,inits,opset", _MALFORMED, ids=[c[0] for c in _MALFORMED])
def test_malformed_operands_pin_and_never_raise(name, nodes, inits, opset):
    result = _walk_unchecked(_mlp_through(nodes, inits, opset))
    if result is not None:  # walked: W1's channels met an operand it cannot read, so they stay put
        assert "W1" not in _moved(result), name


def test_unsqueeze1_negative_axis_follows_onnx_runtime():
    """Unsqueeze-1 (opset 8) with axes=[-1]: ONNX's inference gives the output h's rank 2 (the
    axis dropped), ONNX Runtime inserts it (rank 3). The walker indexed past its axis list; now the
    rank mismatch pins, and the file permutes and verifies with ONNX Runtime."""
    nodes = [helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Unsqueeze", ["r"], ["u"], axes=[-1]),
             helper.make_node("Squeeze", ["u"], ["t"], axes=[2])]
    model = _mlp_through(nodes, opset=8, ir=4)
    onnx.checker.check_model(model)
    result = walk(model)
    assert "W1" not in _moved(result)
    assert any("Unsqueeze" in p.reason for p in result.pinned)
    # the same Unsqueeze on a tensor of known rank 3 that ONNX and ORT agree on: followed
    ok = _mlp_through([helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Unsqueeze", ["r"], ["u"], axes=[0]),
                       helper.make_node("Squeeze", ["u"], ["t"], axes=[0])], opset=8, ir=4)
    assert "W1" in _moved(walk(ok))


def test_quantized_zero_point_of_symbolic_shape():
    """MatMulInteger whose B zero point is a graph input with a symbolic dim: its size is unknown,
    so the channels it could follow pin (np.prod of a dim name raised)."""
    nodes = [helper.make_node("MatMulInteger", ["xq", "Wq", "", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("xq", TensorProto.UINT8, ["N", 4]),
                                           helper.make_tensor_value_info("zp", TensorProto.UINT8, ["K"])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                              [numpy_helper.from_array(np.ones((4, 6), np.uint8), "Wq")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = _walk_unchecked(model)
    assert result is not None and "Wq" not in _moved(result)


def test_valid_split_is_still_followed():
    """The other way: the same Split with valid sizes keeps W1's channels movable, and the
    permuted file verifies with ONNX Runtime."""
    nodes = [helper.make_node("Split", ["h", "sz"], ["a", "b"], axis=1),
             helper.make_node("Concat", ["a", "b"], ["t"], axis=1)]
    model = _mlp_through(nodes, [_const("sz", [2, 4])])
    onnx.checker.check_model(model, full_check=True)
    assert "W1" in _moved(walk(model))  # valid sizes: followed, as before
    _, res = api.permute(model, seed=3)
    assert res.verified and res.groups_permuted >= 1


def _f32(name, shape):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


@pytest.mark.parametrize("opset", [13, 21])
def test_normalization_parameter_of_too_low_a_rank_pins(opset):
    """A BatchNorm variance or InstanceNorm scale given as a scalar (ONNX's inference does not check
    their shapes): the slot has no axis to index, so the channels pin (IndexError before)."""
    bn = [helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["t"])]
    result = _walk_unchecked(_mlp_through(bn, [_f32("s", [6]), _f32("b", [6]), _f32("m", [6]), _f32("v", [])], opset))
    assert result is not None and "W1" not in _moved(result)
    assert any("has no axis" in p.reason for p in result.pinned)
    inorm = [helper.make_node("Unsqueeze", ["h", "ax"], ["h3"]),
             helper.make_node("InstanceNormalization", ["h3", "s", "b"], ["t3"]),
             helper.make_node("Squeeze", ["t3", "ax"], ["t"])]
    result = _walk_unchecked(_mlp_through(inorm, [_const("ax", [2]), _f32("s", []), _f32("b", [6])], opset))
    assert result is not None and "W1" not in _moved(result)


def test_node_of_a_type_onnx_refuses_is_bad_input():
    """A Conv weight stored as int8 of rank 1 on an input of unknown shape: ONNX's shape inference
    accepts the node unless asked to check types (check_model does), so the rule's exception read
    as a bug (exit 5); now ONNX's type check names the node (exit 3, one line)."""
    nodes = [helper.make_node("ReduceLogSum", ["h", "h"], ["u"], keepdims=0),  # no shape: no rule
             helper.make_node("Conv", ["u", "Wc"], ["t"], group=2)]
    model = _mlp_through(nodes, [_const("Wc", [1, 1], np.int8)], 21, ir=10)
    with pytest.raises(ResyncError, match="unsupported type"):
        walk(model)


@pytest.mark.parametrize("bounds", [([[0]], [[6]], [1]), ([0.0], [6.0], [1]), ([0], [6], [7])],
                         ids=["2-D", "float", "axis out of range"])
def test_weight_view_slice_with_bounds_onnx_refuses(bounds):
    """A weight read through a Slice whose bounds ONNX refuses: the view's positions are unknown
    (graph.GraphView._selected took int() of a 2-D array: TypeError)."""
    s, e, ax = bounds
    dtype = np.float32 if isinstance(s[0], float) else np.int64
    nodes = [helper.make_node("Slice", ["Wb", "s", "e", "ax"], ["Ws"]), helper.make_node("MatMul", ["h", "Ws"], ["t"])]
    result = _walk_unchecked(_mlp_through(nodes, [_f32("Wb", [6, 12]), _const("s", s, dtype), _const("e", e, dtype),
                                                  _const("ax", ax)]))
    assert result is None or "Wb" not in _moved(result)


def test_quantize_scale_of_symbolic_length_pins():
    """QuantizeLinear whose scale is a graph input of symbolic length K: it may be per channel, so
    the channels it scales pin (comparing the dim name with 1 raised TypeError)."""
    nodes = [helper.make_node("QuantizeLinear", ["h", "sc"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "sc"], ["t"], axis=1)]
    model = _mlp_through(nodes)
    model.graph.input.append(helper.make_tensor_value_info("sc", TensorProto.FLOAT, ["K"]))
    result = _walk_unchecked(model)
    assert result is not None and "W1" not in _moved(result)


def test_sparse_initializer_with_external_values(tmp_path, monkeypatch):
    """A sparse initializer whose values are external data (valid: the checker and ONNX Runtime
    take the file by path). The loader did not count sparse values among the tensors that may be
    external, so it left their location relative to the current folder and called the file
    invalid; now they are read from the model's folder and every command runs."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((HIDDEN, 3)).astype(np.float32)
    dense[np.abs(dense) < 0.5] = 0
    flat = dense.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[idx], "W2")
    raw = values.raw_data
    values.ClearField("raw_data")
    values.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "sparse.bin"), ("offset", "0"), ("length", str(len(raw)))):
        values.external_data.add(key=key, value=value)
    model = _mlp_through([helper.make_node("Relu", ["h"], ["t"])])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W2"))
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, numpy_helper.from_array(idx, "W2_idx"), list(dense.shape)))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sparse.bin").write_bytes(raw)
    onnx.save(model, folder / "m.onnx")
    monkeypatch.chdir(tmp_path)  # not the model's folder
    onnx.checker.check_model(str(folder / "m.onnx"))
    api.groups(folder / "m.onnx")
    _, res = api.permute(folder / "m.onnx", tmp_path / "p.onnx", seed=1)
    assert res.verified


# ---- odd but valid files real users have: permuted, verified by ONNX Runtime, undone exactly -------
def _cnn(opset: int, ir: int, inits_as_inputs: bool = False, empty_bias: bool = False):
    """Conv -> BatchNorm -> Relu -> Conv -> GAP -> Gemm, 4 hidden channels."""
    rng = np.random.default_rng(1)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [w("C1", 4, 3, 3, 3), w("cb1", 4), w("g", 4), w("be", 4), w("mu", 4),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "var"), w("C2", 5, 4, 1, 1),
             w("W", 2, 5), w("b", 2)]
    nodes = [helper.make_node("Conv", ["x", "C1", "cb1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "C2", ""] if empty_bias else ["r1", "C2"], ["c2"]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])]
    if inits_as_inputs:  # IR 3: every initializer is also a graph input (opset < 9 exporters)
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    model = helper.make_model(helper.make_graph(nodes, "cnn", inputs, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, 2])], inits), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _fp16_mlp():
    model = _mlp_through([helper.make_node("Relu", ["h"], ["t"])])
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


_VALID = {  # name: (build, moves): `moves` False where the file's interface pins every channel
    "opset 7, initializers as inputs": (lambda: _cnn(7, 3, inits_as_inputs=True), False),  # a caller may feed them
    "opset 22": (lambda: _cnn(22, 10), True),
    "empty optional bias": (lambda: _cnn(17, 8, empty_bias=True), True),
    "fp16 graph": (_fp16_mlp, True),
    "zero-size initializer": (lambda: _mlp_through([helper.make_node("Concat", ["h", "e"], ["t"], axis=0)],
                                                   [_f32("e", [0, HIDDEN])]), False),
}


@pytest.mark.parametrize("build,moves", list(_VALID.values()), ids=list(_VALID))
def test_odd_valid_files_permute_verify_and_undo(build, moves):
    model = build()
    onnx.checker.check_model(model, full_check=True)
    permuted, result = api.permute(model, seed=5)
    assert result.verified and (result.groups_permuted > 0) == moves
    restored, _ = api.permute(permuted, undo=result.record, check=False)
    assert restored.SerializeToString() == model.SerializeToString()


def test_layers_inside_local_functions_are_counted_not_nothing_to_permute(tmp_path):
    """x -> Dense(W1, b1) -> Relu -> Dense(W2, b2), Dense a model-local FunctionProto (MatMul + Add):
    the functions are not expanded, so their channels pin with that reason; before, the file read
    as '0/0 hidden channels (nothing to permute)'."""
    rng = np.random.default_rng(0)
    dense = helper.make_function("local", "Dense", ["x", "W", "b"], ["y"],
                                 [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                                 [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Dense", ["x", "W1", "b1"], ["h1"], domain="local"), helper.make_node("Relu", ["h1"], ["r"]),
             helper.make_node("Dense", ["r", "W2", "b2"], ["y"], domain="local")]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (8, 16)), ("b1", (16,)), ("W2", (16, 4)), ("b2", (4,)))]
    graph = helper.make_graph(nodes, "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, functions=[dense], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    result = walk(model)
    assert result.hidden_channels > 0 and result.coverage == 0.0
    assert any("local function" in p.reason and "Dense" in p.reason for p in result.pinned), result.pinned
