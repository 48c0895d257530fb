"""Unrolled recurrent cells (issue 15, items 3): an LSTM/GRU written as Gemm + Split cells over time
steps with one shared recurrent weight (what torch.onnx writes for LSTMCell/GRUCell loops, CRNN
exports). The gate chunks of one Gemm meet in Mul/Add: the layer's channels are a (gate x unit) grid
and units move the same way inside every gate block (rules/selection.py). The first cell multiplies
an all-zero initial state by the shared recurrent weight: that reads nothing (rules/base.py
zero_product), so the weight's input axis stays free.

Each model: permute + verify with ONNX Runtime, undo byte-exact (test_walk_properties), api.permute
with a record then undo, api.resync recovers the permutation exactly.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_walk_properties import check_properties
from onnx_resync import api
from onnx_resync.walk import walk

HIDDEN, FEAT, STEPS, BATCH = 6, 5, 3, 2


def assert_round_trips(model: onnx.ModelProto, full_coverage: bool = True):
    """Permute + ORT, undo exact (check_properties); api.permute/undo and api.resync exact."""
    result = check_properties(model, full_coverage=full_coverage)
    assert result.groups
    permuted, done = api.permute(model, seed=3)
    assert done.verified and done.neurons_moved > 0
    undone, _ = api.permute(permuted, undo=done.record, check=False)
    assert undone.SerializeToString() == model.SerializeToString()
    restored, report = api.resync(permuted, model)
    assert restored.SerializeToString() == model.SerializeToString(), report.verdict
    return result


# ---- by hand: onnx.helper ------------------------------------------------------------------------
def lstm_cells(zero_state: str = "constant", steps: int = STEPS, gates: int = 4) -> onnx.ModelProto:
    """x [B, T, F] -> T LSTM cells (Gemm x W^T + Gemm h R^T + b, Split in 4, i*g + f*c, o*tanh(c))
    -> Gemm head. zero_state: how h0/c0 are written: 'constant', 'constant_of_shape', 'expand'."""
    rng = np.random.default_rng(0)
    h = HIDDEN
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, [4 * h, FEAT], rng.normal(size=4 * h * FEAT)),
        helper.make_tensor("R", TensorProto.FLOAT, [4 * h, h], rng.normal(size=4 * h * h)),
        helper.make_tensor("B", TensorProto.FLOAT, [4 * h], rng.normal(size=4 * h)),
        helper.make_tensor("head_w", TensorProto.FLOAT, [3, h], rng.normal(size=3 * h)),
        helper.make_tensor("split", TensorProto.INT64, [4], [h] * 4),
    ]
    nodes = []
    if zero_state == "constant":
        inits.append(helper.make_tensor("zeros", TensorProto.FLOAT, [BATCH, h], np.zeros(BATCH * h)))
        state = "zeros"
    elif zero_state == "constant_of_shape":
        inits.append(helper.make_tensor("zshape", TensorProto.INT64, [2], [BATCH, h]))
        nodes.append(helper.make_node("ConstantOfShape", ["zshape"], ["zeros"]))
        state = "zeros"
    else:  # a zero scalar expanded to the state's shape
        inits += [helper.make_tensor("zero", TensorProto.FLOAT, [1, 1], [0.0]),
                  helper.make_tensor("zshape", TensorProto.INT64, [2], [BATCH, h])]
        nodes.append(helper.make_node("Expand", ["zero", "zshape"], ["zeros"]))
        state = "zeros"
    hs, cs = state, state
    for t in range(steps):
        inits.append(helper.make_tensor(f"t{t}", TensorProto.INT64, [], [t]))
        p = f"s{t}_"
        nodes += [
            helper.make_node("Gather", ["x", f"t{t}"], [p + "x"], axis=1),
            helper.make_node("Gemm", [p + "x", "W", "B"], [p + "gx"], transB=1),
            helper.make_node("Gemm", [hs, "R"], [p + "gh"], transB=1),
            helper.make_node("Add", [p + "gx", p + "gh"], [p + "gates"]),
            helper.make_node("Split", [p + "gates", "split"], [p + c for c in "ifgo"], axis=1),
            helper.make_node("Sigmoid", [p + "i"], [p + "si"]),
            helper.make_node("Sigmoid", [p + "f"], [p + "sf"]),
            helper.make_node("Tanh", [p + "g"], [p + "tg"]) if gates == 4 else
            helper.make_node("Tanh", [p + "o"], [p + "tg"]),
            helper.make_node("Sigmoid", [p + "o"], [p + "so"]),
            helper.make_node("Mul", [p + "sf", cs], [p + "fc"]),
            helper.make_node("Mul", [p + "si", p + "tg"], [p + "ig"]),
            helper.make_node("Add", [p + "fc", p + "ig"], [p + "c"]),
            helper.make_node("Tanh", [p + "c"], [p + "tc"]),
            helper.make_node("Mul", [p + "so", p + "tc"], [p + "h"]),
        ]
        hs, cs = p + "h", p + "c"
    nodes.append(helper.make_node("Gemm", [hs, "head_w"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "lstm_cells", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [BATCH, steps, FEAT])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("zero_state", ["constant", "constant_of_shape", "expand"])
def test_hand_built_lstm_cells_move_units_inside_every_gate(zero_state):
    model = lstm_cells(zero_state)
    result = assert_round_trips(model)
    (g,) = result.groups
    assert g.size == HIDDEN
    # one unit: its row in each of the four gate blocks of W, R and B, and its column of R
    slots = {(s.weight, s.axis): s.positions for s in g.slots}
    for name in ("W", "R", "B"):
        assert sorted(slots[(name, 0)][0].tolist()) == [0, HIDDEN, 2 * HIDDEN, 3 * HIDDEN]
    assert slots[("R", 1)].shape == (HIDDEN, 1) and slots[("head_w", 1)].shape == (HIDDEN, 1)
    assert result.coverage == 1.0


def test_a_nonzero_initial_state_fixes_the_recurrent_weight():
    """Counter-case: a constant state of 0.5 everywhere is uniform, but Gemm(state, R) reads R's rows
    summed: its output still carries the shared weight's channel order -> the rows stay put there."""
    model = lstm_cells("constant")
    (z,) = [t for t in model.graph.initializer if t.name == "zeros"]
    z.CopyFrom(helper.make_tensor("zeros", TensorProto.FLOAT, [BATCH, HIDDEN], np.full(BATCH * HIDDEN, 0.5)))
    result = check_properties(model, full_coverage=False)
    assert result.coverage < 1.0
    assert not any(("R", 1) in {(s.weight, s.axis) for s in g.slots} for g in result.groups)


