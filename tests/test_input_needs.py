"""What ops further on need of the inputs the plan chooses (inputs.py), read from the graph.

Lengths (`length_floors`): a reflect Pad reads more samples than it adds, a Conv or pool window
must fit its padded axis. An audio model written the way torch exports it (silero-vad: [batch,
sequence] -> reflect Pad 64 with pads computed through Reshape/Slice/Cast -> STFT-like Conv 256 /
128 -> conv stack) was refused on every usual length (16, 8, ... 1) and needed --shape.

Recurrent states: one input stacking h and c ([2, ?, hidden]) has its batch at axis -2, also when
it is taken apart inside an If's branches (a branch's output leaves as the If's output)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from onnx_resync import api


def audio_model(pad: int = 64, window: int = 256, computed_pads: bool = True, mode: str = "reflect") -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = {
        "axes1": np.array([1], np.int64),
        "basis": rng.standard_normal((16, 1, window)).astype(np.float32),
        "w1": rng.standard_normal((8, 16, 3)).astype(np.float32),
        "w2": rng.standard_normal((4, 8, 1)).astype(np.float32),
    }
    nodes = [helper.make_node("Unsqueeze", ["x", "axes1"], ["x3"])]
    if computed_pads:  # as torch writes F.pad: the pads reversed through Reshape/Slice/Reshape, then Cast
        inits.update({"raw": np.array([pad, pad, 0, 0, 0, 0], np.int64), "shape2": np.array([-1, 2], np.int64),
                      "start": np.array([-1], np.int64), "end": np.array([-(2 ** 62)], np.int64),
                      "zero": np.array([0], np.int64), "step": np.array([-1], np.int64),
                      "flat": np.array([-1], np.int64)})
        nodes += [helper.make_node("Reshape", ["raw", "shape2"], ["r2"]),
                  helper.make_node("Slice", ["r2", "start", "end", "zero", "step"], ["rev"]),
                  helper.make_node("Transpose", ["rev"], ["revt"], perm=[1, 0]),
                  helper.make_node("Reshape", ["revt", "flat"], ["pads_i"]),
                  helper.make_node("Cast", ["pads_i"], ["pads"], to=T.INT64)]
    else:
        inits["pads"] = np.array([0, 0, pad, 0, 0, pad], np.int64)
    if mode is not None:
        nodes.append(helper.make_node("Pad", ["x3", "pads"], ["xp"], mode=mode))
    nodes += [helper.make_node("Conv", ["xp" if mode is not None else "x3", "basis"], ["spec"], strides=[window // 2]),
              helper.make_node("Conv", ["spec", "w1"], ["h"], pads=[1, 1]),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "audio", [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("y", T.FLOAT, ["batch", 4, "frames"])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("computed_pads", [True, False], ids=["pads-computed", "pads-constant"])
def test_a_reflect_pad_and_a_window_set_the_length(tmp_path, computed_pads):
    src = tmp_path / "audio.onnx"
    onnx.save(audio_model(computed_pads=computed_pads), src)
    report = api.inputs(str(src), device="cpu")
    (x,) = report.inputs
    assert x["shape"][1] >= 65 and "reflects 64" in x["why"], x
    _, result = api.permute(str(src), None, verify_options={"device": "cpu"})
    assert result.verified


def test_a_window_alone_sets_the_length(tmp_path):
    """No pad: the STFT window of 256 slides along the input's own axis."""
    src = tmp_path / "audio.onnx"
    onnx.save(audio_model(mode=None, computed_pads=False), src)
    (x,) = api.inputs(str(src), device="cpu").inputs
    assert x["shape"][1] >= 256 and "window of 256" in x["why"], x


def test_short_lengths_stay_when_nothing_needs_more(tmp_path):
    """The usual 16 when the pad and the window fit it: the floor is read, not a blanket increase."""
    src = tmp_path / "audio.onnx"
    onnx.save(audio_model(pad=4, window=8), src)
    (x,) = api.inputs(str(src), device="cpu").inputs
    assert x["shape"][1] == 16, x


# ---- a recurrent state fed as one input ---------------------------------------------------------

def stacked_state_model(through_if: bool) -> onnx.ModelProto:
    """x [1, seq, 4] -> LSTM(8) whose initial h and c are state[0] and state[1] of one input
    state [2, ?, 8] (silero-vad's form: the batch an unnamed dim at axis 1); with `through_if` the
    state is taken apart inside an If's branches, as silero_vad.onnx does on the sample rate."""
    rng = np.random.default_rng(6)
    inits = {"W": rng.standard_normal((1, 32, 4)).astype(np.float32),
             "R": rng.standard_normal((1, 32, 8)).astype(np.float32),
             "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
             "ax1": np.array([1], np.int64), "flag": np.array(True)}
    taken = [helper.make_node("Gather", ["state", "i0"], ["h0"]), helper.make_node("Gather", ["state", "i1"], ["c0"])]
    if through_if:
        def branch(name):
            return helper.make_graph(
                [helper.make_node("Gather", ["state", "i0"], [f"{name}_h"]),
                 helper.make_node("Gather", ["state", "i1"], [f"{name}_c"])], name, [],
                [helper.make_tensor_value_info(f"{name}_h", T.FLOAT, None),
                 helper.make_tensor_value_info(f"{name}_c", T.FLOAT, None)])
        taken = [helper.make_node("If", ["flag"], ["h0", "c0"], then_branch=branch("t"), else_branch=branch("e"))]
    nodes = taken + [
        helper.make_node("Unsqueeze", ["h0", "ax0"], ["h"]), helper.make_node("Unsqueeze", ["c0", "ax0"], ["c"]),
        helper.make_node("Transpose", ["x"], ["xs"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["xs", "W", "R", "", "", "h", "c"], ["y", "hn"], hidden_size=8),
        helper.make_node("Squeeze", ["y", "ax1"], ["ys"]),
    ]
    graph = helper.make_graph(nodes, "stacked", [
        helper.make_tensor_value_info("x", T.FLOAT, [1, "seq", 4]),
        helper.make_tensor_value_info("state", T.FLOAT, [2, None, 8])],
        [helper.make_tensor_value_info("ys", T.FLOAT, ["seq", 1, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("through_if", [False, True], ids=["plain", "inside-if"])
def test_a_stacked_recurrent_state_gets_a_batch_of_one(tmp_path, through_if):
    """Its unnamed dim at axis 1 is the LSTM's batch (initial_h is [directions, batch, hidden]): 1,
    not a length of 16 that the LSTM refuses; found through the If's branches too."""
    src = tmp_path / "state.onnx"
    onnx.save(stacked_state_model(through_if), src)
    report = api.inputs(str(src), device="cpu")
    state = next(d for d in report.inputs if d["name"] == "state")
    assert state["shape"] == [2, 1, 8] and "recurrent" in state["why"], state
