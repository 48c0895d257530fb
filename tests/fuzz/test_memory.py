"""Huge declared dimensions with little data never allocate the declared size: every command ends
in a clean error under a tight address-space limit (RLIMIT_AS), well below what the declared
tensors would need (2**40 floats = 4 TiB)."""

from __future__ import annotations

import random

import pytest

from . import cases
from .conftest import assert_no_failure
from .harness import Runner

AS_LIMIT = 3 << 30  # the whole worker (Python, numpy, scipy, onnxruntime) must fit in 3 GiB


@pytest.fixture(scope="module")
def tight():
    r = Runner(as_limit=AS_LIMIT, timeout=60.0, rss_limit=512 << 20)
    yield r
    r.close()


def _with(seed: str, mutate) -> cases.Case:
    m = cases.SEEDS[seed]()
    mutate(m)
    return cases.Case("huge", mutate.__doc__ or "", {cases.MODEL: m.SerializeToString()}, seed_model=seed)


def _dims(name, dims):
    def f(m):
        """weight dims huge, data tiny"""
        t = next(t for t in cases._weights(m) if t.name == name)
        del t.dims[:]
        t.dims.extend(dims)
    return f


def _input_dim(value):
    def f(m):
        """a graph input with a huge fixed dim"""
        d = m.graph.input[0].type.tensor_type.shape.dim[0]
        d.ClearField("dim_param")
        d.dim_value = value
    return f


CASES = {
    "weight-2**40": lambda: _with("mlp", _dims("W1", [2**40])),
    "weight-product-wraps-int64": lambda: _with("mlp", _dims("W2", [2**32, 2**32, 2])),
    "constant-2**31x2**31": lambda: _with("const", _dims("W2", [2**31, 2**31])),
    "input-2**31": lambda: _with("mlp", _input_dim(2**31)),
    "input-10**9": lambda: _with("cnn", _input_dim(10**9)),
    "external-huge-dims": lambda: cases.external_case("huge-dims-small-length", "mlp"),
    "external-length-2**62": lambda: cases.external_case("length-huge", "mlp"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_huge_declared_dims_stay_small(name, tight, good, tmp_path):
    case = CASES[name]()
    report = tight.run_case(case, tmp_path, good[case.seed_model])
    assert_no_failure(report)
    model = str(tmp_path / cases.MODEL)
    for r in report.results:
        if model not in r.argv:
            continue
        if name.startswith("input-") and (r.argv[0] == "groups" or "--no-verify" in r.argv):
            assert r.outcome == "ok"  # nothing is allocated to walk the graph (or to permute unchecked)
        elif name.startswith("input-") and r.argv[0] == "permute":
            assert r.outcome == "error" and "random inputs would take" in r.why, (r.argv, r.why)
        elif not name.startswith("input-"):
            assert r.outcome == "error" and r.rc in (2, 3), (r.argv, r.outcome, r.why)
    assert max(r.peak_rss_kb for r in report.results) < 1 << 20  # KiB: under 1 GiB


def test_random_huge_mutations_under_tight_limit(tight, good, tmp_path):
    for k in range(12):
        case = cases.make_case("huge", random.Random(f"tight-{k}"))
        report = tight.run_case(case, tmp_path / str(k), good[case.seed_model])
        assert_no_failure(report)
