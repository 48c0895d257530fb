"""Safe outputs and inputs (issue 18 items 5 and 6): outputs only to a regular file or a new name in a
writable folder (never a device, a FIFO, a symbolic link), no two outputs on one file, temporary
files removed on SIGTERM and SIGHUP as on SIGINT; inputs only from regular files (a FIFO does not
block, a device is not read), bounded option files and subgraph counts; the loader refuses what
ONNX Runtime refuses (opset versions) and ambiguous external data (duplicate keys).

CLI cases run the CLI's main in a worker process (tests/cli_worker.py: the exit code and output of
`python -m onnx_resync`, without an interpreter start per command) with a timeout (the old code
blocked on a FIFO) and an address-space limit (the old code read a device until memory ran out);
signals, the slowed write and the import check run processes of their own.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cli_worker
from onnx_resync import api
from onnx_resync.errors import LoadError, UsageError
from onnx_resync.io import external, files, load_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", ROOT / "models"))
POSIX = pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices and signals as on POSIX")


def _model(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing (run tools/build_models.py)")
    return path


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("ONNX_RESYNC_DEBUG", None)
    return env


WORKER_AS_LIMIT = 6 << 30  # address space: the old code read /dev/zero until memory ran out


def cli(*args, timeout: int = 60) -> subprocess.CompletedProcess:
    """The command in the shared worker, under WORKER_AS_LIMIT; `seconds`: its wall time."""
    return cli_worker.run(*args, timeout=timeout, as_limit=WORKER_AS_LIMIT)


def one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny(opsets=(("", 17),), *, external_in: Path | None = None) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2): one group of 8 hidden units."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w1, w2])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


# ---------------------------------------------------------------- outputs


def _device(tmp_path: Path) -> Path:
    """A character device that the test may see replaced without harm: as root (where the old code
    would have replaced the system's /dev/null) a null device made in tmp_path; else /dev/null
    itself, which a user cannot replace anyway."""
    if os.geteuid() == 0:
        dev = tmp_path / "null"
        try:
            os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            return dev
        except OSError:
            pytest.skip("root without mknod: /dev/null itself would be at risk on a regression")
    return Path("/dev/null")


def _outputs(kind: str, target: Path, tmp_path: Path) -> list:
    """A command line per output option, the option naming `target`."""
    if kind == "inputs --save" and not hasattr(api, "inputs"):
        pytest.skip("no `inputs` command in this tree")
    mlp = _model("mlp")
    other = tmp_path / "other.onnx"
    return {
        "-o": ["permute", mlp, "-o", target, "--no-verify"],
        "--record": ["permute", mlp, "-o", other, "--record", target, "--no-verify"],
        "--report": ["resync", mlp, "--reference", mlp, "--report", target],
        "--html": ["audit", mlp, "--reference", mlp, "--html", target],
        "--jsonl": ["audit", "--reference", mlp, mlp, "--jsonl", target],
        "inputs --save": ["inputs", mlp, "--save", target],
    }[kind]


OUTPUT_OPTIONS = ["-o", "--record", "--report", "--html", "--jsonl", "inputs --save"]


@POSIX
@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_device_output_refused_untouched(option, tmp_path):
    dev = _device(tmp_path)
    before = os.lstat(dev)
    proc = cli(*_outputs(option, dev, tmp_path))
    one_line(proc, 2, "character device", "refused")
    after = os.lstat(dev)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)


@POSIX
@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_fifo_output_refused(option, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = cli(*_outputs(option, fifo, tmp_path))
    one_line(proc, 2, "FIFO", "refused")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@POSIX
@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_symlink_output_refused(option, tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"old contents")
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = cli(*_outputs(option, link, tmp_path))
    one_line(proc, 2, "symbolic link")
    assert link.is_symlink() and target.read_bytes() == b"old contents"


@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_regular_output_written(option, tmp_path):
    """The other way: a new name, then an existing regular file, are written."""
    target = tmp_path / "out"
    proc = cli(*_outputs(option, target, tmp_path))
    assert proc.returncode in (0, 1), proc.stderr  # (1: a verdict, e.g. audit's)
    assert target.is_file() and target.stat().st_size > 0
    if option != "--jsonl":  # (a JSONL is appended to: a rerun reuses it)
        target.write_bytes(b"old")
        proc = cli(*_outputs(option, target, tmp_path))
        assert proc.returncode in (0, 1), proc.stderr
        assert target.read_bytes() != b"old"


@POSIX
def test_output_folder_not_writable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_line(cli("permute", _model("mlp"), "-o", folder / "x.onnx", "--no-verify"), 2, "not writable")
    finally:
        folder.chmod(0o700)


TWO_ON_ONE = {
    "resync -o X --report X": lambda m, d: ["resync", m, "--reference", m, "-o", d / "X", "--report", d / "X"],
    "permute -o X --record X": lambda m, d: ["permute", m, "-o", d / "X", "--record", d / "X", "--no-verify"],
    "permute -o X --record ./X": lambda m, d: ["permute", m, "-o", d / "X", "--record", f"{d}/./X",
                                              "--no-verify"],
    "permute -o X --record X.data": lambda m, d: ["permute", m, "-o", d / "X", "--record", d / "X.data",
                                                 "--no-verify"],
    "permute -o X --record X.1.data": lambda m, d: ["permute", m, "-o", d / "X", "--record", d / "X.1.data",
                                                   "--no-verify"],
    "resync -o X --report X.data": lambda m, d: ["resync", m, "--reference", m, "-o", d / "X",
                                                 "--report", d / "X.data"],
}


@pytest.mark.parametrize("case", list(TWO_ON_ONE))
def test_two_outputs_on_one_file_refused_before_work(case, tmp_path):
    proc = cli(*TWO_ON_ONE[case](_model("mlp"), tmp_path))
    one_line(proc, 2, "refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_two_outputs_through_a_hard_link_refused(tmp_path):
    (tmp_path / "a").write_bytes(b"old")
    os.link(tmp_path / "a", tmp_path / "b")
    proc = cli("permute", _model("mlp"), "-o", tmp_path / "a", "--record", tmp_path / "b", "--no-verify")
    one_line(proc, 2, "two outputs name one file")
    assert (tmp_path / "a").read_bytes() == b"old"


def test_two_outputs_on_two_files_written(tmp_path):
    """The other way: distinct names are written, both."""
    mlp = _model("mlp")
    proc = cli("resync", mlp, "--reference", mlp, "-o", tmp_path / "X", "--report", tmp_path / "X.json")
    assert proc.returncode == 0, proc.stderr
    onnx.load(tmp_path / "X")
    assert (tmp_path / "X.json").read_text().startswith("{")


def test_api_enforces_the_output_check(tmp_path):
    """The API is the front door: the same refusals, before any work."""
    mlp = _model("mlp")
    out = tmp_path / "X"
    with pytest.raises(UsageError, match="two outputs"):
        api.permute(mlp, out, record_path=out, check=False)
    with pytest.raises(UsageError, match="two outputs"):
        api.resync(mlp, mlp, out, report_path=out)
    with pytest.raises(UsageError, match="external data"):
        api.resync(mlp, mlp, out, report_path=tmp_path / "X.data")
    with pytest.raises(UsageError, match="two outputs"):
        api.audit(mlp, mlp, html=out, json_path=out)
    if os.name == "posix":
        os.mkfifo(tmp_path / "fifo")
        if hasattr(api, "inputs"):
            with pytest.raises(UsageError, match="FIFO"):
                api.inputs(mlp, save=tmp_path / "fifo")
        with pytest.raises(UsageError, match="FIFO"):
            api.audit_many([mlp], mlp, jsonl=tmp_path / "fifo")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fifo"] if os.name == "posix" else [])
    _, result = api.permute(mlp, out, record_path=tmp_path / "X.json", check=False)  # the other way
    assert result.output == str(out) and (tmp_path / "X.json").is_file()


# ---------------------------------------------------------------- signals

SLOW_WRITE = r"""
import sys, time
from onnx_resync.io import files, save

def slow_write(path, chunks):  # the model file, in small pieces, slowly
    with open(path, "wb") as fh:
        for chunk in chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), 8192):
                fh.write(view[i:i + 8192])
                fh.flush()
                if i == 0:
                    print("WRITING", file=sys.stderr, flush=True)
                time.sleep(0.02)

