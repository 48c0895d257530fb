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

Inputs: unless given, the input plan (inputs.py) reads from the graph a shape and values that the
model accepts, and runtime.settle tries it in the reference's session (the next candidate when ONNX
Runtime refuses one); the report says what was fed and why.

Where ONNX Runtime runs: both sessions at the same optimization level, "basic" for a float graph;
for a quantized graph (QDQ, QOperator, dynamic) "all", where ONNX Runtime fuses the Q/DQ pairs and
runs integer kernels as a deployment does (at "basic" QDQ runs in float, and a sum reordered by a
correct permutation can flip one rounding before a QuantizeLinear: one quantum, 3% of the output).

Rounding floor: when an output fails, the reference is run again at the other optimization levels
(and once with no optimization on one thread), and a quantized graph once more on its float inputs
nudged by a float rounding (a value at a quantization boundary flips one quantum there as it does
when a permutation reorders a float sum in a part ONNX Runtime does not fuse), a graph computing in
float16 or bfloat16 on inputs nudged by a rounding of that precision, any other float graph by one
float32 rounding (NUDGE: an ill-conditioned output, a probability near zero after an LSTM, moves by
a rounding of its inputs as it does by a correct permutation's reordered sums); the largest difference
between those runs of the reference itself is the output's floor. An output within NOISE_FACTOR x its floor passes and says so
(an output near zero on the chosen inputs, a saturated sigmoid map), unless the tolerance is 0: that
asks for bitwise equality, which no floor excuses. A failed check names the output,
the error, the floor and the inputs (`explain`); it blames the walker only when the reference is
stable across levels and the error is far above the floor.

Exact form: a node that quantizes or rounds its float activations before computing (its registry
entry's `quantizes_activations`: MatMulNBits at accuracy_level 4 quantizes them to int8 in blocks of K)
turns a correct permutation's float rounding upstream (a sum in another order) into a whole
quantization step, far past any float tolerance. When both models have the same such nodes (op,
attributes), both are checked in their *exact form* (those attributes set as the entry says: activations
as given), where the weights and a permutation are the same as written and a correct one computes the
same up to float rounding: the tolerance above judges it. They are also run as written, on the base
feeds: each output's error must stay within NOISE_FACTOR x how far quantizing the activations moves the
reference itself (|as written - exact form|, measured on the run); the report gives both. Models that
quantize differently are compared as written and the report says why.

A candidate ONNX Runtime cannot open, or cannot run on inputs it runs the reference on, raises
CandidateRefused (a rewrite it refuses is not proven).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import io, runtime
from .errors import LoadError, ModelMismatchError, ResyncError, UsageError
from .inputs import (MAX_SAMPLES, InputPlan, activation_quantizers, fill, half_precision, is_quantized, plan_inputs,
                     plan_variations)
from .jsonable import json_safe

EQUIVALENT, NOT_EQUIVALENT, CANNOT_CHECK = "equivalent", "not equivalent", "cannot check"
# the fewest finite values each output must have compared for a verdict of "equivalent"
MIN_COMPARED = 1
# `onnx-resync verify` exit codes, by verdict
EXIT_CODES = {EQUIVALENT: 0, NOT_EQUIVALENT: 1, CANNOT_CHECK: 4}


class CandidateRefused(ResyncError):
    """ONNX Runtime cannot open the candidate, or cannot run it on inputs it runs the reference on."""


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
    input_plan: list[dict] = field(default_factory=list)  # each input: declared/chosen shape, range, why
    input_tries: list[dict] = field(default_factory=list)  # tries ONNX Runtime refused: shapes, its message
    optimization: str = "basic"  # ONNX Runtime's graph optimization level for both sessions, and why
    nudged: str | None = None  # the floor also nudges the inputs by a rounding of: "quantized", "float16", ...
    # how nodes that quantize their activations were handled (the module docstring), None when none do
    exact_form: str | None = None
    # in the exact form: each output as written: name, max_abs_error, normalized_error, quantization
    # (how far quantizing the activations moves the reference itself), passed
    as_written: list[dict] = field(default_factory=list)

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
        lines.append(f"provider {self.provider} (requested {self.device_requested}), optimization "
                     f"{self.optimization}; {self.samples} sample{plural}, seed {self.seed}, inputs {self.inputs}")
        for d in self.input_plan:
            lines.append(f"  {_input_line(d)}")
        if self.input_tries:
            lines.append(f"  ({len(self.input_tries)} earlier tr{'y' if len(self.input_tries) == 1 else 'ies'} "
                         f"refused by ONNX Runtime, first: {self.input_tries[0]['shapes']}: "
                         f"{_cut(self.input_tries[0]['error'], 200)})")
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
        if self.exact_form:
            lines.append(f"exact form: {self.exact_form}")
        for w in self.as_written:
            lines.append(f"  as written: {w['name']} max_abs_err {w['max_abs_error']:.3e} normalized "
                         f"{w['normalized_error']:.3e}; quantizing the activations moves the reference itself by "
                         f"{w['quantization']:.3e}: {'ok' if w['passed'] else 'FAIL'}")
        rows = [("output", "shape", "max_abs_err", "normalized", "floor", "cosine", "compared", "mismatches", "result")]
        for o in self.outputs:
            rows.append((
                o.name, "x".join(map(str, o.shape)) or "scalar", f"{o.max_abs_error:.3e}",
                f"{o.normalized_error:.3e}", "-" if o.noise_floor is None else f"{o.noise_floor:.1e}",
                f"{o.cosine:.9f}", str(o.compared), f"{o.mismatches}/{o.numel}",
                ("FAIL" if not o.passed else "ok" if o.compared >= MIN_COMPARED else "UNCHECKED")
                + (f" ({o.note})" if o.note else ""),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(lines)


def _input_line(d: dict) -> str:
    shape = "x".join(map(str, d["shape"])) or "scalar"
    return f"{d['name']} {shape} {d['dtype']} {d['range']}" + (f": {d['why']}" if d.get("why") else "")


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


CHANGE_INPUTS = ("change them with --shape NAME:D1,D2,... or --inputs FILE.npz (`onnx-resync inputs MODEL "
                 "--save FILE.npz` writes these to edit)")
# the walker is blamed only for an error this far above the reference's own floor, and this large
BLAME_FACTOR = 100.0
BLAME_NORMALIZED = 1e-3


def explain(report: "VerifyReport", rewrite: str | None = None) -> str:
    """Why a check did not pass, for an error message: the output, the error, the floor, the inputs
    and the option that changes them; a wrong walker rule only when the evidence shows it.

    rewrite: words naming a rewrite the check judged (reduce's folds and removals, "the rewrite"): the
    message then says what that rewrite did (changes the function, or is not proven within rounding),
    never blames a walker rule nor asks for other inputs where the evidence is clear."""
    failing = [o for o in report.outputs if not o.passed]
    inputs = "; ".join(_input_line(d) for d in report.input_plan) or f"inputs {report.inputs}"
    if not failing:
        if rewrite:
            return f"{rewrite} is not proven: {report.reason}; inputs: {inputs}"
        return f"{report.reason}; inputs: {inputs} ({CHANGE_INPUTS})"
    o = max(failing, key=lambda x: x.normalized_error)
    floor = o.noise_floor
    more = f" (and {len(failing) - 1} more output{'s' if len(failing) > 2 else ''})" if len(failing) > 1 else ""
    text = (f"output {o.name!r}{more} differs by {o.max_abs_error:.2e} (normalized {o.normalized_error:.2e}, "
            f"tolerance {report.tolerance:g}){': ' + o.note if o.note else ''}")
    if floor is not None:
        text += (f"; the reference differs from itself by {floor:.2e} between ONNX Runtime's optimization levels"
                 f"{' and on inputs nudged by a rounding' if report.nudged else ''} (its rounding floor)")
    within_rounding = floor is not None and o.max_abs_error <= BLAME_FACTOR * floor
    if rewrite:
        if walker_blamed(o):
            return f"{rewrite} changes the function: {text}, far above that floor; inputs: {inputs}"
        advice = "; within what rounding can do on these inputs (larger or real inputs may prove it)" \
            if within_rounding else ""
        return f"{rewrite} is not proven: {text}{advice}; ONNX Runtime at optimization {report.optimization}; " \
               f"inputs: {inputs}"
    text += f"; ONNX Runtime at optimization {report.optimization}; inputs: {inputs} ({CHANGE_INPUTS})"
    if walker_blamed(o):
        text += ("; the reference is stable across optimization levels and the error is far above that floor: "
                 "please report this model (a walker rule is wrong)")
    elif within_rounding:
        text += ("; the error is within what rounding can do on these inputs: try larger or real inputs "
                 "before concluding")
    return text


def walker_blamed(o: OutputComparison) -> bool:
    """Evidence of a real change: a large error, far above the reference's own floor (NaN/shape
    mismatches count as real)."""
    if o.note and ("NaN" in o.note or o.note.startswith("shape")):
        return True
    return (o.noise_floor is not None and o.normalized_error > BLAME_NORMALIZED
            and o.max_abs_error > BLAME_FACTOR * o.noise_floor)


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


# a quantized graph's floor also takes the reference on its float inputs changed by this much (relative,
# random sign): the size of a float rounding, which flips a value lying at a quantization boundary;
# a graph that computes in half precision, by a rounding of that precision
# a float32 graph, by one float32 rounding: an output that a rounding of its inputs moves (a probability
# near zero after an LSTM) moves as much when a correct permutation reorders a float sum
NUDGE = {"quantized": 2.0 ** -20, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -23}


def _judge_against_noise_floor(reference, provider, feeds, outputs, level: str = "basic",
                               nudge: str | None = None, excuse: bool = True) -> None:
    """Each output's floor: the largest difference between the reference at `level` and the reference
    at every other optimization level and with no optimization on one thread; for a quantized or
    half-precision graph (`nudge`, a key of NUDGE) also the reference on inputs nudged by a rounding."""
    device = "cuda" if provider == runtime.CUDA else "cpu"
    main = runtime.make_session(reference, device, level=level)
    others = [runtime.make_session(reference, device, twin=True)]
    others += [runtime.make_session(reference, device, level=lv) for lv in ("basic", "all") if lv != level]
    floors = [0.0] * len(outputs)
    rng = np.random.default_rng(0)

    def widen(ref, other_out):
        for i, (a, b) in enumerate(zip(ref, other_out)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape == b.shape and a.dtype.kind == "f":
                finite = np.isfinite(a) & np.isfinite(b)
                floors[i] = max(floors[i], float(np.abs(a[finite] - b[finite]).max(initial=0.0)))

    for feed in feeds:
        ref = runtime.run(main, feed)
        for other in others:
            widen(ref, runtime.run(other, feed))
        if nudge:
            nudged = {k: (v * (1 + NUDGE[nudge] * rng.choice([-1.0, 1.0], v.shape))).astype(v.dtype)
                      if v.dtype.kind == "f" else v for k, v in feed.items()}
            try:
                widen(ref, runtime.run(main, nudged))
            except ResyncError:
                pass
    how = "optimization levels" + (f" and inputs nudged by a {nudge} rounding ({NUDGE[nudge]:.0e})" if nudge else "")
    for out, floor in zip(outputs, floors):
        out.noise_floor = floor
        if excuse and not out.passed and not out.note and floor > 0 and out.max_abs_error <= NOISE_FACTOR * floor:
            out.passed = True
            out.mismatches = 0
            out.note = f"within {NOISE_FACTOR:g}x the reference's own rounding floor ({floor:.1e}, across {how})"


def verify(reference, candidate, *, inputs=None, shapes=None, samples: int = 1, seed: int = 0,
           device: str = "auto", tolerance: float = 1e-5, atol: float | None = None,
           rtol: float | None = None) -> VerifyReport:
    """Run reference and candidate (paths or ModelProtos) on the same inputs and compare outputs.

    inputs: dict name -> array or a .npz path (one sample); otherwise `samples` seeded feeds of the
    input plan (inputs.py: shapes and values read from the graph, tried in ONNX Runtime), with the
    inputs that `shapes` (name -> dims) names fixed. With atol and/or rtol (the other one
    defaults to 0) the check is element-wise |cand - ref| <= atol + rtol*|ref|. Models whose nodes
    quantize their activations alike are checked in their exact form and as written (module docstring).
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

    ref_graph, cand_graph = _graph_of(reference), _graph_of(candidate)
    quantized = is_quantized(ref_graph) or is_quantized(cand_graph)
    half = half_precision(ref_graph) or half_precision(cand_graph)
    level = "all" if quantized else "basic"
    exact, exact_words = _exact_form_plan(ref_graph, cand_graph)
    with _exact_forms([reference, candidate] if exact else []) as forms:
        ref_model, cand_model = forms or (reference, candidate)
        ref_session = runtime.make_session(ref_model, device, level=level)
        provider = runtime.provider(ref_session)
        # The candidate runs where the reference ran, so both see the same kernels.
        cand_session = _candidate_session(cand_model, provider, level)
        ref_specs, cand_specs = runtime.specs(ref_session), runtime.specs(cand_session)
        check_signatures(ref_specs, cand_specs)
        for s in ref_specs[1]:
            s.dtype  # raises for outputs that cannot be compared (sequences, maps, strings)

        input_plan = None
        if inputs is not None:
            base = [load_inputs(inputs, ref_specs[0])]
        else:
            input_plan = planned_inputs(ref_session, ref_graph, ref_specs[0], shapes, seed)
            runtime.check_input_size(input_plan, samples)
            base = input_plan.feeds(samples, seed)
            source = "planned from the graph" if input_plan.inputs else "none"
        plan = plan_variations([ref_graph, cand_graph], ref_specs[0])
        assignments, variation = plan.assignments()
        # a varied feed is made when it runs: up to MAX_VARIED_FEEDS copies of an input are never held at once
        jobs = [(feed, None) for feed in base] + [(base[0], a) for a in assignments]

        accs = [_Accumulator(s.name) for s in ref_specs[1]]
        ran, skipped, failed_empty = [], 0, None
        for src, assignment in jobs:
            feed = src if assignment is None else fill(src, assignment)
            try:
                ref_out = runtime.run(ref_session, feed)
            except ResyncError as exc:
                if assignment is not None:  # a value the model does not accept (an index past a table, say)
                    skipped += 1
                    continue
                empty = _empty_input(feed)
                # an empty input the plan chose (a KV cache's past length 0) is no excuse: ORT refused the plan
                if empty is None or (input_plan is not None and not input_plan.settled):
                    raise _run_failed(input_plan, feed, str(exc)) from None
                failed_empty = empty
                continue
            cand_out = _run_candidate(cand_session, feed)
            for acc, r, c in zip(accs, ref_out, cand_out):
                acc.add(r, c, tolerance, atol, rtol)
            del ref_out, cand_out, feed
            ran.append((src, assignment))

        outputs = [acc.result() for acc in accs]
        if ran and not elementwise and not all(o.passed for o in outputs):
            _judge_against_noise_floor(ref_model, provider, (src if a is None else fill(src, a) for src, a in ran),
                                       outputs, level, "quantized" if quantized else half or "float32",
                                       excuse=tolerance > 0)  # a tolerance of 0 asks for bitwise equality
    verdict, reason = _verdict(outputs, base, failed_empty, len(ran))
    as_written = []
    if exact and verdict == EQUIVALENT:
        as_written = _as_written(reference, candidate, ref_session, provider, level,
                                 [src for src, a in ran if a is None])
        bad = next((w for w in as_written if not w["passed"]), None)
        if bad is not None:
            verdict = NOT_EQUIVALENT
            reason = (f"as written, output {bad['name']!r} differs by {bad['max_abs_error']:.2e}, more than "
                      f"{NOISE_FACTOR:g}x what quantizing the activations moves the reference itself "
                      f"({bad['quantization']:.2e}); in the exact form it agrees")
    return VerifyReport(
        equivalent=verdict == EQUIVALENT, verdict=verdict, reason=reason, provider=provider,
        device_requested=device, samples=len(base), seed=seed, mode="elementwise" if elementwise else "normalized",
        tolerance=tolerance, atol=atol, rtol=rtol, inputs=source,
        input_shapes={k: list(v.shape) for k, v in base[0].items()}, outputs=outputs,
        feeds=len(ran), varied=dict(plan.values), varied_why=dict(plan.why), variation=variation,
        skipped_feeds=skipped, compared=sum(o.compared for o in outputs),
        input_plan=input_plan.describe() if input_plan else [_given_line(k, v) for k, v in base[0].items()],
        input_tries=[{"shapes": s, "error": e} for s, e in input_plan.failures] if input_plan and input_plan.settled
        else [],
        optimization="all (a quantized graph: ONNX Runtime runs it quantized there)" if quantized else "basic",
        nudged="quantized" if quantized else half or "float32", exact_form=exact_words, as_written=as_written,
    )


def _candidate_session(candidate, provider: str, level: str):
    try:
        return runtime.make_session(candidate, "cuda" if provider == runtime.CUDA else "cpu", level=level)
    except LoadError as exc:
        raise CandidateRefused(str(exc).replace("cannot open the model", "cannot open the candidate", 1)) from None


def _run_candidate(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return runtime.run(session, feed)
    except ResyncError as exc:
        message = str(exc).removeprefix("onnxruntime failed to run the model: ")
        raise CandidateRefused(f"onnxruntime runs the reference but not the candidate on the same inputs: "
                               f"{message}") from None


# ---- exact form (the module docstring) ----------------------------------------------------------
def _exact_form_plan(ref_graph: onnx.ModelProto, cand_graph: onnx.ModelProto) -> tuple[bool, str | None]:
    """Whether both models are checked in their exact form, and the words for the report."""
    ref_q, cand_q = activation_quantizers(ref_graph), activation_quantizers(cand_graph)
    if not ref_q and not cand_q:
        return False, None
    ref_kinds, cand_kinds = _quantizer_kinds(ref_q), _quantizer_kinds(cand_q)
    if ref_kinds != cand_kinds:
        return False, (f"none: the reference has {_kinds_text(ref_kinds)}, the candidate {_kinds_text(cand_kinds)} "
                       "(they quantize their activations differently: compared as written)")
    return True, (f"{_kinds_text(ref_kinds)} in each model quantize or round their activations before computing, "
                  "where a correct permutation's float rounding upstream can move a value by a whole quantization "
                  "step; both checked with activations as given (the same weights and permutation), and as "
                  "written against how far that quantization moves the reference itself")


def _quantizer_kinds(found: list[tuple[onnx.NodeProto, dict]]) -> Counter:
    """(op, the attributes as written, the exact form's) -> node count."""
    kinds = Counter()
    for node, exact in found:
        written = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in exact}
        kinds[(node.op_type, tuple(sorted(written.items())), tuple(sorted(exact.items())))] += 1
    return kinds


def _kinds_text(kinds: Counter) -> str:
    if not kinds:
        return "no such node"
    return ", ".join(f"{n} {op} with {' '.join(f'{k} {v}' for k, v in written) or 'defaults'} (exact form "
                     f"{' '.join(f'{k} {v}' for k, v in exact)})" for (op, written, exact), n in sorted(kinds.items()))


@contextlib.contextmanager
def _exact_forms(models):
    """`models` (paths or ModelProtos) in their exact form: a path is loaded, weights and all; a
    ModelProto is changed in place and given back as it was on exit. Yields the list (empty for none)."""
    saved = []
    out = []
    try:
        for model in models:
            if not isinstance(model, onnx.ModelProto):
                model = io.load_model(model, check=False)
            for node, exact in activation_quantizers(model):
                saved.append((node, [onnx.AttributeProto.FromString(a.SerializeToString()) for a in node.attribute]))
                kept = [a for a in node.attribute if a.name not in exact]
                del node.attribute[:]
                node.attribute.extend(kept + [onnx.helper.make_attribute(k, v) for k, v in sorted(exact.items())])
            out.append(model)
        yield out
    finally:
        for node, attributes in reversed(saved):
            del node.attribute[:]
            node.attribute.extend(attributes)


def _as_written(reference, candidate, exact_session, provider: str, level: str, feeds: list) -> list[dict]:
    """Both models as written on `feeds`: per output its error and how far quantizing the activations
    moves the reference itself (as written vs `exact_session`, the reference in its exact form)."""
    device = "cuda" if provider == runtime.CUDA else "cpu"
    ref_session = runtime.make_session(reference, device, level=level)
    cand_session = _candidate_session(candidate, provider, level)
    names = [s.name for s in runtime.specs(ref_session)[1]]
    err, scale, moved = [0.0] * len(names), [0.0] * len(names), [0.0] * len(names)
    for feed in feeds:
        written = runtime.run(ref_session, feed)
        cand = _run_candidate(cand_session, feed)
        exact = runtime.run(exact_session, feed)
        for i, (w, c, x) in enumerate(zip(written, cand, exact)):
            w, c, x = (np.asarray(v, np.float64) for v in (w, c, x))
            if w.shape != c.shape:
                err[i] = math.inf
                continue
            err[i] = max(err[i], _max_diff(w, c))
            if w.shape == x.shape:
                moved[i] = max(moved[i], _max_diff(w, x))
            finite = np.abs(w[np.isfinite(w)])
            scale[i] = max(scale[i], float(finite.max(initial=0.0)))
    return [{"name": n, "max_abs_error": e, "normalized_error": e / max(s, np.finfo(np.float64).tiny) if e else 0.0,
             "quantization": q, "passed": e <= NOISE_FACTOR * q}
            for n, e, s, q in zip(names, err, scale, moved)]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over values finite on both sides; inf where one side is not finite and they differ."""
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    finite = np.isfinite(a) & np.isfinite(b)
    if (~finite & ~same).any():
        return math.inf
    return float(np.abs(a[finite] - b[finite]).max(initial=0.0))


def planned_inputs(session, graph: onnx.ModelProto, in_specs, shapes=None, seed: int = 0) -> InputPlan:
    """The input plan of `graph` (inputs.plan_inputs), tried in `session` (runtime.settle). `shapes`
    (name -> dims) fix inputs; an unknown name or a shape that does not fit is a UsageError."""
    unknown = set(shapes or {}) - {s.name for s in in_specs}
    if unknown:
        raise UsageError(f"--shape names {sorted(unknown)[0]!r}, which is not a model input")
    for s in in_specs:
        if shapes and s.name in shapes:
            runtime.resolve_shape(s, shapes)
    plan = plan_inputs(graph, in_specs, shapes)
    runtime.settle(session, plan, seed)
    return plan


def _given_line(name: str, arr: np.ndarray) -> dict:
    return {"name": name, "dtype": str(arr.dtype), "declared": None, "shape": list(arr.shape),
            "range": "given", "why": ""}


def _run_failed(plan: InputPlan | None, feed: dict[str, np.ndarray], error: str) -> ResyncError:
    """ONNX Runtime refused every input tried: name the inputs, ORT's message whole, the options."""
    if plan is None:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'} {v.dtype}" for k, v in feed.items())
        try_ = f"on the given inputs ({shapes})"
    elif plan.settled:
        try_ = f"on the planned inputs ({plan.shapes_text()})"
    else:
        tried = len(plan.failures)
        try_ = (f"on every input tried ({tried} tr{'y' if tried == 1 else 'ies'}; first: {plan.shapes_text(plan.chosen)}"
                f", whose values are {'; '.join(i.name + ' ' + i.range_text(plan.chosen) for i in plan.inputs)})")
    message = error.removeprefix("onnxruntime failed to run the model: ")
    return ResyncError(f"onnxruntime failed to run the model {try_}: {message}; give shapes with --shape "
                       f"NAME:D1,D2,... or inputs with --inputs FILE.npz")


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


@dataclass
class InputsReport:
    """`onnx-resync inputs`: what the checks feed a model, and why."""

    model: str
    provider: str
    optimization: str
    runs: bool  # ONNX Runtime ran the chosen inputs
    inputs: list[dict]  # name, dtype, declared, shape, range, why
    tries: list[dict]  # the tries ONNX Runtime refused: shapes, its message
    saved: str | None = None

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def format_text(self) -> str:
        lines = [f"inputs of {self.model} ({'ONNX Runtime runs them' if self.runs else 'ONNX RUNTIME REFUSED EVERY TRY'}"
                 f" on {self.provider}, optimization {self.optimization})"]
        for d in self.inputs:
            declared = "[" + ", ".join(str(x) for x in d["declared"]) + "]"
            lines.append(f"  {d['name']}: declared {declared} {d['dtype']}, chosen "
                         f"{'x'.join(map(str, d['shape'])) or 'scalar'} {d['range']}")
            if d["why"]:
                lines.append(f"    why: {d['why']}")
        for t in self.tries:
            lines.append(f"  refused: {t['shapes']}: {t['error']}")
        if self.saved:
            lines.append(f"saved to {self.saved} (give it to verify, permute or resync with --inputs)")
        return "\n".join(lines)


def plan_report(model, *, shapes=None, seed: int = 0, device: str = "auto") -> tuple[InputsReport, dict]:
    """The input plan of `model` (path or ModelProto) tried in ONNX Runtime: the report and one feed."""
    graph = _graph_of(model)
    quantized = is_quantized(graph)
    session = runtime.make_session(model, device, level="all" if quantized else "basic")
    in_specs = runtime.specs(session)[0]
    plan = planned_inputs(session, graph, in_specs, shapes, seed)
    runtime.check_input_size(plan, 1)
    report = InputsReport(
        model=str(model) if not isinstance(model, onnx.ModelProto) else "the model", provider=runtime.provider(session),
        optimization="all (quantized graph)" if quantized else "basic", runs=plan.settled, inputs=plan.describe(),
        tries=[{"shapes": s, "error": e} for s, e in plan.failures],
    )
    return report, plan.feeds(1, seed)[0]

