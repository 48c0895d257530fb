"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import json
import sys

from ..errors import UsageError


def add_verify_options(parser, *, prefix_help: str = "") -> None:
    """Options that control the ONNX Runtime equivalence check."""
    g = parser.add_argument_group("equivalence check" + prefix_help)
    g.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix an input's shape (symbolic dims default to 1); repeatable")
    g.add_argument("--inputs", metavar="FILE.npz", help="inputs to run instead of seeded random ones")
    g.add_argument("--samples", type=int, default=1, help="random input batches (default 1)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--tolerance", type=float, default=1e-5,
                   help="max abs error / max |reference| per output (default 1e-5)")


def parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise UsageError(f"--shape {item!r}: expected NAME:D1,D2,... with integer dims") from None
    return shapes


def verify_options(args) -> dict:
    return {
        "shapes": parse_shapes(args.shape),
        "inputs": args.inputs,
        "samples": args.samples,
        "device": args.device,
        "tolerance": args.tolerance,
    }


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")
