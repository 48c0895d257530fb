"""The loader and the walker in-process, many examples: only ResyncError (a clean, one-line error)
may come out, whatever the bytes or the graph; and the walker never takes long.

Byte-level damage goes through io.load_model (and walk when it loads). Structured mutations go
straight to walk() WITHOUT the loader's checks, so the walker itself is tested on graphs that
onnx.checker would refuse (a library caller may hand it any ModelProto)."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_resync import io
from onnx_resync.errors import ResyncError
from onnx_resync.walk import walk

from . import cases

EXAMPLES = int(os.environ.get("FUZZ_INPROCESS_EXAMPLES", "300"))
SEED_BYTES = {name: cases.seed_bytes(name) for name in cases.SEEDS}


@contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise TimeoutError(f"took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def damaged_bytes(draw):
    data = bytearray(SEED_BYTES[draw(st.sampled_from(sorted(SEED_BYTES)))])
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(max_size=12))
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged_bytes())
def test_loader_and_walker_on_damaged_bytes(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "m.onnx"
    path.write_bytes(data)
    with time_limit(30):
        try:
            model = io.load_model(path)
        except ResyncError:
            return
        try:
            walk(model)
        except ResyncError:
            pass


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(category=st.sampled_from(sorted(cases.STRUCTURED) + sorted(cases.WALKER_ONLY)),
       rnd=st.randoms(use_true_random=False), seed=st.sampled_from(sorted(cases.SEEDS)))
def test_walker_on_unchecked_graphs(category, rnd, seed):
    model, _ = {**cases.STRUCTURED, **cases.WALKER_ONLY}[category](cases.SEEDS[seed](), rnd)
    with time_limit(30):
        try:
            io.check_tensor_data(model)  # what the API does with a ModelProto before walking it
            walk(model)
        except ResyncError:
            pass


def test_time_limit_works():
    with pytest.raises(TimeoutError), time_limit(1):
        while True:
            pass


def test_unchecked_proto_through_api_is_clean():
    """api.groups/permute on an in-memory model whose tensor data disagrees with its dims."""
    from onnx_resync import api

    m = cases.mlp()
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([2**40])
    with pytest.raises(ResyncError):
        api.groups(m)
    with pytest.raises(ResyncError):
        api.permute(m, check=False)
    assert isinstance(m, onnx.ModelProto)
