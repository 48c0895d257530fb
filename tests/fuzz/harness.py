"""Run CLI commands on hostile files in a resource-limited worker, with a timeout, and judge them.

The worker is a separate Python process that imports onnx_resync once and runs `cli.main(argv)` for
each request, with its file descriptors 1 and 2 sent to files (so that anything written by C code,
ONNX Runtime included, is captured too). It runs under RLIMIT_AS (address space) and reports each
command's peak resident memory (VmHWM, reset before every command). The parent kills and restarts a
worker that does not answer within the timeout (a hang) or dies (a crash).

Outcomes of one command:
  ok             exit 0, and the result checks out (see `Runner.run_case`)
  error          a clean failure: exit 1 (check failed / not derived / not equivalent) or exit 2/3
                 with exactly one stderr line "onnx-resync: error: ..."
  internal       exit 5 "internal error": an exception the tool did not expect (a bug)
  traceback      an exception escaped main(), or "Traceback" on stderr
  noisy          a failure whose stderr is not exactly one error line (warnings, log spam)
  memory         exit 4 (out of memory), a MemoryError, or peak RSS past the bound
  hang           no answer within the timeout
  crash          the worker died (signal: segfault, abort, killed by the kernel)
  wrong          exit 0 but the result is wrong (e.g. undo does not restore the input's weights)
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAILURES = ("internal", "traceback", "noisy", "memory", "hang", "crash", "wrong")

DEFAULT_AS_LIMIT = 6 << 30  # address space of the worker: bounds what any one command may allocate
DEFAULT_RSS_LIMIT = 1 << 30  # peak resident memory of one command on a tiny hostile file
DEFAULT_TIMEOUT = 60.0


# ---- the worker (runs in its own process) -------------------------------------------------------
def _peak_rss_kb() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _compare_weights(a: str, b: str) -> str | None:
    """None when every weight of a equals b's byte for byte (the undo oracle), else the difference."""
    from onnx_resync.io import WeightStore, load_model

    sa, sb = WeightStore(load_model(a, check=False)), WeightStore(load_model(b, check=False))
    if sorted(sa.names()) != sorted(sb.names()):
        return "different weight names"
    for name in sa.names():
        x, y = sa.get(name), sb.get(name)
        if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            return f"weight {name!r} differs"
    return None


