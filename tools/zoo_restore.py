"""`audit -o` over the exporter zoo (tools/build_zoo.py): every permuted variant of the manifest
(`<transform>.perm`, not the noisy ones) is audited against its fp32 source with -o, and the restored file compared with
the zoo's unpermuted variant of the same transform (`<transform>`, made from the unpermuted
source by the same tool): the share of its stored tensors that are equal bit for bit (names that
both files have). Transforms that commute with permutations (casts, per-channel quantization, ORT's
folds) give 100%; calibrated activation scales of a quantizer may differ in their last bits.

    python tools/zoo_restore.py [--zoo ~/.cache/onnx-resync/zoo] [--out docs/zoo_restore.md] [--timeout 180]

Writes a markdown table: file, verdict, groups restored / groups, neurons moved, verified, tensors
equal to the unpermuted variant, or why nothing was written.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnx_resync import api  # noqa: E402
from onnx_resync.errors import ResyncError  # noqa: E402


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _tensors(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _rounding(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind == "f":
        return bool(np.allclose(a, b, rtol=1e-5, atol=0))
    return a.dtype == np.int32 and int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) <= 1


def one(source: Path, suspect: Path, unpermuted: Path, timeout: int) -> dict:
    row = {"file": f"{suspect.parent.name}/{suspect.name}"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "restored.onnx"
        signal.alarm(timeout)
        try:
            # no shapes given: the input plan sizes every input, the genai decoders' key/value caches too
            report = api.audit(str(suspect), str(source), output=str(out))
            row.update(verdict=report.verdict, restored=report.restored)
        except ResyncError as exc:
            report = getattr(exc, "report", None)
            row.update(verdict=report.verdict if report is not None else "error",
                       restored=report.restored if report is not None else {}, error=str(exc).splitlines()[0])
        except _Timeout:
            row.update(verdict="timeout", restored={})
        except Exception as exc:  # noqa: BLE001 - a study goes on
            row.update(verdict="internal error", restored={}, error=f"{type(exc).__name__}: {exc}")
        finally:
            signal.alarm(0)
        if out.exists() and unpermuted.exists():
            got, want = _tensors(out), _tensors(unpermuted)
            common = [k for k in got if k in want and got[k].shape == want[k].shape]
            row["equal"] = sum(1 for k in common if np.array_equal(got[k], want[k]))
            row["common"] = len(common)
            # a calibrated scale (activation ranges, a bias scale made from one) of the permuted copy
            # differs in its last bits: the calibration ran on activations summed in another order; an
            # int32 bias quantized with such a scale may then round one step the other way
            row["rounding"] = sum(1 for k in common if not np.array_equal(got[k], want[k]) and _rounding(got[k], want[k]))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(Path.home() / ".cache/onnx-resync/zoo"))
    parser.add_argument("--out", default="docs/zoo_restore.md")
    parser.add_argument("--timeout", type=int, default=180)
    parser.add_argument("--models", nargs="*", help="only these zoo models")
    args = parser.parse_args()
    zoo = Path(args.zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name, entry in manifest["models"].items():
        if args.models and name not in args.models:
            continue
        source = Path(entry["source"])
        variants = entry.get("variants", {})
        for key in sorted(k for k in variants if k.endswith(".perm")):
            suspect = Path(variants[key]["file"])
            unpermuted = Path(variants.get(key[:-len(".perm")], {}).get("file", "/nonexistent"))
            row = one(source, suspect, unpermuted, args.timeout)
            row["file"] = f"{name}/{key}"
            rows.append(row)
            r = row["restored"] or {}
            print(json.dumps({k: v for k, v in row.items() if k != "restored"}
                             | {k: r.get(k) for k in ("written", "restored", "groups", "moved")}), flush=True)
    lines = ["# `audit -o` over the exporter zoo", "",
             "Generated by `python tools/zoo_restore.py`: each permuted zoo file audited against its fp32 source "
             "with `-o`; *equal*: the restored file's stored tensors equal, bit for bit, to the zoo's unpermuted "
             "file of the same transform (tensors both have); *calibration rounding*: float tensors within 1e-5 "
             "relative of it (a quantizer's calibrated activation scales, and bias scales made from them, of the "
             "permuted copy: its calibration ran on activations summed in another order), and int32 biases "
             "quantized with them within one step. A file that moves neurons only in units (the int4 decoder's "
             "MatMulNBits: K in whole blocks of 32) is restored in whole units where the audit's order maps "
             "whole units to whole units (a file permuted by the package); groups its storage pins (the genai "
             "decoders' key/value caches) are listed as not restored.", "",
             "| file | verdict | groups restored | neurons moved | verified | tensors equal to the unpermuted file "
             "| calibration rounding | seconds | not written because |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["restored"] or {}
        restored = f"{r.get('restored', '')}/{r.get('groups', '')}" if r.get("written") else "-"
        equal = f"{row['equal']}/{row['common']}" if "common" in row else "-"
        rounding = row.get("rounding", "-")
        why = "" if r.get("written") else (row.get("error") or r.get("reason", ""))
        lines.append(f"| {row['file']} | {row['verdict']} | {restored} | {r.get('moved', '-') if r.get('written') else '-'} "
                     f"| {'yes' if r.get('verified') else '-'} | {equal} | {rounding} | {row['seconds']} | {why.replace('|', '/')} |")
    written = [row for row in rows if (row["restored"] or {}).get("written")]
    full = [row for row in written if row["restored"]["restored"] == row["restored"]["groups"]]
    exact = [row for row in written if row.get("common") and row["equal"] == row["common"]]
    near = [row for row in written if row.get("common") and row["equal"] + row["rounding"] == row["common"]]
    lines += ["", f"{len(rows)} files: {len(written)} written ({len(full)} with every group restored), "
              f"{len(exact)} equal to the unpermuted file in every stored tensor, {len(near)} up to calibration "
              "rounding."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
