"""Large inline models are read in place: the initializers' payloads are memory-mapped from the model
file (wire.cut_payloads) instead of parsed, and the model is written inline again, streamed
(wire.model_chunks). Forced on the small bundled models, every command must give the very bytes
that the in-memory path gives, and a damaged file the same outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli_worker
from onnx_resync import api, io
from onnx_resync.io import wire
from onnx_resync.errors import LoadError

from test_io import mlp_model

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "models").glob("*.onnx"))
IN_PLACE = {"ONNX_RESYNC_LAZY_BYTES": "0", "ONNX_RESYNC_IN_PLACE_MIN_TENSOR_BYTES": "0"}
EAGER = {"ONNX_RESYNC_LAZY_BYTES": str(1 << 40)}


@pytest.fixture
def everything_in_place(monkeypatch):
    monkeypatch.setattr(io.load, "IN_PLACE_MIN_TENSOR_BYTES", 0)


def _chunks(model, streamed, payload=None) -> bytes:
    return b"".join(bytes(c) for c in wire.model_chunks(model, streamed, payload))


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_wire_round_trip(path):
    """The streamed writer gives SerializeToString's bytes, payloads streamed or not; the skeleton plus
    the cut payloads is the model."""
    model = onnx.load(path)
    expected = model.SerializeToString()
    assert _chunks(model, lambda t: False) == expected
    assert _chunks(model, lambda t: t.HasField("raw_data"),
                   lambda t: (len(t.raw_data), [t.raw_data[:7], t.raw_data[7:]])) == expected
    buf = path.read_bytes()
    skeleton, cuts = wire.cut_payloads(buf, 1)
    assert cuts and len(skeleton) < len(buf)
    rebuilt = onnx.ModelProto()
    rebuilt.ParseFromString(skeleton)
    for cut in cuts:
        rebuilt.graph.initializer[cut.index].raw_data = buf[cut.offset:cut.offset + cut.length]
    assert rebuilt.SerializeToString() == onnx.load_from_string(buf).SerializeToString()


def test_streamed_payload_of_wrong_length_is_refused():
    model = mlp_model()
    with pytest.raises(ValueError, match="announced"):
        _chunks(model, lambda t: t.name == "W1", lambda t: (len(t.raw_data), [t.raw_data[:-4]]))


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_loaded_in_place(path, everything_in_place, tmp_path, monkeypatch):
    """Weights read in place equal the parsed ones, read-only; saved unchanged (copied from the file
    in pieces of 100 bytes, each valid only until the next), the file is what onnx.save writes;
    nothing is written beside it."""
    monkeypatch.setattr(io.lazy, "COPY_CHUNK_BYTES", 100)
    model = io.load_model(path, lazy=True)
    eager = io.load_model(path, lazy=False)
    mapped = [t.name for t in model.graph.initializer if io.is_in_place(t)]
    assert mapped and io.streams_inline(model)
    store, eager_store = io.WeightStore(model), io.WeightStore(eager)
    for name in eager_store.names():
        assert np.array_equal(store.get(name), eager_store.get(name)), name
    with pytest.raises(ValueError):
        store.get(mapped[0]).reshape(-1)[0] = 1  # never writes through to the input file
    io.save_model(model, tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx").read_bytes() == eager.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]
    assert io.serialize(model) == eager.SerializeToString()


def test_permute_undo_in_place_api(everything_in_place, tmp_path, monkeypatch):
    """Permuted weights computed and written a row at a time, a mapped one copied 100 bytes at a
    time: the in-memory bytes."""
    monkeypatch.setattr(io.lazy, "WRITE_PIECE_BYTES", 1)
    monkeypatch.setattr(io.lazy, "COPY_CHUNK_BYTES", 100)
    src = ROOT / "models" / "resnet.onnx"
    eager, first = api.permute(io.load_model(src, lazy=False), tmp_path / "e.onnx", seed=3, check=False)
    lazy, lazy_first = api.permute(io.load_model(src, lazy=True), tmp_path / "l.onnx", seed=3)
    assert lazy_first.verified and io.is_lazy_model(lazy)  # ORT gets the streamed bytes
    assert (tmp_path / "l.onnx").read_bytes() == (tmp_path / "e.onnx").read_bytes()
    api.permute(io.load_model(tmp_path / "l.onnx", lazy=True), tmp_path / "u.onnx", undo=lazy_first.record,
                check=False)
    assert (tmp_path / "u.onnx").read_bytes() == io.load_model(src, lazy=False).SerializeToString()


def _cli(*args, env) -> subprocess.CompletedProcess:
    """The command through the CLI's main in a worker process started with `env` (tests/cli_worker.py:
    one per environment, since the package reads these variables when it is imported)."""
    return cli_worker.run(*args, env=env, timeout=600)


@pytest.mark.parametrize("name", ["mlp", "vgg", "transformer"])
def test_cli_in_place_gives_the_in_memory_bytes(name, tmp_path):
    """permute, undo and resync (verified with ORT) write the same files either way, inline."""
    src = ROOT / "models" / f"{name}.onnx"
    for mode, env in (("eager", EAGER), ("in-place", IN_PLACE)):
        d = tmp_path / mode
        d.mkdir()
        steps = [("permute", str(src), "-o", str(d / "p.onnx"), "--record", str(d / "r.json"), "--seed", "5"),
                 ("permute", str(d / "p.onnx"), "-o", str(d / "u.onnx"), "--undo", str(d / "r.json")),
                 ("resync", str(d / "p.onnx"), "--reference", str(src), "-o", str(d / "x.onnx"))]
        for step in steps:
            proc = _cli(*step, "--device", "cpu", env=env)
            assert proc.returncode == 0, proc.stderr
    for f in ("p.onnx", "u.onnx", "x.onnx"):
        assert (tmp_path / "in-place" / f).read_bytes() == (tmp_path / "eager" / f).read_bytes(), f
    audits = {}  # audit canonicalizes the whole model (every weight read, Constant nodes folded)
    for mode, env in (("eager", EAGER), ("in-place", IN_PLACE)):
        proc = _cli("audit", str(tmp_path / mode / "p.onnx"), "--reference", str(src), "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        audits[mode] = {k: v for k, v in json.loads(proc.stdout).items() if k not in ("timings", "suspect")}
    assert audits["in-place"] == audits["eager"] and audits["eager"]["verdict"].startswith("permuted")
    assert not list((tmp_path / "in-place").glob("*.data"))
    original = onnx.load(src).SerializeToString()
    assert (tmp_path / "in-place" / "u.onnx").read_bytes() == original
    assert (tmp_path / "in-place" / "x.onnx").read_bytes() == original


def _outcome(path: Path, lazy: bool):
    try:
        model = io.load_model(path, lazy=lazy)
    except LoadError:
        return "LoadError"
    data = io.serialize(model) if lazy else model.SerializeToString()
    again = onnx.ModelProto()
    again.ParseFromString(data)
    again.DiscardUnknownFields()  # the streamed writer keeps no unknown top-level fields
    return again.SerializeToString()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_load_alike(data, tmp_path_factory, monkeypatch):
    """Bytes flipped, cut, or inserted anywhere in a model: read in place or parsed, the same
    refusal or the same model."""
    monkeypatch.setattr(io.load, "IN_PLACE_MIN_TENSOR_BYTES", 0)
    buf = bytearray(mlp_model().SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(buf) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if kind == "flip":
            buf[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del buf[at:at + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at:]
        if not buf:
            buf = bytearray(b"\x08")
    path = tmp_path_factory.mktemp("damaged") / "m.onnx"
    path.write_bytes(bytes(buf))
    assert _outcome(path, lazy=True) == _outcome(path, lazy=False)


def test_source_saved_over_is_refused_not_misread(everything_in_place, tmp_path):
    """A model mapped from its file, then saved over that file (allowed: the API cannot know every
    name a file has): the save reads the old file to the end, and later reads of the old model are
    refused in one line instead of reading the new file at the old offsets."""
    src = tmp_path / "m.onnx"
    src.write_bytes((ROOT / "models" / "mlp.onnx").read_bytes())
    model = io.load_model(src, lazy=True)
    permuted, _ = api.permute(model, src, seed=1, check=False)
    name = next(t.name for t in model.graph.initializer if io.is_in_place(t))
    with pytest.raises(LoadError, match="replaced or changed after the model was loaded"):
        io.WeightStore(model).get(name)
    assert io.load_model(src, lazy=False).SerializeToString() != (ROOT / "models" / "mlp.onnx").read_bytes()


def test_rescale_undone_in_place(everything_in_place, tmp_path):
    """A rescaled, permuted copy resynced from files read in place: the undone rescale (weights set
    inline, not held as computations) gives the bytes of the in-memory path."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_resync import gen_mlp, permuted, rescale_first_layer

    ref = gen_mlp()
    a = np.exp(np.random.default_rng(0).uniform(-1.5, 1.5, 48))
    suspect, _ = permuted(rescale_first_layer(ref, a), 5)
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(suspect, tmp_path / "sus.onnx")
    outs = {}
    for lazy in (False, True):
        model, report = api.resync(io.load_model(tmp_path / "sus.onnx", lazy=lazy),
                                   io.load_model(tmp_path / "ref.onnx", lazy=lazy), tmp_path / f"{lazy}.onnx")
        assert report.verified and report.perturbation["rescaled_undone"] == 48
        outs[lazy] = (tmp_path / f"{lazy}.onnx").read_bytes()
    assert outs[True] == outs[False]
