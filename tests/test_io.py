"""Loading hostile or broken files gives a clean LoadError; saving is atomic and never over an input.

The CLI's side of each load error runs through its main in the shared worker (tests/cli_worker.py);
test_missing_file runs it as a process of its own (`python -m onnx_resync`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cli_worker
from onnx_resync import io
from onnx_resync.errors import LoadError, UsageError


def mlp_model(seed: int = 0, hidden: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "W2")],
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.onnx"
    onnx.save(mlp_model(), path)
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_resync", *args], capture_output=True, text=True, timeout=120)


def assert_clean_load_error(bad: Path, good: Path, run=cli_worker.run) -> None:
    """LoadError from the API; through the CLI exit 3 and one 'onnx-resync: error:' line."""
    with pytest.raises(LoadError):
        io.load_model(bad)
    proc = run("verify", str(bad), str(good), "--device", "cpu")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-resync: error:"), proc.stderr
    assert proc.stdout == ""


# --- files that are not models ------------------------------------------------------------------

def test_missing_file(tmp_path, good):
    assert_clean_load_error(tmp_path / "nope.onnx", good, run=cli)


def test_directory(tmp_path, good):
    (tmp_path / "dir.onnx").mkdir()
    assert_clean_load_error(tmp_path / "dir.onnx", good)


def test_text_file(tmp_path, good):
    bad = tmp_path / "text.onnx"
    bad.write_text("this is not a model\n" * 20)
    assert_clean_load_error(bad, good)


def test_random_bytes(tmp_path, good):
    bad = tmp_path / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_clean_load_error(bad, good)


def test_empty_file(tmp_path, good):
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    assert_clean_load_error(bad, good)


def test_truncated_half(tmp_path, good):
    data = good.read_bytes()
    bad = tmp_path / "half.onnx"
    bad.write_bytes(data[: len(data) // 2])
    assert_clean_load_error(bad, good)


def test_truncated_everywhere(tmp_path, good):
    """Every cut point (API only: the CLI path is covered by test_truncated_half)."""
    data = good.read_bytes()
    bad = tmp_path / "cut.onnx"
    for cut in list(range(0, 64)) + list(range(64, len(data), 37)) + [len(data) - 1]:
        bad.write_bytes(data[:cut])
        with pytest.raises(LoadError):
            io.load_model(bad)


def test_bit_flipped_structure(tmp_path, good):
    data = bytearray(good.read_bytes())
    # ModelProto.graph is field 7, length-delimited: tag 0x3A. Flipping its wire type breaks parsing.
    pos = data.index(0x3A)
    data[pos] ^= 0x01
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(data))
    assert_clean_load_error(bad, good)


def test_bit_flips_never_crash(tmp_path, good):
    """Any single bit flip in the header either loads (it hit weight bytes) or gives LoadError."""
    data = good.read_bytes()
    bad = tmp_path / "flip.onnx"
    errors = 0
    for pos in range(0, 24):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            bad.write_bytes(bytes(flipped))
            try:
                io.load_model(bad)
            except LoadError:
                errors += 1
    assert errors > 0


# --- external data ------------------------------------------------------------------------------

def _external_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(mlp_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    return path


def _rewrite_external(path: Path, name: str, **changes: str | None) -> Path:
    """Copy of the model whose tensors' external-data keys are changed (None removes a key)."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        info.update(changes)
        del tensor.external_data[:]
        for key, value in info.items():
            if value is not None:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    out = path.parent / name
    onnx.save(model, out)
    return out


def test_external_data_loads(tmp_path):
    path = _external_model(tmp_path / "m")
    model = io.load_model(path)
    ref = mlp_model()
    for a, b in zip(model.graph.initializer, ref.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    io.load_model(path, load_weights=False)  # shapes only: must not look in the current directory


def test_external_parent_location(tmp_path, good):
    path = _external_model(tmp_path / "m")
    (tmp_path / "m.data").write_bytes((tmp_path / "m" / "m.data").read_bytes())
    assert_clean_load_error(_rewrite_external(path, "up.onnx", location="../m.data"), good)


def test_external_absolute_location(tmp_path, good):
    path = _external_model(tmp_path / "m")
    target = str((tmp_path / "m" / "m.data").resolve())
    assert_clean_load_error(_rewrite_external(path, "abs.onnx", location=target), good)


def test_external_symlink_outside(tmp_path, good):
    path = _external_model(tmp_path / "m")
    outside = tmp_path / "secret.bin"
    outside.write_bytes((tmp_path / "m" / "m.data").read_bytes())
    os.symlink(outside, tmp_path / "m" / "link.data")
    assert_clean_load_error(_rewrite_external(path, "sym.onnx", location="link.data"), good)


def test_external_missing_file(tmp_path, good):
    path = _external_model(tmp_path / "m")
    assert_clean_load_error(_rewrite_external(path, "missing.onnx", location="gone.data"), good)


@pytest.mark.parametrize("keep_length", [True, False])
def test_external_short_file(tmp_path, good, keep_length):
    path = _external_model(tmp_path / "m")
    (tmp_path / "m" / "short.data").write_bytes((tmp_path / "m" / "m.data").read_bytes()[:100])
    changes = {"location": "short.data"}
    if not keep_length:
        changes.update(length=None, offset=None)
    assert_clean_load_error(_rewrite_external(path, "short.onnx", **changes), good)


# --- saving -------------------------------------------------------------------------------------

def test_save_refuses_input(good):
    with pytest.raises(UsageError):
        io.save_model(mlp_model(), good, inputs=[good])
    link = good.parent / "alias.onnx"
    os.symlink(good, link)
    with pytest.raises(UsageError):
        io.save_model(mlp_model(), link, inputs=[good])


def test_save_roundtrip_keeps_versions(tmp_path):
    model = mlp_model()
    out = io.save_model(model, tmp_path / "out.onnx")
    back = io.load_model(out)
    assert back.ir_version == 8 and back.opset_import[0].version == 17
    assert back.SerializeToString() == model.SerializeToString()
    if os.name != "nt":  # the usual mode, not mkstemp's private 0600
        mask = os.umask(0)
        os.umask(mask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


@pytest.mark.parametrize("external", [False, True])
def test_save_atomic_on_failure(tmp_path, monkeypatch, external):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    if external:
        monkeypatch.setattr(io.external, "INLINE_LIMIT_BYTES", 1000)
    model = mlp_model(hidden=64)
    before = model.SerializeToString()

    def broken_write(path, chunks):
        with open(path, "wb") as fh:
            fh.write(bytes(next(iter(chunks)))[:10])
        raise OSError("disk full")

    monkeypatch.setattr(io.files, "write_bytes", broken_write)
    with pytest.raises(OSError):
        io.save_model(model, out)
    assert out.read_bytes() == b"old contents"
    assert model.SerializeToString() == before  # weights moved out for external data are back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp files left


def test_save_external_data_for_big_models(tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(io.external, "INLINE_LIMIT_BYTES", 1000)
    model = mlp_model(hidden=64)  # W1 and W2 are 4 KiB each: they go to the data file
    before = model.SerializeToString()
    out = io.save_model(model, tmp_path / "big.onnx")
    assert model.SerializeToString() == before  # the caller's model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    on_disk = onnx.load(out, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in on_disk.graph.initializer)

    back = io.load_model(out)
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))

    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)

    # and the runtime helper opens a "big" in-memory model through a temporary external-data file
    from onnx_resync import runtime

    s = runtime.make_session(model, "cpu")
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], expected)
