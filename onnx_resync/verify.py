"""Prove that two models compute the same function: run both with ONNX Runtime on the same inputs.

Default verdict, per output: normalized error = max|cand - ref| / max|ref| <= tolerance. This scales
with the output, so a correctly permuted deep fp32 model (~1e-6) passes where an element-wise rtol
check can fail on near-zero elements. With atol/rtol, an np.isclose-style element-wise check is used
instead. Integer and bool outputs must match exactly. With several feeds every feed is judged on its
own (normalized by its own max|ref|) and the worst one is reported, so a feed with small outputs is
never hidden by one with large outputs.

What counts, per output element (one rule, here):
- compared: both sides finite (every element of an integer or bool output). Only compared values
  can show that two models agree; `compared` counts them per output, over all feeds.
- mismatch: a compared value past the tolerance, or a value non-finite on one side only, or
  non-finite on both sides but not the same (NaN vs inf, +inf vs -inf), or a shape difference.
- neither: the same non-finite value on both sides (NaN and NaN, +inf and +inf). It is not a
  mismatch, but it proves nothing.
Verdict: "not equivalent" when any output has a mismatch; else "cannot check" when any output
compared fewer than MIN_COMPARED finite values (an empty batch, outputs all NaN/inf, no outputs: two
unrelated networks would pass such a check by accident); else "equivalent". The CLI exits 0, 1, 4
(EXIT_CODES), and permute/resync refuse to write unless the verdict is "equivalent".

Every branch runs: bool inputs, and inputs that reach an If or Loop condition, are varied on top of
the random (or given) feed (see inputs.py for the plan and its caps); the report lists them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import io, runtime
from .errors import LoadError, ModelMismatchError, ResyncError, UsageError
from .inputs import MAX_SAMPLES, fill, plan_variations
from .jsonable import json_safe

EQUIVALENT, NOT_EQUIVALENT, CANNOT_CHECK = "equivalent", "not equivalent", "cannot check"
# the fewest finite values each output must have compared for a verdict of "equivalent"
MIN_COMPARED = 1
# `onnx-resync verify` exit codes, by verdict
EXIT_CODES = {EQUIVALENT: 0, NOT_EQUIVALENT: 1, CANNOT_CHECK: 4}


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    normalized_error: float
    cosine: float
    mismatches: int
    numel: int
    compared: int  # values finite on both sides (see the module docstring)
    passed: bool
    note: str = ""
    # max abs difference between two executions of the reference itself (other kernels/threads);
    # measured only when the normalized check fails, to tell rounding noise from a real change
    noise_floor: float | None = None


@dataclass
class VerifyReport:
    equivalent: bool  # True only for verdict "equivalent"
    verdict: str  # "equivalent" | "not equivalent" | "cannot check"
    reason: str  # one line: what decided the verdict
    provider: str
    device_requested: str
    samples: int
    seed: int
    mode: str  # "normalized" or "elementwise"
    tolerance: float
    atol: float | None
    rtol: float | None
    inputs: str  # "random" or where the user's inputs came from
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    outputs: list[OutputComparison] = field(default_factory=list)
    feeds: int = 0  # feeds run: the samples (or the given inputs) and the varied ones
    varied: dict[str, list] = field(default_factory=dict)  # input -> the values its varied feeds took
    varied_why: dict[str, str] = field(default_factory=dict)
    variation: str = ""  # how the varied feeds were chosen
    skipped_feeds: int = 0  # varied feeds the reference itself could not run (e.g. an index out of range)
    compared: int = 0  # finite values compared, all outputs together

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def format_text(self) -> str:
        verdict = self.verdict.upper()
        if self.mode == "normalized":
            rule = f"max|err| / max|ref| <= {self.tolerance:g} per output"
        else:
            rule = f"|err| <= {self.atol:g} + {self.rtol:g}*|ref| per element"
        plural = "s" if self.samples != 1 else ""
        lines = [f"verify: {verdict}"]
        if self.verdict != EQUIVALENT:
            lines.append(f"why: {self.reason}")
        lines.append(f"provider {self.provider} (requested {self.device_requested}); {self.samples} sample{plural},"
                     f" seed {self.seed}, inputs {self.inputs}")
        if self.varied:
            varied = "; ".join(f"{k} in {{{', '.join(map(str, v))}}} ({self.varied_why.get(k, '')})"
                               for k, v in self.varied.items())
            skipped = f", {self.skipped_feeds} the reference could not run" if self.skipped_feeds else ""
            lines.append(f"feeds: {self.feeds} run ({self.samples} base + {self.feeds - self.samples} varied{skipped}, "
                         f"{self.variation}); varied {varied}")
        else:
            lines.append(f"feeds: {self.feeds} run; no input decides a branch (none varied)")
        value_s = "value" if self.compared == 1 else "values"
        lines.append(f"check: {rule}; integer/bool outputs exact; compared {self.compared} finite {value_s} "
                     f"(each output needs {MIN_COMPARED})")
        rows = [("output", "shape", "max_abs_err", "normalized", "cosine", "compared", "mismatches", "result")]
        for o in self.outputs:
            rows.append((
                o.name, "x".join(map(str, o.shape)) or "scalar", f"{o.max_abs_error:.3e}",
                f"{o.normalized_error:.3e}", f"{o.cosine:.9f}", str(o.compared), f"{o.mismatches}/{o.numel}",
                ("FAIL" if not o.passed else "ok" if o.compared >= MIN_COMPARED else "UNCHECKED")
                + (f" ({o.note})" if o.note else ""),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(lines)


def check_signatures(ref_specs, cand_specs) -> None:
    """Raise ModelMismatchError naming the first difference in inputs or outputs."""
    for kind, refs, cands in (("input", ref_specs[0], cand_specs[0]), ("output", ref_specs[1], cand_specs[1])):
        ref_names, cand_names = [s.name for s in refs], [s.name for s in cands]
        if ref_names != cand_names:
            missing = [n for n in ref_names if n not in cand_names]
            extra = [n for n in cand_names if n not in ref_names]
            if missing:
                detail = f"reference {kind} {missing[0]!r} is missing from the candidate"
            elif extra:
                detail = f"candidate has an extra {kind} {extra[0]!r}"
            else:
                detail = f"{kind}s are in a different order ({ref_names} vs {cand_names})"
            raise ModelMismatchError(f"signatures differ: {detail}")
        for r, c in zip(refs, cands):
            if r.type != c.type:
                raise ModelMismatchError(f"signatures differ: {kind} {r.name!r} is {r.type} vs {c.type}")
            if len(r.shape) != len(c.shape):
                raise ModelMismatchError(f"signatures differ: {kind} {r.name!r} has rank {len(r.shape)} vs {len(c.shape)}")
            for i, (a, b) in enumerate(zip(r.shape, c.shape)):
                if a is not None and b is not None and a != b:
                    raise ModelMismatchError(f"signatures differ: {kind} {r.name!r} dim {i} is {a} vs {b}")


def read_npz(path) -> dict[str, np.ndarray]:
    if not os.path.lexists(path):
        raise LoadError(f"{path}: no such inputs file")
    try:  # a regular file only (UsageError, exit 2): a FIFO would block, a device be read until memory runs out
        with io.open_input(path, what="inputs file") as fh, np.load(fh, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except UsageError:
        raise
    except Exception as exc:
        raise LoadError(f"{path}: not a readable .npz ({type(exc).__name__})") from None


def load_inputs(inputs, in_specs) -> dict[str, np.ndarray]:
    """The user's inputs (dict or .npz path), checked against the model's inputs, dtype-converted."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = read_npz(inputs)
    names = [s.name for s in in_specs]
    for s in in_specs:
        if s.name not in inputs:
            raise UsageError(f"inputs lack model input {s.name!r}")
    extra = sorted(set(inputs) - set(names))
    if extra:
        raise UsageError(f"inputs have {extra[0]!r}, which is not a model input (inputs are {names})")
    feed = {}
    for s in in_specs:
        arr = np.asarray(inputs[s.name])
        runtime.resolve_shape(s, {s.name: list(arr.shape)})  # rank and fixed dims
        want = s.dtype
        if arr.dtype != want:
            if not np.can_cast(arr.dtype, want, "same_kind") or (
                want.kind in "iub" and not np.array_equal(arr.astype(want), arr)
            ):
                raise UsageError(f"input {s.name!r} is {arr.dtype}, the model wants {want}")
            arr = arr.astype(want)
        feed[s.name] = arr
    return feed


