"""A weight that differs from the reference only by the order of its rows, where no neuron group was
matched, is "permuted", never "not derived" (audit/unreached.py; silero_vad_op18_ifless saved by
ONNX Runtime with FusedConv left in its branches: no group matched, its STFT basis in another row
order, 'not derived' on a permuted copy). Rows that share one sorted profile (silero's STFT basis
nearly; here a circulant, each row a shift of one window) are told apart by their values in place
(subgraphs._distance). Counter-case: the basis redrawn is not derived.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit import audit
from onnx_resync.audit.subgraphs import STORAGE_BOUND, SubgraphWeight, _distance

K, N = 8, 16  # frequencies, window


def _basis() -> np.ndarray:
    v = np.random.default_rng(0).normal(size=N)
    return np.asarray([np.roll(v, k) for k in range(2 * K)], np.float32)[:, None, :]  # [2K, 1, N]


def _model(basis: np.ndarray) -> onnx.ModelProto:
    """x [1, 1, 64] -> Conv(basis) -> Reshape to one row: the reshape merges the channels with the
    frames, so no neuron group reaches the basis's rows."""
    nodes = [helper.make_node("Conv", ["x", "basis"], ["c"], strides=[N // 2]),
             helper.make_node("Reshape", ["c", "shape"], ["y"])]
    frames = (64 - N) // (N // 2) + 1
    graph = helper.make_graph(nodes, "stft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * K * frames])],
                              [numpy_helper.from_array(basis, "basis"),
                               numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_rows_of_one_sorted_profile_in_another_order_are_matched_in_place():
    basis = _basis()[:, 0, :]
    moved = basis[np.random.default_rng(1).permutation(2 * K)]
    d, matched, _ = _distance(SubgraphWeight((), "basis", TensorProto.FLOAT, basis),
                              SubgraphWeight((), "basis", TensorProto.FLOAT, moved))
    assert matched and d <= 1.0, d
    rel, floor = STORAGE_BOUND[TensorProto.FLOAT]
    assert np.abs(moved - basis).max() > rel + floor  # it did differ as stored


def test_rows_reordered_where_no_group_reaches_are_permuted_not_unrelated():
    ref = _model(_basis())
    report = audit(_model(_basis()[np.random.default_rng(2).permutation(2 * K)]), ref)
    assert report.derived and report.verdict == "permuted", report.summary
    assert "1 weight in another order" in report.summary and "0 of 0" not in report.summary, report.summary
    redrawn = np.random.default_rng(3).normal(size=_basis().shape).astype(np.float32)
    report = audit(_model(redrawn), ref)
    assert not report.derived and report.verdict == "not derived", report.summary
