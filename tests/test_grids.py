"""Grids of tied chunks (issue 15, items 3, 5 and 8): a layer's output cut into k equal chunks that
meet again elementwise is a (chunk x unit) grid (rules/selection.py): units move the same way inside
every chunk, chunks keep their places. GLU halves a * sigmoid(b), an STFT's real and imaginary halves
combined by sqrt(re^2 + im^2), Split chunks built by hand; a distribution-focal-loss head (bins x
sides, Softmax over the bins, a conv with arange weights) moves its bins with the arange weight as a
slot. Counter-cases pin with a reason: misaligned chunks, a cross-chunk shuffle. And the Gather rule
on a symbolic axis (item 8), with rule exceptions that surface instead of pinning.

Each positive model: permute + verify with ONNX Runtime, undo byte-exact, api.permute/undo with a
record, api.resync exact (test_unrolled_cells.assert_round_trips).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_unrolled_cells import assert_round_trips
from test_walk_properties import check_properties
from onnx_resync.errors import UnsupportedError
from onnx_resync.walk.channels import CELL_OF_ITSELF
from onnx_resync.walk import walk

RNG = np.random.default_rng(0)


def _w(name, *shape):
    return helper.make_tensor(name, TensorProto.FLOAT, list(shape), RNG.normal(size=int(np.prod(shape))))


def _i(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values))


def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def three_chunks(cut: str = "split", sizes=(4, 4, 4), meet: str = "mul") -> onnx.ModelProto:
    """x [2, 5] -> Gemm 12 -> cut into chunks a, b, c -> a * sigmoid(b) + tanh(c) -> Gemm 3.
    cut: 'split' (one Split), 'slice' (three Slices); meet: 'mul' (they meet), 'apart' (each chunk its
    own Gemm, summed after: they never meet)."""
    n = sum(sizes)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1)]
    inits = [_w("w1", n, 5), _w("b1", n)]
    if cut == "split":
        inits.append(_i("sizes", sizes))
        nodes.append(helper.make_node("Split", ["h", "sizes"], ["a", "b", "c"], axis=1))
    else:
        starts = np.cumsum((0,) + tuple(sizes))
        for name, s, e in zip("abc", starts[:-1], starts[1:]):
            inits += [_i(f"{name}_s", [s]), _i(f"{name}_e", [e]), _i(f"{name}_ax", [1])]
            nodes.append(helper.make_node("Slice", ["h", f"{name}_s", f"{name}_e", f"{name}_ax"], [name]))
    if meet == "mul":
        h = sizes[0]
        nodes += [helper.make_node("Sigmoid", ["b"], ["sb"]), helper.make_node("Tanh", ["c"], ["tc"]),
                  helper.make_node("Mul", ["a", "sb"], ["ab"]), helper.make_node("Add", ["ab", "tc"], ["m"]),
                  helper.make_node("Gemm", ["m", "w2"], ["y"], transB=1)]
        inits.append(_w("w2", 3, h))
    else:
        for name, size in zip("abc", sizes):
            inits.append(_w(f"w_{name}", 3, size))
            nodes.append(helper.make_node("Gemm", [name, f"w_{name}"], [f"y_{name}"], transB=1))
        nodes.append(helper.make_node("Sum", ["y_a", "y_b", "y_c"], ["y"]))
    return _model(nodes, inits, [2, 5], [2, 3])


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_chunks_that_meet_are_a_grid(cut):
    result = assert_round_trips(three_chunks(cut))
    (g,) = result.groups
    assert g.size == 4
    (w1,) = [s for s in g.slots if s.weight == "w1"]
    assert sorted(w1.positions[0].tolist()) == [0, 4, 8]  # unit 0 in every chunk, chunks in place
    assert result.coverage == 1.0


def test_chunks_read_apart_keep_their_own_groups():
    """Chunks that never meet are not tied: each moves on its own (three groups, not one grid)."""
    result = assert_round_trips(three_chunks("split", meet="apart"))
    assert sorted(g.size for g in result.groups) == [4, 4, 4]


def test_misaligned_chunks_pin_with_a_reason():
    """Counter-case: Slices [0:4], [2:6], [8:12]: the first and last are chunks of a grid, the middle
    one cuts across it and meets the first: those channels pin, with the reason."""
    model = three_chunks("slice")
    for t in model.graph.initializer:
        if t.name in ("b_s", "b_e"):
            t.CopyFrom(_i(t.name, [2 if t.name == "b_s" else 6]))
    result = check_properties(model, full_coverage=False)
    assert result.coverage == 0.0 and not result.groups
    assert [p.reason for p in result.pinned] == [CELL_OF_ITSELF, "reaches a graph output"], result.pinned


def test_cross_chunk_shuffle_pins_with_a_reason():
    """Counter-case: chunk b reversed before it meets a: unit j meets unit 3 - j of the same grid."""
    model = three_chunks("split")
    model.graph.initializer.append(_i("rev", [3, 2, 1, 0]))
    (sig,) = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    sig.input[0] = "brev"
    model.graph.node.insert(2, helper.make_node("Gather", ["b", "rev"], ["brev"], axis=1))
    onnx.checker.check_model(model, full_check=True)
    result = walk(model)
    assert result.coverage < 1.0
    assert any(p.reason == "tied to another channel of the same layer" for p in result.pinned), result.pinned


# ---- item 8: Gather along a symbolic axis; rule exceptions surface -------------------------------
def symbolic_gather() -> onnx.ModelProto:
    """Conv over [1, 3, S] -> Gather index -1 on the symbolic axis S -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"]), helper.make_node("Gather", ["c", "last"], ["g"], axis=2),
             helper.make_node("Gemm", ["g", "wg"], ["y"], transB=1)]
    inits = [_w("wc", 4, 3, 1), _w("wg", 2, 4), helper.make_tensor("last", TensorProto.INT64, [], [-1])]
    return _model(nodes, inits, [1, 3, "S"], [1, 2])


