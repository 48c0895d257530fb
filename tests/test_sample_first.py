"""The sweep's sampled solve in two stages (match/matcher.py SAMPLE_FIRST, SAMPLE_COLUMNS): a large
group is compared first on a quarter of the sample and accepted there only if every neuron is a
mutual best by SAMPLED_MARGIN; otherwise on the whole sample, as before. The answer must not depend
on which stage settled it, and the first stage must be able to come out either way.

Every bundled model's groups are forced through the sampled sweep (SAMPLE_WORK 0, a sample of 64
columns, a first stage of 16 or of 2, which no group can pass): on a permuted noisy copy every
permutation equals the one from a single stage of the whole sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onnx_resync.io import WeightStore, load_model
from onnx_resync.match import match
from onnx_resync.match import matcher as match_module
from onnx_resync.walk import walk

from test_sampled_groups import _suspect

MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", Path(__file__).resolve().parent.parent / "models"))
BUNDLED = sorted(p.stem for p in MODELS.glob("*.onnx"))
COLUMNS = 64


def _run(ref, suspect, w, monkeypatch, first: int) -> tuple[list, list[int]]:
    """The groups' answers with a sampled sweep whose first stage reads `first` columns, and the
    column counts of every sampled product made."""
    monkeypatch.setattr(match_module, "SAMPLE_WORK", 0)
    monkeypatch.setattr(match_module, "SAMPLE_COLUMNS", COLUMNS)
    monkeypatch.setattr(match_module, "SAMPLE_FIRST", first)
    drawn = []
    original = match_module._Features.sampled_gram

    def counting(self, k, rng, kernels=True):
        drawn.append(k)
        return original(self, k, rng, kernels)

    monkeypatch.setattr(match_module._Features, "sampled_gram", counting)
    return match(WeightStore(ref), WeightStore(suspect), w).groups, drawn


@pytest.mark.parametrize("model", BUNDLED)
def test_first_stage_answers_as_the_whole_sample(model, monkeypatch):
    ref = load_model(MODELS / f"{model}.onnx")
    w = walk(ref)
    suspect = _suspect(MODELS / f"{model}.onnx", w, 0.05)
    single, drawn_single = _run(ref, suspect, w, monkeypatch, COLUMNS)
    if not drawn_single:
        pytest.skip("no group wide enough to be sampled")
    two, drawn_two = _run(ref, suspect, w, monkeypatch, COLUMNS // 4)
    never, drawn_never = _run(ref, suspect, w, monkeypatch, 2)
    for a, b, c in zip(single, two, never):
        np.testing.assert_array_equal(a.perm, b.perm, err_msg=a.key)
        np.testing.assert_array_equal(a.perm, c.perm, err_msg=a.key)
    # a first stage of 2 columns settles nothing: every sampled solve goes on to the whole sample
    assert drawn_never.count(2) == drawn_never.count(COLUMNS) > 0


def test_first_stage_goes_both_ways(monkeypatch):
    """On the bundled models, a first stage of a quarter of the sample settles some sampled solves
    alone (no product on the whole sample follows) and hands others on to the whole sample."""
    settled = handed_on = 0
    for model in BUNDLED:
        ref = load_model(MODELS / f"{model}.onnx")
        w = walk(ref)
        _, drawn = _run(ref, _suspect(MODELS / f"{model}.onnx", w, 0.05), w, monkeypatch, COLUMNS // 4)
        for i, k in enumerate(drawn):
            if k == COLUMNS // 4:
                if i + 1 < len(drawn) and drawn[i + 1] == COLUMNS:
                    handed_on += 1
                else:
                    settled += 1
    assert settled > 0 and handed_on > 0, (settled, handed_on)


def test_assign_shortcut_alone():
    """assign(solve=False): rows the mutual-best shortcut does not settle stay -1 (no solve)."""
    C = np.array([[0.9, 0.1, 0.0],
                  [0.1, 0.5, 0.45],
                  [0.0, 0.45, 0.5]], dtype=np.float32)
    perm, _, _, ok = match_module.assign(C.copy(), margin=0.2, stats=False, solve=False)
    assert ok == 1 and perm.tolist() == [0, -1, -1]
    perm, _, _, ok = match_module.assign(C.copy(), margin=0.2, stats=False)
    assert ok == 1 and perm.tolist() == [0, 1, 2]
