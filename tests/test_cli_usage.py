"""Every value a user types is checked: a bad one is one line on stderr and exit 2, never "internal
error" (issue 18.3); options say what they do and their default; a closed pipe ends quietly (issue 19).

The bad values and help texts run through the CLI's main in one worker process (tests/cli_worker.py:
the same exit code and file-descriptor output, without an interpreter start per command); the entry
point `python -m onnx_resync` itself is run for two bad values (one refused by argparse, one by the
command's own check) and for the pipe tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli_worker

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", ROOT / "models"))


def _model(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing (run tools/build_models.py)")
    return path


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ONNX_RESYNC_DEBUG", None)
    return env


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m onnx_resync *args`, a process of its own."""
    return subprocess.run([sys.executable, "-m", "onnx_resync", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def in_worker(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """The same through the CLI's main in the shared worker."""
    return cli_worker.run(*args, timeout=timeout)


BAD = {
    "seed -1": ("permute", "{mlp}", "-o", "{out}", "--seed", "-1"),
    "seed 2**63": ("permute", "{mlp}", "-o", "{out}", "--seed", str(2 ** 63)),
    "seed of 5000 digits": ("permute", "{mlp}", "-o", "{out}", "--seed", "9" * 5000),
    "seed 1.5": ("permute", "{mlp}", "-o", "{out}", "--seed", "1.5"),
    "seed 1e3": ("permute", "{mlp}", "-o", "{out}", "--seed", "1e3"),
    "seed word": ("permute", "{mlp}", "-o", "{out}", "--seed", "abc"),
    "verify seed -1": ("verify", "{mlp}", "{mlp}", "--seed", "-1"),
    "demo seed -1": ("demo", "--seed", "-1", "--workdir", "{out}"),
    "samples 0": ("verify", "{mlp}", "{mlp}", "--samples", "0"),
    "samples -3": ("verify", "{mlp}", "{mlp}", "--samples", "-3"),
    "samples 1000000": ("verify", "{mlp}", "{mlp}", "--samples", "1000000"),
    "samples 2.5": ("permute", "{mlp}", "-o", "{out}", "--samples", "2.5"),
    "shape no name": ("verify", "{mlp}", "{mlp}", "--shape", "1,784"),
    "shape letters": ("verify", "{mlp}", "{mlp}", "--shape", "input:a,b"),
    "shape negative": ("verify", "{mlp}", "{mlp}", "--shape", "input:1,-784"),
    "shape float": ("verify", "{mlp}", "{mlp}", "--shape", "input:1.5,784"),
    "shape absurd dim": ("verify", "{mlp}", "{mlp}", "--shape", "input:99999999999999999999,784"),
    "shape absurd size": ("resync", "{mlp}", "--reference", "{mlp}", "-o", "{out}", "--shape",
                          "input:100000000,256"),
    "shape twice": ("verify", "{mlp}", "{mlp}", "--shape", "input:1,784", "--shape", "input:2,784"),
    "tolerance nan": ("verify", "{mlp}", "{mlp}", "--tolerance", "nan"),
    "tolerance negative": ("verify", "{mlp}", "{mlp}", "--tolerance", "-1"),
    "noise nan": ("demo", "--noise", "nan", "--workdir", "{out}"),
    "noise -0.1": ("demo", "--noise", "-0.1", "--workdir", "{out}"),
    "noise inf": ("demo", "--noise", "inf", "--workdir", "{out}"),
    "noise word": ("demo", "--noise", "much", "--workdir", "{out}"),
    "demo model path": ("demo", "--model", "../../etc/passwd", "--workdir", "{out}"),
    "jobs 0": ("audit", "--reference", "{mlp}", "{mlp}", "{mlp}", "--jobs", "0"),
    "jobs -2": ("audit", "--reference", "{mlp}", "{mlp}", "{mlp}", "-j", "-2"),
    "jobs huge": ("audit", "--reference", "{mlp}", "{mlp}", "{mlp}", "--jobs", "10000000"),
    "jobs word": ("audit", "--reference", "{mlp}", "{mlp}", "{mlp}", "--jobs", "many"),
    "unknown option": ("groups", "{mlp}", "--no-such-option"),
    "missing argument": ("permute", "{mlp}"),
}


def _bad_value_is_one_line_exit_2(case, tmp_path, run):
    out = tmp_path / "out"
    args = [a.format(mlp=_model("mlp"), out=out) for a in BAD[case]]
    done = run(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_line_exit_2(case, tmp_path):
    _bad_value_is_one_line_exit_2(case, tmp_path, in_worker)


@pytest.mark.parametrize("case", ["missing argument", "seed -1"])
def test_bad_value_through_the_entry_point(case, tmp_path):
    _bad_value_is_one_line_exit_2(case, tmp_path, cli)


def test_closed_pipe_ends_quietly():
    """The reader left before the first line: no "Broken pipe" message; the status a SIGPIPE'd tool gives."""
    proc = subprocess.Popen([sys.executable, "-m", "onnx_resync", "groups", "--slots", str(_model("resnet"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, (proc.returncode, err)
    assert err == b"", err


def test_pipe_to_head_is_quiet():
    done = subprocess.run(f"{sys.executable} -m onnx_resync groups --json {_model('resnet')} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == "{"


def _help(command: str) -> str:
    done = in_worker(command, "--help")
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


def test_help_texts():
    permute = _help("permute")
    assert "seed of the random permutations, 0..2**63-1 (default 0)" in permute
    assert "(default auto)" in permute  # --device
    demo = _help("demo")
    assert "each weight tensor's std, 0..10 (default 0.1)" in demo and "noise), 0..2**63-1 (default 0)" in demo
    for command, phrase in (("audit", "Exit 0 derived"), ("resync", "Exit 0 derived"), ("groups", "pinned and why")):
        assert phrase in _help(command), command
