"""Loading: a file parsed (or read in place) and checked, every failure a one-line LoadError."""

from __future__ import annotations

import math
import mmap as mmap_module
import os
from pathlib import Path

import onnx

from . import files, layout, wire
from ..errors import LoadError
from .external import FIXED_ITEMSIZE, IN_PLACE_KEY, SUBBYTE_BITS, TYPED_FIELDS, check_external_data, \
    check_graph_limits, check_tensor_data, data_length, expected_nbytes, external_info, external_nbytes, \
    in_file_data, is_in_place, over_inline_limit, set_external
from .lazy import STAMP_KEY, file_stamp
from .order import sort_model
from .store import copy_model

# Models with more external data than this are not read into memory ("lazy"): each large tensor
# stays in its file and is memory-mapped when used, and a tensor that is rewritten (permuted) is
# computed only when it is saved, tensor by tensor. Tensors under LAZY_MIN_TENSOR_BYTES (shapes,
# biases, norm parameters) are read as usual, so the walker sees them inline. (Read into memory, a
# model with external data costs several times its size in copies: a 1 GiB model peaked at 6 GiB.)
LAZY_EXTERNAL_BYTES = int(os.environ.get("ONNX_RESYNC_LAZY_BYTES", 64 << 20))
LAZY_MIN_TENSOR_BYTES = int(os.environ.get("ONNX_RESYNC_LAZY_MIN_TENSOR_BYTES", 1 << 20))
# The same holds for a model file past LAZY_EXTERNAL_BYTES with its weights inline: the initializers'
# raw payloads of at least IN_PLACE_MIN_TENSOR_BYTES are not parsed but memory-mapped from the model
# file itself (see wire.py), and the model is saved inline again, streamed. Parsing copies every
# payload, reading raw_data copies it again, and serializing once more: for a 100 MB model those
# copies cost more than the matching. Such tensors carry IN_PLACE_KEY in their external_data entries,
# which is never written to a file.
IN_PLACE_MIN_TENSOR_BYTES = int(os.environ.get("ONNX_RESYNC_IN_PLACE_MIN_TENSOR_BYTES", 64 << 10))
# Opset versions: a model importing a version of a domain that the installed onnx (ai.onnx, ai.onnx.ml)
# or ONNX Runtime does not support is refused in one line, as ONNX Runtime would refuse it at the
# check (opset 999; com.microsoft 2). Versions up to SURELY_SUPPORTED are supported by every onnx and
# onnxruntime that pyproject allows (onnx >= 1.15, onnxruntime >= 1.17) and are accepted without
# asking; above, ONNX Runtime is asked once per (domain, version) and process: does it load a
# one-node model importing that version? (ORT's own schema table says 27 where it loads only 26.)
SURELY_SUPPORTED = {"": 19, "ai.onnx": 19, "ai.onnx.ml": 3, "com.microsoft": 1}


