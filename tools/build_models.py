#!/usr/bin/env python3
"""Train and export the small ONNX models bundled in ``models/``.

Seven small classifiers for scikit-learn's ``digits`` data set (8x8 grey images, bundled with
scikit-learn, no download), each a different architecture family so that the channel-flow walk, the
permutation and the resync code meet real exporter output: Gemm chains, Conv+BatchNorm+Flatten,
residual Adds with projection shortcuts, depthwise convs with squeeze-and-excitation, Split/Concat
(CSP) with SPP max pools, hand-written multi-head attention, and a GRU.

How to run (needs the ``train`` extra: torch and scikit-learn, CPU is enough)::

    pip install -e '.[train]'            # or: pip install torch scikit-learn onnx onnxruntime numpy
    python tools/build_models.py                       # everything, about 3-5 minutes on 2 cores
    python tools/build_models.py --only mlp,vgg        # just these (MANIFEST.json is merged)
    python tools/build_models.py --out models --seed 0 --no-variants

What it writes under ``--out`` (default ``models/``):

- ``<name>.onnx``: opset 17, ``ir_version`` 8, graph input ``input`` with a symbolic batch dimension
  ``batch``, output ``logits`` of shape [batch, 10]. Exported with the TorchScript exporter
  (``dynamo=False``): it writes nn.GRU as the ONNX ``GRU`` op, and with
  ``training=TrainingMode.PRESERVE`` on a model in eval mode it keeps BatchNorm as
  ``BatchNormalization`` (``training_mode=0``) instead of folding it into the Conv. The exported graph
  is saved as is (no shape inference, no value_info added) except that ``ir_version`` is set and the
  exporter's initializer deduplication is undone: where two weights had equal values (the two
  BatchNorm biases that meet at a ResNet projection shortcut's Add always do) it writes
  ``Identity(first)`` for the second; that node is replaced by a copy of the initializer, so every
  weight is a graph initializer (or a Constant node, as the exporter writes small constants).
- ``<name>_test.npz``: the held-out test split, ``input`` (float32, the exact shape the model takes)
  and ``labels`` (int64).
- ``variants/<name>_seed1.onnx``: the same architecture trained from scratch with seed ``seed+1``;
  ``variants/<name>_ft10.onnx`` / ``<name>_ft50.onnx``: the bundled model trained further for 10% and
  50% of its epoch count, same data, learning rate x0.1, seeded.
- ``MANIFEST.json``: for each model and variant the file, parameter count, accuracy of the exported
  ONNX file run with ONNX Runtime on the npz, epochs, seed, optimizer, input shape, op histogram, ...

Data: ``sklearn.datasets.load_digits`` (1797 images, values 0..16); a stratified split with
``random_state=0`` and ``test_size=0.25`` (1347 train / 450 test); images divided by 16, upsampled
to 16x16 with bilinear interpolation (``align_corners=False``), then standardized with the train
split's global mean and std. Input layouts: ``image`` [N,1,16,16] (vgg, resnet, mobilenet, csp);
``flat`` [N,256] (mlp, the 16x16 image row-major); ``rows`` [N,16,16] (gru: 16 image rows as time
steps of 16 pixels); ``patches`` [N,16,16] (transformer: 16 tokens = the 4x4 grid of 4x4 patches in
row-major order, each token the 16 pixels of its patch row-major; patching is done outside the model).

Training is seeded and deterministic on one machine (``torch.use_deterministic_algorithms``); other
CPUs or thread counts may change the low bits, hence the accuracies, slightly.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"build_models.py needs the 'train' extra (torch, scikit-learn): {exc}")

import onnx
import onnxruntime as ort

OPSET = 17
IR_VERSION = 8
NUM_CLASSES = 10
BATCH_SIZE = 64

# Op types each model must contain after export (tests/test_models.py checks the same promises).
REQUIRED_OPS = {
    "mlp": [["Gemm"], ["Relu"]],
    "vgg": [["Conv"], ["BatchNormalization"], ["MaxPool"], ["Flatten", "Reshape"], ["Gemm"]],
    "resnet": [["Conv"], ["BatchNormalization"], ["Add"], ["GlobalAveragePool", "ReduceMean"], ["Gemm"]],
    "mobilenet": [["Conv"], ["BatchNormalization"], ["HardSwish"], ["HardSigmoid"], ["Mul"], ["Add"],
                  ["GlobalAveragePool", "ReduceMean"], ["Gemm"]],
    "csp": [["Conv"], ["BatchNormalization"], ["Split"], ["Concat"], ["MaxPool"], ["Add"], ["Gemm"]],
    "transformer": [["MatMul"], ["Softmax"], ["LayerNormalization"], ["Reshape"], ["Transpose"], ["Add"]],
    "gru": [["GRU"], ["Gemm"]],
}


# --------------------------------------------------------------------------------------------------
# building blocks


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + optional activation."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class MLP(nn.Module):
    """256 -> 256 -> 128 -> 10, ReLU (three Gemm)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class VGG(nn.Module):
    """[conv32-bn-relu x2, maxpool] [conv64-bn-relu x2, maxpool] -> 64x4x4 -> Flatten -> 1024-128-10."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(1, 32), ConvBNAct(32, 32), nn.MaxPool2d(2),
            ConvBNAct(32, 64), ConvBNAct(64, 64), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + sc)


class ResNet(nn.Module):
    """stem conv32 -> block(32) -> block(32->64, s2, proj) -> block(64->128, s2, proj) -> GAP -> 10."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(1, 32)
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 128, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, r, 1)
        self.expand = nn.Conv2d(r, c, 1)

    def forward(self, x):
        w = F.relu(self.reduce(self.pool(x)))
        return x * F.hardsigmoid(self.expand(w))


