"""Hostile files through every CLI command: a clean one-line error or a correct result, never an
internal error, a traceback, a hang or memory past a bound (see harness.py for the outcomes).

Each case runs groups (x2), permute (+ undo, checked byte for byte), resync (both ways and against
itself), verify and audit (when present) in a worker under RLIMIT_AS with a timeout per command.
FUZZ_EXAMPLES sets the number of hypothesis examples (default 120); tools/fuzz.py runs the long
campaign.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import cases
from .conftest import assert_no_failure

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(category=st.sampled_from(cases.CATEGORIES), rnd=st.randoms(use_true_random=False))
def test_hostile_file_through_every_command(category, rnd, runner, good, tmp_path_factory):
    case = cases.make_case(category, rnd)
    report = runner.run_case(case, tmp_path_factory.mktemp(category), good[case.seed_model])
    assert_no_failure(report, xfail=False)


@pytest.mark.parametrize("category", cases.CATEGORIES)
def test_every_category(category, runner, good, tmp_path):
    """Two fixed draws per category, so that every family runs on every test run."""
    for k in range(2):
        case = cases.make_case(category, random.Random(f"{category}-{k}"))
        report = runner.run_case(case, tmp_path / str(k), good[case.seed_model])
        assert_no_failure(report)


def test_seed_models_round_trip(runner, good, tmp_path):
    """The unmutated seeds: every command succeeds (permute + undo restores the bytes)."""
    for name in cases.SEEDS:
        case = cases.Case("seed", name, {cases.MODEL: cases.seed_bytes(name)}, seed_model=name)
        report = runner.run_case(case, tmp_path / name, good[name])
        assert_no_failure(report)
        outcomes = {r.argv[0]: r.outcome for r in report.results}
        assert outcomes["groups"] == "ok" and outcomes["permute"] == "ok", report.results
        assert all(r.outcome == "ok" for r in report.results if r.argv[0] in ("resync", "verify")), \
            [(r.argv, r.why) for r in report.results]
