"""Saving: atomically to a new path, never over an input; lazy payloads streamed, never whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import onnx

from . import files, layout, wire
from ..errors import UsageError
from .external import external_info, is_in_place, iter_graph_tensors, over_inline_limit, set_external, \
    set_inline
from .order import put_back_file_order
from .lazy import LazyTensor, is_lazy_model, is_lazy_tensor


def save_model(
    model: onnx.ModelProto, out_path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Write atomically: temp files in the target folder, then rename; never over an input.

    A model loaded from a file with external data keeps that file's layout (io/layout.py) where it
    can, its data in '<name>.data' beside the file. Otherwise models past the protobuf limit get their
    large tensors, and lazy models their lazy tensors, in '<name>.data'.
    A run killed at any point leaves the old output or the complete new one.
    """
    out = Path(out_path)
    inputs = list(inputs)
    files.refuse_overwrite(out, inputs)
    files.check_output_path(out)
    folder = out.parent
    candidates = _data_candidates(out)
    old_data = files.data_files_of(out) & set(candidates)  # our data file that the current output uses
    tmp_paths: list[Path] = []
    try:
        restore: list[Callable[[], None]] = []
        try:
            put_back = put_back_file_order(model)  # a graph the loader sorted: its file's order again
            if put_back is not None:
                restore.append(put_back)
            value, put_layout = layout.take(model)  # the file's external-data layout, kept if it can be
            if put_layout is not None:
                restore.append(put_layout)
            kept, _ = layout.plan(model, value)
            move_inline = kept is None and over_inline_limit(model)
            streamed = kept is None and not move_inline and streams_inline(model)
            external = kept is not None or move_inline or (is_lazy_model(model) and not streamed)
            data_name = _data_name(out, inputs, candidates, old_data) if external else None
            if external:
                tmp_paths.append(files.temp_path(folder, data_name))  # (listed at once, for the finally)
                data_tmp = tmp_paths[-1]
                if kept is not None:
                    _write_kept_layout(kept, data_tmp, data_name, restore)
                    streamed = streams_inline(model)  # the tensors mapped in place, if any, stay inline
                else:
                    _write_external_data(model, data_tmp, data_name, restore, move_inline)
            tmp_paths.append(files.temp_path(folder, out.name))
            model_tmp = tmp_paths[-1]
            files.write_bytes(model_tmp, _inline_chunks(model) if streamed else [model.SerializeToString()])
        finally:
            for undo in reversed(restore):  # give the caller's model its data back, byte for byte
                undo()
        files.check_output_path(out)  # still a regular file or absent: the rename replaces nothing else
        if external:
            if not _replaceable(folder / data_name):
                raise UsageError(f"{folder / data_name} is no longer a regular file; nothing written")
            os.replace(data_tmp, folder / data_name)
        os.replace(model_tmp, out)
        files.fsync_dir(folder)
        for stale in old_data - {data_name}:  # the previous output's data file, now unused
            if not files.is_one_of(folder / stale, files.protected_files(inputs)):
                (folder / stale).unlink(missing_ok=True)
    finally:  # also on KeyboardInterrupt and the CLI's SIGTERM/SIGHUP (cli.py): no temp file left
        for p in tmp_paths:
            p.unlink(missing_ok=True)
    return out


def _data_name(out: Path, inputs: list, candidates: list[str], old_data: set[str]) -> str:
    """The output's data-file name: never the one the current output reads (a kill between the two
    renames would leave the old model over new data), nor an input's."""
    protected = files.protected_files(inputs)
    name = next((c for c in candidates if c not in old_data and not files.is_one_of(out.parent / c, protected)
                 and _replaceable(out.parent / c)), None)
    if name is None:
        raise UsageError(f"no name for {out}'s external data ({' or '.join(candidates)}) that is neither an "
                         "input file nor a link or special file")
    return name


def _data_candidates(out: Path) -> list[str]:
    """Two names that alternate, so a new data file never replaces the one the old output reads."""
    return files.data_candidates(out)