class _Accumulator:
    """Per-output statistics gathered sample by sample (no output is kept after its sample)."""

    def __init__(self, name: str):
        self.name = name
        self.shape: list[int] | None = None
        self.note = ""
        self.max_abs = 0.0
        self.normalized = 0.0
        self.mismatches = 0
        self.numel = 0
        self.compared = 0
        self.dot = self.ref_sq = self.cand_sq = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray, tolerance: float, atol, rtol) -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
        if self.shape is None:
            self.shape = list(ref.shape)
        self.numel += ref.size
        if ref.shape != cand.shape:
            self.note = self.note or f"shape {list(ref.shape)} vs {list(cand.shape)}"
            self.mismatches += ref.size
            self.normalized = self.max_abs = math.inf
            return
        exact = ref.dtype.kind in "iub"
        a, b = ref.astype(np.float64), cand.astype(np.float64)
        same = a == b  # also equal infinities
        if not exact:
            same |= np.isnan(a) & np.isnan(b)
        with np.errstate(invalid="ignore"):  # inf - inf where the infinities differ in sign
            err = np.where(same, 0.0, np.abs(a - b))  # nan where exactly one side is nan
        one_nan = np.isnan(err)
        n_nan = int(one_nan.sum())
        if n_nan:
            self.note = self.note or "NaN mismatch"
            err[one_nan] = math.inf
        finite_ref = np.abs(a[np.isfinite(a)])
        scale = float(finite_ref.max()) if finite_ref.size else 0.0
        max_err = float(err.max()) if err.size else 0.0
        # Guard division by zero: an all-zero reference gives 0 (equal) or a huge error.
        norm_err = err / max(scale, np.finfo(np.float64).tiny)
        self.max_abs = max(self.max_abs, max_err)
        self.normalized = max(self.normalized, float(norm_err.max()) if err.size else 0.0)
        if exact:
            bad = ~same
        elif atol is not None:
            bad = err > atol + rtol * np.abs(a)
        else:
            bad = norm_err > tolerance
        ok = np.isfinite(a) & np.isfinite(b)
        # not both finite and not the same: inf vs a number (which rtol*inf would let pass), NaN vs inf, +inf vs -inf
        bad |= ~ok & ~same
        self.mismatches += int(np.count_nonzero(bad | one_nan))
        self.compared += int(np.count_nonzero(ok))
        fa, fb = a[ok], b[ok]
        self.dot += float(fa @ fb)
        self.ref_sq += float(fa @ fa)
        self.cand_sq += float(fb @ fb)

    def result(self) -> OutputComparison:
        if self.ref_sq == 0.0 and self.cand_sq == 0.0:
            cosine = 1.0  # both all-zero: same direction by convention
        elif self.ref_sq == 0.0 or self.cand_sq == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.ref_sq * self.cand_sq)
        return OutputComparison(
            name=self.name, shape=self.shape or [], max_abs_error=self.max_abs,
            normalized_error=self.normalized, cosine=cosine, mismatches=self.mismatches,
            numel=self.numel, compared=self.compared, passed=self.mismatches == 0, note=self.note,
        )