def test_gather_of_a_constant_index_along_a_symbolic_axis():
    """The rule added the dim's name to the indices (it raised, and that became a pin: 0 of 4)."""
    result = walk(symbolic_gather())
    assert result.permutable_channels == 4 and result.coverage == 1.0, result.pinned
    assert_round_trips(symbolic_gather())


def test_a_rule_exception_is_never_a_silent_pin(monkeypatch):
    from onnx_resync.walk.rules import selection

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a rule")

    model = three_chunks("split")
    monkeypatch.setattr(selection, "_grid_units", broken)
    with pytest.raises(RuntimeError, match="a bug in a rule"):
        walk(model)


def test_a_node_onnx_refuses_is_bad_input():
    """A Conv whose weight has rank 1: ONNX's own inference refuses it; one line, exit 3."""
    model = symbolic_gather()
    model.graph.initializer[0].CopyFrom(_w("wc", 4))
    with pytest.raises(UnsupportedError, match="'Conv'.*malformed"):
        walk(model)


# ---- torch: GLU, STFT-like magnitude, DFL head ---------------------------------------------------------
try:
    import torch
except ImportError:  # torch is a test-only extra (`train`); the tests above need none
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch (the train extra) makes these exports")
_Module = torch.nn.Module if torch is not None else object  # the classes below are made only with torch
from test_unrolled_cells import export_module  # noqa: E402


class GLU(_Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv1d(4, 12, 3, padding=1)
        self.b = torch.nn.Conv1d(6, 5, 1)

    def forward(self, x):
        return self.b(torch.nn.functional.glu(self.a(x), dim=1))


class Magnitude(_Module):
    """An STFT as a strided conv with real and imaginary filters: |X| = sqrt(re^2 + im^2)."""

    def __init__(self, bins=8):
        super().__init__()
        self.bins = bins
        self.stft = torch.nn.Conv1d(1, 2 * bins, 16, stride=4, bias=False)
        self.head = torch.nn.Conv1d(bins, 5, 1)

    def forward(self, x):
        y = self.stft(x)
        re, im = y[:, :self.bins], y[:, self.bins:]
        return self.head(torch.log(torch.sqrt(re * re + im.pow(2)) + 1e-3))


class DFL(_Module):
    """YOLOv8's distribution-focal-loss head over three scales: 4 sides x 16 bins, Softmax over the
    bins, expectation by a conv whose weight is arange(16)."""

    def __init__(self, bins=16):
        super().__init__()
        self.bins = bins
        self.heads = torch.nn.ModuleList([torch.nn.Conv2d(8, 4 * bins, 1) for _ in range(3)])
        self.dfl = torch.nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)

    def forward(self, x0, x1, x2):
        box = torch.cat([h(x).flatten(2) for h, x in zip(self.heads, (x0, x1, x2))], 2)
        b, _, a = box.shape
        return self.dfl(box.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)


@needs_torch
def test_glu_halves():
    # (torch.onnx's dynamo exporter writes the same Conv -> Split -> Sigmoid -> Mul; 13 s to export)
    model = export_module(GLU(), (torch.randn(2, 4, 10),), dynamo=False)
    result = assert_round_trips(model)
    (g,) = result.groups
    (rows,) = [s for s in g.slots if s.weight.endswith("a.weight")]
    assert g.size == 6 and sorted(rows.positions[0].tolist()) == [0, 6]  # a and b halves of one unit


@needs_torch
def test_stft_real_and_imaginary_halves():
    model = export_module(Magnitude(), (torch.randn(2, 1, 64),), dynamo=False)
    result = assert_round_trips(model)
    (g,) = result.groups
    (rows,) = [s for s in g.slots if s.weight.endswith("stft.weight")]
    assert g.size == 8 and sorted(rows.positions[0].tolist()) == [0, 8]  # re and im of one bin


