"""Random but valid ONNX graphs for the walker's property tests (hypothesis strategies).

Graphs are built by composing blocks on a running NCHW tensor (Conv, depthwise/grouped Conv,
ConvTranspose, norms, activations, pooling, residual Add, Concat, Split/Concat, Slice, channel
shuffle, NHWC sections, squeeze-excitation, Resize, Pad, a LayerNorm over channels written out with
ReduceMean) and ending in a head (GAP + Gemm chain, Flatten of a spatial map + Gemm, or NHWC
Flatten + Gemm); a second generator builds MLPs (Gemm, MatMul + Add, LayerNormalization, Softmax).
Structure comes from hypothesis draws (so failures shrink to small graphs); weight values come from
a numpy Generator seeded by hypothesis. Weights are sometimes Constant nodes, or reached through
Identity or Cast.

`Builder(draw=None)` makes every choice deterministic (first option / lower bound), so targeted
tests can build one construct with explicit parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BATCH = 2
MAX_C = 12


@dataclass
class T:
    """The running activation: name, channels, spatial size."""

    name: str
    c: int
    h: int
    w: int
    # channels come in blocks of one element (after a depthwise conv with a channel multiplier): the
    # walker pins such a stream where a binary op ties it to another producer's channels
    blocked: bool = False
    # sizes of the runs of channels that come from different producers (a Concat of two convs: two
    # runs); empty means one run. A Split or an Add that cuts a run into a piece of one channel
    # leaves that channel alone in its group.
    parts: tuple = ()

    def runs(self) -> tuple:
        return self.parts or (self.c,)


def _cut(parts: tuple, at: int):
    """The runs before and after channel `at`, or None when `at` falls inside a run."""
    bounds = np.cumsum((0,) + tuple(parts)).tolist()
    if at not in bounds:
        return None
    i = bounds.index(at)
    return tuple(parts[:i]), tuple(parts[i:])


def _refine(a: tuple, b: tuple) -> tuple:
    """Runs of a residual sum: every boundary of either side."""
    bounds = sorted(set(np.cumsum((0,) + a).tolist()) | set(np.cumsum((0,) + b).tolist()))
    return tuple(int(y - x) for x, y in zip(bounds, bounds[1:]))


@dataclass
class Generated:
    model: onnx.ModelProto
    kind: str  # "cnn" or "mlp"
    constructs: list[str]  # every construct used, in order (with repeats)
    full_coverage: bool  # the structure implies that every hidden channel is permutable

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        lines = [f"Generated({self.kind}, constructs={self.constructs}, full_coverage={self.full_coverage})"]
        lines.append(onnx.printer.to_text(self.model.graph))
        return "\n".join(lines)


class Builder:
    def __init__(self, draw=None, seed: int = 0, symbolic_batch: bool = False):
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.constructs: list[str] = []
        self.full_coverage = True
        self.batch = "N" if symbolic_batch else BATCH
        self._n = 0
        self.taps: list[T] = []  # intermediate activations a second output may be taken from

    # ---- choices -------------------------------------------------------------------------------
    def pick(self, options):
        options = list(options)
        return options[0] if self.draw is None else self.draw(st.sampled_from(options))

    def int(self, lo: int, hi: int) -> int:
        return lo if self.draw is None else self.draw(st.integers(lo, max(lo, hi)))

    def flag(self) -> bool:
        return False if self.draw is None else self.draw(st.booleans())

    # ---- graph pieces --------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def node(self, op: str, inputs: list[str], hint: str | None = None, outputs: int = 1, domain: str = "",
             **attrs) -> str | list[str]:
        outs = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh("n_" + op), domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, hint: str = "k") -> str:
        """A small constant (shape, axes, pads, scales): always an initializer."""
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape, hint: str = "w", positive: bool = False, mode: str | None = None,
               fan_in: int | None = None) -> str:
        """A random float32 weight, stored as initializer, Constant node, or behind Identity/Cast.

        Matrices are scaled by their fan-in so activations stay O(1) through deep graphs (float32
        rounding after a permutation then stays far below the 1e-5 check).
        """
        shape = tuple(int(s) for s in shape)
        if positive:
            value = self.rng.uniform(0.5, 1.5, size=shape)
        else:
            value = self.rng.standard_normal(shape) * (1.5 / np.sqrt(fan_in) if fan_in else 0.5)
        mode = mode or self.pick(["init", "init", "init", "constant", "identity", "cast"])
        name = self.fresh(hint)
        if mode == "init":
            self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
            return name
        if mode == "constant":
            tensor = numpy_helper.from_array(value.astype(np.float32), name + "_value")
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_Constant"), value=tensor))
            return name
        if mode == "identity":
            self.inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_stored"))
            return self.node("Identity", [name + "_stored"], hint + "_id")
        # cast: stored as float64, cast to float32 in the graph
        self.inits.append(numpy_helper.from_array(value.astype(np.float64), name + "_f64"))
        return self.node("Cast", [name + "_f64"], hint + "_cast", to=TensorProto.FLOAT)

    def used(self, construct: str, full: bool = True) -> None:
        self.constructs.append(construct)
        if not full:
            self.full_coverage = False

    def add_input(self, name: str, shape) -> None:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))

    def add_output(self, name: str, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))

    def model(self, name: str = "generated") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])

    def nchw(self, t: T) -> list:
        return [self.batch, t.c, t.h, t.w]


# ==== CNN blocks ====================================================================================
# Every block takes (b, t, keep_c, keep_hw) and returns the new running tensor. keep_c / keep_hw ask
# the block to preserve channels / spatial size (inside residual branches and split halves).


def conv(b: Builder, t: T, keep_c=False, keep_hw=False, cout=None, k=None, bias=None, stride=None) -> T:
    cout = cout or (t.c if keep_c else b.int(2, MAX_C))
    k = k or b.pick([1, 3])
    bias = b.flag() if bias is None else bias
    stride = stride or (b.pick([1, 2]) if (not keep_hw and k == 3 and min(t.h, t.w) >= 7) else 1)
    w = b.weight((cout, t.c, k, k), "conv_w", fan_in=t.c * k * k)
    inputs = [t.name, w] + ([b.weight((cout,), "conv_b")] if bias else [])
    y = b.node("Conv", inputs, "conv", kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])
    h, w_ = (t.h + 2 * (k // 2) - k) // stride + 1, (t.w + 2 * (k // 2) - k) // stride + 1
    b.used("conv")
    return T(y, cout, h, w_)


def depthwise(b: Builder, t: T, keep_c=False, keep_hw=False, mult=None, bias=None) -> T:
    mult = mult or (1 if keep_c or 2 * t.c > MAX_C else b.pick([1, 2]))
    bias = b.flag() if bias is None else bias
    cout = t.c * mult
    w = b.weight((cout, 1, 3, 3), "dw_w", fan_in=9)
    inputs = [t.name, w] + ([b.weight((cout,), "dw_b")] if bias else [])
    y = b.node("Conv", inputs, "dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=t.c)
    b.used("depthwise" if mult == 1 else "depthwise_x2")
    return T(y, cout, t.h, t.w, blocked=t.blocked or mult > 1, parts=tuple(mult * p for p in t.runs()))


def grouped(b: Builder, t: T, keep_c=False, keep_hw=False, cout=None, bias=None) -> T:
    if t.c % 2:
        return conv(b, t, keep_c, keep_hw)
    cout = cout or (t.c if keep_c else 2 * b.int(1, MAX_C // 2))
    bias = b.flag() if bias is None else bias
    k = b.pick([1, 3])
    w = b.weight((cout, t.c // 2, k, k), "gconv_w", fan_in=t.c // 2 * k * k)
    inputs = [t.name, w] + ([b.weight((cout,), "gconv_b")] if bias else [])
    y = b.node("Conv", inputs, "gconv", kernel_shape=[k, k], pads=[k // 2] * 4, group=2)
    b.used("grouped_conv", full=False)  # its input is pinned (cross-group layout not modelled)
    return T(y, cout, t.h, t.w)


def conv_transpose(b: Builder, t: T, keep_c=False, keep_hw=False, cout=None, bias=None, up=None) -> T:
    cout = cout or (t.c if keep_c else b.int(2, MAX_C))
    bias = b.flag() if bias is None else bias
    up = (not keep_hw and max(t.h, t.w) <= 4 and b.flag()) if up is None else up
    if up:
        w = b.weight((t.c, cout, 2, 2), "convt_w", fan_in=t.c)
        attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
        h, w_ = 2 * t.h, 2 * t.w
    else:
        w = b.weight((t.c, cout, 3, 3), "convt_w", fan_in=t.c * 9)
        attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        h, w_ = t.h, t.w
    inputs = [t.name, w] + ([b.weight((cout,), "convt_b")] if bias else [])
    y = b.node("ConvTranspose", inputs, "convt", **attrs)
    b.used("conv_transpose")
    return T(y, cout, h, w_)


def batchnorm(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    c = t.c
    params = [b.weight((c,), "bn_scale"), b.weight((c,), "bn_bias"), b.weight((c,), "bn_mean"),
              b.weight((c,), "bn_var", positive=True)]
    y = b.node("BatchNormalization", [t.name] + params, "bn", epsilon=1e-3)
    b.used("batchnorm")
    return replace(t, name=y)


def batchnorm_decomposed(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    """(x - mean) * scale + bias with per-channel (C,1,1) weights, operands in either order."""
    c = t.c
    mean = b.weight((c, 1, 1), "dbn_mean")
    y = b.node("Sub", [t.name, mean], "dbn_sub")
    if b.flag():
        scale = b.weight((c, 1, 1), "dbn_scale")
        y = b.node("Mul", [scale, y] if b.flag() else [y, scale], "dbn_mul")
    else:
        scale = b.weight((c, 1, 1), "dbn_div", positive=True)
        y = b.node("Div", [y, scale], "dbn_div")
    bias = b.weight((1, c, 1, 1) if b.flag() else (c, 1, 1), "dbn_bias")
    y = b.node("Add", [bias, y] if b.flag() else [y, bias], "dbn_add")
    b.used("batchnorm_decomposed")
    return replace(t, name=y)


def instancenorm(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    y = b.node("InstanceNormalization", [t.name, b.weight((t.c,), "in_scale"), b.weight((t.c,), "in_bias")], "inorm",
                 epsilon=1e-2)
    b.used("instancenorm")
    return replace(t, name=y)


def prelu(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    y = b.node("PRelu", [t.name, b.weight((t.c, 1, 1), "prelu_slope")], "prelu")
    b.used("prelu")
    return replace(t, name=y)


def activation(b: Builder, t: T, keep_c=False, keep_hw=False, op=None) -> T:
    op = op or b.pick(["Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Clip", "Tanh"])
    if op == "LeakyRelu":
        y = b.node(op, [t.name], "act", alpha=0.1)
    elif op == "Clip":
        y = b.node(op, [t.name, b.const(np.float32(-0.5), "clip_min"), b.const(np.float32(0.75), "clip_max")], "act")
    else:
        y = b.node(op, [t.name], "act")
    b.used("act_" + op)
    return replace(t, name=y)


def pool(b: Builder, t: T, keep_c=False, keep_hw=False, op=None, down=None) -> T:
    op = op or b.pick(["MaxPool", "AveragePool"])
    down = (not keep_hw and min(t.h, t.w) >= 8 and b.flag()) if down is None else down
    if down:
        y = b.node(op, [t.name], "pool", kernel_shape=[2, 2], strides=[2, 2])
        b.used("pool")
        return replace(t, name=y, h=t.h // 2, w=t.w // 2)
    y = b.node(op, [t.name], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.used("pool")
    return replace(t, name=y)


def residual(b: Builder, t: T, keep_c=False, keep_hw=False, depth=0) -> T:
    """x -> two branches of channel- and size-preserving blocks -> Add."""
    branch_a = t
    for _ in range(b.int(1, 2)):
        branch_a = _preserving(b, depth)(b, branch_a, keep_c=True, keep_hw=True)
    kind = b.pick(["identity", "conv", "block"])
    if kind == "identity":
        branch_b = t
    elif kind == "conv":
        branch_b = conv(b, t, keep_c=True, keep_hw=True)
    else:
        branch_b = _preserving(b, depth)(b, t, keep_c=True, keep_hw=True)
    y = b.node("Add", [branch_a.name, branch_b.name] if b.flag() else [branch_b.name, branch_a.name], "res")
    parts = _refine(branch_a.runs(), branch_b.runs())
    b.used("residual", full=not (branch_a.blocked or branch_b.blocked) and min(parts) >= 2)
    return T(y, t.c, t.h, t.w, blocked=branch_a.blocked or branch_b.blocked, parts=parts)


def concat(b: Builder, t: T, keep_c=False, keep_hw=False, depth=0, pieces=None) -> T:
    """Concat of two or three branches on the channel axis (a branch may be x or a residual stream)."""
    n = pieces or b.int(2, 3)
    branches = []
    identity_used = False
    streams = 0  # residual branches: streams that (usually) carry x's channels too
    for i in range(n):
        kind = b.pick(["conv", "conv_act", "identity", "residual"])
        if kind == "identity" and not identity_used and t.c <= MAX_C // n:
            identity_used = True
            branches.append(t)
        elif kind == "residual" and depth < 1 and t.c <= MAX_C // n:
            branches.append(residual(b, t, depth=depth + 1))
            streams += 1
        else:
            br = conv(b, t, keep_hw=True, cout=b.int(2, max(2, MAX_C // n)))
            if kind == "conv_act":
                br = activation(b, br)
            branches.append(br)
    axis = b.pick([1, -3])
    y = b.node("Concat", [br.name for br in branches], "cat", axis=axis)
    b.used("concat")
    # x's channels twice in one label: tied like a channel-multiplier block
    repeated = streams + identity_used >= 2
    return T(y, sum(br.c for br in branches), t.h, t.w, blocked=repeated or any(br.blocked for br in branches),
             parts=sum((br.runs() for br in branches), ()))


def split_concat(b: Builder, t: T, keep_c=False, keep_hw=False, depth=0) -> T:
    """Split into halves, process each half separately, Concat back."""
    if t.c % 2:
        if keep_c:
            return activation(b, t)
        t = conv(b, t, keep_hw=True, cout=2 * b.int(1, MAX_C // 2), k=1)
    half = t.c // 2
    how = b.pick(["input", "equal"])
    if how == "input":
        a, c = b.node("Split", [t.name, b.const(np.array([half, half], np.int64), "split")], "half", outputs=2, axis=1)
    else:
        a, c = b.node("Split", [t.name], "half", outputs=2, axis=1)
    cut = _cut(t.runs(), half)
    outs = []
    for x, runs in zip((a, c), cut or ((), ())):
        ht = T(x, half, t.h, t.w, blocked=t.blocked, parts=runs)
        op = b.pick(["conv", "act", "bn", "none"])
        if op == "conv":
            ht = conv(b, ht, keep_c=True, keep_hw=True)
        elif op == "act":
            ht = activation(b, ht)
        elif op == "bn":
            ht = batchnorm(b, ht)
        outs.append(ht)
    y = b.node("Concat", [o.name for o in outs], "uncat", axis=1)
    b.used("split_concat", full=cut is not None and not t.blocked)  # a half may cut a run or a block
    return T(y, t.c, t.h, t.w, blocked=t.blocked, parts=outs[0].runs() + outs[1].runs())


def slice_channels(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    if keep_c or t.c < 3:
        return activation(b, t)
    start = b.int(0, t.c - 2)
    end = b.int(start + 2, t.c)
    form = b.pick(["plain", "negative", "big_end", "axes_neg"])
    if form == "negative":
        starts, ends, axes = [start - t.c], [end - t.c if end < t.c else np.iinfo(np.int64).max], [1]
    elif form == "big_end":
        starts, ends, axes = [start], [np.iinfo(np.int64).max if end == t.c else end], [1]
    elif form == "axes_neg":
        starts, ends, axes = [start], [end], [-3]
    else:
        starts, ends, axes = [start], [end], [1]
    y = b.node("Slice", [t.name, b.const(np.array(starts, np.int64), "starts"), b.const(np.array(ends, np.int64), "ends"),
                         b.const(np.array(axes, np.int64), "axes")], "slice")
    b.used("slice", full=False)  # the kept and dropped channels become separate groups (maybe of one)
    return T(y, end - start, t.h, t.w)


def shuffle(b: Builder, t: T, keep_c=False, keep_hw=False, g=None) -> T:
    """Channel shuffle: Reshape (N,g,C/g,H,W) -> Transpose(0,2,1,3,4) -> Reshape (N,C,H,W)."""
    choices = [d for d in (2, 3) if t.c % d == 0 and t.c // d >= 2]
    if not choices:
        return activation(b, t)
    g = g or b.pick(choices)
    lead = 0 if (b.batch == "N" or b.flag()) else BATCH
    s1 = b.const(np.array([lead, g, t.c // g, t.h, t.w], np.int64), "shape5")
    y = b.node("Reshape", [t.name, s1], "shuf_split")
    y = b.node("Transpose", [y], "shuf_t", perm=[0, 2, 1, 3, 4])
    s2 = b.const(np.array([lead, t.c, t.h, t.w] if b.flag() else [lead, -1, t.h, t.w], np.int64), "shape4")
    y = b.node("Reshape", [y, s2], "shuf_merge")
    b.used("shuffle", full=False)  # the walker pins a Reshape that splits the channel axis
    return T(y, t.c, t.h, t.w)


def nhwc(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    """Transpose to NHWC, MatMul over the last axis and/or per-channel bias, Transpose back."""
    y = b.node("Transpose", [t.name], "to_nhwc", perm=[0, 2, 3, 1])
    c = t.c
    projected = b.flag()
    if projected:
        cout = c if keep_c else b.int(2, MAX_C)
        y = b.node("MatMul", [y, b.weight((c, cout), "nhwc_w", fan_in=c)], "nhwc_mm")
        c = cout
        if b.flag():
            y = activation(b, T(y, c, t.h, t.w)).name
    if b.flag() or c == t.c:
        bias = b.weight((c,), "nhwc_b")
        y = b.node("Add", [y, bias] if b.flag() else [bias, y], "nhwc_add")
    y = b.node("Transpose", [y], "to_nchw", perm=[0, 3, 1, 2])
    b.used("nhwc")
    return T(y, c, t.h, t.w) if projected else replace(t, name=y)


def squeeze_excitation(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    r = b.int(2, max(2, t.c // 2))
    s = b.node("GlobalAveragePool", [t.name], "se_gap")
    s = b.node("Conv", [s, b.weight((r, t.c, 1, 1), "se_w1", fan_in=t.c), b.weight((r,), "se_b1")], "se_c1", kernel_shape=[1, 1])
    s = b.node("Relu", [s], "se_relu")
    s = b.node("Conv", [s, b.weight((t.c, r, 1, 1), "se_w2", fan_in=r), b.weight((t.c,), "se_b2")], "se_c2", kernel_shape=[1, 1])
    s = b.node(b.pick(["Sigmoid", "HardSigmoid"]), [s], "se_gate")
    y = b.node("Mul", [t.name, s] if b.flag() else [s, t.name], "se_mul")
    b.used("squeeze_excitation", full=not t.blocked)
    return replace(t, name=y)


def resize(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    if keep_hw or max(t.h, t.w) > 4:
        return activation(b, t)
    scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
    y = b.node("Resize", [t.name, "", scales], "resize", mode=b.pick(["nearest", "linear"]))
    b.used("resize")
    return replace(t, name=y, h=2 * t.h, w=2 * t.w)


def pad(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    """Pad 1 on each spatial side; under keep_hw, a 3x3 valid pool brings the size back."""
    mode = b.pick(["constant", "reflect", "edge"])
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    y = b.node("Pad", [t.name, pads], "pad", mode=mode)
    if keep_hw or max(t.h, t.w) > 6:
        y = b.node("AveragePool", [y], "unpad", kernel_shape=[3, 3])
        b.used("pad")
        return replace(t, name=y)
    b.used("pad")
    return replace(t, name=y, h=t.h + 2, w=t.w + 2)


def channel_layernorm(b: Builder, t: T, keep_c=False, keep_hw=False) -> T:
    """A LayerNorm over channels: ReduceMean(axis 1, keepdims) subtracted and divided back in."""
    if b.flag():
        # the op itself, normalizing over (C, H, W)
        y = b.node("LayerNormalization", [t.name, b.weight((t.c, t.h, t.w), "ln_scale"), b.weight((t.c, t.h, t.w), "ln_bias")],
                   "ln", axis=1, epsilon=1e-2)
        b.used("layernorm_chw")
        return replace(t, name=y)
    mean = b.node("ReduceMean", [t.name], "ln_mean", axes=[1], keepdims=1)
    d = b.node("Sub", [t.name, mean], "ln_d")
    var = b.node("ReduceMean", [b.node("Mul", [d, d], "ln_sq")], "ln_var", axes=[1], keepdims=1)
    std = b.node("Sqrt", [b.node("Add", [var, b.const(np.float32(1e-2), "eps")], "ln_ve")], "ln_std")
    y = b.node("Div", [d, std], "ln_y")
    y = b.node("Mul", [y, b.weight((t.c, 1, 1), "ln_g")], "ln_g")
    y = b.node("Add", [y, b.weight((t.c, 1, 1), "ln_b")], "ln_b")
    b.used("channel_layernorm")
    return replace(t, name=y)


PRESERVING = [conv, depthwise, batchnorm, batchnorm_decomposed, instancenorm, prelu, activation, pool,
              squeeze_excitation, nhwc, channel_layernorm, conv_transpose, grouped, shuffle, pad]
BLOCKS = PRESERVING + [residual, concat, split_concat, slice_channels, resize]


def _preserving(b: Builder, depth: int):
    options = PRESERVING + ([residual, split_concat] if depth < 1 else [])
    block = b.pick(options)
    if block in (residual, split_concat):
        return lambda b_, t_, **kw: block(b_, t_, depth=depth + 1, **kw)
    return block


# ==== heads ========================================================================================


def gemm(b: Builder, x: str, k: int, n: int, bias=None, trans_b=None, hint="fc") -> str:
    trans_b = b.pick([0, 1]) if trans_b is None else trans_b
    bias = b.flag() if bias is None else bias
    w = b.weight((n, k) if trans_b else (k, n), hint + "_w", fan_in=k)
    inputs = [x, w]
    if bias:
        inputs.append(b.weight(b.pick([(n,), (1, n)]), hint + "_b"))
    return b.node("Gemm", inputs, hint, transB=trans_b)


def head(b: Builder, t: T, kind=None) -> tuple[str, int]:
    kind = kind or b.pick(["gap", "flatten", "nhwc_flatten", "reduce_mean"])
    if kind == "gap":
        y = b.node("Flatten", [b.node("GlobalAveragePool", [t.name], "gap")], "flat")
        feats = t.c
    elif kind == "reduce_mean":
        y = b.node("ReduceMean", [t.name], "spatial_mean", axes=[2, 3], keepdims=0)
        feats = t.c
    elif kind == "flatten":
        y = b.node("Flatten", [t.name], "flat")
        feats = t.c * t.h * t.w
    else:
        y = b.node("Flatten", [b.node("Transpose", [t.name], "head_nhwc", perm=[0, 2, 3, 1])], "flat")
        feats = t.c * t.h * t.w
    b.used("head_" + kind)
    for _ in range(b.int(0, 2)):
        hidden = b.int(2, MAX_C)
        y = b.node(b.pick(["Relu", "Tanh"]), [gemm(b, y, feats, hidden)], "fc_act")
        feats = hidden
        b.used("gemm")
    out = b.int(2, 6)
    return gemm(b, y, feats, out, hint="logits"), out


# ==== strategies ===================================================================================


@st.composite
def cnn_graphs(draw, max_blocks: int = 6, blocks=None, plain: bool = False):
    """A stem Conv, 1..max_blocks random blocks, a head; sometimes a second output mid-network.

    blocks: restrict the block types; plain=True uses only blocks that keep coverage at 100%.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed, symbolic_batch=draw(st.integers(0, 4)) == 0)
    c0, h0 = draw(st.integers(1, 4)), draw(st.integers(4, 8))
    w0 = draw(st.sampled_from([h0, max(4, h0 - 1)]))
    b.add_input("x", [b.batch, c0, h0, w0])
    t = conv(b, T("x", c0, h0, w0))  # the stem: a depthwise or grouped conv on the input has fixed channels
    b.taps.append(t)
    options = blocks or BLOCKS
    if plain:
        options = [blk for blk in options if blk not in (grouped, shuffle, slice_channels, split_concat)]
    for _ in range(draw(st.integers(1, max_blocks))):
        block = draw(st.sampled_from(options))
        t = block(b, t)
        b.taps.append(t)
    y, n_out = head(b, t)
    b.add_output(y, [b.batch, n_out])
    if draw(st.integers(0, 3)) == 0:
        tap = draw(st.sampled_from(b.taps))
        if tap.name != "x":
            b.add_output(tap.name, b.nchw(tap))
            b.used("second_output")
    return Generated(b.model("cnn"), "cnn", b.constructs, b.full_coverage)


