"""The matcher's shortcuts for big LLM-style files (issue 14 item 5) give the answers of the long way.

- *Partial* first solves (match/matcher.py PARTIAL_*): the residual stream of a decoder is placed in
  the first sweep by its embedding and lm_head alone (their other axes are pinned: nothing to sort),
  where every neuron stands out by PARTIAL_MARGIN; the descent then solves it with every slot.
  Every permutation and statistic must be those of the sweep without the shortcut, on a noisy
  permuted copy (the shortcut taken) and on one whose embedding and lm_head are drowned in noise
  (not taken), and on one whose embedding is shuffled apart from the layers (taken, then corrected).
- Skipped descent solves (inputs unchanged since the group's last solve): the same answers as
  solving every dirty group again, with fewer solves.

A small decoder from tools/bench_audit_big.py (2 layers, hidden 64, vocab 600), in memory.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_resync.io import WeightStore, load_model
from onnx_resync.match import matcher
from onnx_resync.permute import apply_permutations, random_permutations
from onnx_resync.walk import walk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_audit_big import build_reference  # noqa: E402


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = build_reference(tmp_path_factory.mktemp("decoder") / "reference.onnx", hidden=64, heads=4, inter=160,
                           layers=2, vocab=600)
    model = load_model(path, lazy=False)
    return model, walk(model)


def suspect(model, w, noise: float, drown=(), apart: bool = False, seed: int = 1):
    """The reference permuted (every group), each float weight plus Gaussian noise of `noise` x its
    std (the weights named in `drown`: 5 x); apart: the embedding and lm_head are permuted along
    the residual stream once more, apart from the layers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_permutations(out, w, random_permutations(w, seed))
    rng = np.random.default_rng(seed)
    embed_key = next(g.key for g in w.groups if g.key.startswith("embed:"))
    shuffle = rng.permutation(next(g.size for g in w.groups if g.key == embed_key))
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.size < 2:
            continue
        if apart and t.name == "embed":
            a = a[:, shuffle]
        if apart and t.name == "lm_head":
            a = a[shuffle]
        std = 5.0 if t.name in drown else noise
        a = a + (std * a.std() * rng.standard_normal(a.shape)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
    return out


class _Seen(set):
    """A set that remembers every member it ever had (the groups ever solved partially)."""

    def __init__(self):
        super().__init__()
        self.ever = set()

    def add(self, x):
        self.ever.add(x)
        super().add(x)


def run(model, sus, w, **constants):
    with pytest.MonkeyPatch.context() as mp:
        for name, value in constants.items():
            mp.setattr(matcher, name, value)
        m = matcher._Matcher(WeightStore(model), WeightStore(sus), w, matcher.SHORTCUT_MARGIN)
        m.partial = _Seen()
        result = m.run(8)
    return result, m.partial.ever


def assert_same(a, b):
    for ga, gb in zip(a.groups, b.groups, strict=True):
        da, db = dataclasses.asdict(ga), dataclasses.asdict(gb)
        for k in da:
            x, y = da[k], db[k]
            same = np.array_equal(x, y, equal_nan=True) if isinstance(x, np.ndarray) and x.dtype.kind == "f" \
                else np.array_equal(x, y) if isinstance(x, np.ndarray) else (x == y or x != x and y != y)
            assert same, (ga.key, k)


@pytest.mark.parametrize("case", ["noisy", "drowned", "apart"])
def test_partial_first_solve_gives_the_long_way_answers(decoder, case):
    model, w = decoder
    sus = suspect(model, w, 0.05, drown=("embed", "lm_head") if case == "drowned" else (), apart=case == "apart")
    embed = next(i for i, g in enumerate(w.groups) if g.key.startswith("embed:"))
    short, partial = run(model, sus, w)
    long, never = run(model, sus, w, PARTIAL_ENTRIES=1 << 60)
    assert not never
    assert (embed in partial) == (case != "drowned")  # (drowned: no neuron stands out by the margin)
    assert_same(short, long)
    if case == "noisy":  # the permutation recovered
        record = random_permutations(w, 1)
        assert np.array_equal(short.groups[embed].perm, np.argsort(record.perms[w.groups[embed].key])) or \
            np.array_equal(short.groups[embed].perm, record.perms[w.groups[embed].key])


def test_skipped_descent_solves_give_the_same_answers(decoder):
    model, w = decoder
    sus = suspect(model, w, 0.05)
    skipped, _ = run(model, sus, w)
    every, _ = run(model, sus, w, _same=lambda a, b: False)  # (no inputs ever the same: every dirty group solved)
    assert_same(skipped, every)
    assert skipped.solves < every.solves


def test_kept_slots_give_the_same_answers(decoder, monkeypatch):
    """A sampled group's slot read again with the permutations of its last read (matcher.KEEP_SLOTS)
    is taken from that read: the same answers as reading it again, with fewer reads."""
    model, w = decoder
    sus = suspect(model, w, 0.05)
    # the residual stream sampled (its rows 64 x 2672 entries), as on a big file: no other group
    for name, value in (("GROUP_COLUMNS", 1024), ("GROUP_BYTES", 1 << 18), ("GROUP_WORK", 0)):
        monkeypatch.setattr(matcher, name, value)
    reads = []
    plain = matcher._Matcher.slot_features
    monkeypatch.setattr(matcher._Matcher, "slot_features", lambda self, *a, **k: reads.append(a[0]) or plain(self, *a, **k))
    kept, _ = run(model, sus, w)
    kept_reads, reads[:] = len(reads), []
    again, _ = run(model, sus, w, KEEP_SLOTS=False)
    assert_same(kept, again)
    assert kept_reads < len(reads)
