"""The wheel carries its demo (issue 19.5): a wheel built from the sources, installed on its own (no
editable checkout, no ONNX_RESYNC_MODELS), runs `onnx-resync demo` from a temporary folder.

The sources are copied to a temporary folder first, so the build leaves nothing in the checkout. The
wheel is installed with `pip install --no-deps --target` and run with PYTHONPATH pointing there: the
dependencies come from this interpreter's environment, the package from the wheel (checked)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def _copy_sources(dst: Path) -> None:
    for name in SOURCES:
        shutil.copyfile(ROOT / name, dst / name)
    shutil.copytree(ROOT / "onnx_resync", dst / "onnx_resync", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dst / "models").mkdir()
    for pattern in ("*.onnx", "*_test.npz", "MANIFEST.json"):
        for f in (ROOT / "models").glob(pattern):
            shutil.copyfile(f, dst / "models" / f.name)


def test_built_wheel_runs_the_demo_from_any_folder(tmp_path):
    src, dist, target, work = (tmp_path / n for n in ("src", "dist", "site", "elsewhere"))
    for d in (src, dist, work):
        d.mkdir()
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if k not in ("ONNX_RESYNC_MODELS", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(dist), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("onnx_resync-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"onnx_resync/_models/resnet.onnx", "onnx_resync/_models/resnet_test.npz",
            "onnx_resync/_models/MANIFEST.json"} <= names
    assert not any("variants" in n for n in names)
    assert wheel.stat().st_size < 16 << 20  # reasonable: the seven small models and their test sets

    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env["PYTHONPATH"] = str(target)
    where = subprocess.run([sys.executable, "-c", "import onnx_resync.demo as d; print(d.__file__); print(d.models_dir())"],
                           capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert where.returncode == 0, where.stderr
    module, models = where.stdout.split()
    assert Path(module).is_relative_to(target) and Path(models) == target / "onnx_resync" / "_models"
    demo = subprocess.run([sys.executable, "-m", "onnx_resync", "demo", "--workdir", str(work / "demo")],
                          capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "5. check" in demo.stdout and "back in their original place (100.00%)" in demo.stdout
