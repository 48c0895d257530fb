"""Why the tool exists: an Uchida-style white-box watermark dies under a neuron permutation and comes
back after resync (tools/watermark.py has the watermark and the explanation).

On the bundled VGG: 128 bits embedded in the last conv's mean filter (the model stays accurate);
bit error rate 0 on the watermarked model, about 50% once the group that feeds the layer (its input
channels) is permuted, 0 again after resync against the watermarked original, also when the copy
was perturbed as fine-tuning would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import watermark as wm  # noqa: E402

from onnx_resync.api import permute  # noqa: E402
from onnx_resync.resync import resync  # noqa: E402
from onnx_resync.walk import walk  # noqa: E402

MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", ROOT / "models"))
BITS = 128
SEED = 2017


@pytest.fixture(scope="module")
def marked():
    path = MODELS / "vgg.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing (run tools/build_models.py)")
    model = onnx.load(str(path))
    weight = wm.conv_weights(model)[-1]
    X = wm.secret_matrix(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight)).shape,
                         BITS, SEED)
    bits = np.random.default_rng(SEED + 1).integers(0, 2, BITS)
    return model, wm.embed(model, weight, bits, X), weight, X, bits


def test_embedding_keeps_the_model_accurate(marked):
    original, model, weight, X, bits = marked
    npz = MODELS / "vgg_test.npz"
    assert wm.accuracy(model, npz) >= wm.accuracy(original, npz) - 0.01
    assert wm.bit_error_rate(wm.extract(model, weight, X), bits) == 0.0
    # the bits were put there: the unmarked model reads about chance
    assert 0.3 <= wm.bit_error_rate(wm.extract(original, weight, X), bits) <= 0.7


def test_permuting_the_input_channels_destroys_it_and_resync_restores_it(marked):
    _, model, weight, X, bits = marked
    key = wm.feeding_group(model, weight)
    rates = []
    for seed in (1, 2, 3):
        permuted, _ = permute(model, seed=seed, group_keys=[key])
        rates.append(wm.bit_error_rate(wm.extract(permuted, weight, X), bits))
        restored, report = resync(permuted, model)
        assert report.verdict == "permuted"
        assert wm.bit_error_rate(wm.extract(restored, weight, X), bits) == 0.0
    assert all(0.3 <= r <= 0.7 for r in rates), rates
    assert abs(np.mean(rates) - 0.5) < 0.1, rates


def test_permuting_every_group_and_fine_tuning_noise(marked):
    _, model, weight, X, bits = marked
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(0)
    for t in noisy.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim >= 2:  # weight matrices, as further training moves them
            t.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.02 * a.std(), a.shape)).astype(np.float32), t.name))
    permuted, _ = permute(noisy, seed=9)
    assert wm.bit_error_rate(wm.extract(permuted, weight, X), bits) >= 0.3
    restored, report = resync(permuted, model)
    assert report.derived
    assert wm.bit_error_rate(wm.extract(restored, weight, X), bits) <= 0.02


def test_the_layers_own_output_order_does_not_matter(marked):
    """Uchida's mean over output filters is blind to their order: the attack must (and does)
    permute the group that feeds the layer."""
    _, model, weight, X, bits = marked
    own = next(g.key for g in walk(model).groups if any(s.weight == weight and s.axis == 0 for s in g.slots))
    permuted, _ = permute(model, seed=4, group_keys=[own])
    assert wm.bit_error_rate(wm.extract(permuted, weight, X), bits) == 0.0