# ---- MLPs -------------------------------------------------------------------------------------------


def mlp_layer(b: Builder, x: str, d: int, rank: int, keep=False, depth=0) -> tuple[str, int]:
    # a Softmax of a Softmax is nearly uniform: a LayerNorm after it would amplify float rounding
    soft = [] if b.constructs and b.constructs[-1] == "softmax" else ["softmax"]
    kinds = ["matmul_add", "layernorm", "act"] + soft + (["residual"] if depth < 1 else []) + (["gemm"] if rank == 2 else [])
    kind = b.pick(kinds)
    if kind == "gemm":
        n = d if keep else b.int(2, MAX_C)
        b.used("gemm")
        return gemm(b, x, d, n, hint="dense"), n
    if kind == "matmul_add":
        n = d if keep else b.int(2, MAX_C)
        y = b.node("MatMul", [x, b.weight((d, n), "mm_w", fan_in=d)], "mm")
        if b.flag():
            bias = b.weight((n,), "mm_b")
            y = b.node("Add", [y, bias] if b.flag() else [bias, y], "mm_add")
        b.used("matmul_add")
        return y, n
    if kind == "layernorm":
        inputs = [x, b.weight((d,), "ln_scale")] + ([b.weight((d,), "ln_bias")] if b.flag() else [])
        b.used("layernorm")
        return b.node("LayerNormalization", inputs, "ln", axis=-1, epsilon=1e-2), d
    if kind == "softmax":
        b.used("softmax")
        return b.node(b.pick(["Softmax", "LogSoftmax"]), [x], "softmax", axis=-1), d
    if kind == "act":
        op = b.pick(["Relu", "Sigmoid", "Tanh", "LeakyRelu"])
        b.used("act_" + op)
        return b.node(op, [x], "act"), d
    # residual: x + f(x)
    y, n = mlp_layer(b, x, d, rank, keep=True, depth=depth + 1)
    if b.flag():
        y, n = mlp_layer(b, y, d, rank, keep=True, depth=depth + 1)
    b.used("residual")
    return b.node("Add", [x, y], "res"), d


