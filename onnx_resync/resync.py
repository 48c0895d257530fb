"""The `resync` verb: put a suspect back in its reference's neuron order and judge where it came from.

suspect + reference --walk(reference)--> groups --match--> permutations --apply (+ undo neutral
rescales)--> restored model --verify(restored vs suspect)--> file, and a ResyncReport with per-neuron
confidence and an integrity verdict.

Verdict (see docs/robustness.md for the figures behind the threshold):

- "identical": every weight of the suspect equals the reference's, byte for byte;
- "permuted": the restored suspect equals the reference byte for byte (only neurons were moved);
- "permuted and perturbed": derived (evidence >= 1, below) but the weights differ; the report
  estimates the kind and the strength (noise, extra zeros, quantization levels, rescales);
- "not derived": evidence below 1.

Decision statistic ("evidence"), from the final solve, where every axis of every slot is aligned:

- a group's evidence: for every reference neuron, the margin of its match over the best other
  suspect neuron, in units of the spread of its similarities with unrelated suspect neurons (a sample
  of 128), i.e. how far the match stands out; the group's value is the median over its *live*
  neurons, each weighted by how much of the group it carries (its norm against the group's 90th
  percentile, capped at 1). A derived copy stands out by several spreads; between unrelated weights
  the best assignment is not even each row's best (about 0).
- decayed neurons (every slot of 2+ entries below match.DECAYED = 1e-3 of the group's 90th-percentile
  norm: trained down to nothing, functionally inert) and interchangeable ones (an identical twin, or
  decayed with nothing else to tell them apart) are not live: they never count as evidence either
  way, so that a copy that keeps its function is never "not derived" because of its inert parts.
  A group with fewer than 8 live neurons votes only when no group has more (never with none).
- some groups cannot tell even an exact copy from chance (few dimensions, near-duplicate neurons):
  where a group's evidence is below match.INFORMATIVE (3), its capacity (the reference matched
  against itself) is measured, and groups with capacity below 3 abstain, as do groups of fewer than
  8 neurons.
- the model's evidence is the weakest voting group's; groups that are exact copies (every neuron
  byte-identical to its match) agree by definition and do not lower it (infinite if only they
  vote). Derived needs evidence >= match.AGREE (1).
  An independently trained model: about 0 (every group). Weights shuffled inconsistently (each
  tensor on its own): the groups whose slots disagree drop to about 0. A derived copy, even heavily
  perturbed: every group stays well above 1 (figures in docs/robustness.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .errors import CheckFailed, ModelMismatchError
from .io import WeightStore, check_outputs, is_lazy_model, load_model, save_model, write_text_atomic
from .match import AGREE, INFORMATIVE, GroupMatch, MatchResult, match
from .permute import PermutationRecord, permuted_copy
from .reduce.against import to_reference
from .match.rescale import MIN_LOG_SCALE, find_rescales, neutral_groups, rescaled, undo_rescales
from .match.sampling import sub_grid
from .walk import WalkResult, walk
from .walk.layouts import logical_store
from .jsonable import json_safe

# `resync` exit codes when the restored model's check fails (the verdict and report are still given):
# 4 it cannot check (as verify's), 7 the restored model is not equivalent to the suspect
EXIT_CANNOT_CHECK = 4
EXIT_NOT_EQUIVALENT = 7
MIN_EVIDENCE_GROUP = 8  # smaller groups vote only when there is no larger one
STATISTICS_SAMPLE = 1 << 18  # entries of a tensor that the perturbation statistics look at

ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass
class GroupReport:
    key: str
    size: int
    moved: int  # neurons not in their reference place in the suspect
    matched_fraction: float  # matched to their best candidate (or interchangeable)
    cosine_mean: float
    cosine_min: float
    margin_min: float
    margin_median: float
    norm_ratio_median: float
    evidence: float
    interchangeable: list[int]  # reference neurons that have an identical twin (either model), or
    #                             decayed ones that nothing tells apart
    rescaled: list[int]  # reference neurons whose suspect was an exact neutral rescale (undone)
    live: int = 0  # neurons that vote: neither decayed nor interchangeable
    decayed: int = 0  # neurons negligible in every slot of 2+ entries (functionally inert)
    neurons: dict = field(default_factory=dict)  # per neuron: matched, cosine, margin, norm_ratio


@dataclass
class ResyncReport:
    verdict: str
    derived: bool
    evidence: float  # the decision statistic: the weakest voting group's evidence
    evidence_median: float
    neurons: int
    moved: int
    matched: int
    interchangeable: int
    perturbation: dict
    groups: list[GroupReport]
    passes: int
    solves: int
    seconds: float
    output: str | None = None
    verified: bool = False
    verify: dict | None = None
    record: PermutationRecord | None = None
    statistic: str = "evidence"  # the decision statistic's name: derived when it is >= threshold
    threshold: float = AGREE
    reduction: dict | None = None  # reduce.ReduceReport.to_dict() when the suspect was reduced first
    live: int = 0  # neurons that vote (neither decayed nor interchangeable)
    decayed: int = 0  # neurons negligible in every slot of 2+ entries (functionally inert)
    decayed_groups: int = 0  # groups with decayed neurons

    def to_dict(self) -> dict:
        data = asdict(self)
        data["record"] = self.record.to_dict() if self.record else None
        return json_safe(data)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def summary_lines(self) -> list[str]:
        kinds = self.perturbation.get("kinds") or []
        lines = [f"verdict: {self.verdict}" + (f" ({'; '.join(kinds)})" if kinds else "")]
        lines += (self.reduction or {}).get("lines", [])
        if math.isinf(self.evidence):
            lines.append("evidence: every voting group is an exact copy (byte-identical neurons)")
        else:
            lines.append(f"evidence {self.evidence:.2f} (weakest group; derived at >= {self.threshold:g}; unrelated models: "
                         f"about 0), median over groups {self.evidence_median:.2f}")
        pct = 100 * self.matched / self.neurons if self.neurons else 100.0
        lines.append(f"neurons: {self.neurons} in {len(self.groups)} groups, {self.moved} moved back, "
                     f"{self.matched} matched to their best candidate ({pct:.1f}%), "
                     f"{self.interchangeable} interchangeable")
        if self.decayed:
            lines.append(f"decayed (functionally inert, not evidence): {self.decayed} neurons in {self.decayed_groups} "
                         f"groups; {self.live} live neurons vote")
        if self.groups:
            cmin = min(g.cosine_min for g in self.groups)
            cmean = sum(g.cosine_mean * g.size for g in self.groups) / max(self.neurons, 1)
            mmin = min(g.margin_min for g in self.groups)
            lines.append(f"cosine: mean {cmean:.4f}, min {cmin:.4f}; smallest margin to a runner-up {mmin:.4f}")
        p = self.perturbation
        if p.get("rescaled") and self.derived:
            lines.append(f"rescaled neurons: {p['rescaled']} ({p['rescaled_undone']} exact and neutral: undone; "
                         f"{p['rescaled'] - p['rescaled_undone']} not neutral or not exact: kept)")
        lines.append(f"solved in {self.seconds:.2f}s ({self.passes} passes, {self.solves} group solves)")
        if self.output:
            lines.append(f"wrote {self.output}")
        if self.verify and self.verified:
            worst = max((o["normalized_error"] for o in self.verify["outputs"]), default=0.0)
            lines.append(f"verified on {self.verify['provider']}: restored model equivalent to the suspect "
                         f"(max normalized error {worst:.2e})")
        elif self.verify:
            lines.append(f"check of the restored model on {self.verify['provider']}: {self.verify['verdict']} "
                         f"({self.verify['reason']}); nothing written")
        for d in (self.verify or {}).get("input_plan") or ():  # what the check fed, and why
            shape = "x".join(map(str, d["shape"])) or "scalar"
            lines.append(f"  fed {d['name']} {shape} {d['dtype']} {d['range']}" + (f": {d['why']}" if d.get("why") else ""))
        return lines


def resync(
    suspect: ModelLike,
    reference: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    report_path: str | os.PathLike | None = None,
    check: bool = True,
    verify_options: dict | None = None,
    undo_rescale: bool = True,
    max_passes: int = 8,
    ref_walk: WalkResult | None = None,
) -> tuple[onnx.ModelProto, ResyncReport]:
    """Recover every group's permutation, write the suspect in the reference's order, and judge it.

    The restored model computes what the suspect computes (verified with ONNX Runtime unless
    check=False; when the check fails nothing is written and CheckFailed is raised with the report,
    as written to `report_path`, in its `.report` and exit_code EXIT_CANNOT_CHECK or EXIT_NOT_EQUIVALENT); neutral rescales across positively homogeneous activations are undone (only when
    checked: the check is what proves a rescale neutral; unchecked they are reported).
    `ref_walk`: the reference's walk when the caller has it (an audit walks its reference once), else
    walked here.
    """
    inputs = [m for m in (suspect, reference) if not isinstance(m, onnx.ModelProto)]
    check_outputs([report_path], inputs, models=[output])  # before any work; no two outputs on one file
    sus_model, ref_model = _load(suspect), _load(reference)
    t0 = time.perf_counter()
    ref_walk = ref_walk if ref_walk is not None else walk(ref_model)
    # a width or depth change: the suspect without its structural padding, proven equivalent (issue 16)
    sus_model, reduction = to_reference(lambda m: check_structure(ref_model, m, ref_walk), sus_model, verify_options,
                                        reference=ref_model, ref_walk=ref_walk)
    if reduction is not None and reduction.reference is not None:  # pruned: judged on the matched neurons
        ref_model, ref_walk = reduction.reference, walk(reduction.reference)
        check_structure(ref_model, sus_model, ref_walk)
    # read by matching, restoring and the report, never changed here: each weight read once
    # (a weight stored in a layout, an NCHWc filter, is read as the array its slots index)
    ref_store, sus_store = logical_store(ref_model, ref_walk, cache=True), logical_store(sus_model, ref_walk, cache=True)
    result = match(ref_store, sus_store, ref_walk, max_passes=max_passes)
    # an undo claims that the rescale is neutral, which only the check proves (an Add of a constant
    # between the activation and its consumers, say, makes it not neutral): unchecked, report it only
    restored, scales = restore(sus_model, ref_model, ref_walk, result, undo_rescale=undo_rescale and check,
                               stores=(sus_store, ref_store))
    record = result.record()
    seconds = time.perf_counter() - t0
    report = failed = None
    if check:
        from .verify import explain, verify

        report = verify(sus_model, restored, **(verify_options or {}))
        if report.verdict == "not equivalent" and scales:  # the rescales were not neutral after all: keep them
            restored, scales = restore(sus_model, ref_model, ref_walk, result, undo_rescale=False,
                                       stores=(sus_store, ref_store))
            report = verify(sus_model, restored, **(verify_options or {}))
        if report.verdict == "cannot check":
            failed = CheckFailed(f"cannot check the restored model: {report.reason}; nothing written "
                                 "(give --inputs or --shape that the check can compare, or --no-verify)")
            failed.exit_code = EXIT_CANNOT_CHECK
        elif not report.equivalent:
            failed = CheckFailed(f"the restored model is not equivalent to the suspect; nothing written: "
                                 f"{explain(report)}")
            failed.exit_code = EXIT_NOT_EQUIVALENT
    if output is not None and failed is None:
        save_model(restored, output, inputs=inputs)
    # the report describes the file as written; a lazy model's weights are then mapped from it, where
    # they would otherwise be computed (permuted) once more
    written = load_model(output, lazy=True) if output is not None and failed is None and is_lazy_model(restored) \
        else restored
    if scales and report is not None and report.equivalent:  # the matched share as restored (issue 16)
        result = matched_as_restored(result, ref_store, logical_store(restored, ref_walk), ref_walk)
    summary = build_report(result, ref_store, sus_store, logical_store(written, ref_walk), scales, seconds)
    summary.record = record
    summary.verified = bool(report and report.equivalent)
    summary.verify = report.to_dict() if report else None
    summary.output = None if output is None or failed is not None else str(output)
    if reduction is not None:
        summary.reduction = reduction.to_dict()
        summary.verdict = reduction.verdict() if summary.derived else summary.verdict
    if report_path is not None:
        write_text_atomic(report_path, summary.to_json())
    if failed is not None:  # the verdict was found: the caller (the CLI) still shows it
        failed.report = summary
        raise failed
    return restored, summary


def _load(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def check_structure(ref: onnx.ModelProto, sus: onnx.ModelProto, ref_walk: WalkResult | None = None) -> None:
    """Raise ModelMismatchError naming the first difference that makes matching meaningless."""
    rs, ss = WeightStore(ref), WeightStore(sus)
    for name in rs.names():
        if name not in ss:
            raise ModelMismatchError(f"architecture mismatch: the suspect has no weight {name!r}")
        if rs.shape(name) != ss.shape(name):
            raise ModelMismatchError(f"architecture mismatch: weight {name!r} has shape {list(ss.shape(name))} "
                                     f"in the suspect, {list(rs.shape(name))} in the reference")
    extra = [n for n in ss.names() if n not in rs]
    if extra:
        raise ModelMismatchError(f"architecture mismatch: the suspect has a weight {extra[0]!r} the reference lacks")
    rops = [n.op_type for n in ref.graph.node]
    sops = [n.op_type for n in sus.graph.node]
    for k, (a, b) in enumerate(zip(rops, sops)):
        if a != b:
            raise ModelMismatchError(f"architecture mismatch: node #{k} is {b} in the suspect, {a} in the reference")
    if len(rops) != len(sops):
        raise ModelMismatchError(f"architecture mismatch: {len(sops)} nodes in the suspect, {len(rops)} in the reference")
    if _skeleton(ref) == _skeleton(sus):
        return  # same graph, same shapes, same small integer constants: the walk would be the same
    ref_walk = ref_walk or walk(ref)
    sus_walk = walk(sus)
    ref_groups = {g.key: g.size for g in ref_walk.groups}
    sus_groups = {g.key: g.size for g in sus_walk.groups}
    for key, size in ref_groups.items():
        if key not in sus_groups:
            raise ModelMismatchError(f"architecture mismatch: the suspect has no channel group {key!r}")
        if sus_groups[key] != size:
            raise ModelMismatchError(f"architecture mismatch: group {key!r} has {sus_groups[key]} neurons "
                                     f"in the suspect, {size} in the reference")
    extra = [k for k in sus_groups if k not in ref_groups]
    if extra:
        raise ModelMismatchError(f"architecture mismatch: the suspect has a channel group {extra[0]!r} the reference lacks")


def _skeleton(model: onnx.ModelProto) -> list:
    """What the walker reads: nodes, attributes, tensor types and shapes, small integer constants."""
    def tensor(t: onnx.TensorProto):
        small_int = t.data_type not in _FLOAT_TYPES and int(np.prod(t.dims)) <= 64
        return (t.name, t.data_type, tuple(t.dims), t.SerializeToString() if small_int else b"")

    def attribute(a: onnx.AttributeProto):
        return (a.name, tensor(a.t)) if a.type == onnx.AttributeProto.TENSOR else (a.name, a.SerializeToString())

    g = model.graph
    return [
        [(v.name, v.type.SerializeToString()) for v in list(g.input) + list(g.output)],
        [tensor(t) for t in g.initializer],
        [(n.op_type, n.domain, tuple(n.input), tuple(n.output), [attribute(a) for a in n.attribute]) for n in g.node],
    ]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def restore(suspect: onnx.ModelProto, reference: onnx.ModelProto, ref_walk: WalkResult, result: MatchResult,
            *, undo_rescale: bool = True, stores: tuple[WeightStore, WeightStore] | None = None,
            ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The suspect in the reference's order, exact neutral rescales undone; (model, {key: log a}).
    stores: the caller's WeightStores of (suspect, reference), whose reads may be cached."""
    sus_store, ref_store = stores if stores is not None else (WeightStore(suspect), WeightStore(reference))
    restored, _ = permuted_copy(suspect, ref_walk, result.record(), store=sus_store)
    scales = _rescales(reference, ref_walk, result, ref_store, restored) if undo_rescale else {}
    if scales:
        undo_rescales(reference, logical_store(restored, ref_walk), ref_walk.groups, scales)
    return restored, scales


