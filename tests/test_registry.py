"""The op registry is proven op by op: every declaration (walk/registry.py) has a case in
tests/op_cases.py, a small model with the op on a channel axis between producers, and each case is
walked, permuted, verified with ONNX Runtime and undone to the original bytes.

- an op that lets channels through: one group slots the weights on both sides of it;
- an op without a rule (listed below with why): the channels reaching it are pinned, the walk
  names the op, and no group slots the producer's weights;
- permute (seeded, with a record) verifies inside api.permute and again with verify.verify on
  other random inputs; undoing the record gives the original file byte for byte;
- ONNX Runtime's CPU build must run every case except those in op_cases.ORT_CANNOT_RUN, and must
  refuse those (the list stays exact).

A declaration added without a case fails test_every_registered_op_has_a_case, naming the op; a rule
given to an op listed in RULELESS fails test_ops_without_rule_are_listed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_resync import api
from onnx_resync.errors import CheckFailed
from onnx_resync.verify import verify
from onnx_resync.walk import registry

from op_cases import CASES, CHECKER_REFUSES, ORT_CANNOT_RUN, OUTPUT_PIN, VARIANTS

# ops the registry knows but the walker has no rule for (it pins what reaches them): name -> why
RULELESS: dict[str, str] = {
    "DepthToSpace": "channels and space trade places in blocks of blocksize^2; the walker has no label "
                    "for a channel spread over pixels",
    "SpaceToDepth": "the reverse of DepthToSpace: pixels become channels in blocks the walker does not model",
    "NonZero": "returns the coordinates of nonzero values: how many and which depend on the data",
    "com.microsoft.QLinearReduceMean": "no rule yet (the float ReduceMean has one); ONNX Runtime has no "
                                       "CPU kernel for it either",
}

# cases that show a walker bug (the rule's owner fixes it): name -> what goes wrong
XFAIL: dict = {}  # case name -> (exception, reason): walker bugs not fixed yet (none now)


def _params():
    for case in list(CASES.values()) + VARIANTS:
        marks = []
        if case.name in XFAIL:
            raises, reason = XFAIL[case.name]
            marks = [pytest.mark.xfail(strict=True, raises=raises, reason=reason)]
        yield pytest.param(case, id=case.name, marks=marks)


def test_every_registered_op_has_a_case():
    registered = {(s.domain, s.op_type): s.name for s in registry.specs()}
    missing = sorted(name for key, name in registered.items() if key not in CASES)
    assert not missing, f"declared in the op registry without a case in tests/op_cases.py: {missing}"
    stray = sorted(c.name for key, c in CASES.items() if key not in registered)
    assert not stray, f"cases for ops the registry does not declare: {stray}"


def test_ops_without_rule_are_listed():
    ruleless = {s.name for s in registry.specs() if s.rule is None}
    assert sorted(ruleless - set(RULELESS)) == [], "ops declared with rule=None: add them to RULELESS with why"
    assert sorted(set(RULELESS) - ruleless) == [], "these ops have a rule now: drop them from RULELESS"


def test_lists_name_cases():
    names = {c.name for c in list(CASES.values()) + VARIANTS}
    assert len(names) == len(CASES) + len(VARIANTS)
    assert set(ORT_CANNOT_RUN) <= names and set(XFAIL) <= names


def _ort_runs(path) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {}
    for i in session.get_inputs():
        feed[i.name] = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
    session.run(None, feed)


@pytest.mark.parametrize("case", list(_params()))
def test_op(case, tmp_path):
    src, out, back, record = (tmp_path / n for n in ("model.onnx", "permuted.onnx", "undone.onnx", "record.json"))
    model = case.build()
    if case.op not in CHECKER_REFUSES:
        onnx.checker.check_model(model, full_check=True)
    onnx.save(model, src)

    result = api.groups(src)
    slotted = [{s.weight for s in g.slots} for g in result.groups]
    for weights in case.touch:
        assert any(weights <= s for s in slotted), f"no group slots all of {sorted(weights)}: {slotted}"
    reasons = [p.reason for p in result.pinned]
    if case.pinned:
        assert any(case.pinned in r for r in reasons), reasons
    else:
        assert set(reasons) <= {OUTPUT_PIN}, reasons
    for weight in case.free:
        assert not any(weight in s for s in slotted), f"{weight} is slotted: {slotted}"
    assert (case.name in result.ops_without_rule) == (case.name in RULELESS), result.ops_without_rule
    assert not result.ops_without_rule or case.name in RULELESS  # the model's other ops all have rules

    runs = case.name not in ORT_CANNOT_RUN
    if not runs:
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the case lists why
            _ort_runs(src)
    _, info = api.permute(src, out, seed=11, record_path=record, check=runs)
    if case.touch:
        assert info.neurons_moved > 0
    if runs:
        assert info.verified
        report = verify(src, out, samples=2, seed=5)
        assert report.equivalent, report.format_text()
    api.permute(out, back, undo=record, check=runs)
    assert back.read_bytes() == src.read_bytes()
