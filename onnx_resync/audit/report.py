"""The `audit` verb: is this vendor's ONNX file our model?

suspect, reference --canonicalize both--> --align (structure, not names)--> suspect in the reference's
canonical structure --resync--> permutations, per-neuron confidence, integrity verdict --> AuditReport
in terms of the suspect's own layers (JSON, text, HTML).

Verdicts:

- "identical": after canonicalization the suspect's weights equal the reference's, in the same
  neuron order, within the precision the suspect stores them in (fp16 rounding, BatchNorm folding
  rounding); the graph may have been re-exported (the report lists what canonicalization undid);
- "permuted": the same, once the neurons are put back in the reference's order;
- "perturbed": derived (resync's evidence statistic) but the weights differ beyond storage
  precision; kind and strength from resync's estimate (noise or further training, quantization,
  pruning, rescaling); `permuted` tells whether neurons had also moved;
- "not derived": no evidence that the suspect comes from the reference.

`audit_file` is the per-file function for batches: top level, picklable arguments, never raises.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .align import Alignment, align
from .canonical import CanonicalModel, canonicalize
from ..errors import ResyncError, UnsupportedError
from ..io import WeightStore, load_model, write_text_atomic
from ..jsonable import json_safe

ModelLike = str | os.PathLike | onnx.ModelProto

# relative rounding of a value stored in this type (round to nearest), against its float32 form
STORAGE_ROUNDING = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -24}
FP16_SUBNORMAL_HALF_STEP = 2.0 ** -25
COMPUTED_ABS = 1e-5  # x max|w|: rounding of folded / computed weights (BatchNorm folded on one side only)
COMPUTED_REL = 2.0 ** -21
HEATMAP_MAX = 80  # similarity matrices larger than this are max-pooled down to it for display


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
    margins: list[float] = field(default_factory=list, repr=False)
    norm_ratios: list[float] = field(default_factory=list, repr=False)
    cosines: list[float] = field(default_factory=list, repr=False)


@dataclass
class AuditReport:
    suspect: str
    reference: str
    verdict: str  # identical | permuted | perturbed | not derived
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
    precision: dict  # storage precision check: within, worst ratio to the bound, storage types
    re_export: dict  # what canonicalization undid: {"suspect": [...], "reference": [...]}
    layers: list[LayerRow]
    timings: dict
    similarity: dict = field(default_factory=dict, repr=False)  # group -> matrix (display size), not serialized

    @property
    def matched_fraction(self) -> float:
        return self.matched / self.neurons if self.neurons else 1.0

    @property
    def exit_code(self) -> int:
        return 0 if self.derived else 1

    def to_dict(self, detail: bool = True) -> dict:
        data = asdict(self)
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
        head = (f"{'suspect layer':<44} {'neurons':>7} {'matched':>8} {'moved':>6} {'cos mean':>9} "
                f"{'cos min':>8} {'margin min':>10} {'norm ratio':>15} {'max diff':>9}")
        lines.append(head)
        for r in self.layers:
            name = _short(", ".join(r.layers) or r.group, 44)
            lines.append(
                f"{name:<44} {r.neurons:>7} {100 * r.matched / max(r.neurons, 1):>7.1f}% {r.moved:>6} "
                f"{r.cosine_mean:>9.5f} {r.cosine_min:>8.4f} {r.margin_min:>10.4f} "
                f"{r.norm_ratio_min:>7.3f}-{r.norm_ratio_max:<7.3f} {r.max_relative_difference:>9.2e}")
        t = self.timings
        lines.append("")
        lines.append(f"audited in {t.get('total', 0):.2f}s (canonicalize {t.get('canonicalize', 0):.2f}s, "
                     f"align {t.get('align', 0):.2f}s, resync {t.get('resync', 0):.2f}s)")
        return lines


def audit(suspect: ModelLike, reference: ModelLike, *, html: str | os.PathLike | None = None,
          json_path: str | os.PathLike | None = None, max_passes: int = 8,
          heatmap_max: int = HEATMAP_MAX) -> AuditReport:
    """Audit one suspect against its reference (paths or ModelProtos); optionally write HTML / JSON."""
    from ..resync import resync

    t0 = time.perf_counter()
    timings = {}
    sus_model = _load(suspect)
    ref_c = _reference_canonical(reference)
    timings["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    sus_c = _canonical(sus_model, "suspect")
    timings["canonicalize"] = time.perf_counter() - t
    t = time.perf_counter()
    alignment = align(ref_c, sus_c)
    timings["align"] = time.perf_counter() - t
    t = time.perf_counter()
    restored, rs = resync(alignment.model, ref_c.model, check=False, max_passes=max_passes)
    timings["resync"] = time.perf_counter() - t
    t = time.perf_counter()
    report = _build(suspect, reference, ref_c, sus_c, alignment, restored, rs, heatmap_max)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    if json_path is not None:
        write_text_atomic(json_path, report.to_json())
    if html is not None:
        from .html import write_html

        write_html(report, html)
    return report


def audit_file(suspect_path: str, reference_path: str, **options) -> dict:
    """Batch worker: audit one file, return a JSON-ready dict; never raises (errors are recorded).

    Keys: file, reference, ok, exit_code (0 derived, 1 not derived, 3 error), seconds, and either
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


