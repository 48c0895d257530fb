"""`onnx-resync demo`: the main job on a bundled model, in one command with no arguments."""

from __future__ import annotations

from ..demo import DEFAULT_MODEL, run_demo


def register(sub) -> None:
    p = sub.add_parser("demo", help="walk, permute, perturb, re-synchronize and verify a bundled model")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name: mlp, vgg, resnet, mobilenet, csp, transformer, gru (default {DEFAULT_MODEL})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.1, help="noise std as a fraction of each tensor's std")
    p.add_argument("--workdir", help="folder for the files the demo writes (default: a new temp folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    report = run_demo(args.model, seed=args.seed, noise=args.noise, workdir=args.workdir)
    return 0 if report.ok else 1
