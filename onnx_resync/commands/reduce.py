"""`onnx-resync reduce MODEL -o OUT`: take structural padding out of a model, without its reference.

Exit 0 when done (whether or not anything was removed; the reduced model, when written, is proven
equivalent to the input by ONNX Runtime), 2 usage, 3 a load or runtime error.
"""

from __future__ import annotations

from ..api import reduce
from ._common import add_verify_options, print_json, verify_options


def register(sub) -> None:
    p = sub.add_parser("reduce", help="remove dummy/split neurons and inserted identity layers (no reference)",
                       description="Remove what widens or deepens a network without changing its function "
                       "(neural structural obfuscation): neurons nothing reads (dummies), copies of a neuron "
                       "(equal, or positively proportional across ReLU-like activations) merged back into it "
                       "(split neurons, cancelling cliques), identity or monomial layers after a Relu folded into "
                       "their readers. Every rewrite is run against the input in ONNX Runtime and kept only when "
                       "equivalent; refused rewrites are listed. Exit 0 done, 2 usage, 3 load/runtime error.")
    p.add_argument("model", help="the ONNX file to reduce")
    p.add_argument("-o", "--output", help="write the reduced model here")
    p.add_argument("--report", metavar="REPORT.json", help="write the report (per layer) here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_verify_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    _, report = reduce(args.model, args.output, report_path=args.report, verify_options=verify_options(args))
    if args.json:
        print_json(report.to_dict())
    else:
        for line in report.summary_lines():
            print(line)
    return 0
