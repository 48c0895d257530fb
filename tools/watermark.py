#!/usr/bin/env python3
"""An Uchida-style white-box watermark, to show what a neuron permutation does to it (and resync undoes).

Uchida et al., "Embedding Watermarks into Deep Neural Networks" (ICMR 2017): take a conv layer's
kernel W of shape [out, in, kh, kw], average it over the output filters (the *mean filter*
w = mean_o W[o], a vector of in*kh*kw values), project it with a secret matrix X (bits x in*kh*kw),
and read bit t as [X w]_t >= 0. They embed the bits during training with a regularizer; here a
trained model gets them post hoc: the smallest change d of the mean filter (least squares,
X d = target - X w) that puts every projection on the right side with a margin, added to every
output filter (which moves their mean by exactly d). The model stays accurate: check with ONNX
Runtime on the bundled test split.

Why a permutation breaks it: permuting the layer's *output* filters leaves their mean unchanged, but
permuting its *input* channels (the group that feeds the layer: the previous conv's filters, their
BatchNorm, and this kernel's axis 1) reorders the mean filter's blocks. The secret matrix here is
centred over the input channels (for every kernel position its entries sum to 0 across channels),
so only the per-channel part of w counts, and a shuffle of the channels leaves about half the bits
right: a bit error rate of about 50%. Resync puts the channels back: 0 again.

Usage (prints the bit error rates on a bundled model):

    python tools/watermark.py models/vgg.onnx --layer 3 --bits 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def conv_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the (non-grouped) Conv kernels that are initializers, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group == 1 and len(node.input) > 1 and node.input[1] in inits:
            out.append(node.input[1])
    return out


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor)


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), name))


def mean_filter(kernel: np.ndarray) -> np.ndarray:
    """Uchida's w: the kernel averaged over its output filters, flattened (in * kh * kw)."""
    return kernel.astype(np.float64).mean(axis=0).reshape(-1)


def secret_matrix(kernel_shape, bits: int, seed: int) -> np.ndarray:
    """X (bits x in*kh*kw): Gaussian, centred over the input channels at every kernel position."""
    _, cin, *k = kernel_shape
    X = np.random.default_rng(seed).standard_normal((bits, cin, *k))
    X -= X.mean(axis=1, keepdims=True)
    return X.reshape(bits, -1)


def extract(model: onnx.ModelProto, weight: str, X: np.ndarray) -> np.ndarray:
    """The watermark bits as read from `weight` (0/1 array)."""
    return (X @ mean_filter(_get(model, weight)) >= 0).astype(np.uint8)


def bit_error_rate(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def embed(model: onnx.ModelProto, weight: str, bits: np.ndarray, X: np.ndarray,
          margin: float = 2.0) -> onnx.ModelProto:
    """A copy of `model` whose `weight` carries `bits`: each projection at least `margin` times the
    typical projection of the mean filter on the right side (least-squares change of the mean filter,
    added to every output filter)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    W = _get(out, weight).astype(np.float64)
    w = mean_filter(W)
    proj = X @ w
    sign = np.where(np.asarray(bits) > 0, 1.0, -1.0)
    m = margin * float(np.std(proj)) if np.std(proj) > 0 else margin
    target = np.where(sign * proj >= m, proj, sign * m)  # leave the bits that are already safe
    d, *_ = np.linalg.lstsq(X, target - proj, rcond=None)
    _set(out, weight, W + d.reshape(W.shape[1:])[None])
    return out


def feeding_group(model: onnx.ModelProto, weight: str) -> str:
    """Key of the walker group whose neurons are `weight`'s input channels (axis 1)."""
    from onnx_resync.walk import walk

    for g in walk(model).groups:
        if any(s.weight == weight and s.axis == 1 for s in g.slots):
            return g.key
    raise ValueError(f"no permutable group feeds {weight!r}")


def accuracy(model: onnx.ModelProto, npz: str | Path) -> float:
    import onnxruntime as ort

    data = np.load(npz)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: data["input"]})[0]
    return float((logits.argmax(1) == data["labels"]).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="e.g. models/vgg.onnx")
    p.add_argument("--layer", type=int, default=-1, help="which conv kernel (index among non-grouped convs)")
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--seed", type=int, default=2017, help="seed of the secret matrix and the bits")
    args = p.parse_args(argv)
    from onnx_resync.api import permute
    from onnx_resync.resync import resync

    model = onnx.load(args.model)
    weight = conv_weights(model)[args.layer]
    X = secret_matrix(_get(model, weight).shape, args.bits, args.seed)
    bits = np.random.default_rng(args.seed + 1).integers(0, 2, args.bits)
    marked = embed(model, weight, bits, X)
    npz = Path(args.model).with_name(Path(args.model).stem + "_test.npz")
    if npz.exists():
        print(f"accuracy: original {accuracy(model, npz):.4f}, watermarked {accuracy(marked, npz):.4f}")
    print(f"watermark: {args.bits} bits in {weight!r} (mean filter of {_get(model, weight).shape})")
    print(f"BER original model (never marked): {bit_error_rate(extract(model, weight, X), bits):.3f}")
    print(f"BER watermarked:                  {bit_error_rate(extract(marked, weight, X), bits):.3f}")
    permuted, _ = permute(marked, seed=1, group_keys=[feeding_group(marked, weight)])
    print(f"BER input channels permuted:      {bit_error_rate(extract(permuted, weight, X), bits):.3f}")
    restored, report = resync(permuted, marked)
    print(f"BER after resync:                 {bit_error_rate(extract(restored, weight, X), bits):.3f} "
          f"({report.verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
