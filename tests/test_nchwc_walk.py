"""The walker on ONNX Runtime's NCHWc saves (walk/rules/nchwc.py, walk/layouts.py): groups found in the
file as saved, its blocked filters permuted through their layout, and `audit -o` restoring it.

The file is ONNX Runtime's own "all"-level save of a small conv net whose channel counts are not a
multiple of the block (12, 20, 10: padded to 16, 32 or 24 with blocks of 8, 16 with blocks of 16),
with a depthwise conv, a residual Add (the Sum input of an nchwc Conv), a MaxPool and a
GlobalAveragePool: nchwc Convs with filters stored OIHWBo and OIHWBiBo, ReorderInput/ReorderOutput.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import api
from onnx_resync.walk import walk
from onnx_resync.walk.layouts import NCHWC, Blocked, machine_block_size
from onnx_resync.walk.rules.nchwc import PADDING
from test_walk_properties import check_properties

pytestmark = pytest.mark.skipif(machine_block_size() is None, reason="this ONNX Runtime writes no NCHWc")


def _net() -> onnx.ModelProto:
    rng = np.random.default_rng(5)

    def w(name, *shape):
        return numpy_helper.from_array((rng.normal(size=shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "wd", "bd"], ["d0"], pads=[1, 1, 1, 1], group=12),
        helper.make_node("Relu", ["d0"], ["r1"]),
        helper.make_node("Conv", ["r1", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r2"]),
        helper.make_node("Conv", ["r2", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r2"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [w("w0", 12, 3, 3, 3), w("b0", 12), w("wd", 12, 1, 3, 3), w("bd", 12), w("w1", 20, 12, 1, 1),
             w("b1", 20), w("w2", 20, 20, 3, 3), w("b2", 20), w("w3", 10, 20, 1, 1), w("b3", 10), w("wf", 4, 10),
             w("bf", 4)]
    graph = helper.make_graph(nodes, "nchwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _saved_all_level(src, path) -> onnx.ModelProto:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(src if isinstance(src, str) else src.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def test_blocked_layout_round_trips():
    for block, inner in ((8, True), (8, False), (16, True), (4, False)):
        a = np.arange(2 * block * (2 * block if inner else 3) * 9, dtype=np.float32).reshape(
            2 * block, 2 * block if inner else 3, 3, 3)
        layout = Blocked(block, inner)
        np.testing.assert_array_equal(layout.logical(layout.stored(a)), a)
        assert not np.array_equal(layout.stored(a), a)


def test_walk_finds_the_real_channels_of_an_nchwc_save(tmp_path):
    saved = _saved_all_level(_net(), tmp_path / "all.onnx")
    assert sum(n.domain == NCHWC and n.op_type == "Conv" for n in saved.graph.node) >= 4
    result = check_properties(saved)  # permute, verify with ONNX Runtime, undo to the same bytes
    # real channels only: conv0 with its depthwise conv, the residual stream, the last conv
    assert sorted(g.size for g in result.groups) == [10, 12, 20]
    assert result.layouts and all(w in result.layouts for g in result.groups for s in g.slots
                                  for w in [s.weight] if s.axis in (0, 1) and len(s.positions) and
                                  any(t.name == w and len(t.dims) == 4 for t in saved.graph.initializer))
    assert any(p.reason == PADDING for p in result.pinned)  # padded to a multiple of the block: kept in place


def test_audit_restores_an_nchwc_save(tmp_path):
    reference = tmp_path / "ref.onnx"
    onnx.save(_net(), reference)
    api.permute(str(reference), str(tmp_path / "perm.onnx"), seed=3)
    suspect = tmp_path / "perm_all.onnx"
    _saved_all_level(str(tmp_path / "perm.onnx"), suspect)
    out = tmp_path / "restored.onnx"
    report = api.audit(str(suspect), str(reference), output=str(out))
    r = report.restored
    assert report.derived and r["written"] and r["verified"], r
    assert r["restored"] == r["groups"] == 3, r["not_restored"]
    # the restored file is ONNX Runtime's save of the unpermuted reference, value for value
    expected = _saved_all_level(str(reference), tmp_path / "ref_all.onnx")
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in expected.graph.initializer}
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_resync_matches_the_logical_filters(tmp_path):
    """resync of a permuted NCHWc save against the save itself: the matcher reads each blocked filter
    as its plain OIHW array (walk/layouts.LogicalStore), so the permutation comes back exactly (read
    as stored, rows of a blocked filter are not neurons: 'not derived' before)."""
    from onnx_resync.resync import resync

    saved = _saved_all_level(_net(), tmp_path / "all.onnx")
    onnx.save(saved, tmp_path / "all_again.onnx")
    api.permute(str(tmp_path / "all_again.onnx"), str(tmp_path / "all_perm.onnx"), seed=4)
    restored, report = resync(onnx.load(str(tmp_path / "all_perm.onnx")), saved)
    assert report.derived and report.verified, report.verdict
    got = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    for t in saved.graph.initializer:
        np.testing.assert_array_equal(got[t.name], numpy_helper.to_array(t), err_msg=t.name)


def test_reduce_does_not_edit_widths_of_blocked_filters(tmp_path):
    """A width edit of a group whose slots lie in a blocked filter cannot be written (a blocked filter
    holds whole blocks): reduce leaves such groups alone (its candidates were refused by ONNX Runtime
    one by one before)."""
    from onnx_resync.reduce.widths import editable

    result = walk(_saved_all_level(_net(), tmp_path / "all.onnx"))
    blocked = [g for g in result.groups if any(s.weight in result.layouts for s in g.slots)]
    assert blocked and not any(editable(g, result.layouts) for g in blocked)
