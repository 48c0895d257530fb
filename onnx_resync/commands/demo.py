"""`onnx-resync demo`: the main job on a bundled model, in one command with no arguments."""

from __future__ import annotations

import re

from ..demo import DEFAULT_MODEL, run_demo
from ..errors import UsageError
from ._common import float_arg, seed_arg

MAX_NOISE = 10.0


def register(sub) -> None:
    p = sub.add_parser("demo", help="walk, permute, perturb, re-synchronize and verify a bundled model",
                       description="The main job on a bundled model in one command: walk, permute (verified), add "
                       "noise, resync against the original and count the neurons put back. Exit 0 all recovered, "
                       "1 not, 2 usage, 3 load or runtime error.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name: mlp, vgg, resnet, mobilenet, csp, transformer, gru (default {DEFAULT_MODEL})")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of the permutation (and, plus one, of the noise), 0..2**63-1 (default 0)")
    p.add_argument("--noise", type=float_arg(0.0, MAX_NOISE), default=0.1,
                   help=f"noise std as a fraction of each weight tensor's std, 0..{MAX_NOISE:g} (default 0.1)")
    p.add_argument("--workdir", help="folder for the files the demo writes (default: a new temp folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", args.model):
        raise UsageError(f"--model {args.model[:40]!r}: expected a bundled model's name, such as {DEFAULT_MODEL}")
    report = run_demo(args.model, seed=args.seed, noise=args.noise, workdir=args.workdir)
    return 0 if report.ok else 1
