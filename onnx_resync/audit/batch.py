"""Batch audit: many suspects against one reference, in parallel processes, resumable from a JSONL file.

Every result line names the suspect and the reference by content hash (`sha256`, `reference_sha256`:
permute.model_sha256, the model file and its external data, streamed). A rerun with the same JSONL
skips a file only when both hashes equal those of its latest line; a file that changed (or whose
reference changed, or whose line has no hash) is audited again, and the new line, which says why
(`reaudited`), supersedes the old one. Lines that cannot be used (not JSON, a line cut short by a
killed run, not an object, no path in "file") are skipped with a warning.

Reached through `api.audit_many`; the `audit` command only parses arguments and prints.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LoadError, ResyncError, UsageError
from ..io import MAX_OPTION_FILE_BYTES, check_input_file, check_outputs, open_input
from ..permute import model_sha256
from .report import audit_file

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_WARNED_LINES = 5  # bad JSONL lines named one by one; past that, counted


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BatchAudit:
    """The files of a batch, split into results reused from the JSONL and files to audit; iterate to
    get one record per file: the reused ones first (marked "from_earlier_run"), then each new one as it
    finishes (appended to the JSONL, flushed and synced, before it is yielded)."""

    def __init__(self, suspects, reference, *, jobs: int = 1, jsonl=None, retry_errors: bool = False,
                 detail: bool = False, log: Callable[[str], None] | None = log_to_stderr):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise UsageError("jobs must be a positive integer")
        self.reference = os.fspath(reference)
        self.suspects = list(dict.fromkeys(os.fspath(s) for s in suspects))
        if not self.suspects:
            raise UsageError("no suspect files to audit")
        self.jobs, self.detail = jobs, detail
        self.jsonl = os.fspath(jsonl) if jsonl is not None else None
        self.log = log or (lambda message: None)
        if self.jsonl is not None:
            check_outputs([self.jsonl], [self.reference, *self.suspects])
        if os.path.exists(self.reference):  # a FIFO would block the hashing (a missing one: each audit says so)
            check_input_file(self.reference, what="file", error=LoadError)
        self.reference_sha256 = _sha256_or_none(self.reference)
        self.reused: list[dict] = []
        self.todo: list[str] = []
        self.reasons: dict[str, str] = {}  # file -> why it is audited again
        done = read_jsonl(self.jsonl, self.log) if self.jsonl is not None else {}
        for s in self.suspects:
            old = done.get(_key(s))
            if old is None:
                self.todo.append(s)
                continue
            reason = "retrying an earlier error" if retry_errors and not old["ok"] else self._changed(old, s)
            if reason is None:
                self.reused.append(old)
            else:
                self.todo.append(s)
                self.reasons[s] = reason

    def _changed(self, old: dict, suspect: str) -> str | None:
        """Why an earlier line cannot stand for the file now; None when both hashes match."""
        if not isinstance(old.get("sha256"), str) or not isinstance(old.get("reference_sha256"), str):
            return "its earlier line has no content hash"
        if self.reference_sha256 is None or old["reference_sha256"] != self.reference_sha256:
            return "the reference changed since the earlier run"
        if old["sha256"] != _sha256_or_none(suspect):
            return "the file changed since the earlier run"
        return None

    def __iter__(self) -> Iterator[dict]:
        for record in self.reused:
            yield {**record, "from_earlier_run": True}
        if not self.todo:
            return
        out = _open_jsonl(self.jsonl) if self.jsonl is not None else None
        work = functools.partial(_audit_one, reference=self.reference, reference_sha256=self.reference_sha256,
                                 detail=self.detail)
        try:
            for record in _results(work, self.todo, self.jobs):
                reason = self.reasons.get(record.get("file"))
                if reason is not None:
                    record["reaudited"] = reason
                if out is not None:
                    out.write(json.dumps(record, allow_nan=False) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                yield record
        finally:
            if out is not None:
                out.close()


def _audit_one(suspect: str, *, reference: str, reference_sha256: str | None, detail: bool) -> dict:
    """Worker: the file's hash (read before it is audited), then audit_file's record; never raises."""
    sha = _sha256_or_none(suspect)
    record = audit_file(suspect, reference, detail=detail)
    return {"file": record.pop("file"), "reference": record.pop("reference"), "sha256": sha,
            "reference_sha256": reference_sha256, **record}


def _sha256_or_none(path: str) -> str | None:
    try:
        return model_sha256(path)
    except (OSError, ValueError, ResyncError):
        return None  # unreadable, or not a regular file: never matches, so the file is audited (its error recorded)


def _results(work, files: list[str], jobs: int) -> Iterator[dict]:
    """One record per file as each finishes (in parallel when jobs > 1)."""
    if jobs == 1 or len(files) <= 1:
        for f in files:
            yield work(f)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process; same on every OS
    workers = min(jobs, len(files))
    # each worker's BLAS gets its share of the cores (N workers x all-core thread pools thrash);
    # the workers are spawned fresh, so they read these before importing numpy
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for k in THREAD_VARS:
        os.environ.setdefault(k, share)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(work, f): f for f in files}
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    yield {"file": futures[fut], "reference": work.keywords.get("reference"), "sha256": None,
                           "reference_sha256": work.keywords.get("reference_sha256"), "ok": False,
                           "exit_code": 3, "error": "worker process died (crash or out of memory); rerun with "
                                                    "--retry-errors to try the unfinished files again"}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _key(path: str) -> str:
    return os.path.realpath(path)


def read_jsonl(path: str | os.PathLike, log: Callable[[str], None] = log_to_stderr) -> dict[str, dict]:
    """The latest usable line of each file (by real path). A line that is not JSON (one cut short by
    a killed run), not an object, or without a path in "file", "ok" and "exit_code" is skipped with a
    warning through `log`. The file must be a regular file (UsageError otherwise: a FIFO would block, a
    device be read until memory runs out); a line past MAX_OPTION_FILE_BYTES is skipped too."""
    done: dict[str, dict] = {}
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return done
    bad = 0
    with open_input(p, what="JSONL file") as fh:
        for number, raw in enumerate(iter(lambda: fh.readline(MAX_OPTION_FILE_BYTES + 1), b""), 1):
            if len(raw) > MAX_OPTION_FILE_BYTES:  # the rest of the line, read in bounded pieces, is dropped
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(MAX_OPTION_FILE_BYTES + 1)
                bad += 1
                if bad <= _WARNED_LINES:
                    log(f"warning: {path}: line {number} skipped (longer than {MAX_OPTION_FILE_BYTES >> 20} MiB)")
                continue
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            record, problem = _parse_line(text)
            if problem is None:
                try:
                    key = _key(record["file"])
                except (ValueError, OSError):
                    problem = '"file" is not a usable path'
            if problem is not None:
                bad += 1
                if bad <= _WARNED_LINES:
                    log(f"warning: {path}: line {number} skipped ({problem})")
                continue
            done[key] = record
    if bad > _WARNED_LINES:
        log(f"warning: {path}: {bad} lines skipped in all")
    return done


def _parse_line(text: str) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(text)
    except RecursionError:
        return None, "JSON nested too deep"
    except ValueError:
        return None, "not JSON: cut short by a killed run?"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("file"), str) or not record["file"]:
        return None, '"file" is not a path string'
    if not isinstance(record.get("ok"), bool) or isinstance(record.get("exit_code"), bool) \
            or not isinstance(record.get("exit_code"), int):
        return None, 'no boolean "ok" and integer "exit_code"'
    return record, None


def _open_jsonl(path: str):
    p = Path(path)
    fh = open(p, "a+b")
    fh.seek(0, os.SEEK_END)
    if fh.tell() > 0:  # a killed run may have left half a line: start on a fresh one
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        if last != b"\n":
            fh.write(b"\n")
    fh.close()
    return open(p, "a", encoding="utf-8")
