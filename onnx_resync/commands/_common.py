"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import json
import sys

from ..errors import UsageError
from ..inputs import MAX_SAMPLES  # one bound, which verify() enforces too


def add_verify_options(parser, *, prefix_help: str = "") -> None:
    """Options that control the ONNX Runtime equivalence check."""
    g = parser.add_argument_group("equivalence check" + prefix_help)
    g.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix an input's shape (symbolic dims default to 1); repeatable")
    g.add_argument("--inputs", metavar="FILE.npz", help="inputs to run instead of seeded random ones")
    g.add_argument("--samples", type=int, default=1,
                   help=f"random input batches, 1..{MAX_SAMPLES} (default 1); bool inputs and inputs that "
                   "reach an If/Loop condition are also varied so that every branch runs")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--tolerance", type=float, default=1e-5,
                   help="max abs error / max |reference| per output (default 1e-5)")


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    """'name:1,3,32,32' -> {'name': [1, 3, 32, 32]}; split at the last ':' (TF names contain ':')."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")] if dims.strip() else []
        except ValueError:
            values = None
        if not sep or not name or values is None or any(v < 0 for v in values):
            raise UsageError(f"--shape {spec!r}: expected NAME:D1,D2,... with non-negative integers")
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