@st.composite
def mlp_graphs(draw, max_layers: int = 5):
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed, symbolic_batch=draw(st.integers(0, 3)) == 0)
    rank = draw(st.sampled_from([2, 2, 3]))
    d0 = draw(st.integers(1, 8))
    lead = [b.batch] if rank == 2 else [b.batch, 3]
    b.add_input("x", lead + [d0])
    # the first layer is a producer (an LN or Softmax over the raw input would read fixed features)
    if rank == 2 and draw(st.booleans()):
        d = draw(st.integers(2, MAX_C))
        y = gemm(b, "x", d0, d, hint="dense")
        b.used("gemm")
    else:
        d = draw(st.integers(2, MAX_C))
        y = b.node("MatMul", ["x", b.weight((d0, d), "mm_w", fan_in=d0)], "mm")
        b.used("matmul_add")
    taps = [(y, d)]
    for _ in range(draw(st.integers(0, max_layers))):
        y, d = mlp_layer(b, y, d, rank)
        taps.append((y, d))
    out = draw(st.integers(2, 6))
    if rank == 2 and draw(st.booleans()):
        y = gemm(b, y, d, out, hint="logits")
    else:
        y = b.node("MatMul", [y, b.weight((d, out), "logits_w", fan_in=d)], "logits")
    b.add_output(y, lead + [out])
    if draw(st.integers(0, 3)) == 0:
        tap, td = draw(st.sampled_from(taps))
        b.add_output(tap, lead + [td])
        b.used("second_output")
    return Generated(b.model("mlp"), "mlp", b.constructs, b.full_coverage)


