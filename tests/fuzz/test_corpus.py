"""Replay the regression corpus (tests/fuzz_corpus): inputs that once failed must not fail again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cases import Case
from .conftest import assert_no_failure

CORPUS = Path(__file__).resolve().parents[1] / "fuzz_corpus"


def load_case(folder: Path) -> Case:
    meta = json.loads((folder / "case.json").read_text())
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and not p.is_symlink() and p.name != "case.json"}
    return Case(meta["category"], meta.get("detail", folder.name), files, meta.get("links", {}),
                meta.get("seed_model", "mlp"))


ENTRIES = sorted(p for p in CORPUS.iterdir() if (p / "case.json").is_file()) if CORPUS.is_dir() else []


def test_corpus_is_there():
    assert len(ENTRIES) >= 10


@pytest.mark.parametrize("folder", ENTRIES, ids=[p.name for p in ENTRIES])
def test_corpus_entry(folder, runner, good, tmp_path):
    report = runner.run_case(load_case(folder), tmp_path, good[load_case(folder).seed_model])
    assert_no_failure(report)