def _rescales(model, walk_result, result: MatchResult, ref_store, restored) -> dict[str, np.ndarray]:
    """Exact neutral rescales, looked for only where the norms hint at one (cheap gate)."""
    neutral = neutral_groups(walk_result)
    by_key = {gm.key: gm for gm in result.groups}
    hinted = False
    for g in neutral:
        gm = by_key[g.key]
        med = np.median(np.log(np.where(gm.slot_ratio > 0, gm.slot_ratio, 1.0)), axis=0)
        hinted |= gm.rescale_detected > 0 or (med.max() > 1e-4 and med.min() < -1e-4)
    if not hinted:
        return {}
    return find_rescales(model, ref_store, logical_store(restored, walk_result), neutral)


def build_report(result: MatchResult, ref: WeightStore, sus: WeightStore, restored: WeightStore,
                 scales: dict[str, np.ndarray], seconds: float) -> ResyncReport:
    groups = [_group_report(gm, scales.get(gm.key)) for gm in result.groups]
    undone = rescaled(scales)
    neurons = sum(g.size for g in groups)
    evidence, evidence_median = decision_statistics(result.groups)
    derived = evidence >= AGREE
    names = ref.names()
    restored_exact = all(_same(ref, restored, n) for n in names)
    identical = restored_exact and all(_same(ref, sus, n) for n in names)
    perturbation = (estimate_perturbation(ref, restored, result, undone) if not restored_exact else
                    {"noise_relative_std": 0.0, "extra_zero_fraction": 0.0, "rescaled": 0, "rescaled_undone": 0,
                     "norm_outliers": 0, "kinds": []})
    if identical:
        verdict = "identical"
        derived = True
    elif restored_exact:
        verdict = "permuted"
        derived = True
    elif derived:
        verdict = "permuted and perturbed"
    else:
        verdict = "not derived"
        perturbation["kinds"] = []
    return ResyncReport(
        verdict=verdict, derived=derived, evidence=evidence, evidence_median=evidence_median,
        neurons=neurons, moved=sum(g.moved for g in groups),
        matched=sum(round(g.matched_fraction * g.size) for g in groups),
        interchangeable=sum(len(g.interchangeable) for g in groups), perturbation=perturbation,
        groups=groups, passes=result.passes, solves=result.solves, seconds=seconds,
        live=sum(g.live for g in groups), decayed=sum(g.decayed for g in groups),
        decayed_groups=sum(g.decayed > 0 for g in groups),
    )


