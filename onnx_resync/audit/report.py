"""The `audit` verb: is this vendor's ONNX file our model?

suspect, reference --canonicalize both--> --align (structure, not names)--> suspect in the reference's
canonical structure --resync--> permutations, per-neuron confidence, integrity verdict --> AuditReport
in terms of the suspect's own layers (JSON, text, HTML).

Verdicts:

- "identical": after canonicalization the suspect's weights equal the reference's, in the same
  neuron order, within what the suspect's own storage explains (storage.py: half a quantization
  step of an int8/int4 file, from its own scales; fp16/bf16 rounding and clamping; BatchNorm
  folding rounding); the graph may have been re-exported (the report lists what canonicalization
  undid). A suspect stored in another format is "derived with a format change": `format_change`
  names it ("int8 per channel") and the summary says so;
- "permuted": the same, once the neurons are put back in the reference's order;
- "perturbed": derived (resync's evidence statistic) but some weights differ beyond what the
  storage explains; kind and strength (noise or further training, quantization beyond the
  storage, pruning, rescaling) are computed on what lies beyond the bound only, and a kind is
  named only where its shape supports it (beyond.py: noise where a weight's differences are spread
  over its elements, rescaled where they are whole neurons scaled); `permuted` tells
  whether neurons had also moved. The kind is named only where the alignment vouches for it: when
  the differences lie in layers paired with low confidence, the runner-ups of those pairs are
  resynced and one that puts every weight within the bound is kept (_by_storage_bound); none: "kind
  not named" (_unsure_kind, perturbation.kind_named False), since a wrong pairing of same-shape
  twins explains them as well as a change. The alignment's confidence and notes are in the report
  (`alignment`, and the evidence);
- "not derived": no evidence that the suspect comes from the reference, on the alignment given and
  on the runner-up of each doubtful pairing (align.alternatives; _by_neuron_evidence keeps a derived
  one with the highest decision statistic and says so in the evidence);
- "cannot judge" (exit 4, the code `verify` uses for "cannot check"): less than MIN_COMPARED_SHARE
  of the reference's parameters were compared (weights inside If/Loop/Scan bodies count in the
  reference's total, a copy stored in each branch once; layers inside bodies are aligned
  (bodies.py), what is left subgraphs.py pairs and compares by value up to permutation, and only
  what was compared counts as compared). No verdict is stronger than its evidence: nothing
  compared is never "identical". Each line under it states what was measured, on the compared
  part only.

A weight that differs only by an order no neuron group reaches (a layer the walk pins) is not a
change: unreached.py checks it by value, and the verdict says "permuted".

`audit_file` is the per-file function for batches: top level, picklable arguments, never raises.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from .align import MAX_ALTERNATIVES, Alignment, align, alternatives
from .beyond import SliceEvidence
from .canonical import CanonicalModel, canonicalize
from .heatmaps import HEATMAP_MAX, Heatmaps
from .passes.run_time import run_time_format
from .storage import LazyMap, Steps, allowed, clip_phrase, float_format, measure_steps, step_part, storage_dtype
from .subgraphs import SubgraphComparison, compare_subgraphs, carry as carry_subgraphs
from .unreached import explained_by_order
from ..errors import ModelMismatchError, ResyncError, UnsupportedError
from ..reduce.against import to_reference
from ..io import WeightStore, load_model, write_text_atomic
from ..io.lazy import select, through
from ..io.prefetch import prefetched
from ..match.gather import transposed
from ..jsonable import json_safe
from ..walk import walk

ModelLike = str | os.PathLike | onnx.ModelProto

MIN_COMPARED_SHARE = 0.5  # of the reference's parameters: below it the verdict is "cannot judge"
UNSURE_RATIO = 4.0  # doubtful layers' share beyond the bound this x the clear ones' or more: kind not named
EXIT_CANNOT_JUDGE = 4  # the code `verify` uses for "cannot check"
STATISTICS_SAMPLE = 1 << 16  # elements per tensor for the statistics of what lies beyond the bound
PRECISION_CHUNK = 1 << 20  # elements of a weight compared with its bound at a time (float64: 8 MiB per array)
PRECISION_ROWS = 1 << 22  # elements of a lazy weight read (restored, with its steps) at a time: 16 MiB in float32
SCREEN_MARGIN = 1e-3  # a difference this far (relative) below its bound in float32 is within it in float64 too


@dataclass
class LayerRow:
    group: str  # the reference's canonical group key
    layers: list[str]  # the suspect's layers (nodes) that produce the group's neurons
    reference_layers: list[str]
    weights: list[str]  # the suspect's stored tensors that the group touches
    neurons: int
    matched: int  # matched to their best candidate (or interchangeable)
    moved: int  # not in the reference's place in the suspect
    cosine_mean: float
    cosine_min: float
    margin_median: float
    margin_min: float
    norm_ratio_median: float
    norm_ratio_min: float
    norm_ratio_max: float
    evidence: float
    max_relative_difference: float  # after resync, max |suspect - reference| / max |reference| over the slots
    live: int = 0  # neurons that vote (neither decayed nor interchangeable; resync.GroupReport)
    decayed: int = 0  # neurons negligible in every slot of 2+ entries (functionally inert: not evidence)
    margins: list[float] = field(default_factory=list, repr=False)
    norm_ratios: list[float] = field(default_factory=list, repr=False)
    cosines: list[float] = field(default_factory=list, repr=False)


@dataclass
class AuditReport:
    suspect: str
    reference: str
    verdict: str  # identical | permuted | perturbed | not derived | cannot judge
    derived: bool
    permuted: bool
    perturbed: bool
    summary: str  # one line: "derived, permuted (...)"
    evidence: list[str]
    statistic: float  # resync's decision statistic (see `evidence`; unrelated models: about 0)
    neurons: int
    matched: int
    moved: int
    perturbation: dict
    precision: dict  # storage check: within, worst ratio to the bound (and where), storage types, formats
    re_export: dict  # what canonicalization undid: {"suspect": [...], "reference": [...]}
    layers: list[LayerRow]
    timings: dict
    # group -> similarity matrix (display size; heatmaps.Heatmaps: computed when read), not serialized
    similarity: Mapping = field(default_factory=dict, repr=False)
    # the reference's parameters compared: {"parameters", "of", "share" (None: nothing to compare),
    # "in_subgraphs" (inside If/Loop/Scan bodies), "in_subgraphs_compared" (of them), "min_share"}
    compared: dict = field(default_factory=dict)
    format_change: str = ""  # "int8 per channel", "float16", ...: the suspect's storage, when not float32
    reduction: dict = field(default_factory=dict)  # reduce.ReduceReport.to_dict(): what the suspect was reduced by
    restored: dict = field(default_factory=dict)  # audit -o: the suspect's own file restored (restore.py)
    # align.Alignment.to_dict(): layers, confidence (share of contested pairs paired clearly), notes
    alignment: dict = field(default_factory=dict)

    @property
    def matched_fraction(self) -> float | None:
        """Neurons matched / neurons; None when the reference has no permutable neuron (0 of 0)."""
        return self.matched / self.neurons if self.neurons else None

    @property
    def exit_code(self) -> int:
        if self.verdict == "cannot judge":
            return EXIT_CANNOT_JUDGE
        return 0 if self.derived else 1

    def to_dict(self, detail: bool = True) -> dict:
        data = asdict(replace(self, similarity={}))  # (the heatmaps are a display, computed when shown)
        data.pop("similarity")
        data["matched_fraction"] = self.matched_fraction
        for row in data["layers"]:
            if not detail:
                for k in ("margins", "norm_ratios", "cosines"):
                    row.pop(k)
        return json_safe(data)

    def to_json(self, indent: int | None = 1, detail: bool = True) -> str:
        return json.dumps(self.to_dict(detail), indent=indent, allow_nan=False)

    def summary_lines(self) -> list[str]:
        lines = [f"verdict: {self.summary}"]
        lines += [f"  - {e}" for e in self.evidence]
        lines.append("")
        head = (f"{'suspect layer':<44} {'neurons':>7} {'matched':>8} {'moved':>6} {'live':>6} {'decayed':>7} "
                f"{'cos mean':>9} "
                f"{'cos min':>8} {'margin min':>10} {'norm ratio':>15} {'max diff':>9}")
        lines.append(head)
        for r in self.layers:
            name = _short(", ".join(r.layers) or r.group, 44)
            lines.append(
                f"{name:<44} {r.neurons:>7} {100 * r.matched / max(r.neurons, 1):>7.1f}% {r.moved:>6} "
                f"{r.live:>6} {r.decayed:>7} "
                f"{r.cosine_mean:>9.5f} {r.cosine_min:>8.4f} {r.margin_min:>10.4f} "
                f"{r.norm_ratio_min:>7.3f}-{r.norm_ratio_max:<7.3f} {r.max_relative_difference:>9.2e}")
        t = self.timings
        lines.append("")
        lines.append(f"audited in {t.get('total', 0):.2f}s (canonicalize {t.get('canonicalize', 0):.2f}s, "
                     f"align {t.get('align', 0):.2f}s, resync {t.get('resync', 0):.2f}s)")
        if self.restored:
            from .restore import restore_lines

            lines += restore_lines(self.restored)
        return lines


def audit(suspect: ModelLike, reference: ModelLike, *, html: str | os.PathLike | None = None,
          json_path: str | os.PathLike | None = None, max_passes: int = 8,
          heatmap_max: int = HEATMAP_MAX, output: str | os.PathLike | None = None,
          verify_options: dict | None = None) -> AuditReport:
    """Audit one suspect against its reference (paths or ModelProtos); optionally write HTML / JSON.
    `output`: write the suspect's own file in the reference's neuron order there (restore.py), when
    derived and verified; a failed check raises CheckFailed (its .report is this report)."""
    from ..resync import resync

    t0 = time.perf_counter()
    timings = {}
    sus_model = _load(suspect)
    ref_c, ref_steps = _reference_canonical(reference)
    timings["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    sus_c = _canonical(sus_model, "suspect")
    timings["canonicalize"] = time.perf_counter() - t
    t = time.perf_counter()
    reduction = None
    try:
        alignment = align(ref_c, sus_c)
    except ModelMismatchError:  # a width or depth change: align the suspect without its padding (issue 16)
        from .widths import narrow, wider  # a pruned copy: the reference without its unmatched neurons

        try:  # a padded copy still wider after the exact reduction: reduce.against's approximate step
            sus_model, reduction = to_reference(lambda m: align(ref_c, _canonical(m, "suspect")), sus_model,
                                                narrow=lambda m: narrow(ref_c, _canonical(m, "suspect")),
                                                wider=lambda m: wider(ref_c, _canonical(m, "suspect"), m))
            if reduction.reference is not None:  # judged on the matched neurons (no integer steps: full shapes)
                ref_c, ref_steps = reduction.reference, Steps()
            sus_c = _canonical(sus_model, "suspect")
        except ModelMismatchError as mismatch:  # layers the reference lacks: sequences aligned with gaps
            from .depth import without_inserted

            sus_c, reduction = without_inserted(ref_c, sus_c, mismatch)
        alignment = align(ref_c, sus_c)
    timings["align"] = time.perf_counter() - t
    t = time.perf_counter()
    sub = compare_subgraphs(ref_c.model, sus_c.model, alignment.weight_map)  # the rest inside bodies (subgraphs.py)
    carry_subgraphs(alignment.model, sub)
    sus_steps = measure_steps(sus_model, sus_c, set(alignment.weight_map.values()),
                              lambda m: _canonical(m, "suspect"))
    timings["storage"] = time.perf_counter() - t
    t = time.perf_counter()
    ref_walk = walk(ref_c.model)  # once per audit: every resync below and the report read it
    restored, rs = resync(alignment.model, ref_c.model, check=False, max_passes=max_passes, ref_walk=ref_walk)
    if not rs.derived and alignment.doubtful:  # a "not derived" must not rest on a doubtful pairing
        alignment, restored, rs = _by_neuron_evidence(alignment, restored, rs, ref_c, sub, max_passes, ref_walk)
    timings["resync"] = time.perf_counter() - t
    t = time.perf_counter()
    report = _build(suspect, reference, ref_c, sus_c, alignment, restored, rs, heatmap_max, sus_steps, ref_steps,
                    sub, ref_walk)
    if report.perturbation.get("kind_named") is False:  # differences only where the pairing is doubtful
        alignment, restored, rs, report = _by_storage_bound(
            alignment, restored, rs, report, ref_c, sub, max_passes,
            lambda a, r, s: _build(suspect, reference, ref_c, sus_c, a, r, s, heatmap_max, sus_steps, ref_steps, sub,
                                   ref_walk), ref_walk)
    if reduction is not None:
        _obfuscated(report, reduction)
    timings["report"] = time.perf_counter() - t
    failed = None
    if output is not None:
        from .restore import restore_audited

        t = time.perf_counter()
        inputs = [m for m in (suspect, reference) if not isinstance(m, onnx.ModelProto)]
        failed = restore_audited(report, output, sus_model, sus_c, ref_c, alignment, rs,
                                 lambda m: _canonical(m, "suspect"), inputs, verify_options)
        timings["restore"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    if json_path is not None:
        write_text_atomic(json_path, report.to_json())
    if html is not None:
        from .html import write_html

        write_html(report, html)
    if failed is not None:  # the verdict was found: the caller (the CLI) still shows it
        failed.report = report
        raise failed
    return report


def audit_file(suspect_path: str, reference_path: str, **options) -> dict:
    """Batch worker: audit one file, return a JSON-ready dict; never raises (errors are recorded).

    Keys: file, reference, ok, exit_code (0 derived, 1 not derived, 3 error, 4 cannot judge), seconds, and either
    the report (verdict, summary, evidence, layers without per-neuron lists, ...) or error.
    """
    t0 = time.perf_counter()
    record = {"file": str(suspect_path), "reference": str(reference_path)}
    try:
        detail = bool(options.pop("detail", False))
        report = audit(suspect_path, reference_path, **options)
        record.update(report.to_dict(detail=detail))
        record["file"] = str(suspect_path)
        record.update(ok=True, exit_code=report.exit_code)
    except BaseException as exc:  # noqa: BLE001 - a batch must go on (KeyboardInterrupt aside)
        if isinstance(exc, KeyboardInterrupt):
            raise
        from ..errors import ResyncError

        code = exc.exit_code if isinstance(exc, ResyncError) and exc.exit_code >= 3 else 3
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        record.update(ok=False, exit_code=code, error=f"{type(exc).__name__}: {message}")
    record["seconds"] = round(time.perf_counter() - t0, 4)
    return record


# ---- internals -------------------------------------------------------------------------------
def _by_neuron_evidence(alignment: Alignment, restored, rs, ref_c: CanonicalModel, sub: SubgraphComparison,
                        max_passes: int, ref_walk=None):
    """The doubtful pairs decided by neuron evidence: runner-up alignments (align.alternatives) are
    resynced, at most align.MAX_ALTERNATIVES resyncs in all; the first whose resync is derived with a
    higher decision statistic is adopted and its own runner-ups tried next (a runner-up can fix one
    wrong pair and still hold another: q paired with v once q and k are unswapped). A note says
    which was kept and why. An alternative that resync cannot take is skipped. None derived: the
    first alignment stands (its statistic reported, never a maximum over tries) and the verdict stays
    "not derived"."""
    from ..resync import resync

    name, first, _ = decision(rs)
    best, tried, steps = (alignment, restored, rs), [], []
    seen = {_mapping_key(alignment)}
    budget = MAX_ALTERNATIVES
    while budget > 0:
        adopted = False
        for what, other in alternatives(best[0], limit=budget):
            if _mapping_key(other) in seen:
                continue
            seen.add(_mapping_key(other))
            budget -= 1
            carry_subgraphs(other.model, sub)
            try:
                o_restored, o_rs = resync(other.model, ref_c.model, check=False, max_passes=max_passes,
                                          ref_walk=ref_walk)
            except ResyncError:
                continue
            value = decision(o_rs)[1]
            tried.append((what, value))
            if o_rs.derived and value > decision(best[2])[1]:
                best, adopted = (other, o_restored, o_rs), True
                steps.append(what)
                break
        if not adopted:
            break
    if not tried:
        return alignment, restored, rs
    kept, value = best[0], decision(best[2])[1]
    if kept is alignment:
        others = "; ".join(f"{what}: {v:.2f}" for what, v in tried)
        note = (f"doubtful pairs kept by neuron evidence: {name} {first:.2f} as aligned, "
                f"{max(v for _, v in tried):.2f} at best when paired otherwise, not derived either ({others})")
    else:
        note = (f"{'; then '.join(steps)} paired by neuron evidence: {name} {value:.2f} against {first:.2f} as "
                f"first aligned ({len(tried)} runner-up alignment(s) resynced, at most {MAX_ALTERNATIVES})")
    kept.notes.append(note)
    return best


def _by_storage_bound(alignment: Alignment, restored, rs, report: "AuditReport", ref_c: CanonicalModel,
                      sub: SubgraphComparison, max_passes: int, build, ref_walk=None):
    """A derived suspect whose differences beyond its storage lie in layers paired with low
    confidence (_unsure_kind): the runner-up alignments of those pairs (align.alternatives, at most
    MAX_ALTERNATIVES) are resynced, and the first whose restored weights all lie within the
    storage's bound (verdict identical or permuted) is kept, with a note: a wrong pairing of
    distinct layers does not put every weight within the storage's rounding of the reference's.
    None: the first alignment stands, its kind not named, and the evidence lists what was tried."""
    from ..resync import resync

    tried = []
    for what, other in alternatives(alignment):
        carry_subgraphs(other.model, sub)
        try:
            o_restored, o_rs = resync(other.model, ref_c.model, check=False, max_passes=max_passes,
                                      ref_walk=ref_walk)
        except ResyncError:
            continue
        if not o_rs.derived:
            tried.append(f"{what}: not derived")
            continue
        o_report = build(other, o_restored, o_rs)
        tried.append(f"{what}: {o_report.verdict}")
        if o_report.verdict in ("identical", "permuted"):
            note = (f"{what} paired by the storage's bound: every weight within it, where the first alignment left "
                    f"differences in layers paired with low confidence ({len(tried)} runner-up alignment(s) resynced)")
            other.notes.append(note)
            o_report.evidence.append(f"alignment: {note}")
            o_report.alignment = other.to_dict()
            return other, o_restored, o_rs, o_report
    if tried:
        report.evidence.append("alignment: no runner-up alignment puts every weight within the storage's bound ("
                               + "; ".join(tried) + ")")
    return alignment, restored, rs, report


def _mapping_key(alignment: Alignment) -> frozenset:
    return frozenset(alignment.node_map.items())


def _load(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def _canonical(model: onnx.ModelProto, role: str) -> CanonicalModel:
    """Canonicalize, or refuse in one line: the rewrite evaluates the file's weight chains, and a
    hostile file (a string tensor as a kernel, shapes that disagree) must not end in a traceback."""
    try:
        return canonicalize(model)
    except ResyncError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(f"the {role} cannot be brought to canonical form ({message})") from None


_REF_CACHE: dict[tuple, tuple[CanonicalModel, Steps]] = {}


def _reference_canonical(reference: ModelLike) -> tuple[CanonicalModel, Steps]:
    """Canonical reference and the steps of its integer-stored weights (if any); per process, a
    file's are kept (batches audit many files against one)."""
    if isinstance(reference, onnx.ModelProto):
        return _with_steps(reference)
    path = Path(reference)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _REF_CACHE:
        return _REF_CACHE[key]
    result = _with_steps(load_model(path))
    if key is not None:
        _REF_CACHE.clear()
        _REF_CACHE[key] = result
    return result


