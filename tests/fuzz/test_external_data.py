"""External data through every command: locations outside the model's folder (../, absolute,
symbolic links) are refused, missing or short data is a clear error, and nothing is read from
outside the folder."""

from __future__ import annotations

import pytest

from . import cases
from .conftest import assert_no_failure

REFUSED = {
    "parent": "leaves the model's folder",
    "backslash-parent": "is missing",  # a plain (odd) file name on POSIX
    "absolute": "is absolute",
    "symlink-outside": "leaves the model's folder",
    "symlink-dir-outside": "leaves the model's folder",
    "missing": "is missing",
    "short": "too short",
    "short-no-length": "too short",
    "offset-negative": "too short",
    "offset-text": "not an integer",
    "length-huge": "",  # too short, or dims disagree with the length
    "offset-past-end": "too short",
    "folder": "is not a regular file",
    "nul-in-location": "NUL byte",
    "empty-location": "without a location",
    "huge-dims-small-length": "declares dims",
    "dims-disagree-length": "declares dims",
    "symlink-inside": "symbolic link",  # links are refused even inside the folder (as ONNX does)
    "hardlink-outside": "hard links",
}
ACCEPTED = ("valid", "model-itself")


def test_every_kind_is_listed():
    assert set(REFUSED) | set(ACCEPTED) == set(cases.EXTERNAL_KINDS)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_by_every_command(kind, runner, good, tmp_path):
    case = cases.external_case(kind, "mlp")
    report = runner.run_case(case, tmp_path, good["mlp"])
    assert_no_failure(report)
    model = str(tmp_path / cases.MODEL)
    on_model = [r for r in report.results if model in r.argv]
    assert len(on_model) >= 6
    for r in on_model:
        assert r.outcome == "error" and r.rc == 3, (r.argv, r.outcome, r.why)
        assert "external data" in r.why or "tensor" in r.why, r.why
        assert REFUSED[kind] in r.why, r.why
    assert not (tmp_path / "out" / "p.onnx").exists()


@pytest.mark.parametrize("kind", ACCEPTED)
def test_accepted_inside_the_folder(kind, runner, good, tmp_path):
    """Data in the folder loads; permute + undo restores it byte for byte."""
    case = cases.external_case(kind, "mlp")
    report = runner.run_case(case, tmp_path, good["mlp"])
    assert_no_failure(report)
    if kind != "model-itself":  # the model's own bytes as weights: anything clean goes
        outcomes = {r.argv[0]: r.outcome for r in report.results}
        assert outcomes["groups"] == "ok" and outcomes["permute"] == "ok", report.results
