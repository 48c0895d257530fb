"""The exporter zoo of issue 14: every re-export of a bundled model is judged derived, with the right
kind, and not derived against the model's unrelated `_seed1` twin; the Llama-style decoder of
tools/build_decoder.py likewise, against its torch.onnx export and its seed-1 twin.

The zoo is built by tools/build_zoo.py into ~/.cache/onnx-resync/zoo (or $ONNX_RESYNC_ZOO); these
tests are skipped unless it is there and complete, so CI keeps its time budget. Audits run through
tools/zoo_audit.py (worker processes, a per-file timeout, results cached by the content hashes of
the two files and of the package's source: a rerun without code changes takes seconds).

Known false verdicts are listed in tests/zoo_known_failures.json (written by
`python tools/zoo_audit.py --write-known tests/zoo_known_failures.json`) and marked
xfail(strict=True) with today's wrong verdict: the suite stays green, and a fix that makes one
right fails its xfail: take it off the list then.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:  # appended: tools/fuzz.py must not shadow tests/fuzz
    sys.path.append(str(ROOT / "tools"))

import build_decoder  # noqa: E402
import build_zoo  # noqa: E402
import zoo_audit  # noqa: E402

pytestmark = pytest.mark.zoo
KNOWN = ROOT / "tests" / "zoo_known_failures.json"


def _zoo_tasks() -> tuple[list[dict], str | None]:
    """The zoo's audit tasks, or a reason to skip."""
    path = build_zoo.DEFAULT_CACHE / "manifest.json"
    if not path.exists():
        return [], f"no exporter zoo at {build_zoo.DEFAULT_CACHE} (python tools/build_zoo.py)"
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return [], f"{path} is not readable JSON"
    if manifest.get("zoo_version") != build_zoo.ZOO_VERSION or not manifest.get("complete"):
        return [], "the exporter zoo is incomplete or out of date (python tools/build_zoo.py)"
    for model in build_zoo.MODEL_NAMES:
        entry = manifest["models"][model]
        if entry.get("source_sha256") != build_zoo.sha256(build_zoo.MODELS / f"{model}.onnx"):
            return [], f"the zoo's {model} was built from another models/{model}.onnx (python tools/build_zoo.py)"
        for v in entry["variants"].values():
            if v.get("ok") and not Path(v["file"]).exists():
                return [], f"{v['file']} is missing (python tools/build_zoo.py)"
    for v in manifest["models"].get(build_decoder.DECODER, {}).get("variants", {}).values():
        if v.get("ok") and not Path(v["file"]).exists():
            return [], f"{v['file']} is missing (python tools/build_decoder.py)"
    return zoo_audit.tasks(manifest), None


TASKS, SKIP = _zoo_tasks()
_KNOWN = json.loads(KNOWN.read_text()) if KNOWN.exists() else {}


def _params():
    if SKIP:
        return [pytest.param(None, id="zoo", marks=pytest.mark.skip(reason=SKIP))]
    out = []
    for task in TASKS:
        tid = zoo_audit.task_id(task)
        marks = [pytest.mark.xfail(strict=True, reason=f"known: {_KNOWN[tid]}")] if tid in _KNOWN else []
        out.append(pytest.param(task, id=tid, marks=marks))
    return out


@pytest.fixture(scope="module")
def results():
    """Every task's audit record, audited once for the module (2 processes, 120 s a file)."""
    records, _ = zoo_audit.results_for(build_zoo.DEFAULT_CACHE, TASKS, jobs=2, timeout=zoo_audit.DEFAULT_TIMEOUT,
                                       log=lambda message: None)
    return {zoo_audit.task_id(t): rec for t, rec in records}


@pytest.mark.parametrize("task", _params())
def test_zoo_verdict(task, results):
    rec = results[zoo_audit.task_id(task)]
    right, why = zoo_audit.judge(task, rec)
    assert right, f"{zoo_audit.task_id(task)}: {why} | {zoo_audit.short_verdict(rec)}"


def test_decoder_is_in_the_zoo():
    """The Llama-style decoder (tools/build_decoder.py: torch.onnx dynamo and TorchScript, the
    onnxruntime-genai builder's fp32 and int4, permuted copies) is audited with the rest: each of its
    variants was built and checked with ONNX Runtime, so each has its two audits above."""
    if SKIP:
        pytest.skip(SKIP)
    entry = json.loads((build_zoo.DEFAULT_CACHE / "manifest.json").read_text())["models"].get(build_decoder.DECODER)
    if entry is None or entry.get("decoder_version") != build_decoder.DECODER_VERSION:
        pytest.skip("no decoder in the zoo, or an old one (python tools/build_decoder.py; it needs the genai venv)")
    failed = {v: r.get("error") for v, r in entry["variants"].items() if not r.get("ok")}
    assert not failed, failed
    audited = {t["variant"] for t in TASKS if t["model"] == build_decoder.DECODER}
    assert audited == set(build_decoder.VARIANTS)


def test_known_failures_name_zoo_files():
    """Every entry of the known-failure list names an audit the zoo makes (a renamed variant must not
    leave a stale xfail behind)."""
    if SKIP:
        pytest.skip(SKIP)
    ids = {zoo_audit.task_id(t) for t in TASKS}
    stale = sorted(set(_KNOWN) - ids)
    assert not stale, f"tests/zoo_known_failures.json names audits the zoo does not make: {stale[:5]}"