class InvertedResidual(nn.Module):
    def __init__(self, cin, exp, cout, stride):
        super().__init__()
        self.expand = ConvBNAct(cin, exp, 1, act=nn.Hardswish)
        self.dw = ConvBNAct(exp, exp, 3, stride, groups=exp, act=nn.Hardswish)
        self.se = SqueezeExcite(exp, exp // 4)
        self.project = ConvBNAct(exp, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """MobileNetV3-style: stem conv32-bn-hswish, 4 inverted residual blocks with SE, conv1x1 256, GAP, 10."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(1, 32, act=nn.Hardswish)
        self.blocks = nn.Sequential(
            InvertedResidual(32, 96, 48, 2),
            InvertedResidual(48, 144, 48, 1),
            InvertedResidual(48, 192, 64, 2),
            InvertedResidual(64, 256, 64, 1),
        )
        self.last = ConvBNAct(64, 256, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, NUM_CLASSES)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3, act=nn.SiLU)
        self.cv2 = ConvBNAct(c, c, 3, act=nn.SiLU)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8-style CSP block: 1x1 conv, split in two halves, bottlenecks on the second, concat all, 1x1."""

    def __init__(self, cin, cout, n=2):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBNAct(cin, 2 * self.c, 1, act=nn.SiLU)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.c, cout, 1, act=nn.SiLU)

    def forward(self, x):
        y = list(torch.split(self.cv1(x), self.c, dim=1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPP(nn.Module):
    """1x1 conv, max pools of kernel 3/5/7 (stride 1) in parallel, concat with the input, 1x1 conv."""

    def __init__(self, cin, cout, ks=(3, 5, 7)):
        super().__init__()
        c = cin // 2
        self.cv1 = ConvBNAct(cin, c, 1, act=nn.SiLU)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in ks)
        self.cv2 = ConvBNAct(c * (len(ks) + 1), cout, 1, act=nn.SiLU)

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [p(x) for p in self.pools], 1))