def _feeds_everywhere(session, rng) -> list[dict]:
    """Feeds that run every branch an input can select: bools both ways, small integer inputs
    (axes, counts) at each value 0..3, floats random; one feed per combination (capped)."""
    import itertools

    import numpy as np

    base, choices = {}, {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in i.shape]
        if np.prod(shape, dtype=np.float64) > 1 << 20:  # a huge declared input: not run here
            return []
        if i.type == "tensor(bool)":
            choices[i.name] = [np.full(shape, v) for v in (False, True)]
        elif i.type in ("tensor(int64)", "tensor(int32)"):
            dtype = np.int64 if "64" in i.type else np.int32
            choices[i.name] = [np.full(shape, v, dtype=dtype) for v in range(4)]
        elif i.type in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(i.type, np.float16)
            base[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            return []
    names = list(choices)
    return [dict(base, **dict(zip(names, combo)))
            for combo in itertools.islice(itertools.product(*(choices[n] for n in names)), 32)]


def _equivalent_everywhere(a: str, b: str) -> str | None:
    """None when b computes what a computes on every feed a runs (every branch), else why not."""
    import numpy as np
    import onnxruntime as ort

    try:
        sa = ort.InferenceSession(a, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a reference ONNX Runtime refuses: nothing to compare
        return None
    sb = ort.InferenceSession(b, providers=["CPUExecutionProvider"])
    for feed in _feeds_everywhere(sa, np.random.default_rng(0)):
        try:
            ra = sa.run(None, feed)
        except Exception:  # noqa: BLE001 - not a feed the model accepts
            continue
        rb = sb.run(None, feed)
        for name, x, y in zip([o.name for o in sa.get_outputs()], ra, rb):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                return f"output {name!r}: shape {x.shape} vs {y.shape}"
            if x.dtype.kind not in "fc":
                if not np.array_equal(x, y):
                    return f"output {name!r} differs"
                continue
            both = np.isfinite(x) & np.isfinite(y)
            if not np.array_equal(np.isfinite(x), np.isfinite(y)):
                return f"output {name!r}: non-finite values differ"
            scale = float(np.abs(x[both]).max(initial=0.0)) or 1.0
            err = float(np.abs(x[both].astype(np.float64) - y[both]).max(initial=0.0)) / scale
            if err > 1e-4:
                feed_desc = {k: v.tolist() for k, v in feed.items() if v.dtype.kind in "biu" and v.size <= 4}
                return f"output {name!r} differs (normalized error {err:.2e}) on feed {feed_desc}"
    return None


def worker_main(as_limit: int) -> None:
    if as_limit:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
    os.environ.pop("ONNX_RESYNC_DEBUG", None)
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    requests = os.fdopen(os.dup(0), "r")
    from onnx_resync import cli

    scratch = tempfile.mkdtemp(prefix="fuzz-worker-")
    out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in requests:
        req = json.loads(line)
        saved = os.dup(1), os.dup(2)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            _reset_peak_rss()
            t0 = time.perf_counter()
            escaped = None
            # each command warns as in a fresh process: entering catch_warnings resets every module's
            # "already warned here" registry (and the command's own filter changes end with it)
            context = warnings.catch_warnings()
            context.__enter__()
            try:
                if req.get("equivalent"):
                    diff = _equivalent_everywhere(*req["equivalent"])
                    rc = 0 if diff is None else 1
                    if diff:
                        print(diff, file=sys.stderr)
                elif req.get("compare"):
                    diff = _compare_weights(*req["compare"])
                    rc = 0 if diff is None else 1
                    if diff:
                        print(diff, file=sys.stderr)
                else:
                    rc = cli.main(req["argv"])
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code if isinstance(exc.code, int) else 2
            except MemoryError:
                rc, escaped = cli.OUT_OF_MEMORY, "MemoryError"
            except BaseException as exc:  # noqa: BLE001 - this is what the worker is here to catch
                import traceback

                rc, escaped = 98, f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                context.__exit__(None, None, None)
            seconds = time.perf_counter() - t0
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        peak = _peak_rss_kb()
        with open(out_path, "rb") as fh:
            stdout = fh.read(200_000).decode("utf-8", "replace")
        with open(err_path, "rb") as fh:
            stderr = fh.read(20_000).decode("utf-8", "replace")
        reply.write(json.dumps({"rc": rc, "stdout": stdout, "stderr": stderr, "escaped": escaped,
                                "seconds": seconds, "peak_rss_kb": peak}) + "\n")


# ---- the parent side -----------------------------------------------------------------------------
@dataclass
class Result:
    argv: list[str]
    outcome: str
    rc: int | None
    stderr: str = ""
    seconds: float = 0.0
    peak_rss_kb: int = 0
    why: str = ""

    def to_dict(self) -> dict:
        return {"argv": self.argv, "outcome": self.outcome, "rc": self.rc, "stderr": self.stderr[-2000:],
                "seconds": round(self.seconds, 3), "peak_rss_kb": self.peak_rss_kb, "why": self.why}


class Worker:
    def __init__(self, as_limit: int = DEFAULT_AS_LIMIT, timeout: float = DEFAULT_TIMEOUT,
                 package_root: str | os.PathLike | None = None, env: dict | None = None):
        self.as_limit, self.timeout = as_limit, timeout
        self.package_root = str(package_root or ROOT)  # where `onnx_resync` is imported from
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        env = dict(os.environ)
        env.pop("ONNX_RESYNC_DEBUG", None)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), self.package_root, env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from fuzz.harness import worker_main; worker_main({self.as_limit})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            cwd=tempfile.gettempdir(), start_new_session=True, text=True, bufsize=1)
        hello = self._read(120.0)
        if hello is None or "ready" not in hello:
            self.close()
            raise RuntimeError("fuzz worker did not start")

    def _read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"dead": True}

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None

    def request(self, req: dict) -> dict:
        if self.proc is None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            self.restarts += 1
            return {"dead": True, "signal": None}
        answer = self._read(self.timeout)
        if answer is None:
            self.close()
            self.restarts += 1
            return {"hang": True}
        if answer.get("dead"):
            rc = self.proc.wait()
            self.close()
            self.restarts += 1
            return {"dead": True, "signal": -rc if rc and rc < 0 else rc}
        return answer


def _analysis_only(argv: list[str]) -> bool:
    """Commands that never run the model: their memory is bounded by the file, so the RSS bound
    applies. (A tiny file may legitimately compute a huge tensor when ORT runs it: that is bounded
    by RLIMIT_AS and must end in a clean error, which the other outcomes check.)"""
    return bool(argv) and (argv[0] == "groups" or (argv[0] == "resync" and "--no-verify" in argv))


