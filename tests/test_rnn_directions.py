"""Bidirectional recurrent layers: each direction is its own group (issue #5).

Small ONNX graphs with a bidirectional LSTM, GRU or RNN, read the ways exporters read them. For
each: the walker puts the forward and the backward units in separate groups (slots in one direction's
slice of W, R and B), a random permutation verifies equivalent and undoes to the same bytes, and
resync of the permuted model against the original writes the original bytes back. A reader that mixes
the directions (a sum over them) ties them into one group. com.microsoft.DynamicQuantizeLSTM (from
onnxruntime's quantize_dynamic) gets the same groups.
"""

from __future__ import annotations

import onnx
import pytest

from graphgen import BATCH, SEQ, Builder, final_state, gemm, merged_sequence, recurrent
from test_walk_properties import check_properties
from onnx_resync.permute import apply_permutations, random_permutations
from onnx_resync.resync import resync
from onnx_resync.walk import walk

HIDDEN = 5


class Script(Builder):
    """A Builder whose choices are scripted: pick takes the first listed value among the options (else
    the first option), flag pops the next listed flag (else False), int gives HIDDEN."""

    def __init__(self, choices: dict):
        super().__init__(seed=3)
        self.choices = choices

    def pick(self, options):
        options = list(options)
        for value in self.choices.get("pick", []):
            if value in options:
                self.choices["pick"].remove(value)
                return value
        return options[0]

    def int(self, lo, hi):
        return HIDDEN if lo <= HIDDEN <= hi else lo

    def flag(self):
        return self.choices["flags"].pop(0) if self.choices.get("flags") else False


def model_with(op: str, reader: str, layers: int = 1, layout: int = 0, bias: bool = True) -> onnx.ModelProto:
    """MatMul -> `layers` bidirectional `op` layers (stacked on the merged sequence) -> `reader` -> Gemm."""
    b = Script({})
    b.add_input("x", [SEQ, BATCH, 3] if layout == 0 else [BATCH, SEQ, 3])
    x = b.node("MatMul", ["x", b.weight((3, 4), "mm_w", mode="init")], "mm")
    feat = 4
    for layer in range(layers):
        b.choices["pick"] = [op, 2]
        b.choices["flags"] = [bias, False, False]  # bias, no stored state, no peepholes
        y, y_h, dirs, hidden = recurrent(b, x, feat, layout)
        if layer < layers - 1:
            x, feat = merged_sequence(b, y, dirs, hidden, layout), dirs * hidden
    if reader == "sequence":
        out, n = b.node("ReduceMean", [merged_sequence(b, y, dirs, hidden, layout)], "mean", axes=[layout],
                        keepdims=0), dirs * hidden
    else:
        b.choices["pick"] = [reader, 1]
        out, n = final_state(b, y_h, dirs, hidden, layout)
    b.add_output(gemm(b, out, n, 3, bias=True, trans_b=1, hint="logits"), [BATCH, 3])
    return b.model()


def direction_groups(result) -> dict:
    """direction index (or 'both') -> groups of recurrent units, read from where their W slots lie."""
    out: dict = {}
    for g in result.groups:
        rows = {s.at[1] if s.at else "both" for s in g.slots if s.weight.startswith("rnn_w") and s.axis == 1}
        if rows:
            out.setdefault(rows.pop() if len(rows) == 1 else "both", []).append(g)
    return out


def assert_resync_exact(model: onnx.ModelProto, seed: int = 5) -> None:
    wk = walk(model)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, wk, random_permutations(wk, seed))
    assert permuted.SerializeToString() != model.SerializeToString()
    restored, report = resync(permuted, model, check=False)
    assert restored.SerializeToString() == model.SerializeToString(), report.verdict


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("reader", ["merge", "slice", "gather", "concat", "sequence"])
def test_each_direction_is_its_own_group(op, reader):
    model = model_with(op, reader)
    result = check_properties(model, full_coverage=True)
    by_direction = direction_groups(result)
    assert sorted(by_direction, key=str) == [0, 1], by_direction
    for d in (0, 1):
        (g,) = by_direction[d]
        assert g.size == HIDDEN
        # every recurrent weight is read in this direction's slice only: W, R rows and columns, B
        sliced = sorted((s.weight.split("_")[1], s.axis) for s in g.slots if s.at == (0, d))
        assert sliced == [("b", 1), ("r", 1), ("r", 2), ("w", 1)], g.slots
    assert_resync_exact(model)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_stacked_bidirectional_layers(op):
    model = model_with(op, "merge", layers=2)
    result = check_properties(model, full_coverage=True)
    by_direction = direction_groups(result)
    assert [len(by_direction[d]) for d in (0, 1)] == [2, 2]  # two layers, two directions each
    # the second layer reads [fwd | bwd] of the first: its W columns follow each direction's units
    first_fwd = next(g for g in by_direction[0] if any(s.weight.startswith("rnn_w") and s.axis == 2 for s in g.slots))
    (cols,) = [s for s in first_fwd.slots if s.weight.startswith("rnn_w") and s.axis == 2]
    assert cols.at is None and sorted(cols.positions.reshape(-1).tolist()) == list(range(HIDDEN))
    assert_resync_exact(model)