class CSP(nn.Module):
    """conv32 -> conv64 s2 -> C2f(64, 2 bottlenecks) -> conv128 s2 -> SPP(3,5,7) -> GAP -> 10 (SiLU)."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(1, 32, act=nn.SiLU)
        self.down1 = ConvBNAct(32, 64, 3, 2, act=nn.SiLU)
        self.csp = C2f(64, 64, n=2)
        self.down2 = ConvBNAct(64, 128, 3, 2, act=nn.SiLU)
        self.spp = SPP(128, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = self.spp(self.down2(self.csp(self.down1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: MatMul / Reshape / Transpose / Softmax in the graph."""

    def __init__(self, d, heads, tokens):
        super().__init__()
        self.h, self.dh, self.t, self.d = heads, d // heads, tokens, d
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def _heads(self, x):  # [B, T, d] -> [B, h, T, dh]; constant shapes (-1 for the batch)
        return x.reshape(-1, self.t, self.h, self.dh).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.dh), dim=-1)
        out = (att @ v).transpose(1, 2).reshape(-1, self.t, self.d)
        return self.o(out)


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, tokens, ff):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, tokens)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Transformer(nn.Module):
    """16 patch tokens x 16 px -> Linear 64 + learned pos -> 2 pre-norm layers (4 heads, FF 128) -> LN -> mean -> 10."""

    def __init__(self, d=64, heads=4, tokens=16, ff=128, layers=2):
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, tokens, ff) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, NUM_CLASSES)

    def forward(self, x):
        x = self.embed(x) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x).mean(dim=1))


class GRUNet(nn.Module):
    """16 image rows as 16 time steps of 16 pixels -> GRU(64) -> last hidden state -> Linear 10."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(16, 64, batch_first=True)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        _, h = self.gru(x)
        return self.fc(h[-1])


# name -> (class, input layout, epochs, learning rate, one-line description)
SPECS = {
    "mlp": (MLP, "flat", 40, 1e-3, "MLP 256-256-128-10, ReLU (Gemm chain)"),
    "vgg": (VGG, "image", 15, 1e-3,
            "VGG: [conv32-BN-ReLU x2, maxpool] [conv64-BN-ReLU x2, maxpool], Flatten 64x4x4, FC 1024-128-10"),
    "resnet": (ResNet, "image", 15, 1e-3,
               "ResNet: stem conv32-BN-ReLU, basic blocks 32, 32->64 s2 and 64->128 s2 with 1x1 conv+BN "
               "projection shortcuts, global avg pool, FC 128-10"),
    "mobilenet": (MobileNet, "image", 30, 2e-3,
                  "MobileNetV3-style: stem conv32-BN-HardSwish, 4 inverted residual blocks (1x1 expand, "
                  "depthwise 3x3, SE with ReLU/HardSigmoid gate, 1x1 project, residual where shapes match), "
                  "conv1x1 256-BN-HardSwish, global avg pool, FC 256-10"),
    "csp": (CSP, "image", 15, 1e-3,
            "CSP/YOLO-style (SiLU): conv32, conv64 s2, C2f (1x1 conv, Split 2x32, 2 residual bottlenecks, "
            "Concat 4x32, 1x1 fuse), conv128 s2, SPP (1x1 conv, MaxPool 3/5/7, Concat, 1x1), global avg pool, "
            "FC 128-10"),
    "transformer": (Transformer, "patches", 60, 1e-3,
                    "ViT-style: 16 patch tokens (4x4 px) -> Linear 16-64 + learned position embedding, 2 pre-norm "
                    "encoder layers (hand-written 4-head self-attention with q/k/v/o Linear, FF 64-128-64 GELU), "
                    "final LayerNorm, mean over tokens, Linear 64-10"),
    "gru": (GRUNet, "rows", 40, 3e-3,
            "GRU: 16 image rows as time steps of 16 px -> GRU hidden 64 (ONNX GRU op) -> last hidden -> Linear 64-10"),
}

LAYOUT_DOC = {
    "flat": "[batch, 256]: the 16x16 image flattened row-major",
    "image": "[batch, 1, 16, 16]",
    "rows": "[batch, 16, 16]: 16 image rows (time steps) x 16 pixels",
    "patches": "[batch, 16, 16]: 16 tokens (4x4 grid of 4x4-pixel patches, row-major) x 16 pixels (row-major in the patch)",
}


# --------------------------------------------------------------------------------------------------
# data


def load_data():
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8] in 0..1
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, stratify=labels, random_state=0)
    x = F.interpolate(torch.from_numpy(images)[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    mean = float(x[train_idx].mean())
    std = float(x[train_idx].std())
    x = (x - mean) / std
    info = {
        "name": "sklearn.datasets.load_digits",
        "split": "sklearn train_test_split(test_size=0.25, stratify=labels, random_state=0)",
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "preprocess": "x/16, bilinear upsample 8x8->16x16 (align_corners=False), (x - mean) / std "
                      "with the train split's global mean and std",
        "mean": mean,
        "std": std,
    }
    return (x[train_idx], torch.from_numpy(labels[train_idx]),
            x[test_idx], torch.from_numpy(labels[test_idx]), info)


def to_layout(x, layout):
    """x: [N, 1, 16, 16] -> the layout a model takes."""
    n = x.shape[0]
    if layout == "image":
        return x.contiguous()
    if layout == "flat":
        return x.reshape(n, 256).contiguous()
    if layout == "rows":
        return x[:, 0].contiguous()
    if layout == "patches":  # [N, pr, r, pc, c] -> [N, pr, pc, r, c] -> [N, 16 tokens, 16 px]
        return x.reshape(n, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(n, 16, 16).contiguous()
    raise ValueError(layout)


# --------------------------------------------------------------------------------------------------
# training, export, evaluation


def train(model, xtr, ytr, epochs, lr, seed, schedule="cosine"):
    """AdamW (weight decay 1e-4), batch 64, shuffled with a seeded generator; cosine or constant lr."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(ytr) / BATCH_SIZE)
    total = max(1, epochs * steps_per_epoch)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), BATCH_SIZE):
            b = perm[i:i + BATCH_SIZE]
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    return model