def load_model(path: str | os.PathLike, *, load_weights: bool = True, check: bool = True,
               lazy: bool | None = None) -> onnx.ModelProto:
    """Load an ONNX file, turning every failure into a one-line LoadError.

    With load_weights=False, external data is left on disk (the walker needs shapes only).
    check=False skips onnx.checker (for callers such as ORT sessions that validate the graph anyway).
    lazy: keep large external tensors in their files, memory-mapped when read (WeightStore) and
    streamed when saved (save_model); None: lazy when the external data exceeds LAZY_EXTERNAL_BYTES.
    """
    path = Path(path)
    # a FIFO would block, a device be read until memory runs out, a folder is no model
    size = files.check_input_file(path, what="file", error=LoadError).st_size
    in_place = size > LAZY_EXTERNAL_BYTES if lazy is None else lazy
    try:
        model, cuts = _parse(path, in_place)
    except LoadError:
        raise
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise LoadError(f"{path}: not a readable ONNX protobuf ({type(exc).__name__})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise LoadError(f"{path}: not an ONNX model (no graph or ir_version)")
    check_graph_limits(model, path)
    try:
        _check_text(model)
    except UnicodeDecodeError:
        raise LoadError(f"{path}: not a valid ONNX model (a name or attribute is not UTF-8 text)") from None
    external = layout.external_entries(model) if load_weights else []  # (in the file's order)
    sort_model(model)  # as ONNX Runtime does (io/order.py); a sorted graph is left as it is
    check_opsets(model, path)
    check_external_data(model, path.parent)
    try:
        layout.remember(model, external, path.parent)  # a save writes the same layout (io/layout.py)
    except Exception as exc:
        raise LoadError(f"{path}: cannot read external data ({exc})") from None
    _map_in_place(model, cuts, path)
    check_tensor_data(model, path)
    if load_weights:
        if lazy is None:
            lazy = in_place or external_nbytes(model) > LAZY_EXTERNAL_BYTES
        try:
            if lazy:
                _make_lazy(model, path.parent)
            else:
                _load_external(model, path.parent)
        except Exception as exc:
            raise LoadError(f"{path}: cannot read external data ({exc})") from None
    if check:
        _check(model, path)
    return model


def _parse(path: Path, in_place: bool) -> tuple[onnx.ModelProto, list]:
    """The model, and (in_place) the initializer payloads left in the file (see wire.cut_payloads)."""
    found = None
    with files.open_input(path, what="file", error=LoadError) as fh:  # what was checked is what is read
        if in_place:
            try:
                buf = mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ)
            except (ValueError, OSError):  # an empty file cannot be mapped
                buf = None
            if buf is not None:
                try:
                    found = wire.cut_payloads(buf, IN_PLACE_MIN_TENSOR_BYTES)
                finally:
                    buf.close()
        if found is None:  # (the format from the name's extension, as onnx.load_model(path) chooses it)
            fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix) or "protobuf"
            return onnx.load_model(fh, format=fmt, load_external_data=False), []
    skeleton, cuts = found
    model = onnx.ModelProto()
    if model.ParseFromString(skeleton) != len(skeleton):
        raise ValueError("trailing bytes")
    return model, cuts


def check_opsets(model: onnx.ModelProto, where: str | os.PathLike = "model") -> None:
    """Refuse (one LoadError line) an opset import that the installed onnx or ONNX Runtime does not
    support: what the check would refuse later, and what the walker's rules would only guess at."""
    for entry in model.opset_import:
        domain, version = entry.domain, int(entry.version)
        if version <= SURELY_SUPPORTED.get(domain, 0):
            continue
        onnx_max = _onnx_max(domain)
        if (onnx_max is None or version <= onnx_max) and _ort_accepts(domain, version):
            continue
        said = [] if onnx_max is None else [f"onnx {onnx.__version__}: up to {onnx_max}"]
        ort_max = _ort_max(domain, version)
        if ort_max is not None:
            import onnxruntime

            said.append(f"ONNX Runtime {onnxruntime.__version__}: " + (f"up to {ort_max}" if ort_max > 0 else "none"))
        raise LoadError(f"{where}: opset {domain or 'ai.onnx'} {version} is not supported here ({', '.join(said)}); "
                        "refused")


def _ort_max(domain: str, version: int) -> int | None:
    """The highest version of `domain` that ONNX Runtime accepts, counted up from SURELY_SUPPORTED
    (for the message; at most 256 steps: a bisection is fooled by huge versions that ORT's int
    arithmetic wraps into accepted ones); None when it accepts `version` or is absent."""
    if _ort_accepts(domain, version):
        return None
    best = SURELY_SUPPORTED.get(domain, 0)
    while best + 1 < version and best < SURELY_SUPPORTED.get(domain, 0) + 256 and _ort_accepts(domain, best + 1):
        best += 1
    return best


def _onnx_max(domain: str) -> int | None:
    if domain in ("", "ai.onnx"):
        return onnx.defs.onnx_opset_version()
    if domain == "ai.onnx.ml":
        return onnx.defs.onnx_ml_opset_version()
    return None