original_lazy = save._write_lazy

def slow_lazy(tensor, fh):  # the external-data file, a tensor at a time, slowly
    print("WRITING", file=sys.stderr, flush=True)
    time.sleep(0.5)
    return original_lazy(tensor, fh)

files.write_bytes = slow_write
save._write_lazy = slow_lazy
from onnx_resync.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _external_copy(folder: Path) -> Path:
    folder.mkdir()
    model = onnx.load(_model("mlp"))
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    return folder / "m.onnx"


@POSIX
@pytest.mark.parametrize("mode", ["inline", "lazy"])
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
@pytest.mark.parametrize("old", [False, True], ids=["new-target", "old-target"])
def test_signal_mid_write_leaves_no_temp_file(signame, mode, old, tmp_path):
    """SIGTERM and SIGHUP end a write as SIGINT does: the temporary files are removed, the target is
    the old file (or absent), the input is unchanged; the exit status is 128 + the signal number."""
    if mode == "inline":
        source = _model("mlp")
        env = {}
    else:  # external data, memory-mapped and streamed into a new data file
        source = _external_copy(tmp_path / "in")
        env = {"ONNX_RESYNC_LAZY_BYTES": "1024", "ONNX_RESYNC_LAZY_MIN_TENSOR_BYTES": "1024"}
    inputs_before = {p.name: sha(p) for p in source.parent.iterdir() if p.is_file()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "p.onnx"
    if old:
        out.write_bytes(b"old output")
    signum = getattr(signal, signame)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "permute", str(source), "-o", str(out), "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env), cwd=ROOT)
    try:
        line = proc.stderr.readline()
        assert line.strip() == "WRITING", line + proc.stderr.read()
        time.sleep(0.2)
        assert any(p.name.endswith(".tmp") for p in out_dir.iterdir())  # caught mid-write
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    rest = proc.stderr.read()
    assert code == 128 + signum, (code, rest)
    assert "Traceback" not in rest
    assert [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")] == []
    assert sorted(p.name for p in out_dir.iterdir()) == (["p.onnx"] if old else [])
    if old:
        assert out.read_bytes() == b"old output"
    assert {p.name: sha(p) for p in source.parent.iterdir() if p.is_file()} == inputs_before


@POSIX
def test_unsignalled_slow_write_completes(tmp_path):
    """The other way: the same slowed write, left alone, writes the model and nothing else."""
    out = tmp_path / "p.onnx"
    proc = subprocess.run([sys.executable, "-c", SLOW_WRITE, "permute", str(_model("mlp")), "-o", str(out),
                           "--no-verify"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["p.onnx"]
    onnx.load(out)


def test_library_import_installs_no_handler():
    """Handlers belong to the CLI's main, not to importing the library."""
    code = ("import signal, onnx_resync.api, onnx_resync.cli; "
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert out.stdout.strip() == "True", out.stderr


# ---------------------------------------------------------------- inputs


def _record(tmp_path: Path) -> tuple[Path, Path]:
    """A permuted model and its record."""
    out, record = tmp_path / "p.onnx", tmp_path / "p.json"
    api.permute(_model("mlp"), out, record_path=record, check=False)
    return out, record


@POSIX
@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "folder"])
@pytest.mark.parametrize("option", ["--undo", "--inputs", "--jsonl"])
def test_special_option_file_refused_promptly(option, special, tmp_path):
    permuted, record = _record(tmp_path)
    if special == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif special == "folder":
        path = tmp_path / "folder"
        path.mkdir()
    else:
        path = Path(special)
    mlp = _model("mlp")
    args = {"--undo": ["permute", permuted, "-o", tmp_path / "u.onnx", "--undo", path],
            "--inputs": ["verify", mlp, mlp, "--inputs", path],
            "--jsonl": ["audit", "--reference", mlp, mlp, "--jsonl", path]}[option]
    proc = cli(*args)
    one_line(proc, 2, str(path))
    assert proc.seconds < 30


def test_regular_option_files_read(tmp_path):
    """The other way: the same options naming regular files work."""
    permuted, record = _record(tmp_path)
    mlp = _model("mlp")
    proc = cli("permute", permuted, "-o", tmp_path / "u.onnx", "--undo", record, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert sha(tmp_path / "u.onnx") == sha(mlp)
    npz = tmp_path / "feed.npz"
    np.savez(npz, input=np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32))
    assert cli("verify", mlp, mlp, "--inputs", npz).returncode == 0
    jsonl = tmp_path / "r.jsonl"
    assert cli("audit", "--reference", mlp, mlp, "--jsonl", jsonl).returncode == 0
    again = cli("audit", "--reference", mlp, mlp, "--jsonl", jsonl)
    assert again.returncode == 0 and "already in" in again.stderr


@POSIX
@pytest.mark.parametrize("command", ["groups", "permute", "resync-reference", "verify", "audit-batch"])
def test_fifo_model_refused_promptly(command, tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    mlp = _model("mlp")
    args = {"groups": ["groups", fifo],
            "permute": ["permute", fifo, "-o", tmp_path / "o.onnx"],
            "resync-reference": ["resync", mlp, "--reference", fifo, "-o", tmp_path / "o.onnx"],
            "verify": ["verify", mlp, fifo],
            "audit-batch": ["audit", "--reference", fifo, mlp, mlp]}[command]
    proc = cli(*args)
    one_line(proc, 3, "FIFO")
    assert proc.seconds < 30


@POSIX
def test_fifo_suspect_in_a_batch_is_one_failed_record(tmp_path):
    fifo = tmp_path / "s.onnx"
    os.mkfifo(fifo)
    mlp = _model("mlp")
    proc = cli("audit", "--reference", mlp, fifo, mlp)
    assert proc.returncode == 3 and "FIFO" in proc.stdout and "1 failed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["groups", "permute"])
def test_folder_model_refused(command, tmp_path):
    args = ["groups", tmp_path] if command == "groups" else ["permute", tmp_path, "-o", tmp_path / "o.onnx"]
    one_line(cli(*args), 3, "folder")
    assert cli("groups", _model("mlp")).returncode == 0  # the other way


@POSIX
def test_fifo_external_data_refused(tmp_path):
    model = _external_copy(tmp_path / "m")
    data = model.parent / "m.onnx.data"
    data.unlink()
    os.mkfifo(data)
    with pytest.raises(LoadError, match="not a regular file"):
        load_model(model)
    one_line(cli("groups", model), 3, "not a regular file")


def test_option_file_size_bounded(tmp_path, monkeypatch):
    permuted, record = _record(tmp_path)
    assert api.load_record(record).perms  # the other way
    monkeypatch.setattr(files, "MAX_OPTION_FILE_BYTES", 100)
    with pytest.raises(UsageError, match="larger than 100 bytes"):
        api.load_record(record)


def test_jsonl_line_size_bounded(tmp_path, monkeypatch):
    from onnx_resync.audit import batch

    jsonl = tmp_path / "r.jsonl"
    good = '{"file": "%s", "ok": true, "exit_code": 0}' % (tmp_path / "a.onnx")
    jsonl.write_text(good + "\n" + '{"file": "' + "x" * 500 + '", "ok": true, "exit_code": 0}\n' + good + "\n")
    monkeypatch.setattr(batch, "MAX_OPTION_FILE_BYTES", 200)
    warnings = []
    done = batch.read_jsonl(jsonl, warnings.append)
    assert len(done) == 1 and len(warnings) == 1 and "line 2" in warnings[0] and "longer than" in warnings[0]


# ---------------------------------------------------------------- subgraph limits


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def many_ifs(n: int) -> onnx.ModelProto:
    """n tiny If nodes (two subgraphs each), built at the wire level: one node's bytes with its
    names renumbered, parsed once."""
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x"], ["o"])], name, [],
                                 [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])])

    template = helper.make_node("If", ["c"], ["y_0000000"], name="if_0000000", then_branch=branch("t", "Relu"),
                                else_branch=branch("e", "Neg")).SerializeToString()
    blob = b"".join(b"\x0a" + _varint(len(template)) + template.replace(b"_0000000", b"_%07d" % i)
                    for i in range(n))  # GraphProto field 1 (node), length-delimited
    graph = helper.make_graph([], "ifs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                          helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y_0000000", TensorProto.FLOAT, [4])])
    graph.MergeFromString(blob)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def test_many_subgraphs_refused_fast(tmp_path):
    path = tmp_path / "ifs.onnx"
    onnx.save(many_ifs(65536), path)
    assert path.stat().st_size > 8 << 20
    proc = cli("permute", path, "-o", tmp_path / "o.onnx")
    one_line(proc, 3, f"too many subgraphs (131072 > {external.MAX_SUBGRAPHS})")
    assert proc.seconds < 20
    with pytest.raises(LoadError, match="too many subgraphs"):  # the API, a model in memory
        api.groups(onnx.load(path))


