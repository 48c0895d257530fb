"""Restore the vendor's own file in the reference's neuron order (`audit -o`).

The audit finds, for every *reference group* (a group of the walk of the reference's canonical
form), the permutation `perm` that puts the aligned suspect back in the reference's order
(perm[i] = the suspect neuron that goes to the reference's place i). This module carries those
permutations back to the suspect's own file: its graph, node order, dtypes and quantization tensors
stay as they are, only its neurons move (permute.py rewrites every slot of a group, scales and zero
points included).

- A *suspect group* is a group of the walk of the suspect's own file (QDQ, QOperator, fp16, fused
  ops: the walker reads them as they are).
- Suspect group S *stands for* reference group R when moving S's neurons in the file moves R's
  neurons in the canonical form the same way. Found by one *probe*: every suspect group is moved
  by a seeded cycle through all its neurons (no neuron stays), the probe is canonicalized again,
  and R's neurons in the probe are compared with the original's moved by each candidate's cycle
  (candidates: suspect groups of R's size that share a stored tensor with R's weights). A neuron
  is compared by the sorted values of its slices in R's aligned weights (sorted: the moves of other
  axes, other groups', cannot change them), exactly. S stands for R when exactly one candidate
  agrees; every other reference group is *not restored* and reported with the reason.
- A suspect group may move R's neurons in *units* (whole blocks of MatMulNBits' K, the cells of a
  grid whose other factor is pinned): each of its neurons is `unit` consecutive neurons of R (the
  *outer* factor: R's neuron u * unit + p) or every `size`-th (the *inner* factor: p * size + u).
  Such a candidate is probed like the others, its cycle expanded to R's neurons. R's perm is then
  *expressible* in the suspect's file exactly when it maps whole units to whole units in the same
  inner order; it is applied as the unit permutation. A perm that splits units (a float model
  permuted, then quantized in blocks: the blocks were re-formed) cannot be written in the suspect's
  format: R is not restored, with that reason.
- The *restored file*: each S moved by its R's perm. Two checks before anything is written:
  *order*: the restored file canonicalized again carries, in every aligned weight, exactly (bit for
  bit) the audit's suspect weights with the perms of the restored groups applied; *function*: ONNX
  Runtime (verify.py) finds the restored file equivalent to the suspect (exit 4 when it cannot
  check, 7 when not equivalent, as `resync -o`; nothing written).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from .align import Alignment
from .canonical import CanonicalModel
from ..errors import CheckFailed, ResyncError, UnsupportedError, UsageError
from ..io import WeightStore, save_model
from ..permute import PermutationRecord, apply_moves, permuted_copy, slot_indices
from ..walk import Group, WalkResult, walk

PROBE_SEED = 0x5EED  # the probe's cycles: any seed works, a fixed one makes the result reproducible
EXIT_CANNOT_CHECK = 4  # as resync -o
EXIT_NOT_EQUIVALENT = 7


@dataclass
class RestoreResult:
    output: str | None  # the file written; None when nothing was
    written: bool
    groups: int  # the reference's groups (what the audit matched)
    restored: int  # of them, put back in the reference's order in the suspect's own file
    neurons: int  # neurons of the restored groups
    moved: int  # of them, moved by the restore
    suspect_groups: int  # groups of the suspect's own file
    not_restored: list[dict] = field(default_factory=list)  # {"group": reference key, "neurons", "reason"}
    verified: bool = False
    verify: dict | None = None
    reason: str = ""  # why nothing was written, if so
    record: dict = field(default_factory=dict)  # suspect group key -> perm applied (permute --undo's format)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary_lines(self) -> list[str]:
        if not self.written:
            return [f"restore: nothing written ({self.reason})"]
        lines = [f"restored {self.output}: the suspect's own file with {self.restored} of {self.groups} groups in "
                 f"the reference's order ({self.moved} of {self.neurons} neurons moved)"]
        for n in self.not_restored[:6]:
            lines.append(f"  not restored: {n['group']} ({n['neurons']} neurons): {n['reason']}")
        if len(self.not_restored) > 6:
            lines.append(f"  ... and {len(self.not_restored) - 6} more groups not restored")
        if self.verify and self.verified:
            worst = max((o["normalized_error"] for o in self.verify["outputs"]), default=0.0)
            lines.append(f"  verified on {self.verify['provider']}: equivalent to the suspect (max normalized "
                         f"error {worst:.2e}); canonical form in the reference's order (checked bit for bit)")
        return lines


def restore_suspect(suspect: onnx.ModelProto, sus_c: CanonicalModel, ref_c: CanonicalModel, alignment: Alignment,
                    perms: dict[str, list[int]], canonical, *, check: bool = True,
                    verify_options: dict | None = None) -> tuple[onnx.ModelProto, RestoreResult]:
    """The suspect's own file in the reference's order (module docstring); raises CheckFailed
    (exit_code 4 or 7) when the function check fails. `perms`: reference group key -> perm (the
    audit's resync record); `canonical(model)`: the audit's canonicalization of a suspect model."""
    ref_walk = walk(ref_c.model)
    try:
        sus_walk = walk(suspect)
    except ResyncError as exc:
        raise UnsupportedError(f"cannot restore the suspect's own file: its groups cannot be found ({exc})") from None
    ref_groups = [g for g in ref_walk.groups if g.key in perms]
    stands_for, reasons = _correspondence(suspect, sus_walk, sus_c, ref_groups, alignment, canonical)
    applied, record = {}, {}
    for r_key, stand_in in stands_for.items():
        units = stand_in.unit_perm(perms[r_key])
        if units is None:
            reasons[r_key] = stand_in.split_reason()
            continue
        applied[r_key] = list(perms[r_key])
        record[stand_in.group.key] = units
    restored, _ = permuted_copy(suspect, sus_walk, PermutationRecord(dict(record)))
    _check_order(restored, sus_c, ref_walk, alignment, applied, canonical)
    sizes = {g.key: g.size for g in ref_groups}
    result = RestoreResult(
        output=None, written=False, groups=len(ref_groups), restored=len(applied),
        neurons=sum(sizes[k] for k in applied),
        moved=sum(int((np.asarray(p) != np.arange(len(p))).sum()) for p in applied.values()),
        suspect_groups=len(sus_walk.groups),
        not_restored=[{"group": g.key, "neurons": g.size, "reason": reasons.get(g.key, "no suspect group")}
                      for g in ref_groups if g.key not in applied],
        record=record)
    if not result.restored and any(n["neurons"] > 1 for n in result.not_restored):  # nothing to write
        result.reason = (f"none of the reference's {result.groups} groups maps to a group of the suspect's own file "
                         f"({result.not_restored[0]['group']}: {result.not_restored[0]['reason']})")
        failed = CheckFailed(f"cannot restore the suspect's own file: {result.reason}; nothing written")
        failed.exit_code = UnsupportedError.exit_code
        failed.restore = result
        raise failed
    if check:
        from ..verify import explain, verify

        try:
            report = verify(suspect, restored, **(verify_options or {}))
        except (CheckFailed, UsageError):
            raise
        except ResyncError as exc:  # no input ONNX Runtime runs: the check cannot check
            result.reason = f"cannot check the restored file: {str(exc).splitlines()[0] if str(exc) else exc}"
            failed = CheckFailed(result.reason + "; nothing written (give --inputs or --shape that the check can "
                                 "run)")
            failed.exit_code = EXIT_CANNOT_CHECK
            failed.restore = result
            raise failed from None
        result.verify = report.to_dict()
        result.verified = bool(report.equivalent)
        if report.verdict == "cannot check":
            result.reason = f"cannot check the restored file: {report.reason}"
            failed = CheckFailed(result.reason + "; nothing written (give --inputs or --shape that the check can "
                                 "compare)")
            failed.exit_code = EXIT_CANNOT_CHECK
            failed.restore = result
            raise failed
        if not report.equivalent:
            result.reason = "the restored file is not equivalent to the suspect"
            failed = CheckFailed(f"{result.reason}; nothing written: {explain(report)}")
            failed.exit_code = EXIT_NOT_EQUIVALENT
            failed.restore = result
            raise failed
    return restored, result


def restore_audited(report, output: str | os.PathLike, suspect: onnx.ModelProto, sus_c: CanonicalModel,
                    ref_c: CanonicalModel, alignment: Alignment, rs, canonical, inputs,
                    verify_options: dict | None = None) -> CheckFailed | None:
    """`audit -o`: restore and write the suspect's own file when the audit found it derived; the
    result goes to report.restored. Returns the failed check (nothing written) for the caller to
    raise once the report is complete, else None."""
    if not report.derived:
        why = "cannot judge" if report.verdict == "cannot judge" else "not derived from the reference"
        report.restored = {"output": None, "written": False, "reason": f"{why}: nothing to restore"}
        return None
    try:
        restored, result = restore_suspect(suspect, sus_c, ref_c, alignment, rs.record.perms, canonical,
                                           verify_options=verify_options)
    except CheckFailed as failed:
        restore = getattr(failed, "restore", None)
        report.restored = restore.to_dict() if restore is not None else {
            "output": None, "written": False, "reason": str(failed).split("; nothing written")[0]}
        return failed
    save_model(restored, output, inputs=inputs)  # atomic: a temporary file renamed into place
    result.output, result.written = str(output), True
    report.restored = result.to_dict()
    return None


def restore_lines(restored: dict) -> list[str]:
    """The text report's lines for report.restored (a RestoreResult's dict)."""
    if not restored.get("written"):
        return [f"restore: nothing written ({restored.get('reason', '')})"]
    fields = RestoreResult.__dataclass_fields__
    return RestoreResult(**{k: v for k, v in restored.items() if k in fields}).summary_lines()


# ---- correspondence ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StandIn:
    """The suspect group that stands for a reference group: neuron for neuron (unit 1), or each of
    its neurons a unit of `unit` of the reference group's neurons (module docstring)."""
    group: Group
    unit: int = 1
    outer: bool = True  # its neurons are the outer factor (units of consecutive neurons)

    def expand(self, units) -> np.ndarray:
        """The reference group's neuron perm that moving the suspect group by `units` makes."""
        units = np.asarray(units, dtype=np.int64)
        if self.outer:
            return np.add.outer(units * self.unit, np.arange(self.unit)).reshape(-1)
        return np.add.outer(np.arange(self.unit) * self.group.size, units).reshape(-1)

    def unit_perm(self, perm) -> list[int] | None:
        """The suspect group's perm that makes the reference group's `perm`, or None when `perm` does
        not map whole units to whole units in the same inner order."""
        perm = np.asarray(perm, dtype=np.int64)
        units = perm[::self.unit] // self.unit if self.outer else perm[:self.group.size]
        if not np.array_equal(np.sort(units), np.arange(self.group.size)) or \
                not np.array_equal(self.expand(units), perm):
            return None
        return units.tolist()

    def split_reason(self) -> str:
        return (f"the suspect's file moves these {self.group.size * self.unit} neurons only as {self.group.size} "
                f"whole units of {self.unit} (stored in blocks: int4 blocks of K, grid cells), and the audit's order "
                f"splits units: not expressible in the suspect's format")


