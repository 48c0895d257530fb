"""Loading: a file parsed (or read in place) and checked, every failure a one-line LoadError."""

from __future__ import annotations

import math
import mmap as mmap_module
import os
from pathlib import Path

import onnx

from . import wire
from ..errors import LoadError
from .external import FIXED_ITEMSIZE, IN_PLACE_KEY, SUBBYTE_BITS, TYPED_FIELDS, check_external_data, \
    check_tensor_data, data_length, expected_nbytes, external_info, external_nbytes, in_file_data, is_in_place, \
    over_inline_limit, set_external
from .lazy import STAMP_KEY, file_stamp
from .order import sort_nodes
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


def load_model(path: str | os.PathLike, *, load_weights: bool = True, check: bool = True,
               lazy: bool | None = None) -> onnx.ModelProto:
    """Load an ONNX file, turning every failure into a one-line LoadError.

    With load_weights=False, external data is left on disk (the walker needs shapes only).
    check=False skips onnx.checker (for callers such as ORT sessions that validate the graph anyway).
    lazy: keep large external tensors in their files, memory-mapped when read (WeightStore) and
    streamed when saved (save_model); None: lazy when the external data exceeds LAZY_EXTERNAL_BYTES.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if not path.is_file():
        raise LoadError(f"{path}: not a regular file")
    in_place = path.stat().st_size > LAZY_EXTERNAL_BYTES if lazy is None else lazy
    try:
        model, cuts = _parse(path, in_place)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise LoadError(f"{path}: not a readable ONNX protobuf ({type(exc).__name__})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise LoadError(f"{path}: not an ONNX model (no graph or ir_version)")
    try:
        _check_text(model)
    except UnicodeDecodeError:
        raise LoadError(f"{path}: not a valid ONNX model (a name or attribute is not UTF-8 text)") from None
    sort_nodes(model.graph)  # as ONNX Runtime does (io/order.py); a sorted graph is left as it is
    check_external_data(model, path.parent)
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
    if in_place:
        with open(path, "rb") as fh:
            try:
                buf = mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ)
            except (ValueError, OSError):  # an empty file cannot be mapped
                buf = None
        if buf is not None:
            try:
                found = wire.cut_payloads(buf, IN_PLACE_MIN_TENSOR_BYTES)
            finally:
                buf.close()
    if found is None:
        return onnx.load_model(str(path), load_external_data=False), []
    skeleton, cuts = found
    model = onnx.ModelProto()
    if model.ParseFromString(skeleton) != len(skeleton):
        raise ValueError("trailing bytes")
    return model, cuts


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
    try:
        if any(True for _ in in_file_data(model)) or over_inline_limit(model):
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


def _checker_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for onnx.checker, its initializers' large raw payloads cut to one element of a
    [1, ..., 1] tensor.

    The checker copies the whole model to C++ and reads no weight value, only that each tensor's
    data fits its dims and type, which check_tensor_data has verified for the real dims. Building
    this copy never touches a payload: setting the real ones aside and back in place copied every
    weight twice (0.12 s of the 0.32 s that loading two 98 MiB models took)."""
    def cut(source: onnx.TensorProto, target: onnx.TensorProto) -> None:
        count, nbytes = math.prod(source.dims), expected_nbytes(source)
        in_place = is_in_place(source)  # (its data is checked in its file: check_tensor_data)
        if not in_place and (not source.HasField("raw_data") or not source.dims or source.data_type in SUBBYTE_BITS
                             or count <= 0 or nbytes is None or nbytes <= 4096):
            target.CopyFrom(source)
            return
        placement = {"external_data", "data_location"} if in_place else set()
        wire.copy_fields(source, target, {"raw_data", "dims"} | placement)
        target.dims.extend([1] * len(source.dims))
        target.raw_data = bytes(nbytes // max(count, 1))

    return copy_model(model, cut)