def test_gru_linear_before_reset_and_layout_1():
    for lbr in (0, 1):
        model = model_with("GRU", "merge")
        (gru,) = [n for n in model.graph.node if n.op_type == "GRU"]
        (attr,) = [a for a in gru.attribute if a.name == "linear_before_reset"]
        attr.i = lbr
        check_properties(model, full_coverage=True)
    model = model_with("LSTM", "merge", layout=1)  # verified with onnx.reference (ORT has no layout 1)
    assert sorted(direction_groups(check_properties(model, full_coverage=True)), key=str) == [0, 1]


def test_a_sum_over_directions_ties_them():
    """fwd unit k meets bwd unit k: the two directions move together (one group, both slices)."""
    model = model_with("LSTM", "sum")
    result = check_properties(model, full_coverage=True)
    (g,) = direction_groups(result)["both"]
    assert g.size == HIDDEN and {s.at for s in g.slots if s.weight.startswith("rnn_w")} == {(0, 0), (0, 1)}
    assert_resync_exact(model)


def test_initial_state_from_the_other_layer_follows_each_direction():
    """Layer 2 starts from layer 1's Y_h: direction d of layer 2 is one neuron set with direction d of
    layer 1 (and only with it)."""
    b = Script({"pick": ["GRU", 2], "flags": [True, False]})
    b.add_input("x", [SEQ, BATCH, 3])
    x = b.node("MatMul", ["x", b.weight((3, 4), "mm_w", mode="init")], "mm")
    y, y_h, dirs, hidden = recurrent(b, x, 4, 0)
    b.choices.update({"pick": ["GRU"], "flags": [True]})
    y, y_h, dirs, hidden = recurrent(b, merged_sequence(b, y, dirs, hidden, 0), 2 * HIDDEN, 0, like=(2, HIDDEN, y_h))
    b.choices["pick"] = ["merge"]
    out, n = final_state(b, y_h, dirs, hidden, 0)
    b.add_output(gemm(b, out, n, 3, bias=False, trans_b=0, hint="logits"), [BATCH, 3])
    model = b.model()
    result = check_properties(model, full_coverage=True)
    by_direction = direction_groups(result)
    assert sorted(by_direction, key=str) == [0, 1]
    for d in (0, 1):
        (g,) = by_direction[d]  # both layers' units of direction d
        assert {s.weight for s in g.slots if s.weight.startswith("rnn_w") and s.at == (0, d)} == {
            s.weight for s in g.slots if s.weight.startswith("rnn_w") and s.axis == 1}
        assert len({s.weight for s in g.slots if s.weight.startswith("rnn_w") and s.axis == 1}) == 2
    assert_resync_exact(model)


def test_dynamically_quantized_lstm_has_a_group_per_direction(tmp_path):
    from quantize_bundled import quantize

    src = tmp_path / "lstm.onnx"
    onnx.save(model_with("LSTM", "merge"), str(src))
    model = onnx.load(str(quantize(src, tmp_path / "q.onnx", "lstm", "dynamic")))
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in model.graph.node)
    result = walk(model)
    lstm = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    units = [g for g in result.groups if any(s.weight == lstm.input[1] for s in g.slots if s.axis == 2)]
    assert sorted(s.at for g in units for s in g.slots if s.weight == lstm.input[1]) == [(0, 0), (0, 1)]
    from onnx_resync.api import permute

    permuted, info = permute(model, seed=2)
    assert info.verified and info.neurons_moved > 0
    restored, _ = permute(permuted, undo=info.record, check=False)
    assert restored.SerializeToString() == model.SerializeToString()
    assert_resync_exact(model)
