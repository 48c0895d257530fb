"""A long fuzz campaign over every onnx-resync command; writes its statistics to docs/fuzz.md.

    python tools/fuzz.py --cases 5000 --jobs 2 --kills 40 --atheris 300
    python tools/fuzz.py --minutes 30 --save-failures tests/fuzz_corpus

Three parts (see tests/fuzz for the fast versions that run with the test suite):
1. hostile files (tests/fuzz/cases.py: byte damage and structured mutations, every family in turn)
   through every command in resource-limited workers (tests/fuzz/harness.py), each command judged
   ok / error (clean, one line) / internal / traceback / noisy / memory / hang / crash / wrong;
2. SIGKILL during writes: the CLI writing an 80 MB model killed at random moments; the target must
   always be the old or the new output and the input unchanged;
3. a coverage-guided atheris run over the loader and the walker (when atheris is installed).
Exit status 1 when anything failed (failures are listed, and saved with --save-failures).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the `fuzz` package (tests/fuzz), not this file

from fuzz import cases, harness  # noqa: E402

DOC = ROOT / "docs" / "fuzz.md"


# ---- 1. hostile files ------------------------------------------------------------------------------
IN_PLACE_ENV = {"ONNX_RESYNC_LAZY_BYTES": "0", "ONNX_RESYNC_IN_PLACE_MIN_TENSOR_BYTES": "0"}


class Campaign:
    def __init__(self, jobs: int, timeout: float, seed: str, save_dir: Path | None):
        self.jobs, self.timeout, self.seed, self.save_dir = jobs, timeout, seed, save_dir
        self.lock = threading.Lock()
        self.command_outcomes: collections.Counter = collections.Counter()
        self.by_command: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.by_category: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.case_outcomes: collections.Counter = collections.Counter()
        self.failures: list[dict] = []
        self.errors: collections.Counter = collections.Counter()  # first words of clean error messages
        self.cases = 0
        self.commands = 0
        self.peak_kb = 0
        self.slowest = (0.0, "")
        self.restarts = 0
        self.modes: collections.Counter = collections.Counter()

    def run(self, n_cases: int, deadline: float) -> None:
        root = Path(tempfile.mkdtemp(prefix="onnx-resync-fuzz-"))
        good = harness.write_good(root / "good")
        order = [cat for _ in range(n_cases // len(cases.CATEGORIES) + 1) for cat in cases.CATEGORIES][:n_cases]
        chunks = [order[k::self.jobs] for k in range(self.jobs)]
        try:
            with ThreadPoolExecutor(self.jobs) as pool:
                for f in [pool.submit(self._lane, k, chunk, root, good, deadline) for k, chunk in enumerate(chunks)]:
                    f.result()
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _lane(self, lane: int, categories: list[str], root: Path, good: dict, deadline: float) -> None:
        # each case read one of two ways, at random: parsed by protobuf, or (as files past 64 MiB are)
        # with the initializers' payloads mapped in place from the file (io.load_model, wire.py)
        runners = {"parsed": harness.Runner(timeout=self.timeout),
                   "in place": harness.Runner(timeout=self.timeout, env=IN_PLACE_ENV)}
        try:
            for i, category in enumerate(categories):
                if time.time() > deadline:
                    break
                rng = random.Random(f"{self.seed}-{lane}-{i}")
                case = cases.make_case(category, rng)
                mode = rng.choice(sorted(runners))
                folder = root / f"l{lane}-{i}"
                report = runners[mode].run_case(case, folder, good[case.seed_model])
                self._record(case, report, folder, mode)
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            for runner in runners.values():
                with self.lock:
                    self.restarts += runner.worker.restarts
                runner.close()

    def _record(self, case, report, folder: Path, mode: str) -> None:
        with self.lock:
            self.cases += 1
            self.modes[mode] += 1
            self.case_outcomes[report.outcome] += 1
            self.by_category[case.category][report.outcome] += 1
            for r in report.results:
                self.commands += 1
                self.command_outcomes[r.outcome] += 1
                self.by_command[r.argv[0].strip("()").split()[0]][r.outcome] += 1
                self.peak_kb = max(self.peak_kb, r.peak_rss_kb)
                if r.seconds > self.slowest[0]:
                    self.slowest = (r.seconds, f"{r.argv[0]} on {case.category} [{case.detail[:60]}]")
                if r.outcome == "error":
                    self.errors[_error_kind(r.why)] += 1
            if report.failures:
                fail = {"case": case.describe(), "results": [r.to_dict() for r in report.failures]}
                self.failures.append(fail)
                if self.save_dir is not None:
                    _save_case(case, report, self.save_dir)


def _error_kind(message: str) -> str:
    """A short family name for a clean error message (for the table of what the errors were)."""
    text = re.sub(r"^onnx-resync: error: ", "", message)
    text = re.sub(r"^\S*\.onnx: ", "", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|\d+", "_", text)
    return " ".join(text.split()[:6])[:70] or "exit 1 (negative verdict)"


def _save_case(case, report, corpus: Path) -> None:
    name = f"{case.category}-{abs(hash(case.detail)) % 10**8:08d}"
    d = corpus / name
    d.mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    first = report.failures[0]
    (d / "case.json").write_text(json.dumps({
        "category": case.category, "detail": case.detail, "seed_model": case.seed_model, "links": case.links,
        "once_failed": f"{first.argv[0]}: {first.outcome}: {first.why[:200]}"}, indent=1))


# ---- 2. SIGKILL during writes ----------------------------------------------------------------------
def kill_campaign(kills: int, seed: str) -> dict:
    import onnx

    from fuzz.test_atomic import big_mlp, weights_digest

    work = Path(tempfile.mkdtemp(prefix="onnx-resync-kill-"))
    stats = {}
    try:
        model = big_mlp()
        onnx.save(model, work / "inline.onnx")
        onnx.save(model, work / "ext.onnx", save_as_external_data=True, location="ext.onnx.data")
        inputs_before = _digests(work)
        for mode, src, env in (("one protobuf", "inline.onnx", {"ONNX_RESYNC_LAZY_BYTES": str(1 << 40)}),
                               ("in place, streamed", "inline.onnx", {"ONNX_RESYNC_LAZY_BYTES": "0"}),
                               ("lazy, external data", "ext.onnx", {"ONNX_RESYNC_LAZY_BYTES": "0"})):
            env = {**os.environ, **env}
            expected, duration = {}, 0.0
            for s in (1, 2):
                (work / f"ref{s}").mkdir(exist_ok=True)
                t0 = time.perf_counter()
                subprocess.run(_permute(work / src, work / f"ref{s}" / "t.onnx", s), env=env, check=True,
                               capture_output=True)
                duration = max(duration, time.perf_counter() - t0)
                expected[weights_digest(work / f"ref{s}" / "t.onnx")] = s
            out = work / f"out-{mode.split(',')[0].replace(' ', '-')}"
            out.mkdir()
            subprocess.run(_permute(work / src, out / "t.onnx", 1), env=env, check=True, capture_output=True)
            rng = random.Random(f"{seed}-{mode}")
            st = collections.Counter()
            current = 1  # the seed of the output now on disk
            for i in range(kills):
                new = 2 if current == 1 else 1
                proc = subprocess.Popen(_permute(work / src, out / "t.onnx", new), env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(0.2, 1.3) * duration)
                proc.send_signal(signal.SIGKILL)
                st["completed before the kill"] += proc.wait() == 0
                tmp = [p for p in out.iterdir() if p.name.endswith(".tmp")]
                st["killed during a write (temp files left)"] += bool(tmp)
                for p in tmp:
                    p.unlink()
                try:
                    got = expected.get(weights_digest(out / "t.onnx"))
                    st["target NEITHER old nor new" if got is None else
                       f"target = {'old' if got == current else 'new'} output"] += 1
                    current = got or current
                except Exception as exc:  # noqa: BLE001
                    st[f"target unreadable ({type(exc).__name__})"] += 1
                st["input changed"] += _digests(work, only=(src, src + ".data")) != {
                    k: v for k, v in inputs_before.items() if k in (src, src + ".data")}
            st["kills"] = kills
            stats[mode] = dict(st)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def _permute(src: Path, out: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "onnx_resync", "permute", str(src), "-o", str(out), "--no-verify", "--seed", str(seed)]


def _digests(folder: Path, only=None) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and (only is None or p.name in only)}


# ---- 3. atheris ------------------------------------------------------------------------------------
def atheris_run(seconds: int) -> dict | None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return None
    work = Path(tempfile.mkdtemp(prefix="onnx-resync-atheris-"))
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "fuzz" / "atheris_target.py"), f"-max_total_time={seconds}",
             "-timeout=30", "-rss_limit_mb=3000", "-max_len=65536", f"-artifact_prefix={work}/", str(work / "corpus")],
            capture_output=True, text=True, cwd=work, timeout=seconds + 300)
        done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", proc.stderr)
        runs, cov, ft, corp = (int(x) for x in done[-1]) if done else (0, 0, 0, 0)
        crashes = [p.name for p in work.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
        return {"seconds": seconds, "runs": runs, "coverage_edges": cov, "features": ft, "corpus": corp,
                "exit": proc.returncode, "crashes": crashes, "tail": proc.stderr[-1500:] if crashes or proc.returncode else ""}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------------
OUTCOMES = ["ok", "error", "internal", "traceback", "noisy", "memory", "hang", "crash", "wrong"]


def _table(rows: dict[str, collections.Counter], first: str) -> list[str]:
    cols = [o for o in OUTCOMES if any(c[o] for c in rows.values())]
    lines = [f"| {first} | " + " | ".join(cols) + " | total |", "|---" * (len(cols) + 2) + "|"]
    for name in sorted(rows):
        c = rows[name]
        lines.append(f"| {name} | " + " | ".join(str(c[o]) for o in cols) + f" | {sum(c.values())} |")
    return lines


def write_doc(camp: Campaign | None, kills: dict | None, ath: dict | None, seconds: float, args) -> str:
    lines = ["# Fuzzing onnx-resync", "",
             f"Campaign of {datetime.date.today().isoformat()} ({platform.python_version()}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs): `python tools/fuzz.py {' '.join(sys.argv[1:])}`,"
             f" {seconds / 60:.1f} minutes.", "",
             "Every hostile file goes through every command: `groups` (twice), `permute` (and, when it "
             "succeeds, `permute --undo`, checked to restore the input's weights byte for byte; and "
             "`permute --no-verify`: every written permutation is run by an independent oracle on every "
             "branch, bool inputs both ways and small integer inputs at each value), "
             "`resync` (the file as suspect, as reference, and against itself), `verify` and `audit`. "
             "Each command runs in a worker process under RLIMIT_AS (6 GiB) with a timeout; its outcome is "
             "`ok`, `error` (a clean failure: exit 1/4/7, or exit 2/3 with exactly one "
             "`onnx-resync: error:` line), or a failure: `internal` (exit 5), `traceback`, `noisy` (more "
             "than one stderr line), `memory` (exit 6 / MemoryError, or a graph-only command past 1 GiB of "
             "RSS), `hang`, `crash` (the worker died), `wrong` (exit 0 with a wrong result, or an input "
             "changed). Mutation families: `tests/fuzz/cases.py`. The fast version runs with the tests "
             "(`tests/fuzz`, under two minutes).", ""]
    if camp is not None:
        fails = sum(camp.command_outcomes[o] for o in harness.FAILURES)
        lines += ["## Hostile files", "",
                  f"- **{camp.cases} cases, {camp.commands} command runs**: "
                  + ", ".join(f"{camp.command_outcomes[o]} {o}" for o in OUTCOMES if camp.command_outcomes[o])
                  + f"; **{fails} failures**.",
                  f"- Cases by their worst command: " + ", ".join(f"{v} {k}" for k, v in camp.case_outcomes.most_common()),
                  "- Cases by how the files were read: " + ", ".join(f"{v} {k}" for k, v in sorted(camp.modes.items()))
                  + " (in place: the initializers' payloads memory-mapped from the model file, as for files "
                  "past 64 MiB, forced here).",
                  f"- Highest peak RSS of one command: {camp.peak_kb / 1024:.0f} MiB; slowest command: "
                  f"{camp.slowest[0]:.1f} s ({camp.slowest[1]}); worker restarts: {camp.restarts}.", "",
                  "By mutation family (outcome of the case's worst command):", ""]
        lines += _table(camp.by_category, "family") + ["", "By command (every run):", ""]
        lines += _table(camp.by_command, "command") + ["", "The clean errors, by kind (most frequent first):", ""]
        lines += ["| error | count |", "|---|---|"]
        lines += [f"| {k.replace('|', '/')} | {v} |" for k, v in camp.errors.most_common(25)]
        lines.append("")
        if camp.failures:
            lines += ["### Failures", ""]
            for f in camp.failures[:50]:
                r = f["results"][0]
                lines.append(f"- {f['case']['category']} [{f['case']['detail'][:80]}]: `{r['argv'][0]}` -> "
                             f"{r['outcome']}: {r['why'][:160]}")
            lines.append("")
    if kills:
        lines += ["## SIGKILL during writes", "",
                  "The CLI (`permute --no-verify`, seeds alternating so that old and new outputs differ) "
                  "writing an 80 MB model over an existing output, killed with SIGKILL at a random moment "
                  "of its run. After every kill the target must load and be exactly the old or the new "
                  "output; the input must be unchanged.", ""]
        keys = sorted({k for s in kills.values() for k in s})
        lines += ["| | " + " | ".join(kills) + " |", "|---" * (len(kills) + 1) + "|"]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(str(s.get(k, 0)) for s in kills.values()) + " |")
        lines.append("")
    if ath is not None:
        lines += ["## Coverage-guided (atheris / libFuzzer)", "",
                  f"`tests/fuzz/atheris_target.py` (bytes -> load_model -> walk, only ResyncError allowed) "
                  f"for {ath['seconds']} s: {ath['runs']} inputs, {ath['coverage_edges']} covered edges, "
                  f"{ath['features']} features, corpus of {ath['corpus']}; crashes/timeouts/ooms: "
                  f"{len(ath['crashes'])}.", ""]
    lines += ["## Bugs the fuzzing found (all fixed, each a regression case in `tests/fuzz_corpus`)", "",
              "- io: external-data location with a NUL byte -> ValueError (exit 5) in every command.",
              "- io: tensors whose data disagree with their dims (dims [3] over 72 bytes, a scalar over a "
              "matrix, dims 2**40 over 4 bytes) passed onnx.checker and crashed the walker "
              "(IndexError) or made numpy build the declared shape; now refused at load.",
              "- io: invalid UTF-8 in a name (a bit flip) came out of protobuf as bytes and crashed later.",
              "- io: symbolic/hard links were accepted by the memory-mapped path while ONNX's loader "
              "refused them; now refused everywhere.",
              "- runtime: a graph input with a fixed dim of 2**31 made verify/permute/resync allocate it "
              "(out of memory); now a one-line error.",
              "- walk: a rule meeting ranks or attributes it could not follow crashed (IndexError, "
              "TypeError in _conv, _gemm, tile, axes inputs, WalkContext.slot); now the node pins.",
              "- walk: node names with braces crashed the pin reason (str.format).",
              "- walk/match: a string-typed weight became a slot; resync crashed converting it to float.",
              "- walk: weight views reading one weight twice made `bases()` exponential.",
              "- save: the new external-data file replaced the old one before the model was renamed "
              "(a kill in between left the old model over new data); '-o' naming an input's external "
              "data was not refused; '-o' naming a folder or an unwritable path was an internal error.",
              "- audit: a model whose weights are memory-mapped (read in place, or past 64 MiB of external "
              "data) crashed audit's canonical form, which read tensors with numpy_helper; found by the "
              "first campaign that read files in place.",
              "- matcher: a NaN or Inf in a compared weight crashed the assignment; now a one-line refusal.",
              ""]
    text = "\n".join(lines)
    DOC.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2000, help="hostile files (default 2000)")
    p.add_argument("--minutes", type=float, default=0, help="stop the file part after this long (0: no limit)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2))), help="parallel workers")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per command before it counts as a hang")
    p.add_argument("--seed", default="campaign")
    p.add_argument("--kills", type=int, default=30, help="SIGKILLs per write path (0: skip)")
    p.add_argument("--atheris", type=int, default=120, help="seconds of atheris (0: skip)")
    p.add_argument("--save-failures", type=Path, help="save failing cases here (e.g. tests/fuzz_corpus)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/fuzz.md")
    args = p.parse_args(argv)
    t0 = time.time()
    camp = None
    if args.cases:
        camp = Campaign(args.jobs, args.timeout, args.seed, args.save_failures)
        deadline = t0 + args.minutes * 60 if args.minutes else float("inf")
        camp.run(args.cases, deadline)
        print(f"hostile files: {camp.cases} cases, {camp.commands} commands: {dict(camp.command_outcomes)}",
              file=sys.stderr)
        for f in camp.failures[:20]:
            r = f["results"][0]
            print(f"  FAIL {f['case']['category']} [{f['case']['detail'][:60]}] {r['argv'][0]}: {r['outcome']}: "
                  f"{r['why'][:150]}", file=sys.stderr)
    kills = kill_campaign(args.kills, args.seed) if args.kills else None
    if kills:
        print(f"kills: {json.dumps(kills)}", file=sys.stderr)
    ath = atheris_run(args.atheris) if args.atheris else None
    if ath:
        print(f"atheris: {json.dumps({k: v for k, v in ath.items() if k != 'tail'})}", file=sys.stderr)
    text = None if args.no_doc else write_doc(camp, kills, ath, time.time() - t0, args)
    if text:
        print(f"wrote {DOC}", file=sys.stderr)
    failed = bool(camp and camp.failures) or bool(ath and (ath["crashes"] or ath["exit"])) or any(
        s.get("target NEITHER old nor new") or s.get("input changed") or any(k.startswith("target unreadable") for k in s)
        for s in (kills or {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