def test_a_cross_chunk_op_still_pins():
    """Counter-case: chunk g is read where chunk o belongs (Tanh(o) * i): still a grid, exact; but a
    Mul of chunk i with the *reversed* chunk g (a cross-chunk shuffle) pins with a reason."""
    model = lstm_cells("constant", steps=1)
    rev = helper.make_tensor("rev", TensorProto.INT64, [HIDDEN], list(range(HIDDEN - 1, -1, -1)))
    model.graph.initializer.append(rev)
    for node in model.graph.node:
        if node.op_type == "Tanh" and node.input[0] == "s0_g":
            node.input[0] = "s0_grev"
    model.graph.node.insert(len(model.graph.node) - 1,
                            helper.make_node("Gather", ["s0_g", "rev"], ["s0_grev"], axis=1))
    model = _sorted(model)
    onnx.checker.check_model(model)
    result = check_properties(model, full_coverage=False)
    assert result.coverage < 1.0
    assert any(p.reason == "tied to another channel of the same layer" for p in result.pinned), result.pinned


def _sorted(model):
    from onnx_resync.io.order import sort_nodes

    sort_nodes(model.graph)
    return model


def test_an_unequal_split_still_pins():
    """Counter-case: gates cut 6/6/4/8 cannot be a grid: the chunks that meet pin, with a reason."""
    model = lstm_cells("constant", steps=1)
    (s,) = [t for t in model.graph.initializer if t.name == "split"]
    s.CopyFrom(helper.make_tensor("split", TensorProto.INT64, [4], [HIDDEN, HIDDEN, HIDDEN - 2, HIDDEN + 2]))
    # i*g and o*tanh(c) now multiply chunks of different sizes: make them line up again
    for node in model.graph.node:
        if node.op_type == "Mul" and node.input[0] == "s0_si":
            node.input[1] = "s0_f"  # i * f: equal sizes, tied across chunks of an unequal split
        if node.op_type == "Mul" and node.input[0] == "s0_so":
            node.input[0] = "s0_sf"
    result = walk(model)
    assert result.permutable_channels < result.hidden_channels - result.output_channels
    assert any(p.reason == "tied to another channel of the same layer" for p in result.pinned), result.pinned


