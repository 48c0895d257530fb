"""Nothing lost: a run killed (SIGKILL) at any moment leaves the old output or the complete new one,
never a partial file, and never touches its input; '-o' equal to an input or to the reference is
refused, also through symbolic and hard links and through the inputs' external data.

The writer is the real CLI (`permute ... --no-verify`) on an 80 MB model, killed at a random moment
of its run, many times, alternating two seeds so that the old and the new output differ. Two paths:
one protobuf (no external data), and a lazy model with external data (memory-mapped, streamed).
tools/fuzz.py --kills N runs a longer series.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cli_worker
from onnx_resync.io import WeightStore, load_model

KILLS = int(os.environ.get("FUZZ_KILLS", "12"))


def big_mlp(hidden: int = 2048, layers: int = 5) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for k in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), f"W{k}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), f"b{k}"))
        nodes += [helper.make_node("MatMul", [prev, f"W{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"]),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"])]
        prev = f"r{k}"
    head = rng.standard_normal((hidden, 4)).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("MatMul", [prev, "head"], ["y"]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnx_resync", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, **kw)


def weights_digest(path: Path) -> str:
    store = WeightStore(load_model(path, check=False))
    h = hashlib.sha256()
    for name in sorted(store.names()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(store.get(name)).tobytes())
    return h.hexdigest()


def files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill-inputs")
    model = big_mlp()
    onnx.save(model, folder / "inline.onnx")
    onnx.save(model, folder / "ext.onnx", save_as_external_data=True, location="ext.onnx.data")
    return folder


@pytest.mark.parametrize("mode", ["inline", "in-place", "lazy"])
def test_sigkill_during_write_leaves_old_or_new(mode, inputs, tmp_path):
    """inline: parsed, serialized whole; in-place: payloads mapped from the file and streamed into an
    inline file (wire.py); lazy: external data mapped, streamed into a data file."""
    src = inputs / ("ext.onnx" if mode == "lazy" else "inline.onnx")
    env = {"ONNX_RESYNC_LAZY_BYTES": str(1 << 40)} if mode == "inline" else {"ONNX_RESYNC_LAZY_BYTES": "0"}
    before = files_digest(inputs)
    # the two complete outputs (seed 1 and seed 2), made without interruption
    expected, durations = {}, []
    for seed in (1, 2):
        ref = tmp_path / f"ref{seed}"
        ref.mkdir()
        t0 = time.perf_counter()
        p = cli("permute", str(src), "-o", str(ref / "t.onnx"), "--no-verify", "--seed", str(seed), env=env)
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
        durations.append(time.perf_counter() - t0)
        expected[weights_digest(ref / "t.onnx")] = seed
    duration = min(durations)  # a load spike during one run must not push every kill past the end
    assert len(expected) == 2
    out = tmp_path / "out"
    out.mkdir()
    target = out / "t.onnx"
    p = cli("permute", str(src), "-o", str(target), "--no-verify", "--seed", "1", env=env)
    assert p.wait(timeout=300) == 0
    rng = random.Random(f"kill-{mode}")
    seen = {1: 0, 2: 0}
    mid_write = completed = between_renames = 0
    for i in range(KILLS):
        seed = 2 if i % 2 == 0 else 1
        proc = cli("permute", str(src), "-o", str(target), "--no-verify", "--seed", str(seed), env=env)
        if i % 3 == 0:  # wait for the write to start, then kill inside it (the window is short)
            _wait_for_temp_file(out, proc, timeout=5 * duration)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # anywhere from the load to after the end
            time.sleep(rng.uniform(0.3, 1.4) * duration)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=300)
        completed += rc == 0
        leftovers = [p for p in out.iterdir() if p.name.endswith(".tmp")]
        mid_write += bool(leftovers)
        for p in leftovers:  # a killed run leaves its temp files (never the target): clear them
            p.unlink()
        digest = weights_digest(target)  # loads: never a partial file
        assert digest in expected, f"kill {i}: the output is neither the old nor the new model"
        seen[expected[digest]] += 1
        assert files_digest(inputs) == before, "the input changed"
        # no other files than the model and its data file; both data names only when the kill fell
        # between the renames or before the old data file's removal (a few milliseconds): the file
        # the model does not name is never read, and the next save replaces it
        names = sorted(p.name for p in out.iterdir())
        assert names in (["t.onnx"], ["t.onnx", "t.onnx.data"], ["t.onnx", "t.onnx.1.data"],
                         ["t.onnx", "t.onnx.1.data", "t.onnx.data"]), names
        between_renames += len(names) == 3
    assert mid_write >= 1, "no kill landed during a write: the test proves nothing"
    print(f"{mode}: {KILLS} kills, {mid_write} during a write, {between_renames} between the renames, "
          f"{completed} completed, outputs seen {seen}")


def _wait_for_temp_file(folder: Path, proc, timeout: float) -> None:
    """Poll until a temp file of the write shows up in `folder` (or the run ends, or time is up)."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end and proc.poll() is None:
        if any(p.name.endswith(".tmp") for p in folder.iterdir()):
            return
        time.sleep(0.001)


