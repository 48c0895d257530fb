"""What the matcher reads of a weight (match/matcher.py slot_features): the plan (which axes are
aligned, summarized or refused) is made from shapes before the weight is read, so a read that
aligned_only refuses reads nothing (a huge model's weight would be cast or dequantized whole for
nothing); a slot on part of its axis (a head's block) reads that part alone where the weight is
lazy, and gives the rows that the whole weight gives, bit for bit, whatever groups are resolved.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onnx_resync.io import WeightStore, load_model
from onnx_resync.match import matcher
from onnx_resync.match.wide import WideSlot
from onnx_resync.permute import apply_permutations, random_permutations
from onnx_resync.walk import walk

MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", Path(__file__).resolve().parent.parent / "models"))
BUNDLED = sorted(p.stem for p in MODELS.glob("*.onnx"))


def _matcher(model: str) -> matcher._Matcher:
    ref = load_model(MODELS / f"{model}.onnx")
    w = walk(ref)
    sus = load_model(MODELS / f"{model}.onnx")
    apply_permutations(sus, w, random_permutations(w, seed=5))
    return matcher._Matcher(WeightStore(ref), WeightStore(sus), w, matcher.SHORTCUT_MARGIN)


@pytest.mark.parametrize("model", BUNDLED)
def test_refused_read_reads_nothing(model, monkeypatch):
    m = _matcher(model)
    read = []
    original = matcher._Matcher.arrays
    monkeypatch.setattr(matcher._Matcher, "arrays", lambda self, name: read.append(name) or original(self, name))
    refused = 0
    for gi, g in enumerate(m.groups):  # (no group resolved: every other axis needs a summary)
        for slot in g.slots:
            read.clear()
            if m.slot_features(gi, slot, aligned_only=True) is None:
                refused += 1
                assert not read, (g.key, slot.weight)
    if not refused:
        pytest.skip("no read refused")


def _rows(m, gi, slot):
    x = m.slot_features(gi, slot)
    if isinstance(x, WideSlot):
        return None
    return x


@pytest.mark.parametrize("model", ["transformer", "mobilenet", "gru"])
def test_part_read_equals_whole(model, monkeypatch):
    """Every slot of every group, with half the groups resolved (random permutations): the rows read
    through LazyTensor-style part selection equal those of the whole weight gathered."""
    m = _matcher(model)
    rng = np.random.default_rng(0)
    for gi, g in enumerate(m.groups):
        if rng.random() < 0.5:
            m.perm[gi] = rng.permutation(g.size)
    parts = 0
    for gi, g in enumerate(m.groups):
        for slot in g.slots:
            monkeypatch.setattr(matcher._Matcher, "_lazy", lambda self, name: False)
            whole = _rows(m, gi, slot)
            monkeypatch.setattr(matcher._Matcher, "_lazy", lambda self, name: True)
            part = _rows(m, gi, slot)
            if whole is None:
                continue
            parts += slot.at is None and slot.positions.size < m.ref.shape(slot.weight)[slot.axis]
            for a, b in zip(whole, part):
                assert a.dtype == b.dtype and a.shape == b.shape, (g.key, slot.weight)
                np.testing.assert_array_equal(a, b, err_msg=f"{g.key} {slot.weight}")
    if model == "transformer":
        assert parts > 0  # (its heads' blocks)
