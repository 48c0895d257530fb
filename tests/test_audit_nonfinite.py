"""Audit on weights that are not finite, or become so when folded: one line or a verdict, never an
internal error (the vendor-zoo helper's unrelated twin drew BatchNorm variances below zero; the
folded scale 1/sqrt(var + eps) was NaN and the layer assignment raised 'matrix contains invalid
numeric entries', exit 5)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import cli_worker

MODELS = Path(__file__).resolve().parent.parent / "models"


def _audit(suspect: Path) -> subprocess.CompletedProcess:
    """The audit command through the CLI's main in the shared worker (tests/cli_worker.py; each command
    warns there as in a fresh process)."""
    return cli_worker.run("audit", str(suspect), "--reference", str(MODELS / "resnet.onnx"))


def test_a_twin_with_negative_variances_is_not_derived(tmp_path):
    """Every float weight redrawn with its tensor's mean and std (BatchNorm variances go negative):
    its BatchNorms are not folded (they would compute NaN) and the verdict is 'not derived'."""
    model = onnx.load(str(MODELS / "resnet.onnx"))
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size > 1:
            t.CopyFrom(numpy_helper.from_array((rng.standard_normal(a.shape) * a.std() + a.mean()).astype(np.float32), t.name))
    onnx.save(model, tmp_path / "twin.onnx")
    proc = _audit(tmp_path / "twin.onnx")
    assert proc.returncode == 1 and "not derived" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


def test_a_nan_weight_is_refused_in_one_line(tmp_path):
    model = onnx.load(str(MODELS / "resnet.onnx"))
    t = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    a = numpy_helper.to_array(t).copy()
    a.flat[0] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(model, tmp_path / "nan.onnx")
    proc = _audit(tmp_path / "nan.onnx")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1 and "NaN or infinite" in lines[0], proc.stderr