def classify(argv: list[str], answer: dict, rss_limit_kb: int) -> Result:
    if answer.get("hang"):
        return Result(argv, "hang", None, why="no answer within the timeout")
    if answer.get("dead"):
        sig = answer.get("signal")
        return Result(argv, "crash", None, why=f"worker died (signal/exit {sig})")
    rc, err = answer["rc"], answer["stderr"]
    r = Result(argv, "ok", rc, err, answer["seconds"], answer["peak_rss_kb"])
    lines = [l for l in err.strip().splitlines() if l.strip()]
    if answer.get("escaped") == "MemoryError" or rc == 6:  # cli.OUT_OF_MEMORY
        r.outcome, r.why = "memory", "out of memory"
    elif answer.get("escaped") or "Traceback (most recent call last)" in err:
        r.outcome, r.why = "traceback", answer.get("escaped") or "Traceback on stderr"
    elif rc == 5:
        r.outcome, r.why = "internal", lines[-1] if lines else "exit 5"
    elif answer["peak_rss_kb"] > rss_limit_kb and _analysis_only(argv):
        r.outcome, r.why = "memory", f"peak RSS {answer['peak_rss_kb'] // 1024} MiB"
    elif rc == 0:
        r.outcome = "ok"
    elif rc in (2, 3):
        if len(lines) != 1 or not lines[0].startswith("onnx-resync: error: "):
            r.outcome, r.why = "noisy", f"{len(lines)} stderr lines"
        else:
            r.outcome, r.why = "error", lines[0]
    elif rc in (1, 4, 7):
        # check failed / not equivalent / not derived (1), cannot check / cannot judge (4), resync's
        # restored model not equivalent (7): a verdict on stdout, or one error line
        if len(lines) > 1 or (lines and not lines[0].startswith(("onnx-resync: error: ", "not verified"))):
            r.outcome, r.why = "noisy", f"{len(lines)} stderr lines"
        else:
            r.outcome, r.why = "error", lines[0] if lines else "exit 1 (negative verdict)"
    else:
        r.outcome, r.why = "internal", f"unexpected exit code {rc}"
    return r


@dataclass
class CaseReport:
    category: str
    detail: str
    results: list[Result] = field(default_factory=list)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome in FAILURES]

    @property
    def outcome(self) -> str:
        """The case's overall outcome: its worst command (failure > error > ok)."""
        fails = self.failures
        if fails:
            return fails[0].outcome
        return "error" if any(r.outcome == "error" for r in self.results) else "ok"


def commands_available() -> set[str]:
    return {p.stem for p in (ROOT / "onnx_resync" / "commands").glob("*.py") if not p.stem.startswith("_")}