def test_subgraphs_under_the_limit_handled(tmp_path):
    path = tmp_path / "ifs.onnx"
    onnx.save(many_ifs(external.MAX_SUBGRAPHS // 2), path)
    proc = cli("groups", path)
    assert proc.returncode == 0 and proc.seconds < 30, proc.stderr


def nested_ifs(depth: int) -> onnx.ModelProto:
    """If nodes nested `depth` deep in their then branches, built in place (top down): protobuf's
    copies and parser stop at about 33 levels."""
    def value(name: str, kind=TensorProto.FLOAT, shape=(4,)):
        return helper.make_tensor_value_info(name, kind, list(shape))

    model = helper.make_model(helper.make_graph([], "nested", [value("x"), value("c", TensorProto.BOOL, ())],
                                                [value("o")]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = model.graph
    for level in range(depth):
        node = graph.node.add()
        node.op_type, node.input[:], node.output[:] = "If", ["c"], ["o"]
        then, other = node.attribute.add(), node.attribute.add()
        then.name, then.type, other.name, other.type = "then_branch", onnx.AttributeProto.GRAPH, "else_branch", \
            onnx.AttributeProto.GRAPH
        other.g.CopyFrom(helper.make_graph([helper.make_node("Relu", ["x"], ["o"])], "leaf", [], [value("o")]))
        graph = then.g
        graph.name = f"level{level}"
        graph.output.add().CopyFrom(value("o"))
    graph.node.add().CopyFrom(helper.make_node("Relu", ["x"], ["o"]))
    return model


def test_subgraph_depth_bounded():
    with pytest.raises(LoadError, match="nested too deep"):
        external.check_graph_limits(nested_ifs(external.MAX_SUBGRAPH_DEPTH + 1))
    with pytest.raises(LoadError, match="nested too deep"):  # the API, a model in memory
        api.groups(nested_ifs(external.MAX_SUBGRAPH_DEPTH + 1))
    external.check_graph_limits(nested_ifs(external.MAX_SUBGRAPH_DEPTH))  # the other way


# ---------------------------------------------------------------- what ONNX Runtime refuses


@pytest.mark.parametrize("opsets, needle", [
    ((("", 999),), "opset ai.onnx 999"),
    ((("", 17), ("com.microsoft", 9)), "opset com.microsoft 9"),
    ((("", 17), ("ai.onnx.ml", 99)), "opset ai.onnx.ml 99"),
])
def test_unsupported_opset_refused(opsets, needle, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny(opsets), path)
    one_line(cli("groups", path), 3, needle, "not supported")
    with pytest.raises(LoadError, match=needle):
        load_model(path)


@pytest.mark.parametrize("opsets", [(("", 17),), (("", 17), ("com.microsoft", 1)), (("", 17), ("ai.onnx.ml", 3)),
                                    (("", 17), ("com.example.custom", 7))])
def test_supported_opset_loads(opsets, tmp_path):
    """The other way: versions ONNX Runtime runs, and custom domains it does not judge."""
    path = tmp_path / "m.onnx"
    onnx.save(tiny(opsets), path)
    assert cli("groups", path).returncode == 0


def _external_tiny(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(tiny(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    return path


@pytest.mark.parametrize("key", ["location", "offset", "length", "checksum"])
def test_duplicate_external_data_key_refused(key, tmp_path):
    path = _external_tiny(tmp_path)
    model = onnx.load(path, load_external_data=False)
    tensor = model.graph.initializer[0]
    info = {e.key: e.value for e in tensor.external_data}
    for value in (info.get(key, "0"), {"location": "m.data", "offset": "0", "length": "128",
                                       "checksum": "x"}[key]):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
    one_line(cli("groups", path), 3, repr(tensor.name), f"{key!r}")
    with pytest.raises(LoadError, match="ambiguous"):
        load_model(path)


def test_reserved_external_data_key_refused(tmp_path):
    path = _external_tiny(tmp_path)
    model = onnx.load(path, load_external_data=False)
    entry = model.graph.initializer[0].external_data.add()
    entry.key, entry.value = external.IN_PLACE_KEY, "1"
    onnx.save(model, path)
    with pytest.raises(LoadError, match="reserved"):
        load_model(path)


def test_external_data_without_duplicates_loads(tmp_path):
    """The other way."""
    path = _external_tiny(tmp_path)
    assert cli("groups", path).returncode == 0
    assert load_model(path).graph.initializer[0].name == "W1"