# ---- recurrent layers -------------------------------------------------------------------------------
# A producer, then one or two LSTM/GRU/RNN layers (forward or bidirectional, layout 0 or 1), read the
# ways exporters read them: Y merged to [.., dirs*H] (Transpose + Reshape), Y_h squeezed, one
# direction sliced or gathered, directions concatenated or summed (which ties them). Each direction
# is its own group except where a reader mixes them.

SEQ = 3
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent(b: Builder, x: str, feat: int, layout: int, like: tuple | None = None):
    """One recurrent layer on x ([S, B, feat], layout 1: [B, S, feat]); returns (Y, Y_h, dirs, H).
    like = (dirs, H, state): the same size as a layer before, starting from its last state."""
    op = b.pick(["LSTM", "GRU", "RNN"])
    dirs, hidden, state = like or (b.pick([2, 1]), b.int(2, 5), None)
    g = GATES[op]
    inputs = [x, b.weight((dirs, g * hidden, feat), "rnn_w", fan_in=feat),
              b.weight((dirs, g * hidden, hidden), "rnn_r", fan_in=hidden)]
    extra = {}
    if b.flag():
        inputs.append(b.weight((dirs, 2 * g * hidden), "rnn_b"))
    if state is None and b.flag():  # a stored initial state (else zeros)
        shape = (BATCH, dirs, hidden) if layout else (dirs, BATCH, hidden)
        state = b.weight(shape, "rnn_h0", mode="init")
        b.used("rnn_state_weight")
    if state is not None:
        inputs += [""] * (5 - len(inputs)) + [state]
    if op == "LSTM" and b.flag():  # peepholes
        inputs += [""] * (7 - len(inputs)) + [b.weight((dirs, 3 * hidden), "rnn_p")]
        b.used("lstm_peepholes")
    if op == "GRU":
        extra["linear_before_reset"] = b.pick([0, 1])
        b.used(f"gru_lbr{extra['linear_before_reset']}")
    direction = "bidirectional" if dirs == 2 else "forward"
    y, y_h = b.node(op, inputs, op.lower(), outputs=2, hidden_size=hidden, direction=direction, layout=layout, **extra)
    b.used(f"{op}_{direction}_layout{layout}")
    return y, y_h, dirs, hidden


