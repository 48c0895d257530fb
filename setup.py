"""Build hook (the rest of the configuration is pyproject.toml): a built wheel carries the bundled
models (models/*.onnx, models/*_test.npz, models/MANIFEST.json; not models/variants) as
onnx_resync/_models, so `onnx-resync demo` runs from an installed wheel in any folder. An editable
install (`pip install -e .`) reads models/ of the checkout instead (onnx_resync.demo.models_dir)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "models"
BUNDLED = ("*.onnx", "*_test.npz", "MANIFEST.json")


class BuildPyWithModels(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "onnx_resync" / "_models"
        target.mkdir(parents=True, exist_ok=True)
        for pattern in BUNDLED:
            for src in sorted(MODELS.glob(pattern)):
                shutil.copyfile(src, target / src.name)


setup(cmdclass={"build_py": BuildPyWithModels})
