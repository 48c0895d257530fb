"""Parts of lazy tensors (io/lazy.py `select`, `major`): a block of a cast or dequantized huge weight
is computed alone, with the values the whole would give, and the audit's precision check reads a
huge restored weight, its steps and the reference a block at a time with the same report as whole."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_resync.audit.passes.dequantize import nbits_weight
from onnx_resync.io.lazy import LazyTensor

from test_int4 import _mlp, fp16_copy, int4_copy


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("zero_points,g_idx", [("default", False), ("packed", False), ("float16", False),
                                               ("default", True), ("float16", True)])  # (packed + g_idx: refused)
def test_nbits_rows_and_columns_are_the_whole_weights_entries(bits, zero_points, g_idx):
    """MatMulNBits' weight at some rows (of B) and columns (codes) equals those entries of the
    whole, bit for bit, whatever the zero points and block order, K not a multiple of the block."""
    rng = np.random.default_rng(bits)
    N, K, block = 9, 70, 32
    blocks = -(-K // block)
    B = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
    S = rng.random(N * blocks).astype(np.float32)
    Z = {"default": None, "packed": rng.integers(0, 256, (N, -(-blocks * bits // 8)), dtype=np.uint8),
         "float16": rng.random((N, blocks)).astype(np.float16)}[zero_points]
    G = rng.integers(0, blocks, K).astype(np.int32) if g_idx else None
    whole = nbits_weight(B, S, Z, G, bits, block, K, N)
    rows = rng.permutation(N)[:4]
    np.testing.assert_array_equal(nbits_weight(B, S, Z, G, bits, block, K, N, rows=rows), whole[rows])
    for columns in (rng.permutation(K)[:11], rng.permutation(K)):  # a few codes gathered; all, permuted
        np.testing.assert_array_equal(nbits_weight(B, S, Z, G, bits, block, K, N, rows=rows, columns=columns),
                                      whole[np.ix_(rows, columns)])
        np.testing.assert_array_equal(nbits_weight(B, S, Z, G, bits, block, K, N, columns=columns),
                                      whole[:, columns])


def test_a_computed_part_is_computed_alone_through_a_permutation():
    """select() on a computed tensor with `part` never computes the whole; through a permutation the
    part is read at the source entries; the major axis is the computed tensor's own."""
    values = np.arange(48, dtype=np.float32).reshape(6, 8)
    whole_calls, parts = [], []

    def part(index):
        parts.append(index)
        out = values
        for axis, idx in enumerate(index):
            out = out if idx is None else np.take(out, idx, axis=axis)
        return out

    t = helper.make_tensor("w", TensorProto.FLOAT, [6, 8], np.zeros(48, np.float32))
    lazy = LazyTensor.computed(t, lambda: whole_calls.append(1) or values, part, major=1)
    moved = lazy.permuted({0: np.array([5, 4, 3, 2, 1, 0]), 1: np.roll(np.arange(8), 3)})
    expected = values[::-1][:, np.roll(np.arange(8), 3)]
    assert moved.major == 1 and lazy.major == 1
    np.testing.assert_array_equal(moved.rows(np.array([1, 2])), expected[[1, 2]])
    np.testing.assert_array_equal(moved.select([None, np.array([0, 7])]), expected[:, [0, 7]])
    grid = moved.grid([np.array([0, 5]), np.array([1])])
    np.testing.assert_array_equal(grid, expected[np.ix_([0, 5], [1])])
    assert whole_calls == [] and len(parts) == 3
    np.testing.assert_array_equal(moved.read(), expected)  # the whole: computed once ...
    assert whole_calls == [1]
    np.testing.assert_array_equal(moved.rows(np.array([3])), expected[[3]])  # ... and then indexed
    assert len(parts) == 3


def test_a_part_of_the_wrong_shape_is_refused():
    t = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.zeros(16, np.float32))
    lazy = LazyTensor.computed(t, lambda: np.zeros((4, 4), np.float32), lambda index: np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="computed part"):
        lazy.rows(np.array([0, 1]))


def _report(suspect, reference) -> dict:
    from onnx_resync.audit import audit

    d = json.loads(audit(suspect, reference).to_json())
    d.pop("timings", None)
    return d


def _same(a, b, path="report") -> None:
    """Equal, floats up to the order of their sums (a block at a time adds in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("kind", ["int4", "fp16"])
def test_the_precision_check_in_blocks_gives_the_report_read_whole(tmp_path, monkeypatch, kind):
    """A lazily loaded suspect (permuted, with noise beyond its storage, so that every statistic of
    the precision check is at work): the report with blocks of 64 elements is the report with the
    whole weight in one block (floats up to the order of their sums); the int4 weights are read by columns (their major axis), the fp16
    ones by rows."""
    from onnx_resync.api import permute
    from onnx_resync.audit import report as report_module
    from onnx_resync.io import load as load_module

    monkeypatch.setattr(load_module, "LAZY_MIN_TENSOR_BYTES", 0)
    monkeypatch.setattr(load_module, "LAZY_EXTERNAL_BYTES", 0)  # both files lazy, as huge ones are
    ref_path = tmp_path / "reference.onnx"
    onnx.save(_mlp(0), str(ref_path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0,
              location="reference.data")
    permuted, _ = permute(_mlp(0, noise=0.3), seed=3)
    model = int4_copy(permuted) if kind == "int4" else fp16_copy(permuted)
    path = tmp_path / "suspect.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0,
              location="suspect.data")
    reads = []
    blocks = report_module._blocks
    monkeypatch.setattr(report_module, "_blocks", lambda *a: reads.append(a) or blocks(*a))
    monkeypatch.setattr(report_module, "PRECISION_ROWS", 1 << 40)
    whole = _report(str(path), str(ref_path))
    monkeypatch.setattr(report_module, "PRECISION_ROWS", 64)
    reads.clear()
    in_blocks = _report(str(path), str(ref_path))
    _same(in_blocks, whole)
    assert whole["verdict"] == "perturbed" and whole["precision"]["beyond"]["elements"] > 0, whole["summary"]
    majors = {a[2] for a in reads if a[1] and len(a[0]) == 2}  # (shape, lazy, major): the restored matrices
    assert majors == ({1} if kind == "int4" else {0}), reads