# A candidate whose error stays within this many times the reference's own run-to-run rounding
# noise cannot be told apart from the reference by running it (e.g. saturated sigmoid maps ~1e-6).
NOISE_FACTOR = 4.0


def _judge_against_noise_floor(reference, provider, feeds, outputs) -> None:
    twin = runtime.make_session(reference, "cuda" if provider == runtime.CUDA else "cpu", twin=True)
    main = runtime.make_session(reference, "cuda" if provider == runtime.CUDA else "cpu")
    floors = [0.0] * len(outputs)
    for feed in feeds:
        for i, (a, b) in enumerate(zip(runtime.run(main, feed), runtime.run(twin, feed))):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape == b.shape and a.dtype.kind == "f":
                finite = np.isfinite(a) & np.isfinite(b)
                floors[i] = max(floors[i], float(np.abs(a[finite] - b[finite]).max(initial=0.0)))
    for out, floor in zip(outputs, floors):
        out.noise_floor = floor
        if not out.passed and not out.note and floor > 0 and out.max_abs_error <= NOISE_FACTOR * floor:
            out.passed = True
            out.mismatches = 0
            out.note = f"within {NOISE_FACTOR:g}x the reference's own rounding noise ({floor:.1e})"


def verify(reference, candidate, *, inputs=None, shapes=None, samples: int = 1, seed: int = 0,
           device: str = "auto", tolerance: float = 1e-5, atol: float | None = None,
           rtol: float | None = None) -> VerifyReport:
    """Run reference and candidate (paths or ModelProtos) on the same inputs and compare outputs.

    inputs: dict name -> array or a .npz path (one sample); otherwise `samples` seeded random feeds
    with symbolic dims set by `shapes` (name -> dims) or 1. With atol and/or rtol (the other one
    defaults to 0) the check is element-wise |cand - ref| <= atol + rtol*|ref|.
    """
    if not isinstance(samples, (int, np.integer)) or not 1 <= samples <= MAX_SAMPLES:
        raise UsageError(f"samples must be from 1 to {MAX_SAMPLES}, not {samples}")
    if not tolerance >= 0 or any(t is not None and not t >= 0 for t in (atol, rtol)):
        raise UsageError("tolerance, atol and rtol must be non-negative numbers")
    if inputs is not None and (samples != 1 or shapes):
        raise UsageError("given inputs fix the shapes and are one sample: drop --samples/--shape")
    elementwise = atol is not None or rtol is not None
    if elementwise:
        atol, rtol = atol or 0.0, rtol or 0.0

    source = "random"
    if inputs is not None:
        source = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "given"
        if isinstance(inputs, (str, os.PathLike)):
            inputs = read_npz(inputs)  # before the (slow) sessions: a bad file fails fast

    ref_session = runtime.make_session(reference, device)
    provider = runtime.provider(ref_session)
    # The candidate runs where the reference ran, so both see the same kernels.
    cand_session = runtime.make_session(candidate, "cuda" if provider == runtime.CUDA else "cpu")
    ref_specs, cand_specs = runtime.specs(ref_session), runtime.specs(cand_session)
    check_signatures(ref_specs, cand_specs)
    for s in ref_specs[1]:
        s.dtype  # raises for outputs that cannot be compared (sequences, maps, strings)

    if inputs is not None:
        base = [load_inputs(inputs, ref_specs[0])]
    else:
        base = runtime.random_inputs(ref_specs[0], shapes, samples, seed)
    plan = plan_variations([_graph_of(reference), _graph_of(candidate)], ref_specs[0])
    assignments, variation = plan.assignments()
    # a varied feed is made when it runs: up to MAX_VARIED_FEEDS copies of an input are never held at once
    jobs = [(feed, None) for feed in base] + [(base[0], a) for a in assignments]

    accs = [_Accumulator(s.name) for s in ref_specs[1]]
    ran, skipped, failed_empty = [], 0, None
    for src, assignment in jobs:
        feed = src if assignment is None else fill(src, assignment)
        try:
            ref_out = runtime.run(ref_session, feed)
        except ResyncError:
            if assignment is not None:  # a value the model does not accept (an index past a table, say)
                skipped += 1
                continue
            empty = _empty_input(feed)
            if empty is None:
                raise
            failed_empty = empty
            continue
        cand_out = runtime.run(cand_session, feed)
        for acc, r, c in zip(accs, ref_out, cand_out):
            acc.add(r, c, tolerance, atol, rtol)
        del ref_out, cand_out, feed
        ran.append((src, assignment))

    outputs = [acc.result() for acc in accs]
    if ran and not elementwise and not all(o.passed for o in outputs):
        _judge_against_noise_floor(reference, provider, (src if a is None else fill(src, a) for src, a in ran),
                                   outputs)
    verdict, reason = _verdict(outputs, base, failed_empty, len(ran))
    return VerifyReport(
        equivalent=verdict == EQUIVALENT, verdict=verdict, reason=reason, provider=provider,
        device_requested=device, samples=len(base), seed=seed, mode="elementwise" if elementwise else "normalized",
        tolerance=tolerance, atol=atol, rtol=rtol, inputs=source,
        input_shapes={k: list(v.shape) for k, v in base[0].items()}, outputs=outputs,
        feeds=len(ran), varied=dict(plan.values), varied_why=dict(plan.why), variation=variation,
        skipped_feeds=skipped, compared=sum(o.compared for o in outputs),
    )


