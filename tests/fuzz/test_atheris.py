"""A short coverage-guided run (atheris/libFuzzer) over the loader and the walker; skipped when
atheris is not installed (it is in the `dev` extra where a wheel exists)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).with_name("atheris_target.py")
RUNS = int(os.environ.get("FUZZ_ATHERIS_RUNS", "3000"))


def test_atheris_short_run(tmp_path):
    corpus = tmp_path / "corpus"
    proc = subprocess.run(
        [sys.executable, str(TARGET), f"-runs={RUNS}", "-timeout=30", "-rss_limit_mb=3000", "-max_len=65536",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert "Done" in proc.stderr, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), tail
