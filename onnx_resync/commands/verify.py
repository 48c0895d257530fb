"""`onnx-resync verify A.onnx B.onnx`: do two models compute the same function? (exit 0 yes, 1 no)"""

from __future__ import annotations

import argparse

from ..errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check with ONNX Runtime that two models compute the same function",
        description="Run both models on the same seeded random inputs (or --inputs) and compare every "
        "output. Passes when max|err| / max|ref| <= --tolerance per output, or element-wise with "
        "--atol/--rtol. Exit 0 equivalent, 1 not, 2 usage, 3 load/signature error.",
    )
    p.add_argument("reference", help="reference model (.onnx)")
    p.add_argument("candidate", help="model to compare against the reference (.onnx)")
    p.add_argument("--inputs", metavar="NPZ", help=".npz with one array per model input (keys = input names)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="shape of an input with symbolic dims (repeatable); other symbolic dims are 1")
    p.add_argument("--samples", type=int, default=1, help="number of random input samples (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random input seed (default 0)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when it works, else CPU (default)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="max normalized error per output (default 1e-5)")
    p.add_argument("--atol", type=float, help="element-wise absolute tolerance (switches to element-wise check)")
    p.add_argument("--rtol", type=float, help="element-wise relative tolerance (switches to element-wise check)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    from ..verify import verify  # ORT import only when the command runs

    report = verify(
        args.reference, args.candidate, inputs=args.inputs, shapes=parse_shapes(args.shape) or None,
        samples=args.samples, seed=args.seed, device=args.device, tolerance=args.tolerance,
        atol=args.atol, rtol=args.rtol,
    )
    print(report.to_json() if args.json else report.format_text())
    return 0 if report.equivalent else 1
