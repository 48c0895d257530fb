"""The structural campaign (issue 18): valid files whose weights are read where the walker does not
follow (If/Loop/Scan bodies, nested Ifs, graph outputs, overridable graph inputs, run-time axes),
every kind on every seed model. Every command must end in a correct result or one clean line; a
written model is checked by an independent oracle on every branch (harness._equivalent_everywhere),
for `permute` with its ORT check and with --no-verify (the walker alone must be right)."""

from __future__ import annotations

import random

import pytest

from . import cases
from .conftest import assert_no_failure

KINDS = ["if", "if-nested", "loop", "scan", "output", "input", "reduce-axes"]


class _Fixed(random.Random):
    """A Random whose first choice among the interface kinds is fixed (the rest stays random)."""

    def __init__(self, kind: str, seed: str, weight: str | None = None):
        super().__init__(seed)
        self._kind, self._weight = kind, weight

    def choice(self, seq):
        if list(seq) == KINDS:
            return self._kind
        if self._weight and any(getattr(t, "name", None) == self._weight for t in seq):
            return next(t for t in seq if t.name == self._weight)
        return super().choice(seq)


@pytest.mark.parametrize("seed_model", sorted(cases.SEEDS))
@pytest.mark.parametrize("kind", KINDS)
def test_interface_weights(kind, seed_model, runner, good, tmp_path):
    rng = _Fixed(kind, f"{kind}-{seed_model}")
    base = cases.SEEDS[seed_model]()
    model, detail = cases.mutate_interface(base, rng)
    case = cases.Case("interface", detail, {cases.MODEL: model.SerializeToString()}, {}, seed_model)
    report = runner.run_case(case, tmp_path, good[seed_model])
    assert_no_failure(report)


def test_the_oracle_catches_a_wrong_permutation(tmp_path):
    """The other way: a model whose If branch reads a weight, permuted in the main graph only (what
    the walker did before issue 18), is caught by the oracle on the branch a random input misses."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from .harness import _equivalent_everywhere

    base = cases.mlp()
    model, _ = cases.mutate_interface(base, _Fixed("if", "oracle", weight="W1"))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    # permute W1's columns and W2's rows by hand in the main graph; the branch still reads the old W1
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    inits = {t.name: t for t in bad.graph.initializer}
    perm = np.random.default_rng(1).permutation(12)
    for name, axis in (("W1", 1), ("b1", 0), ("W2", 0)):
        arr = np.take(numpy_helper.to_array(inits[name]), perm, axis=axis)
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    dst = tmp_path / "bad.onnx"
    onnx.save(bad, dst)
    assert _equivalent_everywhere(str(src), str(dst)) is not None