_ORT_ACCEPTS: dict[tuple[str, int], bool] = {}


def _ort_accepts(domain: str, version: int) -> bool:
    """Does ONNX Runtime load a one-node model (Identity) that imports `version` of `domain`? Asked
    once per process; True when onnxruntime cannot be imported (the check will say why)."""
    key = (domain, version)
    if key not in _ORT_ACCEPTS:
        try:
            import onnxruntime
        except Exception:  # noqa: BLE001 - no runtime here: nothing to agree with
            return True
        from onnx import TensorProto, helper

        imports = [(domain, version)] if domain in ("", "ai.onnx") else [("", SURELY_SUPPORTED[""]), (domain, version)]
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid(d, v) for d, v in imports])
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its warnings are not ours to print
        try:
            onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            _ORT_ACCEPTS[key] = True
        except Exception:  # noqa: BLE001 - a refusal, whatever its kind
            _ORT_ACCEPTS[key] = False
    return _ORT_ACCEPTS[key]


def _check_text(message) -> None:
    """Every string field must be UTF-8 text: protobuf parses invalid UTF-8 in ONNX's proto2 strings
    and hands it out as bytes (a node name, a tensor name), which breaks name lookups far away, or
    raises later. Raises UnicodeDecodeError. Tensor data is not touched."""
    if isinstance(message, onnx.TensorProto):
        values = [message.name, message.doc_string] + [v for e in message.external_data for v in (e.key, e.value)]
        if any(not isinstance(v, str) for v in values):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "tensor name or external data key")
        return
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        items = value if repeated else [value]
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                _check_text(item)
        elif field.type == field.TYPE_STRING and any(not isinstance(v, str) for v in items):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, f"field {field.name}")


def _map_in_place(model: onnx.ModelProto, cuts: list, path: Path) -> None:
    """Point each initializer whose payload wire.cut_payloads left in the file at that place; one that
    cannot be mapped (a string or packed type, other data fields) gets its payload back."""
    location = str(path.resolve())
    stamp = file_stamp(location)
    with open(path, "rb") as fh:
        for cut in cuts:
            tensor = model.graph.initializer[cut.index]
            mappable = (tensor.data_location != onnx.TensorProto.EXTERNAL and not len(tensor.external_data)
                        and tensor.data_type in FIXED_ITEMSIZE and expected_nbytes(tensor) == cut.length
                        and not any(len(getattr(tensor, f)) for f in TYPED_FIELDS))
            if mappable:
                set_external(tensor, {"location": location, "offset": str(cut.offset), "length": str(cut.length),
                                      IN_PLACE_KEY: "1", STAMP_KEY: stamp})
            else:
                fh.seek(cut.offset)
                tensor.raw_data = fh.read(cut.length)


def _load_external(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external tensor's data into the model."""
    for tensor in list(in_file_data(model)):
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))


def _make_lazy(model: onnx.ModelProto, base_dir: Path) -> None:
    """Small external tensors are read in; large ones point at their (checked) file by absolute path."""
    root = base_dir.resolve()
    for tensor in list(in_file_data(model)):
        info = external_info(tensor)
        nbytes = data_length(tensor, info) or 0
        if nbytes < LAZY_MIN_TENSOR_BYTES or expected_nbytes(tensor) is None or tensor.data_type in SUBBYTE_BITS:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(root))
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            continue
        info["location"] = str((root / info["location"]).resolve())
        info[STAMP_KEY] = file_stamp(info["location"])
        set_external(tensor, info)