def _graph_of(model) -> onnx.ModelProto:
    """The graph (weights left where they are) that the input plan reads."""
    if isinstance(model, onnx.ModelProto):
        return model
    return io.load_model(model, load_weights=False, check=False)


def _empty_input(feed: dict[str, np.ndarray]) -> str | None:
    for name, arr in feed.items():
        if arr.size == 0:
            return f"input {name!r} has shape {list(arr.shape)}"
    return None


def _verdict(outputs: list[OutputComparison], base: list[dict], failed_empty: str | None,
             ran: int) -> tuple[str, str]:
    """The verdict and its one-line reason, by the rule in the module docstring."""
    failing = [o for o in outputs if not o.passed]
    if failing:
        o = failing[0]
        more = f" (and {len(failing) - 1} more output{'s' if len(failing) > 2 else ''})" if len(failing) > 1 else ""
        note = f": {o.note}" if o.note else ""
        return NOT_EQUIVALENT, f"output {o.name!r} differs in {o.mismatches} of {o.numel} values{note}{more}"
    if not outputs:
        return CANNOT_CHECK, "the models have no outputs: nothing to compare"
    if not ran:
        return CANNOT_CHECK, f"onnxruntime cannot run an empty input: {failed_empty}"
    short = [o for o in outputs if o.compared < MIN_COMPARED]
    if short:
        o = short[0]
        if o.numel == 0:
            empty = next((e for e in map(_empty_input, base) if e), None)
            why = f"it is empty ({empty})" if empty else "it is empty"
        else:
            why = "every value is NaN or inf on both sides"
            if any(a.dtype.kind == "f" and not np.isfinite(a).all() for feed in base for a in feed.values()):
                why += " (the inputs hold NaN or inf)"
        count = "no finite value" if o.compared == 0 else f"only {o.compared} finite values"
        return CANNOT_CHECK, f"output {o.name!r} compared {count}: {why}"
    total = sum(o.compared for o in outputs)
    return EQUIVALENT, f"compared {total} finite value{'s' if total != 1 else ''}"
