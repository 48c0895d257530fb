"""External-data layout: a model whose weights its file kept in an external-data file is saved the same way.

The *layout* of a file is where its external tensors' bytes lie: each one's place among the model's
tensors (iter_graph_tensors, in the file's node order), its name, its external_data entries (keys and
values as written), its offset and length, and the size of the data file. The loader remembers it
(remember) before it reads small external tensors into memory; a save *keeps* it (plan, write): every
tensor that was external is written external again, at the same offset with the same length, gaps and
tail zeros as in the source, its entries as they were except the location (the output's data file);
tensors that were inline stay inline. So `permute --undo` gives the source's bytes (a data file of the
same name: both files; otherwise all but the location string).

A layout is kept only where it can be: the tensors must share one data file, their ranges must not
overlap, the bytes between them must be zeros, their entries must be location/offset/length only (a
checksum would be wrong after a permutation), and at save time the same tensors must hold data of the
same lengths. Otherwise the save writes as before (lazy tensors aligned, small ones inline) and
`problem` says why, for the caller's notes.

The layout travels as metadata under LAYOUT_KEY (copies of the model carry it), which a save or
serialize() drops, as io/order.py does with the node order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from .external import data_length, external_info, is_in_place, iter_graph_tensors, over_inline_limit, set_external, \
    set_inline
from .lazy import LazyTensor, is_lazy_tensor

LAYOUT_KEY = "onnx-resync:external-layout"
KEPT_KEYS = {"location", "offset", "length"}
_ZEROS = bytes(64 << 10)  # (zeros written, gaps read, this many bytes at a time)


def external_entries(model: onnx.ModelProto) -> list[list]:
    """[position, name, entries, length] of each external tensor, in the file's order (read before the
    loader sorts the graph: the positions are those a save sees once io/order.py has put the file's
    order back); length None where neither declared nor known from dims and type."""
    found = []
    for k, t in enumerate(iter_graph_tensors(model.graph)):
        if t.data_location == onnx.TensorProto.EXTERNAL and len(t.external_data):
            entries = [[e.key, e.value] for e in t.external_data]
            try:
                length = data_length(t, dict(entries))
            except ValueError:  # check_external_data refuses it
                length = None
            found.append([k, t.name, entries, length])
    return found


def remember(model: onnx.ModelProto, found: list[list], base_dir: Path) -> None:
    """Store the layout of `found` (external_entries, read before sorting; the locations checked by
    check_external_data) on the model, or why it cannot be kept."""
    if not found:
        return
    try:
        value = {"tensors": _layout(found, base_dir)}
    except _Refused as exc:
        value = {"refused": str(exc)}
    except OSError as exc:
        value = {"refused": f"its data file cannot be read ({type(exc).__name__})"}
    model.metadata_props.add(key=LAYOUT_KEY, value=json.dumps(value, separators=(",", ":")))


class _Refused(Exception):
    pass


def _layout(found: list[list], base_dir: Path) -> dict:
    locations = set()
    rows = []
    for position, name, entries, length in found:
        info = dict(entries)
        unknown = sorted(set(info) - KEPT_KEYS)
        if unknown:
            raise _Refused(f"tensor {name!r} has external data entries {unknown} (written anew)")
        locations.add(os.path.normpath(info["location"]))
        if length is None:
            raise _Refused(f"tensor {name!r} has external data of unknown length")
        rows.append([position, name, int(info.get("offset", 0)), length, entries])
    if len(locations) > 1:
        raise _Refused(f"its tensors are in {len(locations)} data files")
    path = base_dir / next(iter(locations))
    size = os.stat(path).st_size
    end = 0
    with open(path, "rb") as fh:
        for _, name, offset, length, _ in sorted(rows, key=lambda r: (r[2], r[3])):
            if offset < end:
                raise _Refused(f"tensor {name!r} overlaps another in the data file")
            _check_zeros(fh, end, offset)
            end = offset + length
        _check_zeros(fh, end, size)
    return {"size": size, "rows": rows}


def _check_zeros(fh, start: int, stop: int) -> None:
    fh.seek(start)
    while start < stop:
        chunk = fh.read(min(stop - start, len(_ZEROS)))
        if not chunk:
            return
        if chunk.count(0) != len(chunk):
            raise _Refused("its data file holds other bytes between the tensors")
        start += len(chunk)


def take(model: onnx.ModelProto) -> tuple[dict | None, Callable[[], None] | None]:
    """The stored layout value (dropped from the model), and what puts it back; (None, None) if none."""
    entry = next((k for k, p in enumerate(model.metadata_props) if p.key == LAYOUT_KEY), None)
    if entry is None:
        return None, None
    props = [onnx.StringStringEntryProto(key=p.key, value=p.value) for p in model.metadata_props]
    del model.metadata_props[entry]

    def restore() -> None:
        del model.metadata_props[:]
        model.metadata_props.extend(props)

    try:
        value = json.loads(props[entry].value)
    except ValueError:
        value = {"refused": "its layout record is unreadable"}
    return value, restore


@dataclass
class Plan:
    """A layout to keep: (tensor, entries, offset, length) in offset order, and the data file's size."""
    rows: list
    size: int