def matched_as_restored(result: MatchResult, ref: WeightStore, restored: WeightStore, ref_walk: WalkResult
                        ) -> MatchResult:
    """The match's cosines and margins measured again once the rescales are undone (the restored
    model, verified, against the reference): a neuron matched under a compound rescale (0.25x-4x)
    can have lost its margin to the scaling alone. Where the restored neuron is not its own best
    match, the first measure stands. Measured only when some neuron is not matched."""
    from dataclasses import replace

    if not any(np.any(g.margin <= 0) for g in result.groups):
        return result
    by_key = {g.key: g for g in match(ref, restored, ref_walk, max_passes=1).groups}
    groups = []
    for gm in result.groups:
        other = by_key.get(gm.key)
        if other is None:
            groups.append(gm)
            continue
        same = other.perm == np.arange(gm.size)
        groups.append(replace(gm, margin=np.where(same, other.margin, gm.margin),
                              cosine=np.where(same, other.cosine, gm.cosine)))
    return replace(result, groups=groups)


def decision_statistics(groups: list[GroupMatch]) -> tuple[float, float]:
    """(evidence of the weakest voting group, size-weighted median evidence); see the docstring.
    Groups that are exact copies (byte-identical neurons) agree by definition; inf if only they vote."""
    live = {id(g): int(g.live.sum()) for g in groups}
    voters = [g for g in groups if live[id(g)] >= MIN_EVIDENCE_GROUP] or [g for g in groups if live[id(g)]]
    if not voters:  # nothing carries the model: an exact copy is still one, else no evidence
        return (math.inf if groups and all(g.exact for g in groups) else 0.0), 0.0
    median = _weighted_quantile([g.evidence for g in voters], [live[id(g)] for g in voters], 0.5)
    informative = [g.evidence for g in voters if not g.exact
                   and (g.evidence >= INFORMATIVE or g.capacity >= INFORMATIVE)]
    if informative:
        return min(informative), median
    return (math.inf if any(g.exact for g in voters) else median), median