def _check(model: onnx.ModelProto, path: Path) -> None:
    runtime_ops = _runtime_standard_ops(model)
    try:
        if runtime_ops:
            onnx.checker.check_model(_runtime_ops_aside(_checker_copy(model, cut_external=True), runtime_ops))
        elif any(True for _ in in_file_data(model)) or over_inline_limit(model):
            # Unloaded external data is resolved against the model's folder only when checked by path
            # (checking the proto looks in the current directory); a path check also has no 2 GiB limit.
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(_checker_copy(model))
    except onnx.checker.ValidationError as exc:
        # one whole line: the checker's message may go on over lines (a node's name and op)
        first = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or "invalid model"
        first = first if len(first) <= 400 else first[:397] + "..."
        raise LoadError(f"{path}: invalid ONNX model: {first}") from None
    except Exception as exc:
        raise LoadError(f"{path}: invalid ONNX model ({type(exc).__name__})") from None


def _runtime_standard_ops(model: onnx.ModelProto) -> set[str]:
    """Ops of the standard domain that the file uses, onnx does not define at the file's opset and ONNX
    Runtime registers there at that opset: ops onnx never defined (SimplifiedLayerNormalization of the
    onnxruntime-genai builder), and ops ONNX Runtime registers below onnx's own since-version
    (LayerNormalization before opset 17, which ONNX Runtime's optimizer writes into opset-12 files).
    ONNX Runtime runs them, so the loader accepts them; onnx.checker would refuse them as unknown."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    used = {n.op_type for g in _graphs(model.graph) for n in g.node if n.domain in ("", "ai.onnx")}
    unknown = {op for op in used if not _onnx_defines(op, opset)}
    if not unknown:
        return set()
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        registered = {s.name for s in C.get_all_operator_schema()
                      if s.domain in ("", "ai.onnx") and (opset is None or s.since_version <= opset)}
    except Exception:  # no ONNX Runtime, or one without its schema table: the checker says what it says
        return set()
    return unknown & registered


def _onnx_defines(op: str, opset: int | None) -> bool:
    """Whether onnx has a schema for op in the standard domain at that opset (any, without one)."""
    if not onnx.defs.has(op):
        return False
    if opset is None:
        return True
    try:
        onnx.defs.get_schema(op, opset, "")
        return True
    except onnx.defs.SchemaError:
        return False


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(g)


RUNTIME_DOMAIN = "onnx_resync.runtime"  # (checker copy only) where ONNX Runtime's standard-domain extras go


def _runtime_ops_aside(copy: onnx.ModelProto, ops: set[str]) -> onnx.ModelProto:
    """The checker copy with those ops in a domain of their own, which the checker does not look into
    (as it does not look into com.microsoft): everything else is checked as usual."""
    for g in _graphs(copy.graph):
        for n in g.node:
            if n.domain in ("", "ai.onnx") and n.op_type in ops:
                n.domain = RUNTIME_DOMAIN
    copy.opset_import.add(domain=RUNTIME_DOMAIN, version=1)
    return copy


def _checker_copy(model: onnx.ModelProto, cut_external: bool = False) -> onnx.ModelProto:
    """The model for onnx.checker, its initializers' large raw payloads cut to one element of a
    [1, ..., 1] tensor.

    The checker copies the whole model to C++ and reads no weight value, only that each tensor's
    data fits its dims and type, which check_tensor_data has verified for the real dims. Building
    this copy never touches a payload: setting the real ones aside and back in place copied every
    weight twice (0.12 s of the 0.32 s that loading two 98 MiB models took)."""
    def cut(source: onnx.TensorProto, target: onnx.TensorProto) -> None:
        count, nbytes = math.prod(source.dims), expected_nbytes(source)
        in_place = is_in_place(source) or (cut_external and source.data_location == onnx.TensorProto.EXTERNAL)
        # (its data is checked in its file: check_tensor_data, check_external_data)
        if not in_place and (not source.HasField("raw_data") or not source.dims or source.data_type in SUBBYTE_BITS
                             or count <= 0 or nbytes is None or nbytes <= 4096):
            target.CopyFrom(source)
            return
        placement = {"external_data", "data_location"} if in_place else set()
        wire.copy_fields(source, target, {"raw_data", "dims"} | placement)
        target.dims.extend([1] * len(source.dims))
        target.raw_data = bytes(nbytes // max(count, 1))

    return copy_model(model, cut)