def plan(model: onnx.ModelProto, value: dict | None) -> tuple[Plan | None, str | None]:
    """The layout to keep in this save (the model in its file's order), or why it cannot be kept
    (None, None: the file had no external data)."""
    if value is None:
        return None, None
    if "refused" in value:
        return None, str(value["refused"])
    layout = value["tensors"]
    tensors = list(iter_graph_tensors(model.graph))
    rows = []
    taken = set()
    for position, name, offset, length, entries in layout["rows"]:
        tensor = tensors[position] if position < len(tensors) else None
        if tensor is None or tensor.name != name:
            return None, f"tensor {name!r} is no longer where it was"
        if is_lazy_tensor(tensor) and not is_in_place(tensor):
            have = LazyTensor.of(tensor).nbytes
        elif tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
            have = len(tensor.raw_data)
        else:
            return None, f"tensor {name!r} is stored otherwise now"
        if have != length:
            return None, f"tensor {name!r} has {have} bytes now, {length} in its file"
        rows.append((tensor, entries, offset, length))
        taken.add(position)
    other = next((t for k, t in enumerate(tensors) if k not in taken and is_lazy_tensor(t) and not is_in_place(t)), None)
    if other is not None:
        return None, f"tensor {other.name!r} was not in the data file"
    if over_inline_limit(model):
        return None, "the model is past protobuf's 2 GiB limit now"
    return Plan(sorted(rows, key=lambda r: (r[2], r[3])), int(layout["size"])), None


def problem(model: onnx.ModelProto) -> str | None:
    """Why a save of this model will not keep its file's external-data layout (None: it will, or the
    file had none): for the caller's notes."""
    value, restore = take(model)
    if restore is None:
        return None
    try:
        from .order import put_back_file_order

        put_back = put_back_file_order(model)
        try:
            return plan(model, value)[1]
        finally:
            if put_back is not None:
                put_back()
    finally:
        restore()


def write(kept: Plan, fh, location: str, restore: list[Callable[[], None]], write_lazy) -> None:
    """Write the data file of a kept layout to fh, pointing each tensor at it (its entries as in the
    source, `location` the output's data file); `restore` gets what gives the caller's model back."""
    at = 0
    for tensor, entries, offset, length in kept.rows:
        _zeros(fh, offset - at)
        if is_lazy_tensor(tensor):
            written = write_lazy(tensor, fh)
            restore.append(lambda t=tensor, info=external_info(tensor): set_external(t, info))
        else:
            raw = tensor.raw_data
            fh.write(raw)
            written = len(raw)
            restore.append(lambda t=tensor, raw=raw, had=tensor.HasField("data_location"): set_inline(t, raw, had))
        if written != length:
            raise ValueError(f"weight {tensor.name!r}: wrote {written} bytes, expected {length}")
        set_external(tensor, {k: (location if k == "location" else v) for k, v in entries})
        at = offset + length
    _zeros(fh, kept.size - at)


def _zeros(fh, count: int) -> None:
    while count > 0:
        fh.write(_ZEROS[:min(count, len(_ZEROS))])
        count -= len(_ZEROS)

