"""Output files: never over an input (nor the external data it reads), written atomically.

An atomic write goes to a temp file in the target folder (temp_path), is fsynced, then renamed over
the target, and the folder is fsynced: a run killed at any point leaves the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import onnx

from ..errors import UsageError
from .external import external_info, iter_graph_tensors


def check_output_path(path: str | os.PathLike) -> None:
    """Fail early (before any slow work) for an output that cannot be written: no folder, a folder."""
    out = Path(path)
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder")


def refuse_overwrite(out_path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise UsageError when out_path names one of the inputs or their external data (also through
    symbolic or hard links)."""
    out = Path(out_path)
    for inp in inputs:
        inp = Path(inp)
        if out.resolve() == inp.resolve() or _same_file(out, inp):
            raise UsageError(f"output {out} is an input file; refusing to overwrite it")
    for data in protected_files(inputs):
        if is_one_of(out, [data]):
            raise UsageError(f"output {out} is the external data of an input; refusing to overwrite it")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON record, report) with the same temp-then-rename guarantee."""
    out = Path(path)
    check_output_path(out)
    tmp = temp_path(out.parent, out.name)
    try:
        write_bytes(tmp, [text.encode()])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_bytes(path: Path, chunks: Iterable) -> None:
    """Write the chunks as they come (a streamed one is valid only until the next is made)."""
    with open(path, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(folder: Path) -> None:
    """Make the renames durable (a power cut after the rename keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file 0600; a saved model should get the usual mode (or keep the old file's).
        target = folder / name
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
    except (AttributeError, OSError):  # no fchmod on Windows
        pass
    finally:
        os.close(fd)
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def data_files_of(model_path: Path) -> set[str]:
    """External-data locations of an existing (small, external-data) model file; empty if none/unreadable."""
    try:
        if not model_path.is_file() or model_path.stat().st_size > 64 << 20:
            return set()
        model = onnx.load_model(str(model_path), load_external_data=False)
        return {external_info(t).get("location", "") for t in iter_graph_tensors(model.graph)
                if t.data_location == onnx.TensorProto.EXTERNAL}
    except Exception:  # noqa: BLE001 - a broken old output uses no data file we need to keep
        return set()


def protected_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The input files and the external-data files they read."""
    files = []
    for inp in inputs:
        inp = Path(inp)
        files.append(inp)
        files.extend(inp.parent / loc for loc in data_files_of(inp) if loc and "\x00" not in loc)
    return files


def is_one_of(path: Path, files: Iterable[Path]) -> bool:
    for f in files:
        try:
            if path.resolve() == f.resolve() or _same_file(path, f):
                return True
        except (OSError, RuntimeError, ValueError):
            continue
    return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