_REF_CACHE: dict[tuple, CanonicalModel] = {}


def _reference_canonical(reference: ModelLike) -> CanonicalModel:
    """Canonical reference; per process, a file's is kept (batches audit many files against one)."""
    if isinstance(reference, onnx.ModelProto):
        return _canonical(reference, "reference")
    path = Path(reference)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _REF_CACHE:
        return _REF_CACHE[key]
    result = _canonical(load_model(path), "reference")
    if key is not None:
        _REF_CACHE.clear()
        _REF_CACHE[key] = result
    return result


def _name(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<model>"
    return str(model)


def _build(suspect, reference, ref_c: CanonicalModel, sus_c: CanonicalModel, alignment: Alignment,
           restored: onnx.ModelProto, rs, heatmap_max: int) -> AuditReport:
    from ..walk import walk

    ref_store, res_store = WeightStore(ref_c.model), WeightStore(restored)
    precision = _precision(ref_store, res_store, alignment, ref_c, sus_c)
    ref_walk = walk(ref_c.model)
    groups = {g.key: g for g in ref_walk.groups}
    rows, similarity = [], {}
    for gr in rs.groups:
        g = groups.get(gr.key)
        rows.append(_row(gr, g, alignment, ref_c, sus_c, ref_store, res_store))
        if g is not None:
            similarity[gr.key] = _downsample(similarity_matrix(g, ref_store, res_store), heatmap_max)
    moved = int(rs.moved)
    within = precision["within"]
    derived = bool(rs.derived) or within
    identical_bytes = rs.verdict == "identical"
    if identical_bytes or (within and moved == 0):
        verdict = "identical"
    elif within:
        verdict = "permuted"
    elif derived:
        verdict = "perturbed"
    else:
        verdict = "not derived"
    permuted = derived and moved > 0
    perturbed = verdict == "perturbed"
    perturbation = dict(rs.perturbation) if derived else {"kinds": []}
    if verdict in ("identical", "permuted"):
        perturbation["kinds"] = []  # what resync sees is the storage rounding, nothing more
    elif verdict == "perturbed" and precision["quantized"]:
        perturbation["kinds"] = ["quantized: the file stores integer weights behind DequantizeLinear"] + [
            k for k in perturbation.get("kinds", []) if not k.startswith("quantized")]
    re_export = {"suspect": sus_c.changes_list(), "reference": ref_c.changes_list(),
                 "differences": _differences(sus_c, ref_c)}
    summary = _summary(verdict, derived, permuted, perturbation, precision, re_export, moved, rs.neurons)
    evidence = _evidence(rs, precision, re_export, alignment, moved, derived)
    return AuditReport(
        suspect=_name(suspect), reference=_name(reference), verdict=verdict, derived=derived,
        permuted=permuted, perturbed=perturbed, summary=summary, evidence=evidence,
        statistic=decision(rs)[1], neurons=int(rs.neurons), matched=int(rs.matched), moved=moved,
        perturbation=perturbation, precision=precision, re_export=re_export, layers=rows, timings={},
        similarity=similarity,
    )


def _summary(verdict, derived, permuted, perturbation, precision, re_export, moved, neurons) -> str:
    if not derived:
        return "not derived from the reference"
    parts = ["derived"]
    if verdict == "identical":
        parts.append("identical weights")
    elif verdict == "permuted":
        parts.append(f"permuted ({moved} of {neurons} neurons moved)")
    else:
        if permuted:
            parts.append(f"permuted ({moved} of {neurons} neurons moved)")
        kinds = perturbation.get("kinds") or ["weights changed"]
        parts.append("perturbed: " + "; ".join(kinds))
    line = ", ".join(parts)
    diffs = re_export["differences"]
    if diffs:
        line += f"; re-exported ({'; '.join(diffs[:4])}" + ("; ..." if len(diffs) > 4 else "") + ")"
    if verdict in ("identical", "permuted") and precision["storage"] != ["float32"]:
        line += f"; equal within {'/'.join(precision['storage'])} storage precision"
    return line


def _evidence(rs, precision, re_export, alignment, moved, derived) -> list[str]:
    name, value, threshold = decision(rs)
    at = f"derived at >= {threshold:g}; " if math.isfinite(threshold) else ""
    out = [f"{name} {value:.2f} ({at}unrelated models score about 0)"]
    pct = 100 * rs.matched / rs.neurons if rs.neurons else 100.0
    if derived:
        out.append(f"{rs.matched} of {rs.neurons} neurons ({pct:.1f}%) matched to their best candidate in "
                   f"{len(rs.groups)} groups; {moved} had been moved")
    else:
        out.append(f"only {rs.matched} of {rs.neurons} neurons ({pct:.1f}%) are their counterpart's best candidate "
                   f"in {len(rs.groups)} groups, and the matches do not stand out from unrelated neurons")
    if rs.groups:
        cmean = sum(g.cosine_mean * g.size for g in rs.groups) / max(rs.neurons, 1)
        out.append(f"cosine of matched neurons: mean {cmean:.5f}, worst {min(g.cosine_min for g in rs.groups):.4f}")
    if not rs.neurons:
        out.append("the reference has no permutable neuron group: the verdict rests on weight equality alone")
    out.append(f"{len(alignment.pairs)} layers aligned by structure, {len(alignment.weight_map)} weights compared")
    out += [f"alignment: {note}" for note in alignment.notes]  # low confidence, inconsistent pairs (align.py)
    if precision["within"]:
        out.append(f"after resync every weight equals the reference within {'/'.join(precision['storage'])} "
                   f"storage precision (worst {precision['worst_ratio']:.2f} of the rounding bound)")
    else:
        out.append(f"after resync the weights differ from the reference by up to {precision['worst_relative']:.3g} "
                   f"x max|w| (in {precision['worst_weight']!r}), beyond storage precision")
    if derived and not precision["within"] and rs.perturbation.get("kinds"):
        out.append("perturbation: " + "; ".join(rs.perturbation["kinds"]))
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
               ref_c: CanonicalModel, sus_c: CanonicalModel) -> dict:
    """Does every restored weight equal the reference's within the suspect's storage rounding?"""
    worst_ratio, worst_rel, worst_name = 0.0, 0.0, ""
    storage = set()
    quantized = False
    for rw, sw in alignment.weight_map.items():
        r = ref_store.get(rw).astype(np.float64)
        s = res_store.get(rw).astype(np.float64)
        so, ro = sus_c.origins.get(sw), ref_c.origins.get(rw)
        dtype = so.dtype if so is not None and so.sources else "float32"
        storage.add(dtype)
        scale = float(np.abs(r).max()) if r.size else 0.0
        diff = np.abs(s - r)
        rel = float(diff.max() / scale) if scale > 0 and diff.size else float(diff.max() if diff.size else 0.0)
        if rel > worst_rel:
            worst_rel, worst_name = rel, (so.sources[0] if so is not None and so.sources else sw)
        if so is not None and so.quantized:
            quantized = True
            if rel > 0:
                worst_ratio = math.inf
            continue
        eps = STORAGE_ROUNDING.get(dtype, 2.0 ** -24)
        ref_dtype = ro.dtype if ro is not None and ro.sources else "float32"
        eps += STORAGE_ROUNDING.get(ref_dtype, 2.0 ** -24)
        allowed = 1.01 * eps * np.abs(r)
        if dtype == "float16":
            allowed += FP16_SUBNORMAL_HALF_STEP
        if (so is not None and so.computed) or (ro is not None and ro.computed):
            allowed += COMPUTED_REL * np.abs(r) + COMPUTED_ABS * scale
            if so is not None and so.computed and eps > 2 * STORAGE_ROUNDING["float32"]:
                # folded from several low-precision tensors (BatchNorm of an fp16 model): each
                # rounding counts, and a bias is a difference of larger terms
                allowed += len(so.sources) * eps * (np.abs(r) + scale)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(diff > 0, diff / np.where(allowed > 0, allowed, 1e-300), 0.0)
        worst_ratio = max(worst_ratio, float(ratio.max()) if ratio.size else 0.0)
    return {
        "within": bool(worst_ratio <= 1.0 and not (quantized and worst_rel > 0)),
        "worst_ratio": worst_ratio,
        "worst_relative": worst_rel,
        "worst_weight": worst_name,
        "storage": sorted(storage) or ["float32"],
        "quantized": quantized,
    }


