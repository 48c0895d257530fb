"""`onnx-resync permute MODEL -o OUT`: seeded random permutation of every group, or undo a record."""

from __future__ import annotations

import sys

from ..api import permute
from ._common import add_verify_options, print_json, seed_arg, verify_options


def register(sub) -> None:
    p = sub.add_parser("permute", help="permute every (or chosen) group, verify, write; or undo a record",
                       description="Permute every (or the chosen) channel group with a seeded random permutation, "
                       "check with ONNX Runtime that the function is unchanged, write the model (and the record "
                       "that undoes it, naming both files by content hash); or undo a record byte for byte. "
                       "Exit 0 done, 1 check failed (nothing written), 2 usage (a record that is not a permutation "
                       "of this model's groups, or made for another file), 3 load or runtime error.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("-o", "--output", required=True, help="where to write the permuted model (never an input)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random permutations, 0..2**63-1 (default 0)")
    p.add_argument("--groups", nargs="+", metavar="KEY_OR_ID", help="permute only these groups")
    p.add_argument("--record", metavar="PERM.json", help="write the permutation record here")
    p.add_argument("--undo", metavar="PERM.json", help="apply the inverse of this record instead")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime equivalence check")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_verify_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    _, result = permute(
        args.model,
        args.output,
        seed=args.seed,
        group_keys=args.groups,
        undo=args.undo,
        record_path=args.record,
        check=not args.no_verify,
        verify_options=verify_options(args),
    )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json(result.to_dict())
        return 0
    action = "undid" if args.undo else f"permuted (seed {args.seed})"
    print(f"{action} {result.groups_permuted} groups: {result.neurons_moved} neurons moved, "
          f"{result.weights_changed} weight tensors rewritten -> {result.output}")
    if result.verify:
        worst = max((o["normalized_error"] for o in result.verify["outputs"]), default=0.0)
        print(f"verified on {result.verify['provider']}: equivalent (max normalized error {worst:.2e})")
        _print_inputs(result.verify)
    else:
        print("not verified (--no-verify)", file=sys.stderr)
    if args.record and not args.undo:
        print(f"record: {args.record}")
    return 0


def _print_inputs(verify: dict) -> None:
    """What the check fed, and why (verify's input plan)."""
    for d in verify.get("input_plan") or ():
        shape = "x".join(map(str, d["shape"])) or "scalar"
        print(f"  fed {d['name']} {shape} {d['dtype']} {d['range']}" + (f": {d['why']}" if d.get("why") else ""))
