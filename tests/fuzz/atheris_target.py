"""libFuzzer (atheris) target: bytes -> io.load_model -> walk; only ResyncError may come out.

Coverage-guided: atheris instruments onnx_resync's Python code, so the fuzzer learns which bytes
reach new branches of the loader and the walker. Run it directly for a campaign:

    python tests/fuzz/atheris_target.py -max_total_time=600 -timeout=30 -rss_limit_mb=3000 CORPUS_DIR

or through tools/fuzz.py --atheris SECONDS. An uncaught exception, a hang (-timeout) or memory past
-rss_limit_mb stops the run with a crash file (libFuzzer's usual output).
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["onnx_resync"]):
    from onnx_resync import io
    from onnx_resync.errors import ResyncError
    from onnx_resync.walk import walk

_DIR = tempfile.mkdtemp(prefix="atheris-onnx-resync-")
_PATH = os.path.join(_DIR, "m.onnx")


def TestOneInput(data: bytes) -> None:
    with open(_PATH, "wb") as fh:
        fh.write(data)
    try:
        model = io.load_model(_PATH)
        walk(model)
    except ResyncError:
        pass


def write_seeds(folder: str) -> None:
    """The seed models as the initial corpus."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fuzz.cases import SEEDS

    os.makedirs(folder, exist_ok=True)
    for name, build in SEEDS.items():
        with open(os.path.join(folder, f"seed-{name}.onnx"), "wb") as fh:
            fh.write(build().SerializeToString())


if __name__ == "__main__":
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for folder in corpus[:1]:
        write_seeds(folder)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