def _row(gr, g, alignment: Alignment, ref_c: CanonicalModel, sus_c: CanonicalModel,
         ref_store: WeightStore, res_store: WeightStore) -> LayerRow:
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
            r = ref_store.get(slot.weight).astype(np.float64)
            s = res_store.get(slot.weight).astype(np.float64)
            scale = float(np.abs(r).max()) if r.size else 0.0
            if scale > 0:
                max_diff = max(max_diff, float(np.abs(s - r).max() / scale))
    return LayerRow(
        group=gr.key, layers=sus_layers, reference_layers=ref_layers, weights=weights, neurons=int(gr.size),
        matched=int(round(gr.matched_fraction * gr.size)), moved=int(gr.moved),
        cosine_mean=float(gr.cosine_mean), cosine_min=float(gr.cosine_min),
        margin_median=float(gr.margin_median), margin_min=float(gr.margin_min),
        norm_ratio_median=float(gr.norm_ratio_median),
        norm_ratio_min=float(ratio.min()) if ratio.size else 1.0,
        norm_ratio_max=float(ratio.max()) if ratio.size else 1.0, evidence=float(gr.evidence),
        max_relative_difference=max_diff,
        margins=[float(x) for x in neurons.get("margin", [])],
        norm_ratios=[float(x) for x in neurons.get("norm_ratio", [])],
        cosines=[float(x) for x in neurons.get("cosine", [])],
    )


