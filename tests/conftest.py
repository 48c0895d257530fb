"""Hypothesis profiles. The default suite is deterministic: every run draws the same examples, so
CI fails on a change, not on a lucky draw. `HYPOTHESIS_PROFILE=explore` draws fresh examples for a
search (tools/fuzz.sh-style runs); a failure it finds becomes a fixed regression test."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
