"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from contextlib import contextmanager

from ..errors import CheckFailed, UsageError
from ..api import MAX_SAMPLES  # one bound, which verify() enforces too
from ..api import MAX_SEED

MAX_DIM = 2 ** 31 - 1
MAX_SHAPE_ELEMENTS = 2 ** 30  # one input of one sample; runtime.MAX_SAMPLE_BYTES bounds the bytes


def int_arg(low: int, high: int, what: str = "an integer", span: str | None = None):
    """argparse type: an integer in low..high (decimal digits, optional sign), else a one-line usage error."""
    span = span or f"{low}..{high}"

    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", text.strip()):
            raise argparse.ArgumentTypeError(f"expected {what} in {span}, got {_shown(text)}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in {span}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def float_arg(low: float, high: float):
    """argparse type: a finite number in low..high."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"expected a number in {low:g}..{high:g}, got {_shown(text)}")
        return value
    parse.__name__ = "number"
    return parse


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


seed_arg = int_arg(0, MAX_SEED, "a seed", "0..2**63-1")


def add_verify_options(parser, *, prefix_help: str = "") -> None:
    """Options that control the ONNX Runtime equivalence check."""
    g = parser.add_argument_group("equivalence check" + prefix_help)
    g.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix an input's shape (its named dims bind the same names elsewhere); repeatable "
                   "(default: shapes read from the graph and tried in ONNX Runtime; see `onnx-resync inputs`)")
    g.add_argument("--inputs", metavar="FILE.npz",
                   help="inputs to run instead of the planned seeded ones (`onnx-resync inputs MODEL --save "
                   "FILE.npz` writes the planned ones to edit)")
    g.add_argument("--samples", type=int_arg(1, MAX_SAMPLES), default=1,
                   help=f"random input batches, 1..{MAX_SAMPLES} (default 1); bool inputs and inputs that "
                   "reach an If/Loop condition are also varied so that every branch runs")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where ONNX Runtime runs the check: auto = CUDA when available, else CPU (default auto)")
    g.add_argument("--tolerance", type=float_arg(0.0, math.inf), default=1e-5,
                   help="max abs error / max |reference| per output (default 1e-5)")


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    """'name:1,3,32,32' -> {'name': [1, 3, 32, 32]}; split at the last ':' (TF names contain ':')."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        parts = [d.strip() for d in dims.split(",")] if dims.strip() else []
        values = [int(d) for d in parts] if all(re.fullmatch(r"[0-9]{1,12}", d) for d in parts) else None
        if not sep or not name or values is None:
            raise UsageError(f"--shape {_shown(spec)}: expected NAME:D1,D2,... with non-negative integers")
        if len(values) > 64 or any(v > MAX_DIM for v in values) or math.prod(values) > MAX_SHAPE_ELEMENTS:
            raise UsageError(f"--shape {_shown(spec)}: too large (at most 64 dims of up to {MAX_DIM}, "
                             f"{MAX_SHAPE_ELEMENTS} elements)")
        if name in shapes:
            raise UsageError(f"--shape given twice for {name!r}")
        shapes[name] = values
    return shapes


def verify_options(args) -> dict:
    return {
        "shapes": parse_shapes(args.shape) or None,
        "inputs": args.inputs,
        "samples": args.samples,
        "device": args.device,
        "tolerance": args.tolerance,
    }


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")


@contextmanager
def verdict_shown_on_failure(show):
    """A check that fails after the verdict was found (the restored file is not equivalent): the
    verdict is printed with show(report) first, then the failure goes on to its exit code."""
    try:
        yield
    except CheckFailed as exc:
        if getattr(exc, "report", None) is not None:
            show(exc.report)
            sys.stdout.flush()
        raise