@torch.no_grad()
def torch_accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def export_onnx(model, example, name):
    """Export with the TorchScript exporter; returns (ModelProto, number of dedup Identity nodes undone).

    The graph is kept as the exporter wrote it except for ``ir_version`` and undo_initializer_dedup.
    """
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, GRU batch-size and folding notes
        torch.onnx.export(
            model, (example,), buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            # PRESERVE on an eval-mode model: BatchNormalization(training_mode=0) stays an op (EVAL would
            # fuse it into the preceding Conv); constant folding stays on so that GRU weights are plain
            # initializers (with folding off they are Slice/Concat chains over the torch parameters).
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )
    mp = onnx.load_from_string(buf.getvalue())
    mp.ir_version = IR_VERSION
    undone = undo_initializer_dedup(mp)
    check_export(mp, name)
    return mp, undone


def undo_initializer_dedup(mp):
    """Replace the exporter's ``Identity(initializer)`` nodes by a copy of the initializer.

    The TorchScript exporter (eval mode) deduplicates initializers with equal values: the second one
    becomes ``Identity(first)``. In a ResNet with a projection shortcut the two BatchNorm biases that
    meet at the residual Add get identical gradients from the same zero init, so they stay equal and
    get tied. Each weight must be its own initializer here, so undo it: same values, same name as the
    Identity's output, node removed. Returns the number of nodes replaced.
    """
    g = mp.graph
    inits = {t.name: t for t in g.initializer}
    keep, replaced = [], 0
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            g.initializer.append(t)
            replaced += 1
        else:
            keep.append(n)
    if replaced:
        del g.node[:]
        g.node.extend(keep)
    return replaced


def op_histogram(mp):
    hist = Counter(n.op_type for n in mp.graph.node)
    return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))


