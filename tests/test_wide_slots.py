"""Wide slots (onnx_resync/wide.py): matching that reads a slot in pieces must answer what matching
on whole rows answers.

Every slot of the bundled models is forced through the wide path (thresholds at zero, pieces of a
few kilobytes, so that every slot is cut into many), on a permuted copy and on a permuted noisy
copy; permutations must be the same as on the ordinary path, statistics equal up to float rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onnx_resync.match import matcher as match_module
from onnx_resync.match import wide
from onnx_resync.io import WeightStore, load_model
from onnx_resync.match import match
from onnx_resync.permute import apply_permutations, random_permutations
from onnx_resync.walk import walk

MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", Path(__file__).resolve().parent.parent / "models"))
BUNDLED = sorted(p.stem for p in MODELS.glob("*.onnx"))


def _suspect(model, w, noise: float, seed: int = 3):
    suspect = load_model(MODELS / f"{model}.onnx")
    apply_permutations(suspect, w, random_permutations(w, seed=seed))
    return add_noise(suspect, noise, seed)


def add_noise(model, noise: float, seed: int):
    """Gaussian noise, `noise` x each float tensor's std, on every float32 tensor of 2+ values (in place)."""
    if noise:
        store, rng = WeightStore(model), np.random.default_rng(seed)
        for name in store.names():
            a = store.get(name)
            if a.dtype == np.float32 and a.size > 1:
                store.set(name, (a + rng.normal(0, noise * a.std(), a.shape)).astype(np.float32))
    return model


@pytest.mark.parametrize("sampled", [False, True], ids=["whole", "sampled"])
@pytest.mark.parametrize("noise", [0.0, 0.3])
@pytest.mark.parametrize("model", BUNDLED)
def test_wide_path_matches_whole_rows(model, noise, sampled, monkeypatch):
    """sampled: the first sweep compares every group on a sample of its entries (as it does for
    large groups), which the two paths draw differently: the answers must still agree."""
    if sampled:
        monkeypatch.setattr(match_module, "SAMPLE_WORK", 0)
        monkeypatch.setattr(match_module, "SAMPLE_COLUMNS", 64)
    ref = load_model(MODELS / f"{model}.onnx")
    w = walk(ref)
    suspect = _suspect(model, w, noise)
    plain = match(WeightStore(ref), WeightStore(suspect), w)

    made = []
    monkeypatch.setattr(match_module, "WIDE_ENTRIES", 2)
    monkeypatch.setattr(match_module, "WIDE_BYTES", 0)
    monkeypatch.setattr(match_module, "WIDE_ROWS_BYTES", 0)
    monkeypatch.setattr(wide, "CHUNK_BYTES", 4096)
    original_init = wide.WideSlot.__init__

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(wide.WideSlot, "__init__", counting_init)
    pieces = match(WeightStore(ref), WeightStore(suspect), w)

    assert made, "no slot went through the wide path"
    assert any(len(range(0, s.ref.shape[s.cut], s.step)) > 1 for s in made), "no slot was cut into pieces"
    for a, b in zip(plain.groups, pieces.groups):
        assert a.key == b.key
        np.testing.assert_array_equal(a.perm, b.perm, err_msg=a.key)
        np.testing.assert_allclose(a.cosine, b.cosine, atol=2e-5, err_msg=a.key)
        np.testing.assert_allclose(a.norm_ratio, b.norm_ratio, rtol=1e-5, err_msg=a.key)
        np.testing.assert_array_equal(a.interchangeable, b.interchangeable, err_msg=a.key)
        assert a.exact == b.exact
        if noise == 0.0:
            assert a.exact, a.key