def _weighted_quantile(values, weights, q: float) -> float:
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values)
    cum = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(values[order][min(np.searchsorted(cum, q * cum[-1]), len(values) - 1)])


def _group_report(gm: GroupMatch, log_scale: np.ndarray | None) -> GroupReport:
    inter = gm.interchangeable
    confident = inter | (gm.margin > 0)
    return GroupReport(
        key=gm.key, size=gm.size, moved=int(gm.moved.sum()),
        matched_fraction=float(confident.mean()), cosine_mean=float(gm.cosine.mean()),
        cosine_min=float(gm.cosine.min()), margin_min=float(gm.margin.min()),
        margin_median=float(np.median(gm.margin)), norm_ratio_median=float(np.median(gm.norm_ratio)),
        evidence=gm.evidence, interchangeable=np.flatnonzero(inter).tolist(),
        rescaled=np.flatnonzero(np.abs(log_scale) >= MIN_LOG_SCALE).tolist() if log_scale is not None else [],
        live=int(gm.live.sum()), decayed=int(gm.decayed.sum()) if gm.decayed is not None else 0,
        neurons={
            "matched": gm.perm.tolist(),
            "cosine": np.round(gm.cosine, 6).tolist(),
            "margin": np.round(gm.margin, 6).tolist(),
            "norm_ratio": np.round(gm.norm_ratio, 6).tolist(),
        },
    )


