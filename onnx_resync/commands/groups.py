"""`onnx-resync groups MODEL`: the permutable channel groups, pinned channels and coverage."""

from __future__ import annotations

from ..api import groups
from ._common import print_json


def register(sub) -> None:
    p = sub.add_parser("groups", help="list permutable channel groups, pinned channels and coverage",
                       description="Walk the graph and list every permutable channel group (size, weight slots, "
                       "producers, key), the channels that are pinned and why, and the coverage. "
                       "Exit 0, 2 usage, 3 load error.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--slots", action="store_true", help="list every weight slot of every group")
    p.set_defaults(func=run)


def run(args) -> int:
    result = groups(args.model)
    if args.json:
        print_json(result.to_dict())
        return 0
    print(f"{'id':>4}  {'size':>5}  {'slots':>5}  producers / key")
    for g in result.groups:
        producers = ", ".join(p.name for p in g.producers[:3]) + (f" (+{len(g.producers) - 3})" if len(g.producers) > 3 else "")
        print(f"{g.id:>4}  {g.size:>5}  {len(g.slots):>5}  {producers}  [{g.key}]")
        if args.slots:
            for s in g.slots:
                block = f" x{s.positions.shape[1]}" if s.positions.shape[1] > 1 else ""
                print(f"{'':>18}{s.weight} axis {s.axis}{block}")
    if result.pinned:
        print("pinned:")
        for p in result.pinned:
            print(f"  {p.channels:>6} channels  {p.reason}  ({', '.join(p.producers[:3])}"
                  f"{' ...' if len(p.producers) > 3 else ''})")
    if result.ops_without_rule:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(result.ops_without_rule.items()))
        print(f"ops without a rule: {ops}")
    inner = result.inner_channels
    share = f"{100 * result.coverage:.1f}%" if inner else "nothing to permute"
    fed = f", {result.input_channels} meet graph inputs (interface)" if result.input_channels else ""
    print(f"coverage: {result.permutable_channels}/{inner} hidden channels permutable ({share}), "
          f"{len(result.groups)} groups; {result.output_channels} channels reach graph outputs{fed}")
    return 0