@needs_torch
def test_dfl_bins_move_with_the_arange_weight():
    """The bins move in every side and scale, and the arange weight (a slot) moves with them; the
    sides reach the output and keep their places."""
    inputs = (torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2), torch.randn(1, 8, 1, 1))
    model = export_module(DFL(), inputs, dynamo=False)
    result = assert_round_trips(model, full_coverage=False)
    (g,) = result.groups
    assert g.size == 16 and result.permutable_channels == 3 * 64  # all but the expectation's one channel
    assert ("dfl.weight", 1) in {(s.weight, s.axis) for s in g.slots}
    assert all(s.positions.shape == (16, 4) for s in g.slots if s.weight.startswith("heads."))  # 4 sides each


# ---- generated: gate grids of any shape, over unrolled steps ---------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_UNARY = ["Sigmoid", "Tanh", "Relu", "Identity"]
_BINARY = ["Mul", "Add", "Sub"]


@st.composite
def gate_cells(draw):
    """x -> `steps` cells sharing W, R, B: Gemm(x, W, B) + Gemm(h, R), cut into k chunks of h units
    (one Split, or k Slices; or interleaved, unit j of chunk c at j*k + c: Slices with step k, or a
    Reshape to [.., h, k] and a Gather per chunk on the last axis), every chunk through a unary op and folded into one by binary ops; h0 is
    zeros written one of three ways. The chunks always meet: every model must reach 100%."""
    k, h, steps = draw(st.integers(2, 4)), draw(st.integers(2, 5)), draw(st.integers(1, 3))
    cut = draw(st.sampled_from(["split", "slice", "strided", "reshape_gather"]))
    zero = draw(st.sampled_from(["constant", "fill", "expand"]))
    unary = [draw(st.sampled_from(_UNARY)) for _ in range(k)]
    binary = [draw(st.sampled_from(_BINARY)) for _ in range(k - 1)]
    order = draw(st.permutations(range(k)))
    n, feat = k * h, 3
    inits = [_w("W", n, feat), _w("R", n, h), _w("B", n), _w("head", 2, h), _i("zshape", [2, h])]
    nodes = []
    if zero == "constant":
        inits.append(helper.make_tensor("h0", TensorProto.FLOAT, [2, h], np.zeros(2 * h)))
    elif zero == "fill":
        nodes.append(helper.make_node("ConstantOfShape", ["zshape"], ["h0"]))
    else:
        inits.append(helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        nodes.append(helper.make_node("Expand", ["zero", "zshape"], ["h0"]))
    if cut == "split":
        inits.append(_i("sizes", [h] * k))
    elif cut == "reshape_gather":  # interleaved: unit j of chunk c at j*k + c, picked by Gather
        inits += [_i("cells", [2, h, k])] + [helper.make_tensor(f"g{c}", TensorProto.INT64, [], [c]) for c in range(k)]
    elif cut == "strided":  # interleaved, picked by Slices with step k
        for c in range(k):
            inits += [_i(f"s{c}", [c]), _i(f"e{c}", [n]), _i(f"ax{c}", [1]), _i(f"st{c}", [k])]
    else:
        for c in range(k):
            inits += [_i(f"s{c}", [c * h]), _i(f"e{c}", [(c + 1) * h]), _i(f"ax{c}", [1])]
    state = "h0"
    for t in range(steps):
        p = f"t{t}_"
        nodes += [helper.make_node("Gemm", ["x", "W", "B"], [p + "gx"], transB=1),
                  helper.make_node("Gemm", [state, "R"], [p + "gh"], transB=1),
                  helper.make_node("Add", [p + "gx", p + "gh"], [p + "gates"])]
        chunks = [f"{p}c{c}" for c in range(k)]
        if cut == "split":
            nodes.append(helper.make_node("Split", [p + "gates", "sizes"], chunks, axis=1))
        elif cut == "reshape_gather":
            nodes.append(helper.make_node("Reshape", [p + "gates", "cells"], [p + "cells"]))
            nodes += [helper.make_node("Gather", [p + "cells", f"g{c}"], [chunks[c]], axis=2) for c in range(k)]
        elif cut == "strided":
            nodes += [helper.make_node("Slice", [p + "gates", f"s{c}", f"e{c}", f"ax{c}", f"st{c}"], [chunks[c]])
                      for c in range(k)]
        else:
            nodes += [helper.make_node("Slice", [p + "gates", f"s{c}", f"e{c}", f"ax{c}"], [chunks[c]])
                      for c in range(k)]
        acts = []
        for c in range(k):
            nodes.append(helper.make_node(unary[c], [chunks[c]], [f"{p}a{c}"]))
            acts.append(f"{p}a{c}")
        acc = acts[order[0]]
        for j, c in enumerate(order[1:]):
            nodes.append(helper.make_node(binary[j], [acc, acts[c]], [f"{p}m{j}"]))
            acc = f"{p}m{j}"
        state = acc
    nodes.append(helper.make_node("Gemm", [state, "head"], ["y"], transB=1))
    return _model(nodes, inits, [2, feat], [2, 2]), h


@settings(max_examples=25, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(gate_cells())
def test_generated_gate_grids(case):
    model, h = case
    result = check_properties(model, full_coverage=True)
    (g,) = result.groups
    assert g.size == h


# ---- interleaved chunks (issue 15.3): a Slice with step k, as GLU or rotary halves are taken --------
def interleaved(meet: str = "glu", k: int = 2, h: int = 4, steps=None) -> onnx.ModelProto:
    """x [2, 5] -> Gemm k*h -> chunks c = Slice(start c, step k) -> recombined -> Gemm 3.
    meet: 'glu' a * sigmoid(b) (k = 2); 'rotary' (k = 2): r1 = a*cos - b*sin, r2 = a*sin + b*cos with
    stored per-unit cos/sin tables, stacked back interleaved (Unsqueeze, Concat on a new last axis,
    Reshape [2, 2h]); 'sum' the chunks added. steps: per chunk (start, step) overrides."""
    n = k * h
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["y0"], transB=1)]
    inits = [_w("w1", n, 5), _w("b1", n)]
    steps = steps or [(c, k) for c in range(k)]
    chunks = []
    for c, (start, step) in enumerate(steps):
        inits += [_i(f"s{c}", [start]), _i(f"e{c}", [n]), _i(f"ax{c}", [1]), _i(f"st{c}", [step])]
        nodes.append(helper.make_node("Slice", ["y0", f"s{c}", f"e{c}", f"ax{c}", f"st{c}"], [f"c{c}"]))
        chunks.append(f"c{c}")
    out_width = h
    if meet == "glu":
        nodes += [helper.make_node("Sigmoid", ["c1"], ["sb"]), helper.make_node("Mul", ["c0", "sb"], ["m"])]
    elif meet == "rotary":
        inits += [_w("cos", h), _w("sin", h), _i("last", [2]), _i("flat", [2, 2 * h])]
        nodes += [helper.make_node("Mul", ["c0", "cos"], ["ac"]), helper.make_node("Mul", ["c1", "sin"], ["bs"]),
                  helper.make_node("Sub", ["ac", "bs"], ["r1"]),
                  helper.make_node("Mul", ["c0", "sin"], ["as"]), helper.make_node("Mul", ["c1", "cos"], ["bc"]),
                  helper.make_node("Add", ["as", "bc"], ["r2"]),
                  helper.make_node("Unsqueeze", ["r1", "last"], ["u1"]), helper.make_node("Unsqueeze", ["r2", "last"], ["u2"]),
                  helper.make_node("Concat", ["u1", "u2"], ["st"], axis=2), helper.make_node("Reshape", ["st", "flat"], ["m"])]
        out_width = 2 * h
    else:
        acc = chunks[0]
        for c in chunks[1:]:
            nodes.append(helper.make_node("Add", [acc, c], [acc + "_" + c]))
            acc = acc + "_" + c
        nodes.append(helper.make_node("Identity", [acc], ["m"]))
    nodes.append(helper.make_node("Gemm", ["m", "wo"], ["y"], transB=1))
    inits.append(_w("wo", 3, out_width))
    return _model(nodes, inits, [2, 5], [2, 3])


