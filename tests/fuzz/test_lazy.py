"""The huge-model path (lazy, memory-mapped weights; tensor-by-tensor writes) on small models:
forced with ONNX_RESYNC_LAZY_BYTES=0, it must give exactly what the in-memory path gives, and keep
the resident memory of permute far below the model's size. tools/bench_huge.py measures 3 GB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_resync import api, io

from . import cases
from .test_atomic import big_mlp

LAZY = {"ONNX_RESYNC_LAZY_BYTES": "0", "ONNX_RESYNC_LAZY_MIN_TENSOR_BYTES": "0"}


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_resync", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def _weights(path: Path) -> dict[str, bytes]:
    store = io.WeightStore(io.load_model(path, lazy=False))
    return {n: np.ascontiguousarray(store.get(n)).tobytes() for n in store.names()}


@pytest.fixture
def ext_models(tmp_path):
    out = {}
    for name in ("mlp", "cnn"):
        folder = tmp_path / name
        folder.mkdir()
        for rel, data in cases.external_files(cases.SEEDS[name]()).items():
            (folder / Path(rel).name).write_bytes(data)
        out[name] = folder / "m.onnx"
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_lazy_cli_equals_in_memory(name, ext_models, tmp_path):
    src = ext_models[name]
    for mode, env in (("eager", {}), ("lazy", LAZY)):
        d = tmp_path / mode
        d.mkdir()
        p = _cli("permute", str(src), "-o", str(d / "p.onnx"), "--record", str(d / "r.json"), "--seed", "5",
                 "--device", "cpu", env=env)
        assert p.returncode == 0, p.stderr
        p = _cli("permute", str(d / "p.onnx"), "-o", str(d / "u.onnx"), "--undo", str(d / "r.json"),
                 "--device", "cpu", env=env)
        assert p.returncode == 0, p.stderr
        p = _cli("resync", str(d / "p.onnx"), "--reference", str(src), "-o", str(d / "x.onnx"),
                 "--device", "cpu", "--json", env=env)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["verified"] is True
    for f in ("p.onnx", "u.onnx", "x.onnx"):
        assert _weights(tmp_path / "eager" / f) == _weights(tmp_path / "lazy" / f), f
    assert _weights(tmp_path / "lazy" / "u.onnx") == _weights(src)  # undo: byte for byte
    assert _weights(tmp_path / "lazy" / "x.onnx") == _weights(src)  # resync of a permuted copy: exact
    lazy_p = onnx.load_model(str(tmp_path / "lazy" / "p.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy_p.graph.initializer)


def test_lazy_api_chain_in_memory(ext_models, tmp_path, monkeypatch):
    """permute then undo on the same in-memory lazy model (deferred data computed from deferred data)."""
    monkeypatch.setattr(io.load, "LAZY_MIN_TENSOR_BYTES", 0)
    src = ext_models["cnn"]
    model = io.load_model(src, lazy=True)
    assert io.is_lazy_model(model)
    permuted, result = api.permute(model, tmp_path / "p.onnx", seed=2)  # verified with ORT (temp file)
    assert result.verified and io.is_lazy_model(permuted)
    back, _ = api.permute(permuted, tmp_path / "u.onnx", undo=result.record)
    store, orig = io.WeightStore(back), io.WeightStore(io.load_model(src, lazy=False))
    for n in orig.names():
        assert np.ascontiguousarray(store.get(n)).tobytes() == orig.get(n).tobytes(), n
    assert _weights(tmp_path / "u.onnx") == _weights(src)


def test_lazy_arrays_are_read_only(ext_models, monkeypatch):
    monkeypatch.setattr(io.load, "LAZY_MIN_TENSOR_BYTES", 0)
    store = io.WeightStore(io.load_model(ext_models["mlp"], lazy=True))
    a = store.get("W1")
    with pytest.raises(ValueError):
        a[0, 0] = 1.0  # never writes through to the input's data file


def test_lazy_permute_memory_stays_small(tmp_path):
    """An 80 MB model: the lazy permute's peak RSS stays well under the model's size (the in-memory
    path holds it several times over). What the interpreter and its imports need aside is measured in
    the same run: the same permute of the same graph 64 units wide (its weights are a few KB)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of this (large) pytest
    # process would report at least the parent's size
    code = ("import sys; from onnx_resync.cli import main; rc = main(sys.argv[1:]); "
            "print(1024 * int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])); "
            "sys.exit(rc)")

    def peak(model_path: Path, mode: str, env: dict) -> int:
        p = subprocess.run([sys.executable, "-c", code, "permute", str(model_path), "-o",
                            str(tmp_path / f"{mode}.onnx"), "--no-verify"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=600)
        assert p.returncode == 0, p.stderr
        return int(p.stdout.strip().splitlines()[-1])

    onnx.save(big_mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data")
    onnx.save(big_mlp(hidden=64), tmp_path / "tiny.onnx", save_as_external_data=True, location="tiny.onnx.data")
    size = (tmp_path / "m.onnx.data").stat().st_size
    peaks = {"baseline": peak(tmp_path / "tiny.onnx", "baseline", LAZY),
             "lazy": peak(tmp_path / "m.onnx", "lazy", LAZY),
             "eager": peak(tmp_path / "m.onnx", "eager", {"ONNX_RESYNC_LAZY_BYTES": str(1 << 40)})}
    assert peaks["lazy"] < 0.5 * peaks["eager"], peaks
    assert peaks["lazy"] - peaks["baseline"] < 0.5 * size, peaks
    assert _weights(tmp_path / "lazy.onnx") == _weights(tmp_path / "eager.onnx")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_lazy_save_in_pieces(name, ext_models, tmp_path, monkeypatch):
    """A permuted lazy tensor is saved a few rows at a time (read_lazy_rows): with pieces of one
    row, permute, a second permute of the deferred result, and undo give the in-memory bytes."""
    monkeypatch.setattr(io.load, "LAZY_MIN_TENSOR_BYTES", 0)
    monkeypatch.setattr(io.lazy, "WRITE_PIECE_BYTES", 1)
    src = ext_models[name]
    eager, _ = api.permute(io.load_model(src, lazy=False), tmp_path / "e.onnx", seed=4, check=False)
    eager2, _ = api.permute(eager, tmp_path / "e2.onnx", seed=9, check=False)
    lazy, first = api.permute(io.load_model(src, lazy=True), tmp_path / "l.onnx", seed=4, check=False)
    assert io.is_lazy_model(lazy)
    lazy2, _ = api.permute(lazy, tmp_path / "l2.onnx", seed=9, check=False)  # rows of rows
    assert _weights(tmp_path / "l.onnx") == _weights(tmp_path / "e.onnx")
    assert _weights(tmp_path / "l2.onnx") == _weights(tmp_path / "e2.onnx")
    back, _ = api.permute(io.load_model(tmp_path / "l.onnx", lazy=True), tmp_path / "u.onnx",
                          undo=first.record, check=False)
    assert _weights(tmp_path / "u.onnx") == _weights(src)