def check_export(mp, name):
    onnx.checker.check_model(mp)
    g = mp.graph
    assert [o.domain for o in mp.opset_import if o.domain in ("", "ai.onnx")] and all(
        o.version == OPSET for o in mp.opset_import if o.domain in ("", "ai.onnx")), mp.opset_import
    assert [i.name for i in g.input] == ["input"], f"{name}: graph inputs {[i.name for i in g.input]}"
    assert [o.name for o in g.output] == ["logits"], f"{name}: graph outputs {[o.name for o in g.output]}"
    d0 = g.input[0].type.tensor_type.shape.dim[0]
    assert d0.dim_param == "batch", f"{name}: input dim 0 is {d0}"
    out_dims = g.output[0].type.tensor_type.shape.dim
    assert len(out_dims) == 2 and out_dims[0].dim_param == "batch" and out_dims[1].dim_value == NUM_CLASSES, \
        f"{name}: logits dims {out_dims}"
    # Weights must be initializers or Constant nodes. The exporter deduplicates equal-valued initializers
    # through Identity nodes; refuse that (it would tie two unrelated tensors together).
    inits = {t.name for t in g.initializer}
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            raise AssertionError(f"{name}: Identity over initializer {n.input[0]} -> {n.output[0]}")
    hist = op_histogram(mp)
    for alternatives in REQUIRED_OPS[name]:
        assert any(op in hist for op in alternatives), f"{name}: none of {alternatives} in {hist}"


def ort_logits(model_bytes, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def ort_check(mp, model, x_np, y_np, name):
    """Accuracy of the exported graph under ONNX Runtime, plus agreement with torch (full batch and batch 1)."""
    data = mp.SerializeToString()
    logits = ort_logits(data, x_np)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_np)).numpy()
    err = float(np.abs(logits - ref).max() / max(1e-12, np.abs(ref).max()))
    assert err < 1e-4, f"{name}: ORT and torch disagree (normalized max error {err:.3g})"
    one = ort_logits(data, x_np[:1])
    assert np.allclose(one, logits[:1], rtol=1e-4, atol=1e-4), f"{name}: batch-1 output differs"
    return float((logits.argmax(1) == y_np).mean()), err


def count_params(model):
    return int(sum(p.numel() for p in model.parameters()))


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_model(mp, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(mp.SerializeToString())
    os.replace(tmp, path)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def build_one(name, out, seed, data, variants, log):
    cls, layout, epochs, lr, desc = SPECS[name]
    xtr_img, ytr, xte_img, yte, _ = data
    xtr, xte = to_layout(xtr_img, layout), to_layout(xte_img, layout)
    x_np = xte.numpy().astype(np.float32)
    y_np = yte.numpy().astype(np.int64)
    example = xte[:2]
    t0 = time.perf_counter()

    seed_everything(seed)
    model = cls()
    train(model, xtr, ytr, epochs, lr, seed)
    mp, undone = export_onnx(model, example, name)
    acc, err = ort_check(mp, model, x_np, y_np, name)
    onnx_path = out / f"{name}.onnx"
    npz_path = out / f"{name}_test.npz"
    save_model(mp, onnx_path)
    tmp_npz = out / f"{name}_test.tmp.npz"
    np.savez_compressed(tmp_npz, input=x_np, labels=y_np)
    os.replace(tmp_npz, npz_path)
    entry = {
        "file": onnx_path.name,
        "test_npz": npz_path.name,
        "description": desc,
        "params": count_params(model),
        "test_accuracy": acc,
        "test_accuracy_torch": torch_accuracy(model, xte, yte),
        "ort_vs_torch_max_rel_error": err,
        "n_test": int(len(y_np)),
        "epochs": epochs,
        "seed": seed,
        "optimizer": f"AdamW(lr={lr:g}, weight_decay=1e-4), batch {BATCH_SIZE}, cosine decay to 0",
        "input_name": "input",
        "input_shape": ["batch"] + list(x_np.shape[1:]),
        "input_layout": LAYOUT_DOC[layout],
        "output_name": "logits",
        "output_shape": ["batch", NUM_CLASSES],
        "opset": OPSET,
        "ir_version": mp.ir_version,
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=False, training=PRESERVE, do_constant_folding=True)",
        "initializer_dedup_undone": undone,
        "bytes": onnx_path.stat().st_size,
        "sha256": sha256(onnx_path),
        "op_histogram": op_histogram(mp),
    }
    log(f"{name}: {entry['params']} params, ORT accuracy {acc:.4f}, {entry['bytes']} bytes, "
        f"{time.perf_counter() - t0:.1f}s")

    var_entries = {}
    if variants:
        vdir = out / "variants"
        # an independently trained model: same architecture and recipe, seed + 1
        t1 = time.perf_counter()
        s1 = seed + 1
        seed_everything(s1)
        m1 = train(cls(), xtr, ytr, epochs, lr, s1)
        var_entries[f"{name}_seed1"] = finish_variant(
            m1, example, name, x_np, y_np, vdir / f"{name}_seed1.onnx", kind="independent", seed=s1,
            epochs=epochs, lr=lr, schedule="cosine", log=log, t0=t1)
        # fine-tuned copies of the bundled model: 10% and 50% more epochs at lr x0.1, constant
        for pct in (10, 50):
            t1 = time.perf_counter()
            ft_epochs = max(1, round(epochs * pct / 100))
            ft_seed = seed + 1000 + pct
            seed_everything(ft_seed)
            mf = train(copy.deepcopy(model), xtr, ytr, ft_epochs, lr * 0.1, ft_seed, schedule="constant")
            var_entries[f"{name}_ft{pct}"] = finish_variant(
                mf, example, name, x_np, y_np, vdir / f"{name}_ft{pct}.onnx", kind=f"finetune_{pct}pct",
                seed=ft_seed, epochs=ft_epochs, lr=lr * 0.1, schedule="constant", log=log, t0=t1)
    return entry, var_entries, time.perf_counter() - t0


