"""A real vendor file whose float16 copies change a folded weight 30-99x, all of it explained by the
converters' clip (issue 14.3; audit/storage.py propagates each stored operand's storage).

PaddleOCR's v4 detector (`ppocr_det`) holds a BatchNorm (batch_norm_0, after the FPN's Concat) with
running variances of 1e7..1e8. onnxconverter-common stores them as its clip 1e4, ONNX Runtime's
converter as 65504: the BatchNorm folds into conv2d_159 with scales 30-99x off the reference's. Those
copies, identical and permuted, were "perturbed beyond its float16 storage: rescaled ..., norm
outliers ..."; the variances' clip explains the difference, and the report says so. Noise on that
layer's own weights is still "perturbed".
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_resync import api
from test_vendor_zoo import _build_zoo, _made as made  # one copy of the vendor-zoo cache helpers
from vendor_models import vendor_model

pytestmark = pytest.mark.vendor

NOISE = 0.05  # x the weight's std: far beyond float16's rounding


def _made(name: str, make) -> pathlib.Path:
    return made(name, make, key="ppocr_det")


def _noisy(src: pathlib.Path, dst: pathlib.Path, name: str = "conv2d_159.w_0") -> None:
    model = onnx.load(str(src))
    init = next(iter([i for i in model.graph.initializer if i.name == name]
                     + [a.t for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name
                        for a in n.attribute if a.name == "value"]))
    w = numpy_helper.to_array(init)
    noisy = w.astype(np.float32) + np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) \
        * NOISE * float(w.astype(np.float32).std())
    init.CopyFrom(numpy_helper.from_array(noisy.astype(w.dtype), name))
    onnx.save(model, str(dst))


@pytest.fixture(scope="module")
def files():
    src = vendor_model("ppocr_det")
    bz = _build_zoo()
    perm = _made("perm.onnx", lambda p: bz.make_permuted(src, p))
    out = {"src": src}
    for t in ("fp16_occ", "fp16_ort"):
        out[t] = _made(f"{t}.src.onnx", lambda p, t=t: getattr(bz, "t_" + t)(src, p, "ppocr_det"))
    out["fp16_ort.perm"] = _made("fp16_ort.perm.onnx", lambda p: bz.t_fp16_ort(perm, p, "ppocr_det"))
    out["fp16_occ.noise"] = _made("fp16_occ.noise159.onnx", lambda p: _noisy(out["fp16_occ"], p))
    return out


@pytest.mark.parametrize("copy, verdict, clip", [("fp16_occ", "identical", "10000"),
                                                 ("fp16_ort.perm", "permuted", "65504")])
def test_fp16_copy_whose_variances_were_clipped_is_derived_unchanged(files, copy, verdict, clip):
    report = api.audit(files[copy], files["src"])
    assert report.verdict == verdict and "float16" in report.format_change, report.summary
    assert f"clip explains (24 of batch_norm_0.w_2 at {clip}" in report.summary, report.summary


def test_noise_on_the_folded_conv_is_still_perturbed(files):
    report = api.audit(files["fp16_occ.noise"], files["src"])
    assert report.verdict == "perturbed" and report.derived, report.summary
    assert report.precision["worst_weight"] == "conv2d_159.w_0", report.precision