def similarity_matrix(group, ref_store: WeightStore, sus_store: WeightStore) -> np.ndarray:
    """Cosine of every reference neuron's feature with every suspect neuron's (both in the reference's
    order, so matched pairs are on the diagonal). A feature is the neuron's slices in all the group's
    slots, each slot scaled to unit length and weighted by the square root of its share of the
    feature, so the cosine is the size-weighted mean of per-slot cosines (as in match.py)."""
    n = group.size
    parts_r, parts_s, dims = [], [], []
    for slot in group.slots:
        r = _rows(*slot.part(ref_store.get(slot.weight)), slot.positions)
        s = _rows(*slot.part(sus_store.get(slot.weight)), slot.positions)
        parts_r.append(r)
        parts_s.append(s)
        dims.append(r.shape[1])
    total = float(sum(dims)) or 1.0
    fr = np.concatenate([_unit(x) * math.sqrt(d / total) for x, d in zip(parts_r, dims)], axis=1) if dims else np.zeros((n, 0))
    fs = np.concatenate([_unit(x) * math.sqrt(d / total) for x, d in zip(parts_s, dims)], axis=1) if dims else np.zeros((n, 0))
    return (fr @ fs.T).astype(np.float32)


def _rows(a: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    n = positions.shape[0]
    taken = np.take(np.asarray(a, dtype=np.float64), positions.reshape(-1), axis=axis)
    return np.moveaxis(taken, axis, 0).reshape(n, -1)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _downsample(m: np.ndarray, size: int) -> np.ndarray:
    """Max-pool a square matrix to at most size x size (the diagonal of a good match stays visible)."""
    n = m.shape[0]
    if n <= size:
        return m
    edges = np.linspace(0, n, size + 1).astype(int)
    rows = np.maximum.reduceat(m, edges[:-1], axis=0)
    return np.maximum.reduceat(rows, edges[:-1], axis=1)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