# ---- torch: LSTMCell / GRUCell loops ----------------------------------------------------------------
try:
    import torch
except ImportError:  # torch is a test-only extra (`train`); the tests above need none
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch (the train extra) makes these exports")
_Module = torch.nn.Module if torch is not None else object  # the classes below are made only with torch


class CellLoop(_Module):
    def __init__(self, cell):
        super().__init__()
        self.kind = cell
        self.cell = cell(FEAT, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], HIDDEN)
        c = torch.zeros(x.shape[0], HIDDEN)
        for t in range(STEPS):
            if self.kind is torch.nn.LSTMCell:
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


def export_module(module, args: tuple, dynamo: bool) -> onnx.ModelProto:
    """torch.onnx in memory: TorchScript (opset 17) or dynamo; skips where this torch cannot export."""
    module = module.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                return torch.onnx.export(module, args, dynamo=True, verbose=False).model_proto
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=17)
    except Exception as exc:  # noqa: BLE001 - an exporter this torch cannot run
        pytest.skip(f"torch.onnx (dynamo={dynamo}) cannot export: {type(exc).__name__}")
    return onnx.load_from_string(buf.getvalue())


def export(module, dynamo: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_module(module, (torch.randn(BATCH, STEPS, FEAT),), dynamo)


@needs_torch
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_lstm_cell_loop(dynamo):
    torch.manual_seed(0)
    model = export(CellLoop(torch.nn.LSTMCell), dynamo)
    result = assert_round_trips(model)
    (g,) = result.groups
    assert g.size == HIDDEN
    assert result.permutable_channels == result.hidden_channels - result.output_channels  # was 0


@needs_torch
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_gru_cell_loop(dynamo):
    """TorchScript keeps the first cell's Gemm(zeros, R, b) (its bias, cut into gates); dynamo folds it
    into a stored [batch, 3H] constant that a Split cuts: both become grid slots."""
    torch.manual_seed(0)
    model = export(CellLoop(torch.nn.GRUCell), dynamo)
    result = assert_round_trips(model)
    (g,) = result.groups
    assert g.size == HIDDEN


class CRNN(_Module):
    """A text recognizer's shape: conv stack -> one feature column per time step -> an LSTM unrolled
    over the columns (torch.nn.LSTMCell, or written by hand with Linear + chunk(4)) -> a classifier
    on every step, stacked."""

    def __init__(self, hand: bool):
        super().__init__()
        self.cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                       torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d((1, None)))
        self.hand = hand
        self.cell = torch.nn.LSTMCell(12, 10)
        self.ih, self.hh = torch.nn.Linear(12, 40), torch.nn.Linear(10, 40)
        self.fc = torch.nn.Linear(10, 7)

    def forward(self, x):
        f = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [T, B, C]
        h = torch.zeros(f.shape[1], 10)
        c = torch.zeros(f.shape[1], 10)
        outs = []
        for t in range(f.shape[0]):
            if self.hand:
                i, fg, g, o = (self.ih(f[t]) + self.hh(h)).chunk(4, 1)
                c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                h, c = self.cell(f[t], (h, c))
            outs.append(self.fc(h))
        return torch.stack(outs, 0).log_softmax(2)


@needs_torch
@pytest.mark.parametrize("hand", [False, True], ids=["lstm_cell", "chunked_by_hand"])
def test_crnn_with_an_unrolled_lstm(hand):
    """20 of 620 channels moved before (the convs' first layers); now all of them."""
    torch.manual_seed(0)
    model = export_module(CRNN(hand), (torch.randn(1, 1, 8, 16),), dynamo=False)
    result = assert_round_trips(model)
    assert result.permutable_channels == 620 == result.hidden_channels - result.output_channels
    assert sorted(g.size for g in result.groups) == [8, 10, 12]