def _same(a: WeightStore, b: WeightStore, name: str) -> bool:
    """Byte-equal weights, compared a block of rows at a time: weights that differ are told at their
    first differing block, and a computed one is never whole in memory."""
    if a.shape(name) != b.shape(name) or a.dtype(name) != b.dtype(name):
        return False
    if a.dtype(name) == np.dtype(object):  # strings
        x, y = a.get(name), b.get(name)
        return x.shape == y.shape and x.tolist() == y.tolist()
    return all(np.array_equal(_bytes_of(x), _bytes_of(y)) for x, y in zip(a.row_blocks(name), b.row_blocks(name)))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The array's bytes, as a view where it is contiguous (NaN payloads and -0.0 count)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _sampled(store: WeightStore, name: str, grid) -> np.ndarray:
    return store.get(name) if grid is None else store.get_grid(name, grid)


def estimate_perturbation(ref: WeightStore, restored: WeightStore, result: MatchResult, undone: int) -> dict:
    """Kind and strength of what changed, from the restored suspect against the reference.

    Tensors over STATISTICS_SAMPLE entries are judged on an evenly spread sub-grid of that size
    (fractions, relative noise and quantization levels are statistics: a sample tells them)."""
    noise, distinct, distinct_ref = [], [], []
    zeros_ref = zeros_new = total = 0
    for name in ref.names():
        if ref.dtype(name).kind != "f" or ref.shape(name) != restored.shape(name):
            continue
        grid = sub_grid(ref.shape(name), STATISTICS_SAMPLE)
        r, s = _sampled(ref, name, grid), _sampled(restored, name, grid)
        if r.size < 16:
            continue
        r64, s64 = r.astype(np.float64), s.astype(np.float64)
        size = math.prod(ref.shape(name))
        weight = size / r.size  # a sample stands for the whole tensor
        total += size
        zeros_ref += weight * int((r64 == 0).sum())
        zeros_new += weight * int((s64 == 0).sum())
        keep = s64 != 0
        std = r64.std()
        if std > 0 and keep.any():
            noise.append((float(np.std((s64 - r64)[keep]) / std), size))
        if r.size >= 256:
            distinct.append(len(np.unique(s)))
            distinct_ref.append(len(np.unique(r)))
    rescaled = max(sum(g.rescale_detected for g in result.groups), undone)
    one_sided = sum(g.rescale_one_sided for g in result.groups)
    out = {
        "noise_relative_std": _weighted_quantile(*zip(*noise), 0.5) if noise else 0.0,
        "extra_zero_fraction": (zeros_new - zeros_ref) / total if total else 0.0,
        "distinct_values_median": int(np.median(distinct)) if distinct else None,
        "distinct_values_reference_median": int(np.median(distinct_ref)) if distinct_ref else None,
        "rescaled": int(rescaled),
        "rescaled_undone": int(undone),
        "norm_outliers": int(one_sided),
    }
    kinds = []
    quantized = bool(distinct) and out["distinct_values_median"] <= 256 < out["distinct_values_reference_median"]
    if quantized:
        bits = math.ceil(math.log2(max(out["distinct_values_median"], 2)))
        out["quantization_bits"] = bits
        kinds.append(f"quantized: ~{out['distinct_values_median']} distinct values per tensor (~{bits} bits)")
    if out["extra_zero_fraction"] > 0.01:
        kinds.append(f"pruned: {100 * out['extra_zero_fraction']:.1f}% of weights newly zero")
    if rescaled:
        kinds.append(f"rescaled: {rescaled} neurons ({undone} exact and neutral, undone)")
    neurons = sum(g.size for g in result.groups)
    if one_sided and one_sided <= 0.1 * neurons:
        kinds.append(f"norm outliers: {one_sided} neurons scaled on one side only")
    if not quantized and out["noise_relative_std"] > 1e-6:
        kinds.append(f"noise or further training: ~{out['noise_relative_std']:.3g} x weight std")
    out["kinds"] = kinds
    return out