class Runner:
    """Runs every command on one case and checks results; keeps counts."""

    def __init__(self, as_limit: int = DEFAULT_AS_LIMIT, timeout: float = DEFAULT_TIMEOUT,
                 rss_limit: int = DEFAULT_RSS_LIMIT, device: str = "cpu", commands: set[str] | None = None,
                 package_root: str | os.PathLike | None = None, env: dict | None = None):
        self.worker = Worker(as_limit, timeout, package_root, env)
        self.rss_limit_kb = rss_limit // 1024
        self.device = device
        self.commands = commands or commands_available()
        self.command_outcomes: Counter = Counter()
        self.case_outcomes: Counter = Counter()
        self.by_category: dict[str, Counter] = {}
        self.commands_run = 0
        self.seconds = 0.0
        self.max_peak_kb = 0

    def close(self) -> None:
        self.worker.close()

    def _run(self, argv: list[str]) -> Result:
        t0 = time.perf_counter()
        answer = self.worker.request({"argv": argv})
        r = classify(argv, answer, self.rss_limit_kb)
        if r.seconds == 0.0:
            r.seconds = time.perf_counter() - t0
        self.commands_run += 1
        self.seconds += r.seconds
        self.max_peak_kb = max(self.max_peak_kb, r.peak_rss_kb)
        return r

    def _equivalent(self, a: str, b: str, argv: list[str]) -> Result | None:
        """The independent oracle for a written model: the same outputs on every branch."""
        answer = self.worker.request({"equivalent": [a, b]})
        if answer.get("rc") == 0:
            return None
        r = classify(argv, answer, self.rss_limit_kb)
        if r.outcome in ("ok", "error"):
            r.outcome, r.why = "wrong", answer.get("stderr", "").strip() or "not equivalent on some branch"
        return r

    def _compare(self, a: str, b: str, argv: list[str]) -> Result | None:
        answer = self.worker.request({"compare": [a, b]})
        if answer.get("rc") == 0:
            return None
        r = classify(argv, answer, self.rss_limit_kb)
        if r.outcome in ("ok", "error"):
            r.outcome, r.why = "wrong", answer.get("stderr", "").strip() or "undo did not restore the weights"
        return r

    def run_case(self, case, folder: str | os.PathLike, good: str) -> CaseReport:
        """Every command on the case's model `m` (written into folder); `good` is the unmutated seed."""
        from .cases import write_case

        folder = os.fspath(folder)
        m = write_case(case, folder)
        out = os.path.join(folder, "out")
        os.makedirs(out, exist_ok=True)
        dev = ["--device", self.device]
        report = CaseReport(case.category, case.detail)
        snapshot = _snapshot(folder)

        def run(argv, check_output=None):
            r = self._run(argv)
            if r.outcome == "ok" and check_output and not os.path.isfile(check_output):
                r.outcome, r.why = "wrong", f"exit 0 but {check_output} was not written"
            report.results.append(r)
            return r

        if "groups" in self.commands:
            r = run(["groups", m, "--json"])
            if r.outcome == "ok":
                pass  # stdout is JSON by construction; the walker's own checks ran
            run(["groups", m, "--slots"])
        if "permute" in self.commands:
            p, rec, u = (os.path.join(out, n) for n in ("p.onnx", "rec.json", "u.onnx"))
            r = run(["permute", m, "-o", p, "--record", rec, "--seed", "7", *dev], check_output=p)
            if r.outcome == "ok":
                bad = self._equivalent(m, p, ["(permuted computes the same on every branch)", m, p])
                if bad is not None:
                    report.results.append(bad)
            q = os.path.join(out, "q.onnx")
            r_unchecked = run(["permute", m, "-o", q, "--seed", "8", "--no-verify"], check_output=q)
            if r_unchecked.outcome == "ok":  # written without ORT: the walker alone must be right
                bad = self._equivalent(m, q, ["(unverified permute computes the same on every branch)", m, q])
                if bad is not None:
                    report.results.append(bad)
            if r.outcome == "ok":
                r2 = run(["permute", p, "-o", u, "--undo", rec, *dev], check_output=u)
                if r2.outcome == "ok":
                    bad = self._compare(m, u, ["(undo restores the input)", m, u])
                    if bad is not None:
                        report.results.append(bad)
        if "resync" in self.commands:
            s1, s2 = os.path.join(out, "s1.onnx"), os.path.join(out, "s2.onnx")
            run(["resync", m, "--reference", good, "-o", s1, *dev])
            run(["resync", good, "--reference", m, "-o", s2, *dev])
            run(["resync", m, "--reference", m, "--no-verify"])
        if "verify" in self.commands:
            run(["verify", m, good, *dev])
        if "audit" in self.commands:
            r = run(["audit", m, "--reference", good])
            if r.rc == 2 and "usage" in r.stderr:
                report.results.pop()
                run(["audit", m])
        changed = _snapshot(folder, skip=out)
        if changed != {k: v for k, v in snapshot.items() if not k.startswith(out)}:
            report.results.append(Result(["(inputs untouched)"], "wrong", None, why="an input file changed"))
        self._count(report)
        return report

    def _count(self, report: CaseReport) -> None:
        for r in report.results:
            self.command_outcomes[r.outcome] += 1
        self.case_outcomes[report.outcome] += 1
        self.by_category.setdefault(report.category, Counter())[report.outcome] += 1


def _snapshot(folder: str, skip: str | None = None) -> dict[str, tuple[int, int]]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        if skip and os.path.abspath(dirpath).startswith(os.path.abspath(skip)):
            continue
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                st = os.lstat(p)
                snap[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
    return snap


def write_good(folder: str | os.PathLike) -> dict[str, str]:
    """The unmutated seed models, one file each; returns {seed name: path}."""
    from .cases import SEEDS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in SEEDS.items():
        path = folder / f"{name}.onnx"
        path.write_bytes(build().SerializeToString())
        paths[name] = str(path)
    return paths