def _replaceable(path: Path) -> bool:
    """A data file name that a rename may take: absent, or a regular file (never a link, a FIFO, a device)."""
    try:
        return files.file_kind(os.lstat(path).st_mode) is None
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False


def streams_inline(model: onnx.ModelProto) -> bool:
    """A lazy model whose every lazy tensor was inline in its file (a graph initializer mapped in
    place, or computed from one): it is written inline again, its payloads streamed."""
    lazy = [t for t in iter_graph_tensors(model.graph) if is_lazy_tensor(t)]
    return bool(lazy) and all(is_in_place(t) for t in lazy) and len(lazy) == sum(
        is_lazy_tensor(t) for t in model.graph.initializer)


def serialize(model: onnx.ModelProto) -> bytes:
    """model.SerializeToString(), also for a model whose weights are mapped in place or computed
    (and a graph the loader sorted in its file's order)."""
    put_back = put_back_file_order(model)
    _, put_layout = layout.take(model)  # (a save's business: not in the bytes)
    try:
        return _serialize(model)
    finally:
        if put_layout is not None:
            put_layout()
        if put_back is not None:
            put_back()


def _serialize(model: onnx.ModelProto) -> bytes:
    if streams_inline(model) and not over_inline_limit(model):
        out = bytearray()
        for chunk in _inline_chunks(model):  # (each valid only until the next is made: no join)
            out += chunk
        return bytes(out)
    if is_lazy_model(model):
        raise UsageError("a model with lazy external data cannot be serialized in one piece; save it")
    return model.SerializeToString()


def _inline_chunks(model: onnx.ModelProto) -> Iterator:
    return wire.model_chunks(model, is_lazy_tensor, _payload)


def _payload(tensor: onnx.TensorProto) -> tuple[int, Iterator[memoryview]]:
    """A lazy tensor's length in bytes and its bytes in pieces (each valid until the next is asked for)."""
    lazy = LazyTensor.of(tensor)
    return lazy.nbytes, lazy.pieces()


def _write_external_data(model: onnx.ModelProto, data_path: Path, location: str,
                         restore: list[Callable[[], None]], move_inline: bool) -> None:
    """Write lazy tensors (streamed one at a time) and, when the model is past the protobuf limit,
    every large inline tensor into data_path, pointing the tensors at it; `restore` gets (as it goes,
    so that a failure half-way can still be undone) what gives the caller's model back."""
    with open(data_path, "wb") as fh:
        for tensor in iter_graph_tensors(model.graph):
            if is_lazy_tensor(tensor):
                fh.write(b"\0" * (-fh.tell() % 64))  # aligned, for memory-mapping
                offset = fh.tell()
                length = _write_lazy(tensor, fh)
                restore.append(lambda t=tensor, info=external_info(tensor): set_external(t, info))
                set_external(tensor, {"location": location, "offset": str(offset), "length": str(length)})
                continue
            if not move_inline or not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                continue
            offset = fh.tell()
            raw = tensor.raw_data
            fh.write(raw)
            restore.append(lambda t=tensor, raw=raw, had=tensor.HasField("data_location"): set_inline(t, raw, had))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        fh.flush()
        os.fsync(fh.fileno())


def _write_kept_layout(kept: "layout.Plan", data_path: Path, location: str,
                       restore: list[Callable[[], None]]) -> None:
    """The data file of a layout kept from the source file (io/layout.py), lazy tensors streamed."""
    with open(data_path, "wb") as fh:
        layout.write(kept, fh, location, restore, _write_lazy)
        fh.flush()
        os.fsync(fh.fileno())


def _write_lazy(tensor: onnx.TensorProto, fh) -> int:
    """Append a lazy tensor's bytes to fh; returns the length. (A function of its own: no piece
    outlives it, so the next tensor's pieces are made with this one's freed.)"""
    length, pieces = _payload(tensor)
    for piece in pieces:
        fh.write(piece)
    return length

