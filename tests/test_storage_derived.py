"""Steps derived from the stored codes (storage._derived): where a canonical weight is the plain
dequantization of a lazy MatMulNBits weight's codes, its step is computed from one dequantization of
the codes moved by one, not from the probes' canonical forms; the steps must be the probed ones, bit
for bit, whole and in parts (a block of rows beside a permuted whole axis, as the report reads them),
and a weight that another pass changed, or whose scales a probe moves, keeps the probes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from test_int4 import _hand_nbits


def _lazy(model: onnx.ModelProto, tmp_path, monkeypatch) -> onnx.ModelProto:
    from onnx_resync.io import load_model
    from onnx_resync.io import load as load_module

    monkeypatch.setattr(load_module, "LAZY_MIN_TENSOR_BYTES", 0)
    monkeypatch.setattr(load_module, "LAZY_EXTERNAL_BYTES", 0)
    path = tmp_path / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0,
              location="model.data")
    return load_model(path, lazy=True)


def _steps(model, monkeypatch, derive: bool, after=None) -> tuple[dict, list]:
    """name -> (whole step, parts) with the rule on or off, and the weights it applied to; `after`:
    a pass run after canonicalization, on the canonical form and every probe's."""
    from onnx_resync.audit import storage
    from onnx_resync.audit.canonical import canonicalize

    applied = []
    original = storage._derived

    def rule(n, *args):
        found = original(n, *args) if derive else None
        if found is not None:
            applied.append(n)
        return found

    def canonical(m):
        c = canonicalize(m)
        if after is not None:
            after(c)
        return c

    monkeypatch.setattr(storage, "_derived", rule)
    canon = canonical(model)
    names = [n for n, o in canon.origins.items() if o.quantized]
    steps = storage.measure_steps(model, canon, names, canonical).steps
    rng = np.random.default_rng(1)
    out = {}
    for n in names:
        K, N = steps[n].shape
        indexes = [[rng.permutation(K), np.arange(3, min(N, 9))],  # a permuted whole axis beside a block
                   [None, rng.permutation(N)[:5]], [rng.permutation(K)[:7], None], [np.arange(K), None]]
        out[n] = (np.array(steps[n]), [np.array(steps.select(n, i)) for i in indexes])
    return out, applied


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n][0].tobytes() == b[n][0].tobytes(), n
        for x, y in zip(a[n][1], b[n][1]):
            assert x.shape == y.shape and x.tobytes() == y.tobytes(), n


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (the scales not finite)
@pytest.mark.parametrize("bits,block,zp_kind,g_idx,K", [
    (2, 16, "none", False, 64), (2, 16, "packed", False, 64), (4, 32, "packed", False, 80),
    (4, 16, "float", False, 64), (4, 32, "none", True, 96), (4, 32, "float", True, 96),
    (8, 32, "packed", False, 64), (8, 16, "float", False, 48), (8, 16, "none", True, 48)])
def test_the_derived_step_is_the_probed_one(tmp_path, monkeypatch, bits, block, zp_kind, g_idx, K):
    model, _ = _hand_nbits(K, 24, bits, block, zp_kind, g_idx=g_idx)
    if zp_kind == "packed" or bits == 8:  # codes at both ends of the range, and a scale not finite
        scales = next(t for t in model.graph.initializer if t.name == "scales")
        s = onnx.numpy_helper.to_array(scales).copy()
        s[[1, 5]] = (np.inf, np.nan)
        scales.CopyFrom(onnx.numpy_helper.from_array(s, "scales"))
    lazy = _lazy(model, tmp_path, monkeypatch)
    derived, applied = _steps(lazy, monkeypatch, True)
    probed, none = _steps(lazy, monkeypatch, False)
    assert applied and not none
    _assert_same(derived, probed)


def test_no_step_is_derived_where_another_pass_set_the_weight_or_a_probe_moves_its_scales(tmp_path, monkeypatch):
    """A pass after the dequantization that sets the weight's values (here doubled: WeightStore.set,
    as any rewrite of a lazy weight), in every canonical form or in the probes' alone; float16
    scales (moved by a probe of their own): no codes to derive from, the probes as before."""
    from onnx_resync.io import WeightStore

    def doubled(skip: int):
        calls = []

        def after(canon):  # the first canonical form made is the file's own, the others the probes'
            calls.append(1)
            if len(calls) > skip:
                store = WeightStore(canon.model)
                for n in [n for n, o in canon.origins.items() if o.quantized]:
                    store.set(n, 2 * np.asarray(store.get(n)))
        return after

    model, _ = _hand_nbits(64, 24, 4, 32, "packed")
    half, _ = _hand_nbits(64, 24, 4, 32, "packed", scale_type=np.float16)
    for m, skip in ((model, 0), (model, 1), (half, None)):
        lazy = _lazy(m, tmp_path, monkeypatch)
        derived, applied = _steps(lazy, monkeypatch, True, None if skip is None else doubled(skip))
        assert not applied
        probed, _ = _steps(lazy, monkeypatch, False, None if skip is None else doubled(skip))
        _assert_same(derived, probed)
