"""The CLI run in a long-lived worker process: what `python -m onnx_resync ARGS` gives, without a
fresh interpreter for every command.

`run(*args, env=...)` sends ARGS to a worker (tests/fuzz/harness.Worker: a separate Python process
that imports onnx_resync once and calls `cli.main(argv)` for each request, its file descriptors 1 and
2 sent to files, so that whatever C code writes is captured too) and returns a
subprocess.CompletedProcess with the exit code, stdout and stderr a separate run gives: an exception
that escapes main() shows as its traceback on stderr and exit 98, a worker that dies as a negative
return code, one that does not answer within the timeout as subprocess.TimeoutExpired.

Why: a fresh interpreter imports onnx, ONNX Runtime, numpy and scipy (about a second of CPU on the CI
machine) before the command starts; the default suite ran ~150 such commands. The entry point
itself (`python -m onnx_resync`, the interpreter's exit status, signals, pipes) keeps its own
subprocess tests (test_cli_usage.py, test_safe_io.py, test_audit.py, fuzz/test_atomic.py).

One worker per distinct environment: variables such as ONNX_RESYNC_LAZY_BYTES are read when the
package is imported. Workers start on first use and end with the test session; no address-space
limit (the fuzz suite sets its own).
"""

from __future__ import annotations

import atexit
import os
import subprocess

from fuzz.harness import Worker

_WORKERS: dict[tuple, Worker] = {}


def run(*args, env: dict | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`python -m onnx_resync *args` with `env` added to os.environ, run by a worker."""
    argv = [os.fspath(a) for a in args]
    key = tuple(sorted((env or {}).items()))
    worker = _WORKERS.get(key)
    if worker is None:
        worker = _WORKERS[key] = Worker(as_limit=0, timeout=timeout, env=dict(env or {}))
    worker.timeout = timeout
    answer = worker.request({"argv": argv})
    if answer.get("hang"):
        raise subprocess.TimeoutExpired(["onnx-resync", *argv], timeout)
    if answer.get("dead"):
        return subprocess.CompletedProcess(argv, -(answer.get("signal") or 1), "",
                                           f"the worker died (signal/exit {answer.get('signal')})")
    return subprocess.CompletedProcess(argv, answer["rc"], answer["stdout"], answer["stderr"])


@atexit.register
def close() -> None:
    for worker in _WORKERS.values():
        worker.close()
    _WORKERS.clear()
