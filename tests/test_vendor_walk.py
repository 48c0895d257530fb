"""The walker on real vendor files: no crash, permute+verify equivalent, undo byte-exact, coverage.

CNN channels must be permutable (100% where the model is a plain CNN); sequence and attention
parts may still pin (recorded in the issue note). Coverage floors below are what the walker
reaches today: a drop is a regression.
"""

from __future__ import annotations

import onnx
import pytest

from onnx_resync.api import permute
from onnx_resync.io import load_model, serialize
from onnx_resync.walk import walk
from vendor_models import vendor_model

pytestmark = pytest.mark.vendor

# key -> (input shapes for ORT, minimum coverage)
CASES = {
    "pplcnet_orientation": ({}, 1.0),
    "ppocr_cls": ({"x": [1, 3, 48, 192]}, 1.0),
    "ppocr_det": ({"x": [1, 3, 64, 64]}, 1.0),
    "ppocr_rec": ({"x": [1, 3, 48, 320]}, 1.0),
    "ppocrv3_det": ({"x": [1, 3, 64, 64]}, 1.0),
    "ppocrv3_rec": ({"x": [1, 3, 48, 320]}, 1.0),
    "picodet_layout": ({}, 1.0),
    "ddddocr_det": ({}, 1.0),
    "ddddocr_common": ({"input1": [1, 1, 64, 64]}, 1.0),
    "ddddocr_common_old": ({"input1": [1, 1, 64, 64]}, 1.0),
    "arabic_gru_encoder": ({}, 1.0),
    "minilm": ({"input_ids": [1, 8], "attention_mask": [1, 8], "token_type_ids": [1, 8]}, 1.0),
    # no shapes given: the input plan reads the reflect Pad's and the STFT window's needs; the STFT's
    # real/imaginary halves are a grid (tests/test_silero_forms.py); the LSTM fed 'state' is interface.
    # torch's squeeze(-1) of the encoder's output is an If on a symbolic length that only its Squeeze
    # branch lets run (the LSTM cell after it takes 2-D input): 0.79 / 0.77 before walk/branches.by_rank
    "silero_vad_op15": ({}, 0.99),
    "silero_vad_ifless": ({}, 0.99),
    "silero_vad_openvino": ({}, 0.99),
    "silero_vad_v6": ({}, 1.0),
    "silero_vad_if": ({}, 0.99),
    "nudenet_320n": ({}, 0.95),
    "magika": ({}, 1.0),
    # keras2onnx 1.7.0 (NHWC input, PRelu, Dense as MatMul + Add)
    "mtcnn_pnet": ({}, 1.0),
    "mtcnn_rnet": ({}, 1.0),
    "mtcnn_onet": ({}, 1.0),
    # tf2onnx 1.15.1: the CQT bins are an ordered axis (harmonic stacking pads and slices them) and pin
    "basic_pitch": ({}, 0.09),
    # Silero v4: torch's squeeze/unsqueeze as Ifs on shapes inside the If on the sample rate; their
    # conditions are constants (a dim of 1, a known rank): 12.2% before tests/test_shape_decided_ifs.py.
    # The LSTM fed 'h' and 'c' is interface; the 1-channel decoder Conv squeezed on its channel pins
    "oww_silero_vad": ({}, 0.99),
    "oww_melspectrogram": ({}, 1.0),
    "oww_embedding": ({}, 1.0),
    "oww_hey_mycroft": ({}, 1.0),
    # keras2onnx reads the 161 STFT bins as the height of a Conv2D image: an ordered axis, they pin
    "dnsmos_sig_bak_ovr": ({}, 0.65),
    # the last Gemm's 1 unit squeezed on its channel axis pins
    "plcmos_v2": ({}, 0.99),
    "deepcut": ({}, 1.0),
}


@pytest.mark.parametrize("key", sorted(CASES))
def test_vendor_permute_verify_undo(key):
    shapes, floor = CASES[key]
    model = load_model(vendor_model(key))
    result = walk(model)
    assert result.coverage >= floor - 1e-9, (key, result.coverage, [p.reason for p in result.pinned])
    inputs = {i.name for i in model.graph.input}
    permuted, info = permute(model, seed=7, verify_options={"shapes": {k: v for k, v in shapes.items() if k in inputs}})
    assert info.verified and info.neurons_moved > 0
    # serialize: a large file (minilm) is read in place, its weights mapped from the file
    assert serialize(permuted) != serialize(model)
    restored, _ = permute(permuted, undo=info.record, check=False)
    assert serialize(restored) == serialize(model)


def test_vendor_files_pin_only_output_channels():
    for key in ("pplcnet_orientation", "ppocr_cls", "ppocr_det", "ppocr_rec", "ddddocr_det", "ddddocr_common",
                "ddddocr_common_old", "arabic_gru_encoder", "minilm", "ppocrv3_det", "ppocrv3_rec", "picodet_layout"):
        result = walk(load_model(vendor_model(key)))
        reasons = {p.reason for p in result.pinned}
        assert reasons <= {"reaches a graph output"}, (key, reasons)


@pytest.mark.parametrize("key", ["ddddocr_common", "ddddocr_common_old", "arabic_gru_encoder"])
def test_vendor_bidirectional_layers_have_a_group_per_direction(key):
    """Every bidirectional layer's two directions are separate groups (slots in one direction's slice
    of W), and resync of a permuted copy against the file writes its bytes back exactly."""
    from onnx_resync.permute import apply_permutations, random_permutations
    from onnx_resync.resync import resync

    model = load_model(vendor_model(key))
    result = walk(model)
    recurrent = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "DynamicQuantizeLSTM")]
    assert recurrent
    for node in recurrent:
        gate_axis = 2 if node.op_type == "DynamicQuantizeLSTM" else 1
        owners = {s.at: g.key for g in result.groups for s in g.slots if s.weight == node.input[1] and s.axis == gate_axis}
        # arabic's second layer reaches the graph output (memory_out): pinned, no group
        assert set(owners) in ({(0, 0), (0, 1)}, set()) and len(set(owners.values())) == len(owners), owners
    assert any(s.at for g in result.groups for s in g.slots)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutations(permuted, result, random_permutations(result, 3))
    restored, report = resync(permuted, model, check=False)
    assert restored.SerializeToString() == model.SerializeToString(), report.verdict
