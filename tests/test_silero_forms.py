"""Silero VAD's STFT as its exporters write it (issue 15, item 4): a strided conv makes 2h channels,
real and imaginary halves are cut by Slices that also cut time, or are sliced again along other axes
before re^2 + im^2 meet. The chunks still meet with their units aligned, so the conv's channels are a
(chunk x unit) grid (rules/selection.py `_chunks_meet` follows a Slice that keeps the chunk axis
whole; `_slice_range` reads a Slice of several axes along the one asked for).

Forms, from the real files:
- 'chained' (torch, silero_vad_16k_op15 and the If branches): Slice batch [0:] -> Slice channels
  [0:h] / [h:] -> Slice time [0:] -> Cast -> Pow 2 -> Add -> Sqrt.
- 'merged' (onnxslim, silero_vad_v6): one Slice per half cutting channels and time at once.
Counter-cases: equal halves that Slices shift by one bin before they meet ('shifted'), or halves cut
unequally (re [0:h-1], im [h+1:]: 'unequal'), tie neighbouring bins: the conv's channels pin, and what
moves is still exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_unrolled_cells import assert_round_trips
from test_walk_properties import check_properties
from onnx_resync.walk import walk

BINS, OUT, T = 6, 5, 64
BIG = 2 ** 63 - 1


def stft_model(form: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    h = BINS
    inits = [
        helper.make_tensor("basis", TensorProto.FLOAT, [2 * h, 1, 8], rng.normal(size=2 * h * 8)),
        helper.make_tensor("enc_w", TensorProto.FLOAT, [OUT, h, 3], rng.normal(size=OUT * h * 3)),
        helper.make_tensor("enc_b", TensorProto.FLOAT, [OUT], rng.normal(size=OUT)),
        helper.make_tensor("head_w", TensorProto.FLOAT, [1, OUT, 1], rng.normal(size=OUT)),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
    ]

    def ints(name, *values):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values)))
        return name

    nodes = [helper.make_node("Conv", ["x", "basis"], ["spec"], kernel_shape=[8], strides=[4])]
    if form == "chained":
        nodes.append(helper.make_node("Slice", ["spec", ints("s0", 0), ints("e0", BIG), ints("a0", 0)], ["all"]))
        halves = []
        for part, (s, e) in (("re", (0, h)), ("im", (h, BIG))):
            nodes += [
                helper.make_node("Slice", ["all", ints(f"{part}_s", s), ints(f"{part}_e", e), ints(f"{part}_a", 1)],
                                 [f"{part}_c"]),
                helper.make_node("Slice", [f"{part}_c", ints(f"{part}_ts", 0), ints(f"{part}_te", BIG),
                                           ints(f"{part}_ta", 2)], [f"{part}_t"]),
                helper.make_node("Cast", [f"{part}_t"], [part], to=TensorProto.FLOAT),
            ]
            halves.append(part)
    else:
        cuts = {"merged": ((0, h), (h, BIG)), "shifted": ((0, h), (h, BIG)), "unequal": ((0, h - 1), (h + 1, BIG))}
        halves = []
        for part, (s, e) in zip(("re", "im"), cuts[form]):
            nodes.append(helper.make_node("Slice", ["spec", ints(f"{part}_s", s, 1), ints(f"{part}_e", e, BIG),
                                                    ints(f"{part}_a", 1, 2)], [part]))
            halves.append(part)
        if form == "shifted":  # equal halves, then re[:h-1] meets im[1:]: bin j with bin j + 1
            nodes.append(helper.make_node("Slice", ["re", ints("rs", 0), ints("re_", h - 1), ints("ra", 1)], ["re2"]))
            nodes.append(helper.make_node("Slice", ["im", ints("is", 1), ints("ie", BIG), ints("ia", 1)], ["im2"]))
            halves = ["re2", "im2"]
    nodes += [
        helper.make_node("Pow", [halves[0], "two"], ["re_sq"]),
        helper.make_node("Pow", [halves[1], "two"], ["im_sq"]),
        helper.make_node("Add", ["re_sq", "im_sq"], ["power"]),
        helper.make_node("Sqrt", ["power"], ["mag"]),
    ]
    bins = h if form in ("chained", "merged") else h - 1
    if bins != h:
        inits[1] = helper.make_tensor("enc_w", TensorProto.FLOAT, [OUT, bins, 3], rng.normal(size=OUT * bins * 3))
    nodes += [
        helper.make_node("Conv", ["mag", "enc_w", "enc_b"], ["enc"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["enc"], ["act"]),
        helper.make_node("Conv", ["act", "head_w"], ["y"], kernel_shape=[1]),
    ]
    graph = helper.make_graph(nodes, "stft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, T])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "frames"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _stft_group(result):
    return [g for g in result.groups if any(s.weight == "basis" for s in g.slots)]


@pytest.mark.parametrize("form", ["chained", "merged"])
def test_stft_halves_cut_with_time_are_a_grid(form):
    result = assert_round_trips(stft_model(form), full_coverage=True)
    (group,) = _stft_group(result)
    assert group.size == BINS  # units: bin j of the real and of the imaginary half move together
    (slot,) = [s for s in group.slots if s.weight == "basis"]
    rows = np.asarray(slot.positions)
    assert rows.shape == (BINS, 2) and np.array_equal(rows[:, 1] - rows[:, 0], np.full(BINS, BINS))


@pytest.mark.parametrize("form", ["shifted", "unequal"])
def test_stft_halves_misaligned_pin(form):
    result = check_properties(stft_model(form), full_coverage=False)
    # the 2(h-1) bins that meet are tied to their neighbours; the two no one reads may swap
    assert all(g.size < BINS for g in _stft_group(result))
    tied = [p for p in result.pinned if p.reason == "tied to another channel of the same layer"]
    assert tied and tied[0].channels == 2 * (BINS - 1) and tied[0].producers == ["Conv"], result.pinned
