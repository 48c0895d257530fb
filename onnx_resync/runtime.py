"""ONNX Runtime sessions and seeded random inputs (the only module besides verify that touches ORT).

`make_session` prefers CUDA and falls back to CPU without noise, and reports the provider that really
ran (asked of the session; `get_available_providers()` lists only what was compiled in).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io as _io
import math
import os
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import io
from .errors import LoadError, ResyncError, UsageError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")

# ORT's own default logger severity (WARNING); ORT has no getter, so this is what we restore.
_ORT_DEFAULT_SEVERITY = 2

# ORT type strings -> numpy dtypes that can be fed from Python.
_ORT_DTYPES = {
    "float": np.float32, "double": np.float64, "float16": np.float16,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as ORT sees it. Dims are ints, or str/None when symbolic/unknown."""

    name: str
    type: str  # ORT type string, e.g. 'tensor(float)'
    shape: tuple

    @property
    def dtype(self) -> np.dtype:
        elem = self.type[len("tensor("):-1] if self.type.startswith("tensor(") else None
        if elem not in _ORT_DTYPES:
            raise UsageError(f"{self.name!r} has type {self.type}, which cannot be fed or compared from Python")
        return np.dtype(_ORT_DTYPES[elem])


def specs(session_or_model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a session or ModelProto; inputs that have an initializer are left out."""
    if isinstance(session_or_model, onnx.ModelProto):
        return _model_specs(session_or_model)

    def conv(args):
        return [TensorSpec(a.name, a.type, tuple(d if isinstance(d, int) else None for d in a.shape)) for a in args]

    return conv(session_or_model.get_inputs()), conv(session_or_model.get_outputs())


def _model_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def conv(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            type_str = f"tensor({onnx.TensorProto.DataType.Name(t.elem_type).lower()})" if v.type.HasField("tensor_type") else "other"
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
            out.append(TensorSpec(v.name, type_str, dims))
        return out

    weights = {i.name for i in model.graph.initializer}
    return conv(v for v in model.graph.input if v.name not in weights), conv(model.graph.output)


@functools.lru_cache(maxsize=1)
def cuda_possible() -> bool:
    """Cheap test that CUDA could come up, so a CPU machine never asks for it (and never sees ORT's errors)."""
    if CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    # CUDA libs installed as pip wheels (nvidia-*) are not on the loader path until preloaded.
    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(_io.StringIO()), contextlib.suppress(Exception):
            ort.preload_dlls()
    return True


@contextlib.contextmanager
def _quiet_ort():
    """Silence ORT's logger while a session is created (provider load failures print red errors)."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _has_unloaded_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in io.iter_graph_tensors(model.graph))


# graph optimization levels by name: "basic" for float graphs (no kernel fusions that could make two
# models round differently), "all" for quantized graphs (where ONNX Runtime fuses Q/DQ pairs into
# integer kernels and runs them quantized, as deployed), "none" for a twin that measures rounding noise
LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(model, device: str = "auto", *, twin: bool = False, level: str = "basic") -> ort.InferenceSession:
    """Open an ORT session on a path or ModelProto.

    device: "auto" (CUDA if it really comes up, else CPU, silently), "cuda" (required: ResyncError
    otherwise), "cpu". The provider that ran is `session.get_providers()[0]`. level: a key of LEVELS;
    twin: no optimization and one thread (the same model computed another way).
    """
    if device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and not cuda_possible():
        raise ResyncError("CUDA was requested but is not available (no CUDA driver or no GPU build of onnxruntime)")
    want_cuda = device == "cuda" or (device == "auto" and cuda_possible())

    options = ort.SessionOptions()
    options.log_severity_level = 4
    # Basic optimizations only: constant folding and cleanups, no kernel fusions that could make the
    # two models round differently. Both models always get the same level.
    options.graph_optimization_level = LEVELS[level]
    if twin:  # the same model computed another way: measures the model's own rounding noise
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
    # TF32 would make a strict fp32 comparison meaningless; a fixed conv algorithm search keeps runs
    # of the two models comparable and skips benchmarking time.
    providers = [(CUDA, {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}), CPU] if want_cuda else [CPU]

    tmp = None
    if isinstance(model, onnx.ModelProto):
        # a lazy model goes to ORT in one piece when its weights were inline in its file, else (a huge
        # model) it is written (streamed) to a temporary file
        lazy = io.is_lazy_model(model) and not io.streams_inline(model)
        if _has_unloaded_external_data(model) and not io.is_lazy_model(model):
            raise UsageError("model has external data that is not loaded; pass its file path instead")
        if not io.over_inline_limit(model) and not lazy:
            source = io.serialize(model)
        else:  # past protobuf's 2 GiB: ORT must read it from a file with external data
            tmp = tempfile.mkdtemp(prefix="onnx-resync-")
            try:
                source = str(io.save_model(model, Path(tmp) / "model.onnx"))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    else:
        path = Path(os.fspath(model))
        # Clean LoadError for unreadable files and the external-data safety checks; the graph itself
        # is validated by ORT, so skip onnx.checker (it would parse the whole file once more).
        io.load_model(path, load_weights=False, check=False)
        source = str(path)

    try:
        with _quiet_ort():
            try:
                session = ort.InferenceSession(source, options, providers=providers)
            except Exception:
                if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
                    raise
                # some valid graphs trip an ORT rewrite (e.g. Pad -> Pad -> pooling fusion): retry as written
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LoadError(f"onnxruntime cannot open the model: {_first_line(exc)}") from None
    finally:
        del source
    if tmp is not None:  # ORT may map the external data: keep the files while the session lives
        weakref.finalize(session, shutil.rmtree, tmp, ignore_errors=True)
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise ResyncError("CUDA was requested but onnxruntime could not start it (missing CUDA/cuDNN libraries?)")
    return session


def provider(session: ort.InferenceSession) -> str:
    """The execution provider that actually runs the session."""
    return session.get_providers()[0]


def run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run all outputs; ORT failures become a ResyncError with ORT's message whole."""
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise ResyncError(f"onnxruntime failed to run the model: {ort_message(exc)}") from None


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's message, whole (its lines joined)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


def settle(session: ort.InferenceSession, plan, seed: int = 0) -> bool:
    """Try an input plan (inputs.InputPlan) in ONNX Runtime, try after try, and keep the first that
    runs (plan.chosen); the tries it refuses are kept with ORT's message (plan.failures). False when
    none ran (plan.chosen is then the first try, whose failure the caller reports)."""
    plan.failures.clear()
    tries = plan.tries()
    for k in tries:
        shapes = [(i.name, i.dtype, plan.shape(i, k)) for i in plan.inputs]
        try:
            _check_input_size(shapes, 1)
        except ResyncError as exc:
            plan.failures.append((plan.shapes_text(k), str(exc)))
            continue
        try:
            session.run(None, plan.feeds(1, seed, k)[0])
        except Exception as exc:
            plan.failures.append((plan.shapes_text(k), ort_message(exc)))
            continue
        plan.chosen, plan.settled = k, True
        return True
    plan.chosen, plan.settled = tries[0], False
    return False


def check_input_size(plan, samples: int) -> None:
    """Refuse feeds past MAX_SAMPLE_BYTES per sample or MAX_INPUT_BYTES in all (an input plan)."""
    _check_input_size([(i.name, i.dtype, plan.shape(i)) for i in plan.inputs], samples)


def resolve_shape(spec: TensorSpec, shapes: dict[str, list[int]] | None) -> tuple[int, ...]:
    """The concrete shape to feed: the user's shape if named (checked against fixed dims), else
    the model's with symbolic/unknown dims set to 1."""
    given = (shapes or {}).get(spec.name)
    if given is None:
        return tuple(d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape)
    given = tuple(int(d) for d in given)
    if len(given) != len(spec.shape):
        raise UsageError(f"input {spec.name!r} has rank {len(spec.shape)}, shape {list(given)} has rank {len(given)}")
    for i, (want, got) in enumerate(zip(spec.shape, given)):
        if got < 0 or (isinstance(want, int) and want >= 0 and want != got):
            raise UsageError(f"input {spec.name!r} dim {i} is {want}, shape gives {got}")
    return given


def _int_high(name: str) -> int:
    # Masks are 0/1; everything else (ids, positions, counts) stays small so that any embedding
    # table or Gather axis is large enough for it.
    return 2 if "mask" in name.lower() else 10


# Random inputs past these sizes are refused, not allocated: a hostile file may declare huge fixed dims.
MAX_SAMPLE_BYTES = 1 << 30
MAX_INPUT_BYTES = 4 << 30


def _check_input_size(plan, samples: int) -> None:
    sizes = [(name, shape, math.prod(shape) * np.dtype(dtype).itemsize) for name, dtype, shape in plan]
    per_sample = sum(n for _, _, n in sizes)
    if per_sample > MAX_SAMPLE_BYTES or per_sample * samples > MAX_INPUT_BYTES:
        name, shape, _ = max(sizes, key=lambda t: t[2])
        raise ResyncError(f"random inputs would take {per_sample * samples / 2**30:.1f} GiB (input {name!r} has "
                          f"shape {list(shape)}); the limit is {MAX_SAMPLE_BYTES >> 30} GiB per sample and "
                          f"{MAX_INPUT_BYTES >> 30} GiB in all: set smaller dims with --shape or give --inputs")


def random_inputs(session_or_specs, shapes: dict[str, list[int]] | None = None, samples: int = 1,
                  seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`samples` seeded feeds for a session, a ModelProto, or a list of TensorSpec.

    floats: standard normal; ints: uniform in [0, 10), or {0, 1} when the name contains 'mask';
    bool: random bits. Symbolic dims are 1 unless `shapes` names the input.
    """
    if isinstance(session_or_specs, (ort.InferenceSession, onnx.ModelProto)):
        in_specs = specs(session_or_specs)[0]
    else:
        in_specs = list(session_or_specs)
    unknown = set(shapes or {}) - {s.name for s in in_specs}
    if unknown:
        raise UsageError(f"--shape names {sorted(unknown)[0]!r}, which is not a model input")
    rng = np.random.default_rng(seed)
    plan = [(s.name, s.dtype, resolve_shape(s, shapes)) for s in in_specs]
    _check_input_size(plan, samples)
    feeds = []
    for _ in range(samples):
        feed = {}
        for name, dtype, shape in plan:
            if dtype.kind == "f":
                arr = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                arr = rng.integers(0, _int_high(name), size=shape).astype(dtype)
            else:  # bool
                arr = rng.integers(0, 2, size=shape).astype(np.bool_)
            feed[name] = arr
        feeds.append(feed)
    return feeds
