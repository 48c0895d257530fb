"""`onnx-resync inputs MODEL`: what the checks feed a model (shape, dtype, range, why); --save an .npz."""

from __future__ import annotations

from ..api import inputs
from ._common import parse_shapes, print_json, seed_arg


def register(sub) -> None:
    p = sub.add_parser("inputs", help="show (and save) the inputs the checks feed a model, and why",
                       description="Read from the graph a shape and values every input accepts (image sizes "
                       "its Resize and strided Concat take, ids below the tables they index, masks of ones, "
                       "scalars at the constants they are compared with, recurrent states of zeros), try them "
                       "in ONNX Runtime (the next candidate when one fails), and print each input's declared "
                       "and chosen shape, dtype, range and why. --save writes them as an .npz that verify, "
                       "permute and resync take with --inputs. Exit 0 ONNX Runtime runs them, 1 it refused "
                       "every try, 2 usage, 3 load or runtime error.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix an input's shape (its named dims bind the same names elsewhere); repeatable "
                   "(default: from the graph)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random values, 0..2**63-1 (default 0)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where ONNX Runtime tries them: auto = CUDA when available, else CPU (default auto)")
    p.add_argument("--save", metavar="FEEDS.npz", help="write the chosen inputs here (default: not written)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    report = inputs(args.model, shapes=parse_shapes(args.shape) or None, seed=args.seed, device=args.device,
                    save=args.save)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_text())
    return 0 if report.runs else 1
