"""Real Loop/Scan/If exports (tests/loop_exports.py: torch.jit.script through torch.onnx's TorchScript
exporter, torch's scan through its dynamo exporter): the walker follows their bodies (issue 15.4).

Each: coverage as measured, permute + ONNX Runtime equivalent at several trip counts (T = 1, 2, 3, 5:
the state is read back from T = 2 on, and the nested model's inner loops and If branches all run),
undo byte-exact, api.resync restores every weight's bytes. Before this pass (7983dd2's parent), a
state starting as zeros pinned the body's channels and nested bodies were not followed; the figures
(permutable / inner channels) are in each test's docstring.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_resync import api
from onnx_resync.io import load_model
from onnx_resync.io.store import WeightStore
from onnx_resync.walk import walk

torch = pytest.importorskip("torch")  # these models are exported here: the whole file needs torch

import loop_exports  # noqa: E402

TRIPS = (1, 2, 3, 5)


def _load(name: str) -> onnx.ModelProto:
    try:
        path = loop_exports.export_path(name)
    except Exception as exc:  # noqa: BLE001 - an exporter this torch cannot run
        pytest.skip(f"{name}: torch.onnx cannot export it here: {type(exc).__name__}: {exc}")
    return load_model(path)


def _run(model: onnx.ModelProto, trips: int) -> list[np.ndarray]:
    x = np.random.default_rng(trips).standard_normal((trips, 2, loop_exports.FEAT)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def prove(name: str):
    """Walk, permute every group (api, its own ORT check at T = 4), compare with ORT at every T of
    TRIPS, undo byte-exact, resync restores the bytes; returns the walk."""
    model = _load(name)
    result = walk(model)
    assert result.groups, result.pinned
    permuted, info = api.permute(model, seed=3, verify_options={"shapes": {"x": [4, 2, loop_exports.FEAT]}})
    assert info.verified and info.neurons_moved > 0
    for trips in TRIPS:
        for ref, got in zip(_run(model, trips), _run(permuted, trips)):
            assert np.max(np.abs(ref - got)) <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), trips
    undone, _ = api.permute(permuted, undo=info.record, check=False)
    assert undone.SerializeToString() == model.SerializeToString()
    restored, report = api.resync(permuted, model, verify_options={"shapes": {"x": [4, 2, loop_exports.FEAT]}})
    a, b = WeightStore(model), WeightStore(restored)
    assert all(a.get(n).tobytes() == b.get(n).tobytes() for n in a.names()), report.verdict
    return result


def test_torchscript_lstm_cell_loop():
    """An LSTM node inside the Loop body, its state zeros from ConstantOfShape: 4/10 -> 10/10 (the
    LSTM's 6 units pinned 'LSTM initial state from an unlabelled tensor')."""
    result = prove("torchscript_lstm_cell_loop")
    assert result.coverage == 1.0 and result.permutable_channels == 10, result.pinned
    (units,) = [g for g in result.groups if g.size == loop_exports.HIDDEN]
    assert {"cell.weight_ih", "cell.weight_hh", "head.weight"} <= {s.weight for s in units.slots}


def test_torchscript_lstm_hand_loop():
    """Gemm + MatMul cut into 4 gates by Slices at bounds computed from Shape inside the body; the
    zero state carried: 4/52 -> 52/52 (48 pinned: 'Mul mixes channels with an unlabelled tensor c')."""
    result = prove("torchscript_lstm_hand_loop")
    assert result.coverage == 1.0 and result.permutable_channels == 4 + 24 + 24, result.pinned


def test_torchscript_nested_loop_if():
    """Loop > Loop > If: 0/18 -> 18/18 (the inner Loop's output had no shape: 'Add with unknown ranks';
    before that, nested bodies were not followed)."""
    result = prove("torchscript_nested_loop_if")
    assert result.coverage == 1.0 and result.permutable_channels == 18, result.pinned


def test_torchscript_loop_in_if():
    """If > Loop: 12/12 before and after (the Loop's state is a producer's output)."""
    result = prove("torchscript_loop_in_if")
    assert result.coverage == 1.0 and result.permutable_channels == 12, result.pinned


def test_dynamo_scan_rnn():
    """torch's scan through the dynamo exporter (a Scan node, its zero initial state a stored tensor):
    0/12 -> 12/12 (was 'the carried state of Scan ... does not line up')."""
    result = prove("dynamo_scan_rnn")
    assert result.coverage == 1.0 and result.permutable_channels == 12, result.pinned


def test_torchscript_list_loop():
    """Outputs collected in a list (SequenceEmpty carried by the Loop, SequenceInsert in the body,
    ConcatFromSequence after): the empty list takes the layout its body inserts, 4/40 -> 40/40 (was
    'Mul mixes channels with an unlabelled tensor', then 'consumed by SequenceInsert (no rule)')."""
    result = prove("torchscript_gru_list_loop")
    assert result.coverage == 1.0 and result.permutable_channels == 40, result.pinned


@pytest.mark.parametrize("name", ["torchscript_lstm_cell_loop", "dynamo_scan_rnn"])
def test_the_check_runs_the_loop_more_than_once(name):
    """The input plan gives a Loop's trip count (x.shape[0] through Shape -> Gather) or a Scan's scan
    axis 4 steps, not a batch of 1 (inputs.py is_trip_count): a recurrent weight scrambled on its
    state axis is harmless at one step (the state starts at zero) and caught at four. Before: T = 1,
    and this scrambled file verified 'equivalent'."""
    from onnx_resync.verify import verify

    model = _load(name)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    state_weight = {"torchscript_lstm_cell_loop": "cell.weight_hh", "dynamo_scan_rnn": "wh.weight"}[name]
    for t in broken.graph.initializer:
        if t.name == state_weight:
            value = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(value[:, ::-1]), t.name))
    assert verify(model, broken).verdict == "not equivalent"
    # one step (what the plan gave before) cannot see it
    assert verify(model, broken, shapes={"x": [1, 2, loop_exports.FEAT]}).verdict == "equivalent"
