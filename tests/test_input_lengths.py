"""Input lengths an op further on needs: a reflect Pad reads more samples than it adds, a Conv or
pool window must fit its padded axis (inputs.py, `length_floors`). An audio model written the way
torch exports it (silero-vad: [batch, sequence] -> reflect Pad 64 with pads computed through
Reshape/Slice/Cast -> STFT-like Conv 256 / 128 -> conv stack) was refused on every usual length
(16, 8, ... 1) and needed --shape; read from the graph, it runs on the first try."""

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