def _with_steps(model: onnx.ModelProto) -> tuple[CanonicalModel, Steps]:
    canon = _canonical(model, "reference")
    return canon, measure_steps(model, canon, list(canon.origins), lambda m: _canonical(m, "reference"))


def _name(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<model>"
    return str(model)


def _build(suspect, reference, ref_c: CanonicalModel, sus_c: CanonicalModel, alignment: Alignment,
           restored: onnx.ModelProto, rs, heatmap_max: int, sus_steps: Steps | None = None,
           ref_steps: Steps | None = None, sub: SubgraphComparison | None = None, ref_walk=None) -> AuditReport:
    """ref_walk: the walk of ref_c.model (walked here when not given)."""
    ref_store, res_store = WeightStore(ref_c.model), WeightStore(restored)
    ref_walk = ref_walk if ref_walk is not None else walk(ref_c.model)
    sub = sub if sub is not None else compare_subgraphs(ref_c.model, sus_c.model, alignment.weight_map)
    rs = _without_groups(rs, ref_walk, sub.unpaired)
    sus_steps, ref_steps = sus_steps or Steps(), ref_steps or Steps()
    steps = _restored_steps(sus_steps, alignment, ref_walk, rs, ref_store, WeightStore(sus_c.model))
    precision = _precision(ref_store, res_store, alignment, ref_c, sus_c, steps, ref_steps, sus_steps)
    beyond_at, differences = precision.pop("_beyond_at"), precision.pop("_differences")
    compared = _compared(ref_c, alignment)
    _add_subgraphs(compared, sub)
    groups = {g.key: g for g in ref_walk.groups}
    rows = []
    for gr in rs.groups:
        rows.append(_row(gr, groups.get(gr.key), alignment, ref_c, sus_c, ref_store, res_store, differences))
    similarity = Heatmaps({gr.key: groups[gr.key] for gr in rs.groups if gr.key in groups}, ref_store, res_store,
                          heatmap_max)
    moved = int(rs.moved)
    # a layer no group reaches keeps the suspect's order: equal up to it is no change (unreached.py)
    # (also where no group was matched at all: equality alone must not call an order a change)
    reordered = explained_by_order(alignment, ref_walk, ref_store, res_store, sus_c, {gr.key for gr in rs.groups}) \
        if not precision["within"] and (rs.derived or not rs.neurons) else None
    if reordered:
        precision["within"], precision["reordered"] = True, reordered
    within = precision["within"] and sub.within
    judged = compared["share"] is not None and compared["share"] >= MIN_COMPARED_SHARE
    # the main graph's evidence; where it compared nothing (every weight in a body), the bodies'
    looks_derived = (bool(rs.derived) or precision["within"]) if alignment.weight_map else sub.looks_derived
    derived = judged and looks_derived
    if not judged:
        verdict = "cannot judge"
    elif not derived:
        verdict = "not derived"
    elif within and moved == 0 and not sub.moved and not reordered:
        verdict = "identical"
    elif within:
        verdict = "permuted"
    else:
        verdict = "perturbed"
    permuted = derived and (moved > 0 or sub.moved or bool(reordered))
    perturbed = verdict == "perturbed"
    format_change = ", ".join(precision["formats"])
    if verdict in ("identical", "permuted", "not derived", "cannot judge"):
        perturbation = dict(rs.perturbation) if verdict != "not derived" and derived else {}
        perturbation["kinds"] = []  # what resync sees within the bound is the storage, nothing more
    else:  # float32 too: resync's whole-tensor statistics name rescales on a copy with noise everywhere
        perturbation = _beyond_kinds(precision["beyond"], rs.perturbation)
    if verdict == "perturbed":
        _unsure_kind(perturbation, alignment, beyond_at, ref_c)
    re_export = {"suspect": sus_c.changes_list(), "reference": ref_c.changes_list(),
                 "differences": _differences(sus_c, ref_c)}
    summary = _summary(verdict, derived, permuted, perturbation, precision, re_export, moved, rs.neurons,
                       compared, looks_derived, format_change)
    evidence = _evidence(rs, precision, re_export, alignment, moved, derived, compared, perturbation)
    if reordered:
        evidence.append(f"{len(reordered)} weights equal the reference's only once their rows and columns are "
                        "matched by value: an order no neuron group reaches (resync cannot put it back), not a "
                        "change: " + ", ".join(reordered[:4]) + (" ..." if len(reordered) > 4 else ""))
    if sub.weights:
        evidence.append(sub.phrase())
    return AuditReport(
        suspect=_name(suspect), reference=_name(reference), verdict=verdict, derived=derived,
        permuted=permuted, perturbed=perturbed, summary=summary, evidence=evidence,
        statistic=decision(rs)[1], neurons=int(rs.neurons), matched=int(rs.matched), moved=moved,
        perturbation=perturbation, precision=precision, re_export=re_export, layers=rows, timings={},
        similarity=similarity, compared=compared, format_change=format_change, alignment=alignment.to_dict(),
    )


def _permuted_phrase(moved: int, neurons: int, precision: dict) -> str:
    if neurons or not precision.get("reordered"):
        return f"permuted ({moved} of {neurons} neurons moved)"
    n = len(precision["reordered"])  # no group matched: only weights in another row order (unreached.py)
    return f"permuted ({n} weight{'s' if n > 1 else ''} in another order of rows or columns, no neuron group)"


def _summary(verdict, derived, permuted, perturbation, precision, re_export, moved, neurons, compared,
             looks_derived, format_change) -> str:
    if verdict == "cannot judge":
        line = f"cannot judge: {_compared_phrase(compared)}; at least {100 * MIN_COMPARED_SHARE:.0f}% is needed"
        if compared["parameters"]:
            line += (f" (what was compared {'looks derived' if looks_derived else 'does not look derived'})")
        return line
    if not derived:
        partial = compared["share"] is not None and compared["share"] < 1.0
        return "not derived from the reference" + (f"; {_compared_phrase(compared)}" if partial else "")
    parts = ["derived with a format change" if format_change else "derived"]
    if verdict == "identical":
        parts.append("identical weights")
    elif verdict == "permuted":
        parts.append(_permuted_phrase(moved, neurons, precision))
    else:
        if permuted:
            parts.append(_permuted_phrase(moved, neurons, precision))
        kinds = perturbation.get("kinds") or ["weights changed"]
        beyond = f" beyond its {format_change} storage" if format_change else ""
        parts.append(f"perturbed{beyond}: " + "; ".join(kinds))
    line = ", ".join(parts)
    if verdict in ("identical", "permuted") and format_change:
        line += f" (stored as {format_change}: every weight within {_within_phrase(precision)})"
    diffs = re_export["differences"]
    if diffs:
        line += f"; re-exported ({'; '.join(diffs[:4])}" + ("; ..." if len(diffs) > 4 else "") + ")"
    if compared["share"] is not None and compared["share"] < 1.0:
        line += f"; {_compared_phrase(compared)}"
    return line


def _within_phrase(precision) -> str:
    if precision["quantized"]:
        phrase = "half a step" + (" or its rounding" if set(precision["storage"]) & {"float16", "bfloat16"} else "")
    else:
        phrase = "its rounding"
    return phrase + clip_phrase(precision.get("clipped"))


def _compared_phrase(compared) -> str:
    if compared["of"] == 0:
        return "the reference has no parameters to compare"
    text = (f"{compared['parameters']:,} of the reference's {compared['of']:,} parameters compared "
            f"({100 * compared['share']:.1f}%)")
    reached = compared.get("in_subgraphs_compared", 0)
    if reached:
        text += f"; {reached:,} of them inside If/Loop/Scan bodies"
    if compared["in_subgraphs"] - reached:
        text += (f"; {compared['in_subgraphs'] - reached:,} sit inside If/Loop/Scan bodies, which the comparison "
                 "does not reach")
    return text


def _evidence(rs, precision, re_export, alignment, moved, derived, compared, perturbation) -> list[str]:
    name, value, threshold = decision(rs)
    at = f"derived at >= {threshold:g}; " if math.isfinite(threshold) else ""
    judged = compared["share"] is not None and compared["share"] >= MIN_COMPARED_SHARE
    # each line states what was measured; under "cannot judge" it is on the compared part only
    on = "" if judged else "on the compared part only (too little for a verdict): "
    out = [f"{on}{name} {value:.2f} ({at}unrelated models score about 0)"]
    share = f"{100 * rs.matched / rs.neurons:.1f}%" if rs.neurons else ""
    if not rs.neurons:
        out.append("no permutable neuron group among the compared weights: the verdict rests on weight equality "
                   "alone" if judged else "no permutable neuron group among the compared weights")
    elif rs.derived:
        out.append(f"{on}{rs.matched} of {rs.neurons} neurons ({share}) matched to their best candidate in "
                   f"{len(rs.groups)} groups; {moved} had been moved")
    else:
        out.append(f"{on}{rs.matched} of {rs.neurons} neurons ({share}) are their counterpart's best candidate in "
                   f"{len(rs.groups)} groups, and the matches do not stand out from unrelated neurons")
    if rs.groups:
        cmean = sum(g.cosine_mean * g.size for g in rs.groups) / max(rs.neurons, 1)
        out.append(f"cosine of matched neurons: mean {cmean:.5f}, worst {min(g.cosine_min for g in rs.groups):.4f}")
    out.append(f"{len(alignment.pairs)} layers aligned by structure, {len(alignment.weight_map)} weights compared: "
               + _compared_phrase(compared) + (f" (below {100 * MIN_COMPARED_SHARE:.0f}%: cannot judge)"
                                               if compared["share"] is None or compared["share"] < MIN_COMPARED_SHARE
                                               else ""))
    out += [f"alignment: {note}" for note in alignment.notes]  # low confidence, inconsistent pairs (align.py)
    storage = "/".join(precision["formats"] or precision["storage"])
    if not alignment.weight_map:
        pass
    elif precision["within"]:
        out.append(f"after resync every weight equals the reference within what its {storage} storage explains "
                   f"(worst {precision['worst_ratio']:.2f} of the bound, in {precision['worst_weight']!r})")
    else:
        b = precision["beyond"]
        out.append(f"after resync {100 * b['fraction']:.2g}% of the compared weights lie beyond what the {storage} "
                   f"storage explains (worst {precision['worst_ratio']:.3g} x the bound, in "
                   f"{precision['worst_weight']!r}; largest difference {precision['worst_relative']:.3g} x max|w|, "
                   f"in {precision['worst_relative_weight']!r})")
    if precision.get("unmeasured"):
        out.append("no quantization step could be measured for " + ", ".join(precision["unmeasured"][:4])
                   + (" ..." if len(precision["unmeasured"]) > 4 else "") + ": compared as stored")
    if derived and not precision["within"] and perturbation.get("kinds"):
        out.append("perturbation: " + "; ".join(perturbation["kinds"]))
    if re_export["differences"]:
        out.append("the suspect's graph differs from the reference's: " + "; ".join(re_export["differences"]))
    return out


def decision(rs) -> tuple[str, float, float]:
    """resync's decision statistic as its report states it: (name, value, threshold for derived)."""
    return rs.statistic, float(rs.evidence), float(rs.threshold)


def _differences(sus_c: CanonicalModel, ref_c: CanonicalModel) -> list[str]:
    """How the two files' graphs differ, from what canonicalization had to do to each."""
    out = []
    for what in sorted(set(sus_c.changes) | set(ref_c.changes)):
        d = sus_c.changes.get(what, 0) - ref_c.changes.get(what, 0)
        if d > 0:
            out.append(f"{_PHRASES.get(what, what)} ({d})")
        elif d < 0:
            out.append(f"{_REVERSE_PHRASES.get(what, what + ' in the reference only')} ({-d})")
    return out


_PHRASES = {
    "float16 weight cast to float32": "weights stored as float16",
    "bfloat16 weight cast to float32": "weights stored as bfloat16",
    "float64 weight cast to float32": "weights stored as float64",
    "Cast of constants folded": "Cast nodes on weights",
    "DequantizeLinear of constants folded": "quantized weights (DequantizeLinear)",
    "QuantizeLinear of constants folded": "weights fake-quantized (QuantizeLinear)",
    "Identity removed": "Identity nodes",
    "Dropout removed": "Dropout nodes",
    "Constant node made an initializer": "weights in Constant nodes",
}
_REVERSE_PHRASES = {
    "BatchNormalization folded into Conv": "BatchNormalization folded into Conv",
    "BatchNormalization folded into Gemm": "BatchNormalization folded into Gemm",
    "BatchNormalization folded into ConvTranspose": "BatchNormalization folded into ConvTranspose",
    "Identity removed": "Identity nodes removed",
    "Dropout removed": "Dropout nodes removed",
    "Constant node made an initializer": "constants folded into initializers",
    "zero bias added": "Conv biases present",
}


def _precision(ref_store: WeightStore, res_store: WeightStore, alignment: Alignment,
               ref_c: CanonicalModel, sus_c: CanonicalModel, steps: dict[str, np.ndarray],
               ref_steps: Steps, sus_steps: Steps) -> dict:
    """Does every restored weight equal the reference's within what the two files' storage explains
    (storage.py)? The worst weight is the one with the worst ratio to its bound; what lies beyond the
    bound is summarized for the kinds of perturbation."""
    worst_ratio, worst_name = 0.0, ""
    worst_rel, worst_rel_name = 0.0, ""
    storage, formats, unmeasured = set(), [], []
    quantized = False
    total = beyond = newly_zero = 0
    noise, distinct, distinct_ref = [], [], []
    spread: dict[str, tuple[float, int]] = {}  # weight -> (its noise / std, elements): beyond_kinds' "noise"
    scaled: dict[str, int] = {}  # weight -> neurons scaled whole (beyond.py)
    beyond_at: dict[str, tuple[int, int]] = {}  # weight -> (elements beyond the bound, elements)
    differences: dict[str, tuple[float, float]] = {}  # weight -> (max |reference|, max |restored - reference|)
    for rw, sw in alignment.weight_map.items():
        # one weight at a time, a block of PRECISION_ROWS rows at a time where the restored weight is
        # lazy (a huge model's weight: mapped, or computed a block at a time: dequantized, cast,
        # permuted), in chunks of PRECISION_CHUNK elements (float64 only there): never a whole float
        # copy of a huge weight, nor of its steps
        transposed, blocks = _blocks(ref_store.shape(rw), res_store.is_lazy(rw), res_store.major(rw))
        layout = ref_store.shape(rw)[::-1] if transposed else ref_store.shape(rw)
        evidence = SliceEvidence(layout)  # (its statistics per slice of both axes: the same for the transpose)
        so, ro = sus_c.origins.get(sw), ref_c.origins.get(rw)
        dtype = storage_dtype(so)
        storage.add(dtype)
        shown = so.sources[0] if so is not None and so.sources else sw
        if so is not None and so.quantized:
            quantized = True
            fmt = sus_steps.formats.get(sw)
            if fmt is None:
                unmeasured.append(shown)
                fmt = f"{dtype} (step not measured)"
        else:
            fmt = float_format(dtype) + run_time_format(so)
        formats += [f for f in fmt.split(", ") if f != "float32" and f not in formats]
        size = math.prod(layout)
        beyond_before = beyond
        pieces = zip(_flat(ref_store, rw, blocks, transposed), _flat(res_store, rw, blocks, transposed),
                     _flat(steps, rw, blocks, transposed), _flat(ref_steps.steps, rw, blocks, transposed))
        if len(blocks) > 1:  # the next block read (dequantized, cast, its steps) while this one is checked,
            #                  the first ones while the reference's scale is found
            pieces = prefetched(pieces, depth=1, now=True)
        scale = 0.0
        moments = np.zeros(2)  # of r: sum, sum of squares
        for _, r_all in _flat(ref_store, rw, blocks, False):  # (any order: a maximum and sums)
            for a in range(0, r_all.size, PRECISION_CHUNK):
                piece = r_all[a:a + PRECISION_CHUNK]
                if piece.dtype.kind == "f":  # max |r| in r's own type: the same value, with no float64 copy
                    scale = max(scale, float(piece.max()), float(-piece.min()))  # (a NaN skipped, as before)
                r = piece.astype(np.float64)
                if piece.dtype.kind != "f":
                    scale = max(scale, float(np.abs(r).max()))
                moments += (r.sum(), np.square(r, out=r).sum())
        std = math.sqrt(max(moments[1] / size - (moments[0] / size) ** 2, 0.0)) if size else 0.0
        top = max_diff = 0.0
        excess_moments = np.zeros(3)  # of the excess where kept: count, sum, sum of squares
        stride = max(1, size // STATISTICS_SAMPLE)
        distinct_of = size >= 256 and not (so is not None and so.quantized)  # (a float copy's levels)
        picked, picked_ref = [], []  # every stride-th element, for the distinct values (copies: a view
        #                              would keep its whole block alive)
        for (start, r_all), (_, s_all), (_, step_s), (_, step_r) in pieces:
            for a in range(0, r_all.size, PRECISION_CHUNK):
                piece = slice(a, a + PRECISION_CHUNK)
                piece_steps = (step_s[piece] if step_s is not None else None,
                               step_r[piece] if step_r is not None else None)
                clear = _clearly_within(r_all[piece], s_all[piece], so, ro, piece_steps, scale)
                if clear is not None:  # nothing beyond the bound, no excess: the piece's largest ratio and difference
                    top, max_diff = max(top, clear[0]), max(max_diff, clear[1])
                    excess_moments[0] += r_all[piece].size
                    continue
                r = r_all[piece].astype(np.float64)
                s = s_all[piece].astype(np.float64)
                bound = allowed(r, so, ro, *piece_steps, scale=scale)
                diff = np.abs(s - r)
                max_diff = max(max_diff, float(diff.max()))
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(diff > 0, diff / np.where(bound > 0, bound, 0.0), 0.0)
                top = max(top, float(ratio.max()))
                # what lies beyond the bound, for the kinds of perturbation
                out_of = diff > bound
                beyond += int(out_of.sum())
                zero = (s == 0) & (r != 0) & out_of  # newly zero where the storage's rounding does not explain it
                newly_zero += int(zero.sum())
                evidence.add(start + a, r, s, out_of & ~zero)
                excess = (np.sign(s - r) * np.maximum(diff - bound, 0.0))[~zero]
                excess_moments += (excess.size, excess.sum(), np.square(excess).sum())
            if distinct_of:
                first = -start % stride  # this block's first element at a multiple of the stride
                picked.append(s_all[first::stride].copy())
                picked_ref.append(r_all[first::stride].copy())
        total += size
        beyond_at[rw] = (beyond - beyond_before, size)
        differences[rw] = (scale, max_diff)
        rel = max_diff / scale if scale > 0 and size else max_diff
        if rel > worst_rel:
            worst_rel, worst_rel_name = rel, shown
        if top > worst_ratio or not worst_name:
            worst_ratio, worst_name = top, shown
        count = excess_moments[0]
        kind, neurons = evidence.kind()
        if size >= 16 and std > 0 and count:
            spread_ = math.sqrt(max(excess_moments[2] / count - (excess_moments[1] / count) ** 2, 0.0))
            noise.append((spread_ / std, size))
            if kind == "spread":
                spread[shown] = (spread_ / std, size)
        if kind == "spread" and shown not in spread:  # too small or constant for a relative noise
            spread[shown] = (0.0, size)
        if kind == "scaled":
            scaled[shown] = neurons
        if distinct_of:
            distinct.append(len(np.unique(np.concatenate(picked))))
            distinct_ref.append(len(np.unique(np.concatenate(picked_ref))))
    beyond_stats = {
        "elements": int(beyond), "of": int(total), "fraction": beyond / total if total else 0.0,
        "noise_relative_std": _weighted_median(noise) if noise else 0.0,
        # by shape (beyond.py): weights whose differences beyond the bound are spread over their
        # elements (noise / std of each), and weights where whole neurons are scaled (neurons)
        "spread_weights": {k: float(v[0]) for k, v in spread.items()},
        "spread_noise_relative_std": _weighted_median(list(spread.values())) if spread else 0.0,
        "scaled_weights": scaled,
        "extra_zero_fraction": newly_zero / total if total else 0.0,
        "distinct_values_median": int(np.median(distinct)) if distinct else None,
        "distinct_values_reference_median": int(np.median(distinct_ref)) if distinct_ref else None,
    }
    return {
        "within": bool(worst_ratio <= 1.0),
        "worst_ratio": worst_ratio,
        "worst_weight": worst_name,
        "worst_relative": worst_rel,
        "worst_relative_weight": worst_rel_name,
        "storage": sorted(storage) or ["float32"],
        "formats": formats,
        "quantized": quantized,
        "unmeasured": unmeasured,
        "probes": sus_steps.probes,
        "clipped": {t: list(v) for t, v in sus_steps.clipped.items()},  # storage.clip_phrase
        "beyond": beyond_stats,
        "_beyond_at": beyond_at,  # for _unsure_kind; popped by _build (not serialized)
        "_differences": differences,  # for the layer rows (_row); popped by _build
    }


def _blocks(shape: tuple[int, ...], lazy: bool, major: int) -> tuple[bool, list[tuple[int, list]]]:
    """How the precision check reads a weight: in its own layout or transposed (a 2-D weight
    cheapest to read by columns: LazyTensor.major), and in which blocks, each (first element's flat
    index in the layout walked, index for select): PRECISION_ROWS elements' worth of rows of that
    layout at a time where the restored weight is lazy, else the whole weight in one block."""
    if not lazy or len(shape) < 1 or not math.prod(shape):
        return False, [(0, [])]
    transposed = major == 1 and len(shape) == 2
    layout = shape[::-1] if transposed else shape
    row = math.prod(layout[1:])
    rows = max(1, PRECISION_ROWS // max(1, row))
    blocks = []
    for a in range(0, layout[0], rows):
        cut = np.arange(a, min(a + rows, layout[0]))
        blocks.append((a * row, [None, cut] if transposed else [cut]))
    return transposed, blocks


def _flat(source, name: str, blocks: list[tuple[int, list]], transposed: bool):
    """(first element's flat index, the block's values flattened in the layout walked) for each
    block: `source` a WeightStore, or a map of steps (values None where it has no entry)."""
    for start, index in blocks:
        if isinstance(source, WeightStore):
            values = source.get(name) if not index else source.select(name, index)
        elif name not in source:
            values = None
        else:
            values = source[name] if not index else step_part(source, name, index)
        if values is not None:
            values = np.asarray(values)
            values = (_transposed(values) if transposed else values).reshape(-1)
        yield start, values


def _transposed(values: np.ndarray) -> np.ndarray:
    """values.T, contiguous: a view where it is one already (a part computed by columns), else a
    copy by strips of rows (match/gather.transposed: a reference's block of columns)."""
    out = values.T
    return out if out.flags.c_contiguous or values.ndim != 2 else transposed(values)


def _clearly_within(r: np.ndarray, s: np.ndarray, so, ro, steps: tuple, scale: float) -> tuple[float, float] | None:
    """The exact check's float32 screen (float32 pieces only): None unless every element's
    difference lies below its bound by SCREEN_MARGIN, more than float32's rounding of either can
    move (~1e-6 relative; a bound too small for float32's relative precision is left to the exact
    check). Then nothing lies beyond the bound, and the piece's largest ratio to the bound and
    largest difference are computed again in float64 on the elements within the margin of either's
    float32 maximum: the values the float64 check gives."""
    if r.dtype != np.float32 or s.dtype != np.float32:
        return None
    bound = allowed(r, so, ro, *steps, scale=scale)
    if not bound.min() >= np.finfo(np.float32).tiny:  # (zero, subnormal or NaN somewhere)
        return None
    diff = np.subtract(s, r)
    np.abs(diff, out=diff)
    ratio = np.divide(diff, bound, out=bound)  # (the bound is not read again)
    top32, max32 = ratio.max(), diff.max()
    if not top32 <= 1 - SCREEN_MARGIN:  # (a NaN fails too: the exact check counts it)
        return None
    top = max_diff = 0.0
    if top32 > 0:
        near = np.flatnonzero(ratio >= top32 * (1 - SCREEN_MARGIN))
        r64, s64 = r[near].astype(np.float64), s[near].astype(np.float64)
        b64 = allowed(r64, so, ro, *(st[near] if st is not None else None for st in steps), scale=scale)
        d64 = np.abs(s64 - r64)
        with np.errstate(divide="ignore", invalid="ignore"):
            top = float(np.where(d64 > 0, d64 / np.where(b64 > 0, b64, 0.0), 0.0).max())
    if max32 > 0:
        near = np.flatnonzero(diff >= max32 * (1 - SCREEN_MARGIN))
        max_diff = float(np.abs(s[near].astype(np.float64) - r[near].astype(np.float64)).max())
    return top, max_diff


def _weighted_median(pairs: list[tuple[float, int]]) -> float:
    values = np.asarray([v for v, _ in pairs], dtype=np.float64)
    weights = np.asarray([w for _, w in pairs], dtype=np.float64)
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][min(int(np.searchsorted(cum, 0.5 * cum[-1])), len(values) - 1)])


def _unsure_kind(perturbation: dict, alignment: Alignment, beyond_at: dict, ref_c: CanonicalModel) -> None:
    """A kind of perturbation is named only where the alignment vouches for it: when what lies
    beyond the storage's bound is concentrated in layers paired with low confidence (a share of
    their elements beyond the bound UNSURE_RATIO times that of the clearly paired layers, or more),
    a wrong pairing explains it as well as a change does, and the kinds are replaced by a phrase
    saying so (perturbation["kind_named"] False)."""
    pairs = alignment.doubtful_pairs()
    doubtful = {rw for p in pairs for rw, _ in p.weights}
    counts = {"doubt": [0, 0], "clear": [0, 0]}
    for rw, (n, size) in beyond_at.items():
        side = counts["doubt" if rw in doubtful else "clear"]
        side[0] += n
        side[1] += size
    (nd, sd), (nc, sc) = counts["doubt"], counts["clear"]
    if not nd or (sc and nc / sc * UNSURE_RATIO > nd / sd):
        return
    layers = sorted({ref_c.layer_of(p.reference) for p in pairs
                     if any(beyond_at.get(rw, (0, 0))[0] for rw, _ in p.weights)})
    shown = ", ".join(repr(x) for x in layers[:4]) + (f" (+{len(layers) - 4} more)" if len(layers) > 4 else "")
    perturbation["kinds"] = [f"kind not named: {100 * nd / max(nd + nc, 1):.0f}% of the differences beyond the "
                             f"storage lie in layers paired with low confidence ({shown}), where a wrong pairing "
                             "explains them as well as a change"]
    perturbation["kind_named"] = False


def _beyond_kinds(beyond: dict, resync_perturbation: dict) -> dict:
    """Kind and strength of a perturbation from what lies beyond the storage's bound only, each kind
    named only where that evidence supports it: noise where a weight's differences are spread over
    its elements, rescaled where they are whole neurons scaled (beyond.py; resync's count of
    rescales and one-sided norm outliers is kept then, never passed on alone)."""
    out = dict(resync_perturbation)
    out.update({k: v for k, v in beyond.items() if k not in ("elements", "of")})
    out["beyond_fraction"] = beyond["fraction"]
    kinds = []
    d, dr = beyond["distinct_values_median"], beyond["distinct_values_reference_median"]
    quantized = d is not None and dr is not None and d <= 256 < dr
    if quantized:
        bits = math.ceil(math.log2(max(d, 2)))
        out["quantization_bits"] = bits
        kinds.append(f"quantized beyond the storage: ~{d} distinct values per tensor (~{bits} bits)")
    if beyond["extra_zero_fraction"] > 0.01:
        kinds.append(f"pruned: {100 * beyond['extra_zero_fraction']:.1f}% of weights newly zero")
    # whole neurons scaled: named where some weight's differences beyond the bound are whole slices
    # scaled (beyond.py), in resync's words (it counts neurons over a group's slots) when it saw them
    scaled, spread = beyond.get("scaled_weights", {}), beyond.get("spread_weights", {})
    if scaled:
        theirs = [k for k in resync_perturbation.get("kinds", []) if k.startswith(("rescaled", "norm outliers"))]
        mine = {f"{w}: {n} neuron{'s' if n > 1 else ''}": n for w, n in scaled.items()}
        kinds += theirs or [f"rescaled: whole neurons scaled in {len(scaled)} weight{'s' if len(scaled) > 1 else ''}"
                            f" ({_names(mine)})"]
    # noise: where some weight's differences beyond the bound are spread over its elements; its size
    # is theirs (a median over every weight would drown one noisy layer in the unchanged ones)
    if not quantized and spread:
        out["noise_relative_std"] = beyond["spread_noise_relative_std"]
        kinds.append(f"noise or further training: ~{beyond['spread_noise_relative_std']:.3g} x weight std "
                     f"beyond the storage's rounding, in {len(spread)} weight{'s' if len(spread) > 1 else ''}"
                     f" ({_names(spread)})")
    out["kinds"] = kinds
    return out


def _names(weights: Mapping, shown: int = 3) -> str:
    names = list(weights)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _restored_steps(steps: Steps, alignment: Alignment, ref_walk, rs, ref_store: WeightStore,
                    sus_store: WeightStore) -> LazyMap:
    """The suspect's measured steps in the restored (reference's) layout: aligned as its weights
    were, then moved by resync's permutations; a part (a block) computed alone where it can be."""
    from ..permute import apply_moves, slot_indices

    names = {rw: sw for rw, sw in alignment.weight_map.items() if sw in steps.steps}
    index = {}
    if names and getattr(rs, "record", None) is not None:
        index = slot_indices(ref_walk, rs.record.perms, lambda w, a: ref_store.shape(w)[a])

    def moves(weight: str) -> list[tuple]:
        return [(axis, at, idx) for (w, axis, at), idx in index.items() if w == weight]

    def restored(weight: str) -> np.ndarray:  # one weight at a time (storage.LazyMap)
        out = steps.steps[names[weight]].reshape(ref_store.shape(weight))
        return apply_moves(out, moves(weight))

    def restored_part(weight: str, index: list) -> np.ndarray:
        """restored(weight) at `index` (io.lazy.select): the suspect's steps at the entries they
        came from, where the moves allow (whole axes moved; the suspect's weight in the reference's
        shape)."""
        mine = moves(weight)
        if any(at is not None for _, at, _ in mine) or sus_store.shape(names[weight]) != ref_store.shape(weight):
            return select(out[weight], index)  # (computed whole, once: the map keeps the last one)
        index = list(index) + [None] * (len(ref_store.shape(weight)) - len(index))
        return step_part(steps.steps, names[weight], through({axis: idx for axis, _, idx in mine}, index))

    out = LazyMap(names, restored, restored_part)
    return out


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _compared(ref_c: CanonicalModel, alignment: Alignment) -> dict:
    """How many of the reference's parameters (float weights of its canonical form, those inside
    If/Loop/Scan bodies included; synthetic ones, such as zero biases the canonical form adds, not)
    the alignment compared."""
    from .subgraphs import body_sizes

    sizes = {}
    # a Constant node counts like an initializer (canonical keeps one that a body reads as a node)
    consts = [(n.output[0], a.t) for n in ref_c.model.graph.node if n.op_type == "Constant" and n.output
              for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
    for name, t in [(t.name, t) for t in ref_c.model.graph.initializer] + consts:
        o = ref_c.origins.get(name)
        if t.data_type in _FLOATS and not (o is not None and not o.sources):
            sizes[name] = int(np.prod(t.dims)) if t.dims else 1
    body = {k: v for k, v in body_sizes(ref_c.model).items()  # layers inside bodies are aligned too (bodies.py);
            if not (k in ref_c.origins and not ref_c.origins[k].sources)}  # a copy counts once, a synthetic none
    distinct = {digest: size for size, digest in body.values()}
    inside = sum(distinct.values())
    reached = {body[rw][1] for rw in alignment.weight_map if rw in body and rw not in sizes}
    aligned_inside = sum(distinct[d] for d in reached)
    parameters = sum(sizes.get(rw, 0) for rw in alignment.weight_map) + aligned_inside
    of = sum(sizes.values()) + inside
    return {"parameters": int(parameters), "of": int(of), "share": parameters / of if of else None,
            "in_subgraphs": int(inside), "in_subgraphs_aligned": int(aligned_inside),
            "min_share": MIN_COMPARED_SHARE}


def _without_groups(rs, ref_walk, unpaired: set):
    """resync's report without the groups that touch a subgraph weight left unpaired: the aligned
    model holds the reference's own values there (compared with themselves, they prove nothing).
    The decision statistic is then the weakest of the other voting groups that are not exact copies
    (every one counts: the capacity that lets a weak group abstain is not in the report), infinite
    when only exact copies vote, 0 when none does (resync.decision_statistics, conservatively)."""
    if not unpaired:
        return rs
    import dataclasses
    from ..resync import MIN_EVIDENCE_GROUP

    own = {g.key for g in ref_walk.groups if any(s.weight in unpaired for s in g.slots)}
    kept = [g for g in rs.groups if g.key not in own]
    if len(kept) == len(rs.groups):
        return rs
    voters = [g for g in kept if g.size >= MIN_EVIDENCE_GROUP] or kept
    inexact = [g.evidence for g in voters if not (g.cosine_min >= 1.0 and g.matched_fraction >= 1.0)]
    evidence = min(inexact) if inexact else (math.inf if voters else 0.0)
    derived = evidence >= rs.threshold
    return dataclasses.replace(
        rs, groups=kept, neurons=sum(g.size for g in kept), moved=sum(g.moved for g in kept),
        matched=sum(round(g.matched_fraction * g.size) for g in kept),
        interchangeable=sum(len(g.interchangeable) for g in kept), evidence=evidence, derived=derived,
        verdict=rs.verdict if derived else "not derived")


def _add_subgraphs(compared: dict, sub: SubgraphComparison) -> None:
    """The subgraph weights that were paired and compared count as compared ("in_subgraphs" stays
    the reference's total inside bodies; "in_subgraphs_compared" of them were compared)."""
    reached = min(sub.parameters, compared["in_subgraphs"] - compared.get("in_subgraphs_aligned", 0))
    compared["in_subgraphs_compared"] = int(reached) + compared.get("in_subgraphs_aligned", 0)
    if reached:
        compared["parameters"] += int(reached)
        compared["share"] = compared["parameters"] / compared["of"] if compared["of"] else None


def _row(gr, g, alignment: Alignment, ref_c: CanonicalModel, sus_c: CanonicalModel,
         ref_store: WeightStore, res_store: WeightStore, differences: dict | None = None) -> LayerRow:
    """differences: {weight: (max |reference|, max |restored - reference|)}, shared by the rows
    of one report (a weight is in several groups' slots: read once; _precision gives those it compared)."""
    differences = {} if differences is None else differences
    neurons = gr.neurons or {}
    ratio = np.asarray(neurons.get("norm_ratio", [gr.norm_ratio_median]), dtype=np.float64)
    sus_layers, ref_layers, weights = [], [], []
    max_diff = 0.0
    if g is not None:
        for p in g.producers:
            ref_layers.append(ref_c.layer_of(p.name))
            sn = alignment.node_map.get(p.name)
            name = sus_c.layer_of(sn) if sn else f"(reference) {ref_c.layer_of(p.name)}"
            if name not in sus_layers:
                sus_layers.append(name)
        for slot in g.slots:
            sw = alignment.weight_map.get(slot.weight)
            origin = sus_c.origins.get(sw) if sw else None
            for src in (origin.sources if origin else []):
                if src not in weights:
                    weights.append(src)
            if slot.weight not in differences:
                r = np.asarray(ref_store.get(slot.weight)).reshape(-1)
                s = np.asarray(res_store.get(slot.weight)).reshape(-1)
                scale = diff = 0.0
                for a in range(0, r.size, PRECISION_CHUNK):  # float64 a piece at a time
                    rp, sp = r[a:a + PRECISION_CHUNK].astype(np.float64), s[a:a + PRECISION_CHUNK].astype(np.float64)
                    scale, diff = max(scale, float(np.abs(rp).max())), max(diff, float(np.abs(sp - rp).max()))
                differences[slot.weight] = (scale, diff)
            scale, diff = differences[slot.weight]
            if scale > 0:
                max_diff = max(max_diff, diff / scale)
    return LayerRow(
        group=gr.key, layers=sus_layers, reference_layers=ref_layers, weights=weights, neurons=int(gr.size),
        matched=int(round(gr.matched_fraction * gr.size)), moved=int(gr.moved),
        cosine_mean=float(gr.cosine_mean), cosine_min=float(gr.cosine_min),
        margin_median=float(gr.margin_median), margin_min=float(gr.margin_min),
        norm_ratio_median=float(gr.norm_ratio_median),
        norm_ratio_min=float(ratio.min()) if ratio.size else 1.0,
        norm_ratio_max=float(ratio.max()) if ratio.size else 1.0, evidence=float(gr.evidence),
        max_relative_difference=max_diff, live=int(gr.live), decayed=int(gr.decayed),
        margins=[float(x) for x in neurons.get("margin", [])],
        norm_ratios=[float(x) for x in neurons.get("norm_ratio", [])],
        cosines=[float(x) for x in neurons.get("cosine", [])],
    )


def _obfuscated(report: AuditReport, reduction) -> None:
    """A suspect reduced before alignment (structural obfuscation, issue 16): say so in the verdict
    (when derived) and list what was removed, per layer, in the evidence."""
    report.reduction = reduction.to_dict()
    if report.derived:
        rest = report.summary.removeprefix("derived").lstrip(", ")
        report.summary = reduction.verdict() + (f"; {rest}" if rest else "")
    report.evidence.insert(0, reduction.headline())
    report.evidence[1:1] = [line.strip() for line in reduction.lines()]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