def merged_sequence(b: Builder, y: str, dirs: int, hidden: int, layout: int) -> str:
    """Y -> [S, B, dirs*H] (layout 1: [B, S, dirs*H]) as PyTorch exports it."""
    if layout == 0:
        y = b.node("Transpose", [y], "rnn_t", perm=[0, 2, 1, 3])
        return b.node("Reshape", [y, b.const(np.array([SEQ, BATCH, dirs * hidden], dtype=np.int64))], "rnn_seq")
    return b.node("Reshape", [y, b.const(np.array([BATCH, SEQ, dirs * hidden], dtype=np.int64))], "rnn_seq")


def final_state(b: Builder, y_h: str, dirs: int, hidden: int, layout: int) -> tuple[str, int]:
    """Y_h ([dirs, B, H], layout 1: [B, dirs, H]) -> [B, features], one of the ways exporters do it."""
    axis = layout  # the direction axis
    kind = b.pick(["merge", "slice", "gather", "concat", "sum"] if dirs == 2 else ["merge", "gather"])
    b.used(f"rnn_state_{kind}")
    if kind == "merge":  # [B, dirs*H]
        if layout == 0:
            y_h = b.node("Transpose", [y_h], "h_t", perm=[1, 0, 2])
        return b.node("Reshape", [y_h, b.const(np.array([BATCH, dirs * hidden], dtype=np.int64))], "h_flat"), dirs * hidden
    d = b.pick(range(dirs))
    if kind == "slice":  # one direction: Slice + Squeeze
        one = b.node("Slice", [y_h, b.const(np.array([d], dtype=np.int64)), b.const(np.array([d + 1], dtype=np.int64)),
                               b.const(np.array([axis], dtype=np.int64))], "h_slice")
        return b.node("Squeeze", [one, b.const(np.array([axis], dtype=np.int64))], "h_one"), hidden
    if kind == "gather":
        return b.node("Gather", [y_h, b.const(np.array(d - dirs if b.flag() else d, dtype=np.int64))], "h_dir",
                      axis=axis), hidden
    if kind == "concat":  # [h_bwd, h_fwd] or [h_fwd, h_bwd]
        order = b.pick([[0, 1], [1, 0]])
        parts = [b.node("Gather", [y_h, b.const(np.array(k, dtype=np.int64))], "h_dir", axis=axis) for k in order]
        return b.node("Concat", parts, "h_cat", axis=-1), 2 * hidden
    # sum over directions: fwd unit k meets bwd unit k, so the two directions move together
    return b.node("ReduceSum", [y_h, b.const(np.array([axis], dtype=np.int64))], "h_sum", keepdims=0), hidden


