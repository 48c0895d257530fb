"""`onnx-resync verify A.onnx B.onnx`: do two models compute the same function? (exit 0 yes, 1 no,
4 cannot check: no finite value compared)"""

from __future__ import annotations

import argparse

from ._common import add_verify_options, seed_arg, verify_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check with ONNX Runtime that two models compute the same function",
        description="Run both models on the same seeded random inputs (or --inputs) and compare every "
        "output. Passes when max|err| / max|ref| <= --tolerance per output, or element-wise with "
        "--atol/--rtol. Bool inputs and inputs that reach an If/Loop condition are varied so that every "
        "branch runs. Every output must compare at least one finite value (finite on both sides): an "
        "empty batch, or outputs all NaN/inf, prove nothing. Exit 0 equivalent, 1 not equivalent, "
        "2 usage, 3 load/signature error, 4 cannot check (no finite value compared).",
    )
    p.add_argument("reference", help="reference model (.onnx)")
    p.add_argument("candidate", help="model to compare against the reference (.onnx)")
    add_verify_options(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="random input seed, 0..2**63-1 (default 0)")
    p.add_argument("--atol", type=float, help="element-wise absolute tolerance (switches to element-wise check)")
    p.add_argument("--rtol", type=float, help="element-wise relative tolerance (switches to element-wise check)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import verify  # ORT import only when the command runs

    report = verify(args.reference, args.candidate, seed=args.seed, atol=args.atol, rtol=args.rtol,
                    **verify_options(args))
    print(report.to_json() if args.json else report.format_text())
    return report.exit_code