def finish_variant(model, example, name, x_np, y_np, path, kind, seed, epochs, lr, schedule, log, t0):
    mp, undone = export_onnx(model, example, name)
    acc, err = ort_check(mp, model, x_np, y_np, path.stem)
    save_model(mp, path)
    sched = "cosine decay to 0" if schedule == "cosine" else "constant lr"
    entry = {
        "file": f"variants/{path.name}",
        "base": name,
        "test_npz": f"{name}_test.npz",
        "kind": kind,
        "params": count_params(model),
        "test_accuracy": acc,
        "ort_vs_torch_max_rel_error": err,
        "epochs": epochs,
        "seed": seed,
        "optimizer": f"AdamW(lr={lr:g}, weight_decay=1e-4), batch {BATCH_SIZE}, {sched}",
        "opset": OPSET,
        "ir_version": mp.ir_version,
        "initializer_dedup_undone": undone,
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
    }
    if kind.startswith("finetune"):
        entry["started_from"] = f"{name}.onnx (the bundled model's torch weights and BN statistics)"
    log(f"  {path.stem}: ORT accuracy {acc:.4f} ({time.perf_counter() - t0:.1f}s)")
    return entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated model names (default: all of "
                    + ",".join(SPECS) + ")")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models"),
                    help="output directory (default: models/ next to tools/)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the bundled models (default 0)")
    ap.add_argument("--no-variants", action="store_true", help="skip models/variants/")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these models are tiny, and on a busy machine OpenMP "
                         "threads that wait on each other make training 10-50x slower; 0 = torch's choice)")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(SPECS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data()

    manifest_path = out / "MANIFEST.json"
    manifest = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("models", {})
    manifest.setdefault("variants", {})
    manifest["generator"] = "tools/build_models.py"
    manifest["dataset"] = data[4]
    manifest["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                            "onnxruntime": ort.__version__, "numpy": np.__version__}

    timings = {}
    for name in names:
        entry, var_entries, secs = build_one(name, out, args.seed, data, not args.no_variants, log)
        manifest["models"][name] = entry
        manifest["variants"].update(var_entries)
        timings[name] = round(secs, 1)

    order = list(SPECS)
    manifest["models"] = {k: manifest["models"][k] for k in sorted(manifest["models"], key=order.index)}
    manifest["variants"] = {k: manifest["variants"][k] for k in sorted(
        manifest["variants"], key=lambda k: (order.index(manifest["variants"][k]["base"]), k))}
    manifest.pop("build_seconds", None)  # timings are machine-dependent: logged, not recorded
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    log(f"done in {time.perf_counter() - t_start:.1f}s (per model with its variants: {timings}); "
        f"wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
