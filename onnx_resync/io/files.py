"""Files in and out: outputs never over an input (nor the external data it reads), nor over anything
but a regular file, written atomically; inputs read only from regular files, option files bounded.

An atomic write goes to a temp file in the target folder (temp_path), is fsynced, then renamed over
the target, and the folder is fsynced: a run killed at any point leaves the old file or the new one,
and an exception (the CLI turns SIGINT, SIGTERM and SIGHUP into one) removes the temp file.

Outputs (check_outputs, the one check every command's outputs go through before any work): a new
name or an existing regular file, in a folder that exists and can be written; a symbolic link is
refused, not followed (a rename replaces the link, not what it points to, and a link planted where
an output goes, say to /dev/fd/1 or another user's file, must not decide where the bytes land); no
two outputs name one file (path, inode, or the external-data file a model output may be saved with).
Inputs (open_input, read_input): only a regular file is opened (a FIFO would block, a device be read
until memory runs out); option files read whole are at most MAX_OPTION_FILE_BYTES.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

import onnx

from ..errors import UsageError
from .external import external_info, iter_graph_tensors

# A JSON option file read whole (a permutation record) or one line of a batch's JSONL: past this,
# one line and exit 2 (a record of a model with a million neurons is ~8 MiB).
MAX_OPTION_FILE_BYTES = 64 << 20


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def check_input_file(path: str | os.PathLike, *, what: str = "file", error: type = UsageError) -> os.stat_result:
    """A file to read must exist and be a regular file (links followed); else `error` in one line:
    '<path>: no such <what>', '<path> is a FIFO, not a regular file; refused'."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, ValueError) as exc:  # permissions, a name too long, a link loop, a NUL byte
        raise error(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise error(f"{path} is {kind}, not a regular file; refused")
    return st


def open_input(path: str | os.PathLike, *, what: str = "file", error: type = UsageError,
               buffering: int = -1) -> BinaryIO:
    """Open a file for reading only when it is a regular file: checked by name, then opened without
    blocking (O_NONBLOCK: a FIFO swapped in after the check does not wait for a writer) and checked
    again on the open descriptor (fstat), so what is read is what was checked."""
    check_input_file(path, what=what, error=error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise error(f"{path} is {kind}, not a regular file; refused")
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike, *, what: str = "file", error: type = UsageError,
               limit: int | None = None) -> bytes:
    """A regular file's bytes, at most `limit` (default MAX_OPTION_FILE_BYTES) of them (past that,
    `error` in one line)."""
    limit = MAX_OPTION_FILE_BYTES if limit is None else limit
    with open_input(path, what=what, error=error) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: {what} is larger than {_size(limit)}; refused")
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


def check_output_path(path: str | os.PathLike) -> None:
    """Fail early (before any slow work) for an output that cannot be written: no folder, a folder
    that cannot be written, a name that is a folder, a symbolic link, a FIFO, a device or a socket.
    (Checked again just before the rename: a name swapped meanwhile is not replaced either.)"""
    out = Path(path)
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    except (OSError, ValueError) as exc:
        raise UsageError(f"output {out} cannot be written ({getattr(exc, 'strerror', None) or exc})") from None
    if st is not None:
        kind = file_kind(st.st_mode)
        if kind == "a folder":
            raise UsageError(f"output {out} is a folder")
        if kind == "a symbolic link":
            raise UsageError(f"output {out} is a symbolic link; refused (name the file itself)")
        if kind is not None:
            raise UsageError(f"output {out} is {kind}, not a regular file; refused")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder} is not writable")


def check_outputs(outputs: Iterable[str | os.PathLike | None] = (), inputs: Iterable[str | os.PathLike] = (), *,
                  models: Iterable[str | os.PathLike | None] = ()) -> None:
    """The one check of a command's outputs, before any work (None entries are options not given).

    Each output (and each model output in `models`) must pass check_output_path and must not be an
    input or an input's external data (refuse_overwrite); no two of them may name one file: the same
    path, the same inode, or the external-data file a model output may be saved with beside it
    (data_candidates). UsageError (exit 2), one line, otherwise."""
    inputs = [i for i in inputs if i is not None]
    model_outs = [Path(m) for m in models if m is not None]
    plain = [Path(o) for o in outputs if o is not None]
    claimed: list[tuple[Path, Path]] = []  # (a file some output writes, that output)
    for out in model_outs + plain:
        refuse_overwrite(out, inputs)
        check_output_path(out)
        writes = [out] + ([out.parent / c for c in data_candidates(out)] if out in model_outs else [])
        for f in writes:
            for g, owner in claimed:
                if _same_name(f, g):
                    raise UsageError(_clash(f, out, g, owner))
            claimed.append((f, out))


def _clash(f: Path, out: Path, g: Path, owner: Path) -> str:
    if f == out and g == owner:
        both = str(out) if str(out) == str(owner) else f"{owner} and {out}"
        return f"two outputs name one file: {both}; refused"
    data, model = (out, owner) if g != owner else (owner, out)
    return f"output {data} is where the external data of model output {model} may be saved; refused"


def _same_name(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or _same_file(a, b)
    except (OSError, RuntimeError, ValueError):
        return os.path.abspath(a) == os.path.abspath(b)


def data_candidates(out: str | os.PathLike) -> list[str]:
    """The names of the external-data file a model saved as `out` may get beside it: two that
    alternate, so a new data file never replaces the one the old output reads (save.py)."""
    name = Path(out).name
    return [name + ".data", name + ".1.data"]


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
        check_output_path(out)  # still a regular file or absent: the rename replaces nothing else
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
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
    """A new empty file beside `name` (the caller removes it in `finally`); removed here when
    interrupted before it is handed over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file 0600; a saved model should get the usual mode (or keep the old file's).
        target = folder / name
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.is_file() else 0o666 & ~_umask())
    except (AttributeError, OSError):  # no fchmod on Windows
        pass
    except BaseException:  # a signal turned into an exception (cli.py)
        os.close(fd)
        os.unlink(tmp)
        raise
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
