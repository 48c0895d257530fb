"""Prove that two models compute the same function: run both with ONNX Runtime on the same inputs.

Default verdict, per output: normalized error = max|cand - ref| / max|ref| <= tolerance. This scales
with the output, so a correctly permuted deep fp32 model (~1e-6) passes where an element-wise rtol
check can fail on near-zero elements. With atol/rtol, an np.isclose-style element-wise check is used
instead. Integer and bool outputs must match exactly. NaN (and inf) in the same place count as equal.
With several samples every sample is judged on its own (normalized by its own max|ref|) and the
worst one is reported, so a sample with small outputs is never hidden by one with large outputs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import runtime
from .errors import LoadError, ModelMismatchError, UsageError
from .jsonable import json_safe


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    normalized_error: float
    cosine: float
    mismatches: int
    numel: int
    passed: bool
    note: str = ""
    # max abs difference between two executions of the reference itself (other kernels/threads);
    # measured only when the normalized check fails, to tell rounding noise from a real change
    noise_floor: float | None = None


@dataclass
class VerifyReport:
    equivalent: bool
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

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def format_text(self) -> str:
        verdict = "EQUIVALENT" if self.equivalent else "NOT EQUIVALENT"
        if self.mode == "normalized":
            rule = f"max|err| / max|ref| <= {self.tolerance:g} per output"
        else:
            rule = f"|err| <= {self.atol:g} + {self.rtol:g}*|ref| per element"
        plural = "s" if self.samples != 1 else ""
        lines = [
            f"verify: {verdict}",
            f"provider {self.provider} (requested {self.device_requested}); {self.samples} sample{plural},"
            f" seed {self.seed}, inputs {self.inputs}",
            f"check: {rule}; integer/bool outputs exact",
        ]
        rows = [("output", "shape", "max_abs_err", "normalized", "cosine", "mismatches", "result")]
        for o in self.outputs:
            rows.append((
                o.name, "x".join(map(str, o.shape)) or "scalar", f"{o.max_abs_error:.3e}",
                f"{o.normalized_error:.3e}", f"{o.cosine:.9f}", f"{o.mismatches}/{o.numel}",
                ("ok" if o.passed else "FAIL") + (f" ({o.note})" if o.note else ""),
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
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise LoadError(f"{path}: no such inputs file") from None
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
        self.mismatches += int(np.count_nonzero(bad | one_nan))
        ok = np.isfinite(a) & np.isfinite(b)
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
            numel=self.numel, passed=self.mismatches == 0, note=self.note,
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
    if samples < 1:
        raise UsageError("samples must be at least 1")
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
        feeds = [load_inputs(inputs, ref_specs[0])]
    else:
        feeds = runtime.random_inputs(ref_specs[0], shapes, samples, seed)

    accs = [_Accumulator(s.name) for s in ref_specs[1]]
    for feed in feeds:
        ref_out = runtime.run(ref_session, feed)
        cand_out = runtime.run(cand_session, feed)
        for acc, r, c in zip(accs, ref_out, cand_out):
            acc.add(r, c, tolerance, atol, rtol)
        del ref_out, cand_out

    outputs = [acc.result() for acc in accs]
    if not elementwise and not all(o.passed for o in outputs):
        _judge_against_noise_floor(reference, provider, feeds, outputs)
    return VerifyReport(
        equivalent=all(o.passed for o in outputs), provider=provider, device_requested=device,
        samples=len(feeds), seed=seed, mode="elementwise" if elementwise else "normalized",
        tolerance=tolerance, atol=atol, rtol=rtol, inputs=source,
        input_shapes={k: list(v.shape) for k, v in feeds[0].items()}, outputs=outputs,
    )