@st.composite
def rnn_graphs(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed)
    layout = b.pick([0, 1])
    d0 = b.int(1, 4)
    lead = [SEQ, BATCH] if layout == 0 else [BATCH, SEQ]
    b.add_input("x", lead + [d0])
    feat = b.int(2, 6)
    x = b.node("MatMul", ["x", b.weight((d0, feat), "mm_w", fan_in=d0)], "mm")
    if b.flag():
        x = b.node("Tanh", [x], "act")
    y, y_h, dirs, hidden = recurrent(b, x, feat, layout)
    if b.flag():  # a stacked layer reads the merged sequence (maybe starting from the last state)
        x = merged_sequence(b, y, dirs, hidden, layout)
        like = (dirs, hidden, y_h) if b.flag() else None
        b.used("rnn_stacked" + ("_state" if like else ""))
        y, y_h, dirs, hidden = recurrent(b, x, dirs * hidden, layout, like)
    if b.flag():
        out, n = final_state(b, y_h, dirs, hidden, layout)
    else:  # mean over time of the merged sequence
        seq = merged_sequence(b, y, dirs, hidden, layout)
        out = b.node("ReduceMean", [seq], "seq_mean", axes=[layout], keepdims=0)
        n = dirs * hidden
        b.used("rnn_sequence")
    logits = gemm(b, out, n, b.int(2, 4), hint="logits")
    b.add_output(logits, [BATCH, None])
    return Generated(b.model("rnn"), "rnn", b.constructs, b.full_coverage)