def _stand_ins(g: Group, size: int) -> list[StandIn]:
    """How suspect group `g` could stand for a reference group of `size` neurons."""
    if g.size == size:
        return [StandIn(g)]
    if 2 <= g.size < size and size % g.size == 0:
        return [StandIn(g, size // g.size, True), StandIn(g, size // g.size, False)]
    return []


def _correspondence(suspect: onnx.ModelProto, sus_walk: WalkResult, sus_c: CanonicalModel, ref_groups: list[Group],
                    alignment: Alignment, canonical) -> tuple[dict[str, StandIn], dict[str, str]]:
    """Reference group key -> the suspect group that stands for it; and why the others have none."""
    reasons: dict[str, str] = {}
    cycles = _probe_cycles(sus_walk)
    probe_model, _ = permuted_copy(suspect, sus_walk, PermutationRecord({k: c.tolist() for k, c in cycles.items()}))
    probe_c = canonical(probe_model)
    if _layout(probe_c.model) != _layout(sus_c.model):
        return {}, {g.key: "the suspect's canonical form changes when its neurons move" for g in ref_groups}
    original, probed = WeightStore(sus_c.model), WeightStore(probe_c.model)
    aligned = WeightStore(alignment.model)
    # which suspect groups touch each stored tensor
    by_tensor: dict[str, list[Group]] = {}
    for g in sus_walk.groups:
        for slot in g.slots:
            if g not in by_tensor.setdefault(slot.weight, []):
                by_tensor[slot.weight].append(g)
    found: dict[str, StandIn] = {}
    for r in ref_groups:
        candidates: list[StandIn] = []
        for slot in r.slots:
            sw = alignment.weight_map.get(slot.weight)
            origin = sus_c.origins.get(sw) if sw else None
            for src in (origin.sources if origin else []):
                for g in by_tensor.get(src, []):
                    candidates += [c for c in _stand_ins(g, r.size) if c not in candidates]
        if not candidates:
            reasons[r.key] = _pinned(r, sus_walk, sus_c, alignment) or \
                "no group of the suspect's file of its size (or in whole units of it) reads its weights"
            continue
        if r.size < 2:
            reasons[r.key] = "a single neuron (nothing to move)"
            continue
        before = _features(r, original, alignment, aligned)
        after = _features(r, probed, alignment, aligned)
        if before is None:
            reasons[r.key] = "its weights are not all in the suspect's canonical form"
            continue
        agree = [c for c in candidates if np.array_equal(after, before[c.expand(cycles[c.group.key])])]
        if len(agree) == 1:
            found[r.key] = agree[0]
        else:
            reasons[r.key] = ((_pinned(r, sus_walk, sus_c, alignment) or
                               "moving the suspect's neurons does not move it the same way (its neurons are "
                               "not those of one group of the suspect's file)") if not agree else
                              f"{len(agree)} groups of the suspect's file move it alike")
    # a suspect group stands for one reference group at most
    taken: dict[str, list[str]] = {}
    for r_key, c in found.items():
        taken.setdefault(c.group.key, []).append(r_key)
    for s_key, r_keys in taken.items():
        if len(r_keys) > 1:
            for r_key in r_keys:
                found.pop(r_key)
                reasons[r_key] = f"its suspect group also stands for {len(r_keys) - 1} other reference group(s)"
    return found, reasons


def _pinned(r: Group, sus_walk: WalkResult, sus_c: CanonicalModel, alignment: Alignment) -> str:
    """Why the suspect's walker pinned the neurons of the suspect's layers behind `r`, if it did
    (int4 blocks, a graph output, ...)."""
    layers = {sus_c.layer_of(alignment.node_map[p.name]) for p in r.producers if p.name in alignment.node_map}
    for pinned in sus_walk.pinned:
        if layers & set(pinned.producers):
            return f"the suspect's file pins its neurons ({pinned.reason})"
    return ""


def _probe_cycles(sus_walk: WalkResult) -> dict[str, np.ndarray]:
    """Per suspect group a random cycle through all its neurons: no neuron keeps its place."""
    rng = np.random.default_rng(PROBE_SEED)
    out = {}
    for g in sus_walk.groups:
        order = rng.permutation(g.size)
        cycle = np.empty(g.size, dtype=np.int64)
        cycle[order] = np.roll(order, -1)
        out[g.key] = cycle
    return out


def _layout(model: onnx.ModelProto) -> list:
    return sorted((t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer)


def _features(group: Group, store: WeightStore, alignment: Alignment,
              alignment_shapes: WeightStore) -> np.ndarray | None:
    """Per neuron of a reference group: the sorted values of its slices in the aligned suspect
    weights (read from a suspect canonical form), slot after slot."""
    parts = []
    for slot in group.slots:
        sw = alignment.weight_map.get(slot.weight)
        if sw is None or sw not in store:
            if slot.weight in alignment.kept:  # a reference constant (not a weight): the same in both
                continue
            return None
        shape = alignment_shapes.shape(slot.weight)
        a = store.get(sw).astype(np.float32, copy=False).reshape(shape)
        part, axis = slot.part(a)
        n = slot.positions.shape[0]
        rows = np.moveaxis(np.take(part, slot.positions.reshape(-1), axis=axis), axis, 0).reshape(n, -1)
        parts.append(np.sort(rows, axis=1))
    if not parts:
        return None
    return np.concatenate(parts, axis=1)


# ---- the order check ---------------------------------------------------------------------------
def _check_order(restored: onnx.ModelProto, sus_c: CanonicalModel, ref_walk: WalkResult, alignment: Alignment,
                 applied: dict[str, list[int]], canonical) -> None:
    """The restored file's canonical form carries exactly the audit's aligned suspect weights with
    the applied perms: anything else is a wrong correspondence (a bug), refused before writing."""
    if not applied:
        return
    restored_c = canonical(restored)
    if _layout(restored_c.model) != _layout(sus_c.model):
        raise _order_failed("its canonical form has other weights than the suspect's")
    aligned = WeightStore(alignment.model)
    now = WeightStore(restored_c.model)
    index = slot_indices(ref_walk, applied, lambda w, a: aligned.shape(w)[a])
    moves: dict[str, list] = {}
    for (weight, axis, at), idx in index.items():
        moves.setdefault(weight, []).append((axis, at, idx))
    for rw, sw in alignment.weight_map.items():
        expected = aligned.get(rw)
        if rw in moves:
            expected = apply_moves(expected, moves[rw])
        got = now.get(sw).astype(np.float32, copy=False).reshape(expected.shape)
        if not np.array_equal(got.view(np.uint32), np.ascontiguousarray(expected, dtype=np.float32).view(np.uint32)):
            raise _order_failed(f"weight {sw!r} is not in the reference's order after the restore")


def _order_failed(why: str) -> CheckFailed:
    failed = CheckFailed(f"the restored file is not in the reference's order ({why}); nothing written "
                         "(please report this model)")
    failed.exit_code = EXIT_NOT_EQUIVALENT
    return failed
