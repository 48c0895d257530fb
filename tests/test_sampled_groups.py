"""Sampled groups (match/matcher.py GROUP_*): a group too large to hold as rows (a transformer's
residual stream) is compared on an evenly spread sample of its entries; its norms, hashes and byte
identity still come from every entry. The answers must be those of the whole rows.

Every group of the bundled models with more than a few dozen entries per neuron is forced through
the sampled path (thresholds at zero, a sample of 48 entries per neuron): on a permuted copy every
permutation and every exact flag must be the same as on whole rows, also where one entry that no
sample reads was changed (byte identity is judged on every entry); on a noisy copy nearly every
match; a noisy copy stays derived and an independently trained model "not derived".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from onnx_resync.io import WeightStore, load_model
from onnx_resync.match import match
from onnx_resync.match import matcher as match_module
from onnx_resync.permute import apply_permutations, random_permutations
from onnx_resync.resync import resync
from onnx_resync.walk import walk

from test_wide_slots import add_noise

MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", Path(__file__).resolve().parent.parent / "models"))
BUNDLED = sorted(p.stem for p in MODELS.glob("*.onnx"))
COLUMNS = 48


def _suspect(model, w, noise: float, seed: int = 3, off_sample: bool = False):
    suspect = load_model(model)
    apply_permutations(suspect, w, random_permutations(w, seed=seed))
    if off_sample:  # entry [0, 1] of the largest matrix: column 1 of its rows, which no sample of 48 reads
        store = WeightStore(suspect)
        name = max((n for n in store.names() if len(store.shape(n)) == 2), key=lambda n: np.prod(store.shape(n)))
        a = store.get(name).copy()
        a[0, 1] = np.nextafter(a[0, 1], np.float32(np.inf))
        store.set(name, a)
    return add_noise(suspect, noise, seed)


def _sampled_everywhere(monkeypatch, made: list):
    monkeypatch.setattr(match_module, "GROUP_COLUMNS", COLUMNS)
    monkeypatch.setattr(match_module, "GROUP_BYTES", 0)
    monkeypatch.setattr(match_module, "GROUP_WORK", 0)
    original = match_module._Matcher._sample_columns

    def counting(self, gi):
        columns = original(self, gi)
        if columns is not None:
            made.append(gi)
        return columns

    monkeypatch.setattr(match_module._Matcher, "_sample_columns", counting)


@pytest.mark.parametrize("noise", [0.0, "off-sample", 0.1])
@pytest.mark.parametrize("model", BUNDLED)
def test_sampled_groups_answer_as_whole_rows(model, noise, monkeypatch):
    ref = load_model(MODELS / f"{model}.onnx")
    w = walk(ref)
    off = noise == "off-sample"
    noise = 0.0 if off else noise
    suspect = _suspect(MODELS / f"{model}.onnx", w, noise, off_sample=off)
    plain = match(WeightStore(ref), WeightStore(suspect), w)
    made = []
    _sampled_everywhere(monkeypatch, made)
    sampled = match(WeightStore(ref), WeightStore(suspect), w)
    if not made:
        pytest.skip("no group wider than the sample")
    agree = total = 0
    for a, b in zip(plain.groups, sampled.groups):
        assert a.key == b.key
        assert a.exact == b.exact, a.key
        np.testing.assert_allclose(a.norm_ratio, b.norm_ratio, rtol=1e-5, err_msg=a.key)  # (every entry)
        if noise == 0.0:  # byte identity from every entry: the same answer
            np.testing.assert_array_equal(a.perm, b.perm, err_msg=a.key)
            np.testing.assert_array_equal(a.interchangeable, b.interchangeable, err_msg=a.key)
    if noise == 0.0:  # exact, but for the groups that read the changed entry
        assert sum(not g.exact for g in sampled.groups) == (1 if off else 0) or off and \
            0 < sum(not g.exact for g in sampled.groups) <= 2
        agree += int((a.perm == b.perm).sum())
        total += a.size
    assert agree >= 0.99 * total


def test_sampled_verdicts_go_both_ways(monkeypatch):
    """A noisy copy stays derived and an independently trained model not derived when the groups
    are sampled (the statistics come from the sample: the verdict must not)."""
    name = "mlp"
    other = MODELS / "variants" / f"{name}_seed1.onnx"
    if not other.exists():
        pytest.skip("no independently trained variant")
    ref = load_model(MODELS / f"{name}.onnx")
    w = walk(ref)
    made = []
    _sampled_everywhere(monkeypatch, made)
    _, copy = resync(_suspect(MODELS / f"{name}.onnx", w, 0.1), ref, check=False)
    assert made
    assert copy.derived and copy.verdict == "permuted and perturbed", copy.verdict
    _, unrelated = resync(_suspect(other, w, 0.0), ref, check=False)
    assert unrelated.verdict == "not derived"
    assert unrelated.evidence < 0.5
