"""A Reshape that keeps a bidirectional layer's direction and unit axes whole moves its stacked label.

onnxslim writes PyTorch's Transpose of Y ([seq, 2, batch, hidden] -> [seq, batch, 2, hidden]) as a
Reshape when batch is 1 (only a size-1 axis moves), then the Reshape merging (2, hidden). The
arithmetic of the first Reshape keeps the direction axis and the unit axis as axes of their own, so
each direction stays its own group (ddddocr_common's onnxslim copy: the two directions were one tied
group). A Reshape that really mixes the direction axis with another (2 x hidden -> hidden x 2) still
ties them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from test_walk_properties import check_properties

SEQ, IN, HIDDEN, OUT = 3, 4, 5, 3


def model_with(middle: list[int]) -> onnx.ModelProto:
    """x [SEQ, 1, IN] -> bidirectional LSTM -> Y [SEQ, 2, 1, HIDDEN] -> Reshape `middle` ->
    Reshape [SEQ, 1, 2 * HIDDEN] -> MatMul -> [SEQ, 1, OUT]."""
    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def shape(name, dims):
        return numpy_helper.from_array(np.array(dims, dtype=np.int64), name)

    nodes = [
        helper.make_node("LSTM", ["x", "rnn_w", "rnn_r", "rnn_b"], ["y"], direction="bidirectional",
                         hidden_size=HIDDEN),
        helper.make_node("Reshape", ["y", "middle"], ["y_moved"]),
        helper.make_node("Reshape", ["y_moved", "merged"], ["y_flat"]),
        helper.make_node("MatMul", ["y_flat", "head"], ["out"]),
    ]
    inits = [init("rnn_w", [2, 4 * HIDDEN, IN]), init("rnn_r", [2, 4 * HIDDEN, HIDDEN]),
             init("rnn_b", [2, 8 * HIDDEN]), init("head", [2 * HIDDEN, OUT]),
             shape("middle", middle), shape("merged", [SEQ, 1, 2 * HIDDEN])]
    graph = helper.make_graph(nodes, "slim", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, 1, IN])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [SEQ, 1, OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def unit_groups(result) -> dict:
    """direction (or 'both') -> sizes of the groups slotted in the LSTM's W rows."""
    out: dict = {}
    for g in result.groups:
        rows = {s.at[1] if s.at else "both" for s in g.slots if s.weight == "rnn_w" and s.axis == 1}
        if rows:
            out.setdefault(rows.pop() if len(rows) == 1 else "both", []).append(g.size)
    return out


def test_reshape_moving_a_size1_axis_keeps_the_directions_apart():
    # onnxslim's Reshape for Transpose(perm=[0, 2, 1, 3]) of a batch of 1
    result = check_properties(model_with([SEQ, 1, 2, HIDDEN]), full_coverage=True)
    assert unit_groups(result) == {0: [HIDDEN], 1: [HIDDEN]}


def test_reshape_mixing_the_direction_axis_ties_them():
    # (2, HIDDEN) read as (HIDDEN, 2): a unit's two directions are no longer one axis apart
    result = check_properties(model_with([SEQ, 1, HIDDEN, 2]))
    assert set(unit_groups(result)) <= {"both"}  # tied into one group, or pinned