@pytest.mark.parametrize("meet,k", [("glu", 2), ("rotary", 2), ("sum", 3)])
def test_interleaved_chunks_are_a_grid(meet, k):
    """Before: every channel pinned 'tied to another channel of the same layer' (0%). Now units move
    inside every chunk (and with the rotary tables' entries, their slots), chunks keep their places."""
    result = assert_round_trips(interleaved(meet, k))
    assert result.coverage == 1.0, result.pinned
    (g,) = result.groups
    assert g.size == 4
    slots = {s.name(): s for s in g.slots}
    assert slots["w1:0"].positions.shape == (4, k)  # unit j: positions j*k .. j*k + k - 1
    assert np.array_equal(slots["w1:0"].positions[0], np.arange(k))
    if meet == "rotary":
        assert {"cos:0", "sin:0"} <= set(slots)


def test_interleaved_chunks_of_unequal_steps_pin():
    """The counter-case: chunk 0 takes every 2nd channel, chunk 1 the last half (contiguous): they do
    not cut one grid, so the channels that meet are tied to others of the same layer and pin."""
    result = walk(interleaved("glu", 2, steps=[(0, 2), (4, 1)]))
    assert result.permutable_channels < 8
    assert any(p.reason == "tied to another channel of the same layer" for p in result.pinned), result.pinned
