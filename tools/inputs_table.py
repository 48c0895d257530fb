#!/usr/bin/env python3
"""The vendor models with no hint: permute (verified), undo (byte-exact), resync -o (verified), verify.

    python tools/inputs_table.py [--src DIR] [KEY or FILE.onnx ...]

Runs `python -m onnx_resync` (from DIR when given: an older checkout of the package, to compare) on
each model of tests/vendor_models.py (fetched and cached; or each .onnx file named) in a temporary
folder, and prints one
Markdown row per model: the exit status of each command (ok, or the code and the message's first
words) and, from `onnx-resync inputs` when the package has it, the inputs chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from vendor_models import MODELS, fetch  # noqa: E402


def _cli(src: pathlib.Path, *args, cwd) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run([sys.executable, "-m", "onnx_resync", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _cell(rc: int, out: str, ok: bool | None = None) -> str:
    if rc == 0 and ok is not False:
        return "ok"
    lines = [ln for ln in out.splitlines() if "error" in ln.lower()] or out.splitlines() or [""]
    words = lines[-1].replace("onnx-resync: error: ", "").replace("|", "/")
    return f"exit {rc}: {words[:90]}" if rc else f"differs: {words[:90]}"


def _same_bytes(a: pathlib.Path, b: pathlib.Path) -> bool:
    """The model files and their external data files beside them (NAME.data), byte for byte."""
    data_a, data_b = a.with_name(a.name + ".data"), b.with_name(b.name + ".data")
    return a.read_bytes() == b.read_bytes() and data_a.exists() == data_b.exists() and (
        not data_b.exists() or data_a.read_bytes() == data_b.read_bytes())


def row(src: pathlib.Path, key: str) -> list[str]:
    model = pathlib.Path(key) if key.endswith(".onnx") else fetch(key)
    with tempfile.TemporaryDirectory(prefix="inputs-table-") as tmp:
        t = pathlib.Path(tmp)
        undone = t / "undone" / model.name  # the model's own name: an external data file keeps its name
        undone.parent.mkdir()
        rc, out = _cli(src, "permute", model, "-o", t / "p.onnx", "--record", t / "r.json", cwd=tmp)
        cells = [_cell(rc, out)]
        if rc == 0:
            rc, out = _cli(src, "permute", t / "p.onnx", "-o", undone, "--undo", t / "r.json", "--no-verify",
                           cwd=tmp)
            same = rc == 0 and _same_bytes(undone, model)
            cells.append(_cell(rc, out if rc else "undone file is not byte-identical", same))
        else:  # the other commands do not need a verified permutation
            _cli(src, "permute", model, "-o", t / "p.onnx", "--record", t / "r.json", "--no-verify", cwd=tmp)
            cells.append("(no permuted file)" if not (t / "p.onnx").exists() else "-")
            if (t / "p.onnx").exists():
                rc, out = _cli(src, "permute", t / "p.onnx", "-o", undone, "--undo", t / "r.json",
                               "--no-verify", cwd=tmp)
                same = rc == 0 and _same_bytes(undone, model)
                cells[-1] = _cell(rc, out if rc else "undone file is not byte-identical", same)
        rc, out = _cli(src, "resync", t / "p.onnx", "--reference", model, "-o", t / "b.onnx", cwd=tmp)
        cells.append(_cell(rc, out))
        rc, out = _cli(src, "verify", model, t / "p.onnx", cwd=tmp)
        cells.append(_cell(rc, out))
        rc, out = _cli(src, "inputs", model, "--json", cwd=tmp)
        if rc == 0:
            chosen = json.loads(out)["inputs"]
            cells.append("; ".join(f"{i['name']} {'x'.join(map(str, i['shape'])) or 'scalar'} {i['range']}"
                                   for i in chosen))
        else:
            cells.append("1 for every symbolic dim, ints 0..9")
    label = key if not key.endswith(".onnx") else f"{model.parent.parent.parent.name}/{model.parent.name}"
    return [f"`{label}`", *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=pathlib.Path, default=ROOT, help="folder holding the onnx_resync package")
    parser.add_argument("keys", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    print("| model | permute (verified) | undo (byte-exact) | resync -o (verified) | verify permuted | inputs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in args.keys:
        print("| " + " | ".join(row(args.src.resolve(), key)) + " |", flush=True)


if __name__ == "__main__":
    main()
