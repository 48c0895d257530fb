"""The CLI run in a long-lived worker process: what `python -m onnx_resync ARGS` gives, without a
fresh interpreter for every command.

`run(*args, env=...)` sends ARGS to a worker (tests/fuzz/harness.Worker: a separate Python process
that imports onnx_resync once and calls `cli.main(argv)` for each request, its file descriptors 1 and
2 sent to files, so that whatever C code writes is captured too) and returns a
subprocess.CompletedProcess with the exit code, stdout and stderr a separate run gives: an exception
that escapes main() shows as its traceback on stderr and exit 98, a worker that dies as a negative
return code, one that does not answer within the timeout as subprocess.TimeoutExpired (the worker
is then killed; the next command starts a fresh one). The worker's stdout is read up to 200,000
characters, its stderr up to 20,000, and OMP_NUM_THREADS defaults to 1 there (harness.Worker).

Why: a fresh interpreter imports onnx, ONNX Runtime, numpy and scipy (about a second of CPU on the CI
machine) before the command starts; the default suite ran ~150 such commands. The entry point
itself (`python -m onnx_resync`, the interpreter's exit status, signals, pipes) keeps its own
subprocess tests (test_cli_usage.py, test_safe_io.py, test_audit.py, fuzz/test_atomic.py).

One worker per distinct environment: variables such as ONNX_RESYNC_LAZY_BYTES are read when the
package is imported. Workers start on first use and end with the test session; no address-space
limit unless `as_limit` asks for one (the fuzz suite keeps its own worker).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time

from fuzz.harness import Worker

_WORKERS: dict[tuple, Worker] = {}


def run(*args, env: dict | None = None, timeout: float = 300.0, as_limit: int = 0) -> subprocess.CompletedProcess:
    """`python -m onnx_resync *args` with `env` added to os.environ, run by a worker (whose address
    space is limited to `as_limit` bytes, if given). The result's `seconds`: the command's wall time."""
    argv = [os.fspath(a) for a in args]
    key = (tuple(sorted((env or {}).items())), as_limit)
    worker = _WORKERS.get(key)
    if worker is None:
        worker = _WORKERS[key] = Worker(as_limit=as_limit, timeout=timeout, env=dict(env or {}))
    worker.timeout = timeout
    t0 = time.perf_counter()
    answer = worker.request({"argv": argv})
    seconds = time.perf_counter() - t0
    if answer.get("hang"):
        raise subprocess.TimeoutExpired(["onnx-resync", *argv], timeout)
    if answer.get("dead"):
        done = subprocess.CompletedProcess(argv, -(answer.get("signal") or 1), "",
                                           f"the worker died (signal/exit {answer.get('signal')})")
    else:
        done = subprocess.CompletedProcess(argv, answer["rc"], answer["stdout"], answer["stderr"])
    done.seconds = seconds
    return done


@atexit.register
def close() -> None:
    for worker in _WORKERS.values():
        worker.close()
    _WORKERS.clear()