# ---- -o equal to an input ------------------------------------------------------------------------
def _run(*args: str) -> subprocess.CompletedProcess:
    """The command through the CLI's main in the shared worker (tests/cli_worker.py): the exit code and
    stderr `python -m onnx_resync` gives, without an interpreter start per command."""
    return cli_worker.run(*args, timeout=300)


@pytest.fixture
def small(tmp_path):
    from .cases import external_files, mlp

    model = tmp_path / "m.onnx"
    model.write_bytes(mlp().SerializeToString())
    ref = tmp_path / "ref.onnx"
    ref.write_bytes(mlp(seed=1).SerializeToString())
    ext = tmp_path / "ext"
    ext.mkdir()
    for rel, data in external_files(mlp()).items():
        (ext / Path(rel).name).write_bytes(data)
    os.symlink(model, tmp_path / "sym.onnx")
    os.link(model, tmp_path / "hard.onnx")
    os.symlink(ref, tmp_path / "refsym.onnx")
    os.link(ref, tmp_path / "refhard.onnx")
    return tmp_path


@pytest.mark.parametrize("out", ["m.onnx", "sym.onnx", "hard.onnx", "./m.onnx", "ext/../m.onnx"])
def test_output_equal_to_input_refused(small, out):
    before = files_digest(small)
    for args in (["permute", str(small / "m.onnx"), "-o", str(small / out), "--no-verify"],
                 ["permute", str(small / "m.onnx"), "-o", str(small / "p.onnx"), "--record", str(small / out)],
                 ["resync", str(small / "m.onnx"), "--reference", str(small / "ref.onnx"), "-o", str(small / out)],
                 ["resync", str(small / "m.onnx"), "--reference", str(small / "ref.onnx"), "--report", str(small / out)]):
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().startswith("onnx-resync: error: output") and "input" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert files_digest(small) == before


@pytest.mark.parametrize("out", ["ref.onnx", "refsym.onnx", "refhard.onnx"])
def test_output_equal_to_reference_refused(small, out):
    before = files_digest(small)
    proc = _run("resync", str(small / "m.onnx"), "--reference", str(small / "ref.onnx"), "-o", str(small / out))
    assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr
    assert files_digest(small) == before


def test_output_equal_to_inputs_external_data_refused(small):
    ext = small / "ext"
    before = files_digest(ext)
    for args in (["permute", str(ext / "m.onnx"), "-o", str(ext / "m.data"), "--no-verify"],
                 ["resync", str(ext / "m.onnx"), "--reference", str(small / "ref.onnx"), "-o", str(ext / "m.data")]):
        proc = _run(*args)
        assert proc.returncode == 2 and "external data of an input" in proc.stderr, proc.stderr
    assert files_digest(ext) == before


@pytest.mark.parametrize("out", ["adir", "missing/x.onnx", "x" * 300 + ".onnx"])
def test_unwritable_output_is_one_line_error(small, out):
    (small / "adir").mkdir()
    proc = _run("permute", str(small / "m.onnx"), "-o", str(small / out), "--no-verify")
    assert proc.returncode in (2, 3), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-resync: error:"), proc.stderr
