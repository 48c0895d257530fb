"""One small model per op in the walker's registry (walk/registry.py), for tests/test_registry.py.

Each case puts its op on a channel axis between producers (X -> Conv W1 -> op -> Conv W2 for the
unary ops, two producers W1a/W1b meeting in a binary op, Gemm/MatMul chains where the op wants a
2-D or NHWC tensor, a MatMul before and after a recurrent layer), with its inputs in the op's
domain (a Sigmoid before Log, Sqrt, Asin, ...; a bool tensor from a comparison before Not/And/...;
a Cast to an integer type before the bitwise ops). `touch` lists sets of weights that one group
must all slot (the op lets channels through: both sides move together); `pinned` is a reason the
walk must give for channels it cannot follow, and `free` the weights that no group may slot.
VARIANTS add models where a rule must pin (ArgMax over channels, Pad/Tile/Resize along them, grouped
convolutions, outputs that name channels) or that have shown a walker bug (test_registry.XFAIL).

Weights are seeded random numbers; every model is ir_version 8, opset 17 unless the op needs
another (noted in the case), and ONNX Runtime's contrib ops import com.microsoft version 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

IR_VERSION = 8
OPSET = 17
MS = "com.microsoft"
C = 6  # channels on the axis the op sits on
OUTPUT_PIN = "reaches a graph output"


class G:
    """A tiny graph builder: inputs, seeded weights, nodes with fresh output names, outputs."""

    def __init__(self, opset: int = OPSET, ms: bool = False, seed: int = 0):
        self.opset, self.ms = opset, ms
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.ranks: dict[str, int] = {}  # of the tensors that may become graph outputs
        self.value_info: list[onnx.ValueInfoProto] = []

    def input(self, name: str, shape, dtype=TP.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        self.ranks[name] = len(shape)
        return name

    def const(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def rand(self, name: str, shape, scale: float = 0.5) -> str:
        return self.const(name, self.rng.standard_normal(shape) * scale)

    def ints(self, name: str, shape, low: int, high: int, dtype) -> str:
        return self.const(name, self.rng.integers(low, high, size=shape), dtype)

    def op(self, op_type: str, inputs, outputs: int = 1, domain: str = "", **attrs):
        self.count += 1
        outs = [f"t{self.count}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self.count}",
                                           domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def output(self, name: str, dtype=TP.FLOAT, rank: int | None = None) -> None:
        rank = self.ranks[name] if rank is None else rank  # symbolic dims: the checker wants a shape
        self.outputs.append(helper.make_tensor_value_info(name, dtype, [f"{name}_{i}" for i in range(rank)]))

    # ---- producers ------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, w: str) -> str:
        out = self.op("Conv", [x, self.rand(w, [cout, cin, 1, 1]), self.rand(w + "_b", [cout], 0.1)])
        self.ranks[out] = 4
        return out

    def gemm(self, x: str, k: int, n: int, w: str, trans_b: int = 0) -> str:
        weight = self.rand(w, [n, k] if trans_b else [k, n])
        out = self.op("Gemm", [x, weight, self.rand(w + "_b", [n], 0.1)], transB=trans_b)
        self.ranks[out] = 2
        return out

    def matmul(self, x: str, k: int, n: int, w: str, rank: int | None = None) -> str:
        out = self.op("MatMul", [x, self.rand(w, [k, n])])
        self.ranks[out] = self.ranks[x] if rank is None else rank
        return out

    def shape_of(self, name: str, dtype, shape) -> None:
        """Declare a tensor's shape (what an exporter writes where ONNX shape inference stops)."""
        self.value_info.append(helper.make_tensor_value_info(name, dtype, shape))

    # ---- small steps ----------------------------------------------------------------------
    def cast(self, x: str, to=TP.FLOAT) -> str:
        return self.op("Cast", [x], to=to)

    def sigmoid(self, x: str) -> str:
        return self.op("Sigmoid", [x])

    def scalar(self, value, dtype=np.float32) -> str:
        self.count += 1
        return self.const(f"s{self.count}", value, dtype)

    def quantize(self, x: str, scale: float = 0.05, zp: int = 128) -> tuple[str, str, str]:
        s, z = self.scalar(scale), self.scalar(zp, np.uint8)
        return self.op("QuantizeLinear", [x, s, z]), s, z

    def dequantize(self, q: str, s: str, z: str) -> str:
        return self.op("DequantizeLinear", [q, s, z])

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "case", self.inputs, self.outputs, self.inits,
                                  value_info=self.value_info)
        opsets = [helper.make_opsetid("", self.opset)] + ([helper.make_opsetid(MS, 1)] if self.ms else [])
        return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=opsets)


@dataclass
class Case:
    op: str
    build: Callable[[], onnx.ModelProto]
    touch: tuple[frozenset, ...] = ()  # each set of weights lies in one group's slots
    pinned: str | None = None  # a reason the walk gives (substring)
    free: tuple[str, ...] = ()  # weights that no group slots
    domain: str = ""
    variant: str = ""  # VARIANTS: what this model does differently

    @property
    def name(self) -> str:
        base = self.op if not self.domain else f"{self.domain}.{self.op}"
        return f"{base}[{self.variant}]" if self.variant else base


CASES: dict[tuple[str, str], Case] = {}


def case(op: str, touch=(), pinned=None, free=(), domain: str = ""):
    def register(build):
        CASES[(domain, op)] = Case(op, build, tuple(frozenset(t) for t in touch), pinned, tuple(free), domain)
        return build

    return register


def _sets(*names: str) -> tuple[frozenset, ...]:
    return tuple(frozenset(n.split()) for n in names)


# ---- unary elementwise: X -> Conv W1 -> [pre] -> op -> [post] -> Conv W2 --------------------------
def _conv_chain(middle: Callable[[G, str], str], opset: int = OPSET, hw: int = 4, c: int = C, out_c=None,
                ms: bool = False) -> onnx.ModelProto:
    g = G(opset, ms)
    t = g.conv(g.input("X", [1, 3, hw, hw]), 3, c, "W1")
    u = middle(g, t)
    g.output(g.conv(u, out_c or c, 4, "W2"))
    return g.model()


def _unary(op: str, pre=None, post=None, opset: int = OPSET, extra=None, **attrs) -> None:
    def middle(g: G, t: str) -> str:
        if pre is not None:
            t = pre(g, t)
        u = g.op(op, [t] + (extra(g) if extra else []), **attrs)
        return post(g, u) if post is not None else u

    case(op, touch=_sets("W1 W2"))(lambda: _conv_chain(middle, opset))


def _sig(g, t):
    return g.sigmoid(t)


def _to_float(g, t):
    return g.cast(t)


for _op in ("Relu Elu Selu Celu Sigmoid HardSigmoid Tanh Softplus Softsign Erf Exp Abs Neg Floor Ceil Round "
            "Sign Sin Cos Atan Sinh Cosh Asinh Identity Dropout").split():
    _unary(_op)
_unary("LeakyRelu", alpha=0.2)
_unary("HardSwish")  # opset 14
_unary("ThresholdedRelu", alpha=0.3)
_unary("Shrink", bias=0.1, lambd=0.4)
for _op in ("Log", "Sqrt", "Reciprocal", "Asin", "Acos", "Atanh", "Tan"):  # inputs in (0, 1)
    _unary(_op, pre=_sig)
_unary("Acosh", pre=lambda g, t: g.op("Add", [g.sigmoid(t), g.scalar(1.0)]))  # inputs in (1, 2)
_unary("Gelu", opset=20)
_unary("Mish", opset=18)
_unary("Swish", opset=24)
_unary("Cast", post=_to_float, to=TP.DOUBLE)
_unary("CastLike", post=_to_float, extra=lambda g: [g.scalar(0.0, np.float64)])  # opset 15
_unary("IsNaN", pre=lambda g, t: g.op("Log", [t]), post=_to_float)  # NaN where the conv is negative
_unary("IsInf", pre=lambda g, t: g.op("Reciprocal", [g.op("Relu", [t])]), post=_to_float)  # inf where <= 0
_unary("Not", pre=lambda g, t: g.op("Greater", [t, g.scalar(0.0)]), post=_to_float)
_unary("BitwiseNot", pre=lambda g, t: g.cast(t, TP.INT32), post=_to_float, opset=18)


# ---- binary: two producers W1a, W1b meet in the op --------------------------------------------------
def _binary(op: str, pre_a=None, pre_b=None, post=None, opset: int = OPSET, **attrs) -> None:
    def build():
        g = G(opset)
        x = g.input("X", [1, 3, 4, 4])
        a, b = g.conv(x, 3, C, "W1a"), g.conv(x, 3, C, "W1b")
        a = pre_a(g, a) if pre_a else a
        b = pre_b(g, b) if pre_b else b
        u = g.op(op, [a, b], **attrs)
        g.output(g.conv(post(g, u) if post else u, C, 4, "W2"))
        return g.model()

    case(op, touch=_sets("W1a W1b W2"))(build)


for _op in ("Add", "Sub", "Mul", "Max", "Min", "Mean", "Sum"):
    _binary(_op)
_binary("Div", pre_b=_sig)
_binary("Pow", pre_a=_sig)
_binary("Mod", pre_b=_sig, fmod=1)
_binary("Equal", pre_a=lambda g, t: g.op("Sign", [t]), pre_b=lambda g, t: g.op("Sign", [t]), post=_to_float)
for _op in ("Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
    _binary(_op, post=_to_float)


def _positive(g, t):
    return g.op("Greater", [t, g.scalar(0.0)])


for _op in ("And", "Or", "Xor"):
    _binary(_op, pre_a=_positive, pre_b=_positive, post=_to_float)


def _small_uint8(g, t):
    return g.cast(g.op("Mul", [g.op("Abs", [t]), g.scalar(2.0)]), TP.UINT8)


_binary("BitShift", pre_a=_small_uint8, pre_b=_small_uint8, post=_to_float, direction="LEFT")


@case("Where", touch=_sets("W1a W1b W2"))
def _where():
    g = G()
    x = g.input("X", [1, 3, 4, 4])
    a, b = g.conv(x, 3, C, "W1a"), g.conv(x, 3, C, "W1b")
    g.output(g.conv(g.op("Where", [g.op("Greater", [a, b]), a, b]), C, 4, "W2"))
    return g.model()


@case("PRelu", touch=_sets("W1 slope W2"))
def _prelu():
    return _conv_chain(lambda g, t: g.op("PRelu", [t, g.rand("slope", [C, 1, 1], 0.3)]))


@case("Clip", touch=_sets("W1 W2"))
def _clip():
    return _conv_chain(lambda g, t: g.op("Clip", [t, g.scalar(-0.5), g.scalar(0.5)]))


# ---- layout --------------------------------------------------------------------------------------------
@case("Transpose", touch=_sets("W1 W2"))
def _transpose():  # NCHW -> NHWC, then a MatMul over channels
    g = G()
    t = g.conv(g.input("X", [1, 3, 4, 4]), 3, C, "W1")
    g.output(g.matmul(g.op("Transpose", [t], perm=[0, 2, 3, 1]), C, 4, "W2", rank=4))
    return g.model()


@case("Squeeze", touch=_sets("W1 W2"))
def _squeeze():
    g = G()
    t = g.conv(g.input("X", [2, 3, 1, 1]), 3, C, "W1")
    s = g.op("Squeeze", [t, g.const("axes", [2, 3], np.int64)])
    g.output(g.gemm(s, C, 4, "W2"))
    return g.model()


@case("Unsqueeze", touch=_sets("W1 W2"))
def _unsqueeze():
    g = G()
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    g.output(g.conv(g.op("Unsqueeze", [t, g.const("axes", [2, 3], np.int64)]), C, 4, "W2"))
    return g.model()


def _merge_head(op: str):
    def build():  # Conv [1, C, 2, 2] -> [1, 4C] -> Gemm: each channel is a block of 4 rows of W2
        g = G()
        t = g.conv(g.input("X", [1, 3, 2, 2]), 3, C, "W1")
        if op == "Reshape":
            flat = g.op("Reshape", [t, g.const("shape", [1, 4 * C], np.int64)])
        else:
            flat = g.op("Flatten", [t], axis=1)
        g.output(g.gemm(flat, 4 * C, 4, "W2"))
        return g.model()

    case(op, touch=_sets("W1 W2"))(build)


_merge_head("Reshape")
_merge_head("Flatten")

case("Expand", touch=_sets("W1 W2"))(
    lambda: _conv_chain(lambda g, t: g.op("Expand", [t, g.const("shape", [2, 1, 1, 1], np.int64)])))
case("Tile", touch=_sets("W1 W2"))(
    lambda: _conv_chain(lambda g, t: g.op("Tile", [t, g.const("repeats", [1, 1, 2, 2], np.int64)])))
case("Pad", touch=_sets("W1 W2"))(
    lambda: _conv_chain(lambda g, t: g.op("Pad", [t, g.const("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)])))
case("Resize", touch=_sets("W1 W2"))(
    lambda: _conv_chain(lambda g, t: g.op("Resize", [t, "", g.const("scales", [1, 1, 2, 2])], mode="nearest")))
case("Upsample", touch=_sets("W1 W2"))(  # deprecated from opset 10: an opset 9 model
    lambda: _conv_chain(lambda g, t: g.op("Upsample", [t, g.const("scales", [1, 1, 2, 2])], mode="nearest"),
                        opset=9))
for _op, _attrs in (("MaxPool", {"kernel_shape": [2, 2]}), ("AveragePool", {"kernel_shape": [2, 2]}),
                    ("LpPool", {"kernel_shape": [2, 2]}), ("GlobalMaxPool", {}), ("GlobalAveragePool", {}),
                    ("GlobalLpPool", {})):
    case(_op, touch=_sets("W1 W2"))(lambda _op=_op, _attrs=_attrs: _conv_chain(lambda g, t: g.op(_op, [t], **_attrs)))

case("DepthToSpace", pinned="consumed by DepthToSpace (no rule)", free=("W1",))(
    lambda: _conv_chain(lambda g, t: g.op("DepthToSpace", [t], blocksize=2), c=8, out_c=2))
case("SpaceToDepth", pinned="consumed by SpaceToDepth (no rule)", free=("W1",))(
    lambda: _conv_chain(lambda g, t: g.op("SpaceToDepth", [t], blocksize=2), out_c=4 * C))


def _filled_like(g, t):  # t + ConstantOfShape(Shape(t)): a filled tensor does not pin
    value = numpy_helper.from_array(np.array([0.5], np.float32), "value")
    return g.op("Add", [t, g.op("ConstantOfShape", [g.op("Shape", [t])], value=value)])


case("Shape", touch=_sets("W1 W2"))(lambda: _conv_chain(_filled_like))
case("ConstantOfShape", touch=_sets("W1 W2"))(lambda: _conv_chain(_filled_like))
case("Size", touch=_sets("W1 W2"))(
    lambda: _conv_chain(lambda g, t: g.op("Div", [t, g.cast(g.op("Size", [t]))])))


@case("NonZero", pinned="consumed by NonZero (no rule)", free=("W1", "W2"))
def _nonzero():
    g = G()
    t = g.conv(g.input("X", [1, 3, 4, 4]), 3, C, "W1")
    g.output(g.op("NonZero", [t]), TP.INT64, rank=2)
    g.output(g.conv(t, C, 4, "W2"))
    return g.model()


# ---- normalization -------------------------------------------------------------------------------------
@case("BatchNormalization", touch=_sets("W1 bn_s bn_b bn_m bn_v W2"))
def _batchnorm():
    def middle(g, t):
        var = g.const("bn_v", g.rng.uniform(0.5, 2.0, C))
        return g.op("BatchNormalization", [t, g.rand("bn_s", [C]), g.rand("bn_b", [C]), g.rand("bn_m", [C]), var])

    return _conv_chain(middle)


case("InstanceNormalization", touch=_sets("W1 in_s in_b W2"))(lambda: _conv_chain(
    lambda g, t: g.op("InstanceNormalization", [t, g.rand("in_s", [C]), g.rand("in_b", [C])])))
case("GroupNormalization", touch=_sets("W1 gn_s gn_b W2"))(lambda: _conv_chain(  # opset 21: scale per channel
    lambda g, t: g.op("GroupNormalization", [t, g.rand("gn_s", [C]), g.rand("gn_b", [C])], num_groups=2),
    opset=21))


@case("LayerNormalization", touch=_sets("W1 ln_s ln_b W2"))
def _layernorm():
    g = G()
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    n = g.op("LayerNormalization", [t, g.rand("ln_s", [C]), g.rand("ln_b", [C])], axis=-1)
    g.output(g.gemm(n, C, 4, "W2"))
    return g.model()


for _op in ("Softmax", "LogSoftmax"):
    case(_op, touch=_sets("W1 W2"))(lambda _op=_op: _conv_chain(lambda g, t: g.op(_op, [t], axis=1)))


# ---- producers: each side of the op is its own group -------------------------------------------------------
case("Conv", touch=_sets("W1 Wop", "Wop W2"))(lambda: _conv_chain(lambda g, t: g.conv(t, C, 5, "Wop"), out_c=5))


@case("ConvTranspose", touch=_sets("W1 Wop", "Wop W2"))
def _conv_transpose():
    def middle(g, t):
        return g.op("ConvTranspose", [t, g.rand("Wop", [C, 5, 2, 2]), g.rand("Wop_b", [5], 0.1)], strides=[2, 2])

    return _conv_chain(middle, out_c=5)


@case("Gemm", touch=_sets("W1 Wop", "Wop W2"))
def _gemm():
    g = G()
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    g.output(g.gemm(g.gemm(t, C, 5, "Wop", trans_b=1), 5, 4, "W2"))
    return g.model()


@case("MatMul", touch=_sets("W1 Wop", "Wop W2"))
def _matmul():
    g = G()
    t = g.matmul(g.input("X", [2, 4, 3]), 3, C, "W1")
    g.output(g.matmul(g.matmul(t, C, 5, "Wop"), 5, 4, "W2"))
    return g.model()


@case("Einsum", touch=_sets("W1 Wop", "Wop W2"))
def _einsum():  # Keras' EinsumDense as tf2onnx writes it: a weight-only letter makes fresh channels
    g = G()
    t = g.matmul(g.input("X", [2, 4, 3]), 3, C, "W1")
    y = g.op("Einsum", [t, g.rand("Wop", [C, 5])], equation="abc,cd->abd")
    g.ranks[y] = 3
    g.output(g.matmul(y, 5, 4, "W2"))
    return g.model()


# ---- selection -----------------------------------------------------------------------------------------------
case("Gather", touch=_sets("W1 W2"))(lambda: _conv_chain(
    lambda g, t: g.op("Gather", [t, g.const("idx", [0, 2, 3, 5], np.int64)], axis=1), out_c=4))
case("Slice", touch=_sets("W1 W2"))(lambda: _conv_chain(
    lambda g, t: g.op("Slice", [t, g.const("starts", [1], np.int64), g.const("ends", [5], np.int64),
                                g.const("axes", [1], np.int64)]), out_c=4))


@case("Concat", touch=_sets("W1a W2", "W1b W2"))
def _concat():
    g = G()
    x = g.input("X", [1, 3, 4, 4])
    cat = g.op("Concat", [g.conv(x, 3, C, "W1a"), g.conv(x, 3, 4, "W1b")], axis=1)
    g.output(g.conv(cat, C + 4, 4, "W2"))
    return g.model()


@case("Split", touch=_sets("W1 W2a", "W1 W2b"))
def _split():
    g = G()
    t = g.conv(g.input("X", [1, 3, 4, 4]), 3, C, "W1")
    a, b = g.op("Split", [t, g.const("split", [2, 4], np.int64)], outputs=2, axis=1)
    g.output(g.conv(a, 2, 4, "W2a"))
    g.output(g.conv(b, 4, 4, "W2b"))
    return g.model()


# ---- reductions (opset 18: axes are an input) over the spatial axes ---------------------------------------------
for _op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSumExp", "ReduceSumSquare"):
    case(_op, touch=_sets("W1 W2"))(lambda _op=_op: _conv_chain(
        lambda g, t: g.op(_op, [t, g.const("axes", [2, 3], np.int64)], keepdims=1), opset=18, hw=2))
for _op in ("ArgMax", "ArgMin"):  # indices along a spatial axis, per channel
    case(_op, touch=_sets("W1 W2"))(lambda _op=_op: _conv_chain(
        lambda g, t: g.cast(g.op(_op, [t], axis=2, keepdims=1))))


# ---- recurrent: X [T, B, F] -> MatMul W1 -> RNN -> Y [T, 1, B, H] -> Squeeze -> MatMul W2 -------------------------
H = 5


def _rnn(op: str, gates: int):
    def build():
        g = G()
        t = g.matmul(g.input("X", [3, 2, 3]), 3, C, "W1")
        w, r = g.rand("Wop", [1, gates * H, C]), g.rand("Rop", [1, gates * H, H])
        y = g.op(op, [t, w, r, g.rand("Bop", [1, 2 * gates * H], 0.1)], hidden_size=H)
        g.output(g.matmul(g.op("Squeeze", [y, g.const("axes", [1], np.int64)]), H, 4, "W2", rank=3))
        return g.model()

    case(op, touch=_sets("W1 Wop", "Wop Rop Bop W2"))(build)


_rnn("LSTM", 4)
_rnn("GRU", 3)
_rnn("RNN", 1)


@case("DynamicQuantizeLSTM", touch=_sets("W1 Wq", "Wq Rq Bop W2"), domain=MS)
def _dq_lstm():  # W [dir, input, 4H] and R [dir, H, 4H] int8, per-direction scales
    g = G(ms=True)
    t = g.matmul(g.input("X", [3, 2, 3]), 3, C, "W1")
    w, r = g.ints("Wq", [1, C, 4 * H], -60, 60, np.int8), g.ints("Rq", [1, H, 4 * H], -60, 60, np.int8)
    inputs = [t, w, r, g.rand("Bop", [1, 8 * H], 0.1), "", "", "", "",
              g.const("Ws", [0.01]), g.const("Wz", [0], np.int8), g.const("Rs", [0.01]), g.const("Rz", [0], np.int8)]
    y = g.op("DynamicQuantizeLSTM", inputs, domain=MS, hidden_size=H)
    g.shape_of(y, TP.FLOAT, [3, 1, 2, H])  # ONNX shape inference does not know the contrib op
    g.output(g.matmul(g.op("Squeeze", [y, g.const("axes", [1], np.int64)]), H, 4, "W2", rank=3))
    return g.model()


# ---- quantized: Q/DQ around the op; integer producers between float ones ------------------------------------------
def _qdq_chain(weight_dq: bool):
    g = G()
    x = g.input("X", [1, 3, 4, 4])
    if weight_dq:  # W1 stored as int8 with a scale per output channel
        w = g.op("DequantizeLinear", [g.ints("W1q", [C, 3, 1, 1], -100, 100, np.int8),
                                      g.const("W1s", g.rng.uniform(0.002, 0.01, C)),
                                      g.const("W1z", np.zeros(C), np.int8)], axis=0)
        t = g.op("Conv", [x, w, g.rand("W1_b", [C], 0.1)])
    else:
        t = g.conv(x, 3, C, "W1")
    s, z = g.const("qs", g.rng.uniform(0.01, 0.03, C)), g.const("qz", g.rng.integers(100, 150, C), np.uint8)
    q = g.op("QuantizeLinear", [t, s, z], axis=1)
    g.output(g.conv(g.op("DequantizeLinear", [q, s, z], axis=1), C, 4, "W2"))
    return g.model()


case("QuantizeLinear", touch=_sets("W1 qs qz W2"))(lambda: _qdq_chain(False))
case("DequantizeLinear", touch=_sets("W1q W1s W1z qs qz W2"))(lambda: _qdq_chain(True))


@case("DynamicQuantizeLinear", touch=_sets("W1 W2"))
def _dynamic_quantize_linear():
    return _conv_chain(lambda g, t: g.dequantize(*g.op("DynamicQuantizeLinear", [t], outputs=3)))


@case("ConvInteger", touch=_sets("W1 Wq", "Wq W2"))
def _conv_integer():
    def middle(g, t):
        q, s, z = g.op("DynamicQuantizeLinear", [t], outputs=3)
        w = g.ints("Wq", [5, C, 1, 1], 0, 255, np.uint8)
        y = g.op("ConvInteger", [q, w, z, g.scalar(128, np.uint8)])  # ORT: per-tensor w_zero_point only
        return g.op("Mul", [g.cast(y), g.scalar(1e-4)])

    return _conv_chain(middle, out_c=5)


@case("QLinearConv", touch=_sets("W1 Wq", "Wq Ws Bq W2"))
def _qlinear_conv():
    def middle(g, t):
        q, s, z = g.quantize(t)
        w = g.ints("Wq", [5, C, 1, 1], -100, 100, np.int8)
        ws, wz = g.const("Ws", g.rng.uniform(0.002, 0.01, 5)), g.const("Wz", np.zeros(5), np.int8)
        ys, yz = g.scalar(0.05), g.scalar(128, np.uint8)
        y = g.op("QLinearConv", [q, s, z, w, ws, wz, ys, yz, g.ints("Bq", [5], -500, 500, np.int32)])
        return g.dequantize(y, ys, yz)

    return _conv_chain(middle, out_c=5)


def _two_d(middle, ms: bool = False):
    """X [2, 3] -> Gemm W1 -> middle -> Gemm W2 (middle returns a float [2, 5])."""
    g = G(ms=ms)
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    g.output(g.gemm(middle(g, t), 5, 4, "W2"))
    return g.model()


@case("MatMulInteger", touch=_sets("W1 Bq", "Bq Bz W2"))
def _matmul_integer():
    def middle(g, t):
        q, s, z = g.op("DynamicQuantizeLinear", [t], outputs=3)
        b = g.ints("Bq", [C, 5], 0, 255, np.uint8)
        y = g.op("MatMulInteger", [q, b, z, g.ints("Bz", [5], 120, 136, np.uint8)])
        return g.op("Mul", [g.cast(y), g.scalar(1e-4)])

    return _two_d(middle)


@case("QLinearMatMul", touch=_sets("W1 Bq", "Bq Bs W2"))
def _qlinear_matmul():
    def middle(g, t):
        q, s, z = g.quantize(t)
        b = g.ints("Bq", [C, 5], -100, 100, np.int8)
        bs, bz = g.const("Bs", g.rng.uniform(0.002, 0.01, 5)), g.const("Bz", np.zeros(5), np.int8)
        ys, yz = g.scalar(0.05), g.scalar(128, np.uint8)
        return g.dequantize(g.op("QLinearMatMul", [q, s, z, b, bs, bz, ys, yz]), ys, yz)

    return _two_d(middle)


@case("QGemm", touch=_sets("W1 Bq", "Bq Bs Cq W2"), domain=MS)
def _qgemm():
    def middle(g, t):
        q, s, z = g.quantize(t)
        b = g.ints("Bq", [C, 5], -100, 100, np.int8)
        bs, bz = g.const("Bs", g.rng.uniform(0.002, 0.01, 5)), g.const("Bz", np.zeros(5), np.int8)
        ys, yz = g.scalar(0.05), g.scalar(128, np.uint8)
        y = g.op("QGemm", [q, s, z, b, bs, bz, g.ints("Cq", [5], -500, 500, np.int32), ys, yz], domain=MS)
        return g.dequantize(y, ys, yz)

    return _two_d(middle, ms=True)


def _qlinear_binary(op: str):
    def build():
        g = G(ms=True)
        x = g.input("X", [1, 3, 4, 4])
        a, sa, za = g.quantize(g.conv(x, 3, C, "W1a"))
        b, sb, zb = g.quantize(g.conv(x, 3, C, "W1b"), 0.04, 120)
        ys, yz = g.scalar(0.08), g.scalar(128, np.uint8)
        y = g.op(op, [a, sa, za, b, sb, zb, ys, yz], domain=MS)
        g.output(g.conv(g.dequantize(y, ys, yz), C, 4, "W2"))
        return g.model()

    case(op, touch=_sets("W1a W1b W2"), domain=MS)(build)


_qlinear_binary("QLinearAdd")
_qlinear_binary("QLinearMul")


def _qlinear_unary(op: str, **attrs):
    def middle(g, t):
        q, s, z = g.quantize(t)
        ys, yz = g.scalar(0.004 if op == "QLinearSigmoid" else 0.05), g.scalar(0 if op == "QLinearSigmoid" else 128,
                                                                               np.uint8)
        return g.dequantize(g.op(op, [q, s, z, ys, yz], domain=MS, **attrs), ys, yz)

    return middle


case("QLinearSigmoid", touch=_sets("W1 W2"), domain=MS)(
    lambda: _conv_chain(_qlinear_unary("QLinearSigmoid"), ms=True))
case("QLinearLeakyRelu", touch=_sets("W1 W2"), domain=MS)(
    lambda: _conv_chain(_qlinear_unary("QLinearLeakyRelu", alpha=0.2), ms=True))
case("QLinearGlobalAveragePool", touch=_sets("W1 W2"), domain=MS)(
    lambda: _conv_chain(_qlinear_unary("QLinearGlobalAveragePool", channels_last=0), ms=True))
case("QLinearAveragePool", touch=_sets("W1 W2"), domain=MS)(
    lambda: _conv_chain(_qlinear_unary("QLinearAveragePool", kernel_shape=[2, 2]), ms=True))


@case("QLinearSoftmax", touch=_sets("W1 W2"), domain=MS)
def _qlinear_softmax():  # over the channel axis of [2, C]
    def middle(g, t):
        q, s, z = g.quantize(t)
        ys, yz = g.scalar(1 / 256), g.scalar(0, np.uint8)
        y = g.op("QLinearSoftmax", [q, s, z, ys, yz], domain=MS, axis=-1, opset=13)
        return g.dequantize(y, ys, yz)

    g = G(ms=True)
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    g.output(g.gemm(middle(g, t), C, 4, "W2"))
    return g.model()


case("QLinearReduceMean", pinned="consumed by QLinearReduceMean (no rule)", free=("W1", "W2"), domain=MS)(
    lambda: _conv_chain(_qlinear_unary("QLinearReduceMean", axes=[2, 3], keepdims=1), ms=True))


@case("QLinearConcat", touch=_sets("W1a W2", "W1b W2"), domain=MS)
def _qlinear_concat():
    g = G(ms=True)
    x = g.input("X", [1, 3, 4, 4])
    a, sa, za = g.quantize(g.conv(x, 3, C, "W1a"))
    b, sb, zb = g.quantize(g.conv(x, 3, 4, "W1b"), 0.04, 120)
    ys, yz = g.scalar(0.05), g.scalar(128, np.uint8)
    y = g.op("QLinearConcat", [ys, yz, a, sa, za, b, sb, zb], domain=MS, axis=1)
    g.output(g.conv(g.dequantize(y, ys, yz), C + 4, 4, "W2"))
    return g.model()


# ---- variants: a rule meets what it must pin (the permutation of the rest stays exact) -------------------------
VARIANTS: list[Case] = []


def variant(op: str, name: str, pinned: str, touch=(), free=("W1",)):
    def register(build):
        VARIANTS.append(Case(op, build, _sets(*touch), pinned, tuple(free), variant=name))
        return build

    return register


variant("ArgMax", "channel-axis", "ArgMax returns channel indices")(
    lambda: _conv_chain(lambda g, t: g.cast(g.op("ArgMax", [t], axis=1, keepdims=1)), out_c=1))
variant("Pad", "channel-axis", "Pad on the channel axis")(lambda: _conv_chain(
    lambda g, t: g.op("Pad", [t, g.const("pads", [0, 1, 0, 0, 0, 1, 0, 0], np.int64)]), out_c=C + 2))
variant("Tile", "channel-axis", "Tile along the channel axis")(lambda: _conv_chain(
    lambda g, t: g.op("Tile", [t, g.const("repeats", [1, 2, 1, 1], np.int64)]), out_c=2 * C))
variant("Resize", "channel-axis", "Resize along the channel axis")(lambda: _conv_chain(
    lambda g, t: g.op("Resize", [t, "", g.const("scales", [1, 2, 1, 1])], mode="nearest"), out_c=2 * C))
variant("ConvTranspose", "grouped", "ConvTranspose with group=2", free=("W1", "Wop"))(lambda: _conv_chain(
    lambda g, t: g.op("ConvTranspose", [t, g.rand("Wop", [C, 3, 2, 2])], strides=[2, 2], group=2), out_c=6))
variant("Conv", "grouped", "input of a grouped Conv (group=2)", touch=["Wop W2"])(lambda: _conv_chain(
    lambda g, t: g.op("Conv", [t, g.rand("Wop", [4, C // 2, 1, 1])], group=2), out_c=4))


def _maxpool_indices(read: bool):
    g = G()
    t = g.conv(g.input("X", [1, 3, 4, 4]), 3, C, "W1")
    y, idx = g.op("MaxPool", [t], outputs=2, kernel_shape=[2, 2])
    if read:  # flat indices over (N, C, H, W): they name channels
        idx = g.cast(idx)
    g.output(idx, TP.FLOAT if read else TP.INT64, rank=4)
    g.output(g.conv(y, C, 4, "W2"))
    return g.model()


variant("MaxPool", "indices-used", "MaxPool indices output is used")(lambda: _maxpool_indices(True))
# the indices straight to a graph output: whatever the walk says, permuting must keep them
variant("MaxPool", "indices-output", OUTPUT_PIN, free=())(lambda: _maxpool_indices(False))


@variant("Add", "graph-input", "Add mixes channels with an unlabelled tensor")
def _add_input():
    g = G()
    t = g.conv(g.input("X", [1, 3, 4, 4]), 3, C, "W1")
    g.output(g.conv(g.op("Add", [t, g.input("X2", [1, C, 4, 4])]), C, 4, "W2"))
    return g.model()


def _qdq_blocked(g, t):  # opset 21: one scale per block of 2 channels and pixel
    s = g.const("qs", g.rng.uniform(0.01, 0.03, (1, C // 2, 4, 4)))
    z = g.const("qz", np.full((1, C // 2, 4, 4), 128), np.uint8)
    q = g.op("QuantizeLinear", [t, s, z], axis=1, block_size=2)
    return g.op("DequantizeLinear", [q, s, z], axis=1, block_size=2)


# (the walk's view is not asserted: the bug shows when the permuted model runs)
variant("QuantizeLinear", "blocked", OUTPUT_PIN, free=())(lambda: _conv_chain(_qdq_blocked, opset=21))


@variant("DequantizeLinear", "blocked-weight", OUTPUT_PIN, free=())
def _dq_blocked_weight():  # a MatMul weight stored as int8 blocks of 2 rows (as int4 LLM weights are)
    g = G(opset=21)
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    w = g.op("DequantizeLinear", [g.ints("Wq", [C, 5], -100, 100, np.int8),
                                  g.const("Ws", g.rng.uniform(0.002, 0.01, (C // 2, 5)))], axis=0, block_size=2)
    y = g.op("MatMul", [t, w])
    g.ranks[y] = 2
    g.output(g.gemm(y, 5, 4, "W2"))
    return g.model()


@variant("LayerNormalization", "statistics-used", "LayerNormalization statistics output is used")
def _layernorm_stats():
    g = G()
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    n, mean = g.op("LayerNormalization", [t, g.rand("ln_s", [C]), g.rand("ln_b", [C])], outputs=2, axis=-1)
    g.output(g.op("Neg", [mean]), rank=2)
    g.output(g.gemm(n, C, 4, "W2"))
    return g.model()


# ONNX Runtime on CPU cannot run these cases (the test checks that it really refuses them): name -> why
ORT_CANNOT_RUN: dict[str, str] = {
    "com.microsoft.QLinearReduceMean": "ONNX Runtime has no CPU kernel for it (NOT_IMPLEMENTED)",
}


# ---- ONNX Runtime's contrib ops (walk/rules/contrib.py), as its optimizer and tools write them ----------------
CHECKER_REFUSES: dict[str, str] = {  # onnx.checker does not know these ops: name -> why
    "SimplifiedLayerNormalization": "ONNX Runtime registers it in the standard domain; ONNX has no such op",
}
H, HEADS = 8, 2  # hidden channels and heads of the attention cases (head size 4)


def _seq(middle, hidden: int = H, out_hidden: int | None = None, opset: int = OPSET):
    """X [1, 4, 6] -> MatMul W1 -> middle -> MatMul W2 (middle returns [1, 4, out_hidden])."""
    g = G(opset, ms=True)
    t = g.matmul(g.input("X", [1, 4, 6]), 6, hidden, "W1")
    u = middle(g, t)
    g.ranks.setdefault(u, 3)
    g.output(g.matmul(u, out_hidden or hidden, 4, "W2"))
    return g.model()


def _fused_conv(activation: str, params=None, z: bool = False):
    def build():
        g = G(ms=True)
        x = g.input("X", [1, 3, 4, 4])
        t = g.conv(x, 3, C, "W1")
        ins = [t, g.rand("Wop", [5, C, 1, 1]), g.rand("Wop_b", [5], 0.1)]
        if z:  # the sum input: another producer's channels meet the conv's
            ins.append(g.conv(x, 3, 5, "Wz"))
        attrs = {"activation_params": params} if params else {}
        y = g.op("FusedConv", ins, domain=MS, activation=activation, kernel_shape=[1, 1], **attrs)
        g.ranks[y] = 4
        g.output(g.conv(y, 5, 4, "W2"))
        return g.model()

    return build


case("FusedConv", touch=_sets("W1 Wop", "Wop Wop_b Wz W2"), domain=MS)(_fused_conv("Relu", z=True))
for _act, _params in (("Tanh", None), ("Sigmoid", None), ("LeakyRelu", [0.2]), ("Clip", [-0.5, 0.5]),
                      ("HardSigmoid", [0.2, 0.5])):
    VARIANTS.append(Case("FusedConv", _fused_conv(_act, _params), _sets("W1 Wop", "Wop Wop_b W2"), None, (), MS,
                         variant=_act))


@case("FusedGemm", touch=_sets("W1 Wop", "Wop Wop_b W2"), domain=MS)
def _fused_gemm():
    def middle(g, t):
        return g.op("FusedGemm", [t, g.rand("Wop", [5, C]), g.rand("Wop_b", [5], 0.1)], domain=MS, transB=1,
                    activation="LeakyRelu", activation_alpha=0.1)

    return _two_d(middle, ms=True)


@case("FusedMatMul", touch=_sets("W1 Wop", "Wop W2"), domain=MS)
def _fused_matmul():  # the weight stored transposed [N, K], alpha folded in
    return _seq(lambda g, t: g.op("FusedMatMul", [t, g.rand("Wop", [5, H])], domain=MS, transB=1, alpha=0.5),
                out_hidden=5)


@variant("FusedMatMul", "transA", "reaches a graph output", touch=(), free=())
def _fused_matmul_trans_a():  # x^T W over the sequence axis: the hidden channels become rows
    g = G(ms=True)
    t = g.gemm(g.input("X", [2, 3]), 3, C, "W1")
    y = g.op("FusedMatMul", [t, g.rand("Wop", [2, 5])], domain=MS, transA=1)
    g.ranks[y] = 2
    g.output(y)
    return g.model()


case("QuickGelu", touch=_sets("W1 W2"), domain=MS)(
    lambda: _conv_chain(lambda g, t: g.op("QuickGelu", [t], domain=MS, alpha=1.702), ms=True))
case("Gelu", touch=_sets("W1 W2"), domain=MS)(
    lambda: _conv_chain(lambda g, t: g.op("Gelu", [t], domain=MS), ms=True))
case("BiasGelu", touch=_sets("W1 gb W2"), domain=MS)(
    lambda: _seq(lambda g, t: g.op("BiasGelu", [t, g.rand("gb", [H], 0.1)], domain=MS)))
case("FastGelu", touch=_sets("W1 gb W2"), domain=MS)(
    lambda: _seq(lambda g, t: g.op("FastGelu", [t, g.rand("gb", [H], 0.1)], domain=MS)))
variant("FastGelu", "no-bias", None, touch=["W1 W2"], free=())(
    lambda: _seq(lambda g, t: g.op("FastGelu", [t], domain=MS)))


def _skip_norm(op: str):
    def build():
        g = G(ms=True)
        x = g.input("X", [1, 4, 6])
        a, b = g.matmul(x, 6, H, "W1a"), g.matmul(x, 6, H, "W1b")
        params = [g.rand("gamma", [H])] + ([] if "Simplified" in op else [g.rand("beta", [H], 0.1)])
        y, _, _, total = g.op(op, [a, b] + params + [g.rand("sbias", [H], 0.1)], outputs=4, domain=MS,
                              epsilon=1e-5)
        both = g.op("Add", [y, total])
        g.ranks[both] = 3
        g.output(g.matmul(both, H, 4, "W2"))
        return g.model()

    touch = "W1a W1b gamma sbias W2" + ("" if "Simplified" in op else " beta")
    case(op, touch=_sets(touch), domain=MS)(build)


_skip_norm("SkipLayerNormalization")
_skip_norm("SkipSimplifiedLayerNormalization")
case("SimplifiedLayerNormalization", touch=_sets("W1 rms_s W2"))(
    lambda: _seq(lambda g, t: g.op("SimplifiedLayerNormalization", [t, g.rand("rms_s", [H])], axis=-1,
                                   epsilon=1e-5)))


@case("EmbedLayerNormalization", touch=_sets("word pos seg e_gamma e_beta W2"), domain=MS)
def _embed_layer_norm():
    g = G(ms=True)
    ids = g.input("ids", [1, 4], TP.INT32)
    seg_ids = g.input("seg_ids", [1, 4], TP.INT32)
    y, _ = g.op("EmbedLayerNormalization", [ids, seg_ids, g.rand("word", [10, H]), g.rand("pos", [6, H]),
                                            g.rand("seg", [2, H]), g.rand("e_gamma", [H]),
                                            g.rand("e_beta", [H], 0.1)], outputs=2, domain=MS, epsilon=1e-5)
    g.ranks[y] = 3
    g.output(g.matmul(y, H, 4, "W2"))
    return g.model()


@case("Attention", touch=_sets("W1 Wqkv", "Wqkv bqkv W2"), domain=MS)
def _attention():  # packed QKV [H, 3H]: heads move in Q, K and V together, with W2's rows
    return _seq(lambda g, t: g.op("Attention", [t, g.rand("Wqkv", [H, 3 * H]), g.rand("bqkv", [3 * H], 0.1)],
                                  domain=MS, num_heads=HEADS))


@case("MultiHeadAttention", touch=_sets("Wq Wk Wv mbias W2"), domain=MS)
def _multi_head_attention():
    g = G(ms=True)
    x = g.input("X", [1, 4, 6])
    q, k, v = (g.matmul(x, 6, H, w) for w in ("Wq", "Wk", "Wv"))
    y = g.op("MultiHeadAttention", [q, k, v, g.rand("mbias", [3 * H], 0.1)], domain=MS, num_heads=HEADS)
    g.ranks[y] = 3
    g.output(g.matmul(y, H, 4, "W2"))
    return g.model()


def _gqa(rotary: bool):
    def build():  # 4 query heads over 2 key/value heads, head size 16 (ORT's rotary
        # kernel wants a multiple of 16), no cache (a prompt of 4 tokens)
        g = G(ms=True)
        x = g.input("X", [1, 4, 6])
        q, k, v = g.matmul(x, 6, 64, "Wq"), g.matmul(x, 6, 32, "Wk"), g.matmul(x, 6, 32, "Wv")
        extra = {}
        ins = [q, k, v, "", "", g.const("seqlens", [3], np.int32), g.const("total", [4], np.int32)]
        if rotary:
            ins += [g.rand("cos", [8, 8]), g.rand("sin", [8, 8])]
            extra = {"do_rotary": 1}
        y, _, _ = g.op("GroupQueryAttention", ins, outputs=3, domain=MS, num_heads=4, kv_num_heads=2, **extra)
        g.ranks[y] = 3
        g.output(g.matmul(y, 64, 4, "W2"))
        return g.model()

    return build


case("GroupQueryAttention", touch=_sets("Wq Wk Wv W2"), domain=MS)(_gqa(False))


@variant("GroupQueryAttention", "packed", None, touch=["Wqkv W2"], free=())
def _gqa_packed():  # Q, K and V from one MatMul [6, (4 + 2 + 2) * 16], key and value inputs empty
    g = G(ms=True)
    qkv = g.matmul(g.input("X", [1, 4, 6]), 6, 128, "Wqkv")
    ins = [qkv, "", "", "", "", g.const("seqlens", [3], np.int32), g.const("total", [4], np.int32)]
    y, _, _ = g.op("GroupQueryAttention", ins, outputs=3, domain=MS, num_heads=4, kv_num_heads=2)
    g.ranks[y] = 3
    g.output(g.matmul(y, 64, 4, "W2"))
    return g.model()
# (a pinned dim does not show among the pins: its cells still move with their heads; tests/test_contrib_walk.py
# checks which groups there are)
VARIANTS.append(Case("GroupQueryAttention", _gqa(True), _sets("Wq Wk Wv W2"), None, (), MS, variant="rotary"))


@case("RotaryEmbedding", touch=_sets("W1 W2"), domain=MS)
def _rotary_embedding():  # heads move, the dims inside a head stay (pairs ordered by frequency)
    def middle(g, t):
        pos = g.const("pos_ids", [[0, 1, 2, 3]], np.int64)
        return g.op("RotaryEmbedding", [t, pos, g.rand("cos", [8, 2]), g.rand("sin", [8, 2])], domain=MS,
                    num_heads=HEADS)

    return _seq(middle)


@case("MatMulNBits", touch=_sets("Bq Bs Bz W2"), pinned="MatMulNBits input axis K", free=("W1",), domain=MS)
def _matmul_nbits():  # int4, K = 32 in blocks of 16: 5 rows of 2 blocks, packed zero points
    g = G(ms=True)
    t = g.gemm(g.input("X", [2, 3]), 3, 32, "W1")
    ins = [t, g.ints("Bq", [5, 2, 8], 0, 256, np.uint8), g.const("Bs", g.rng.uniform(0.01, 0.05, 10)),
           g.ints("Bz", [5], 0, 256, np.uint8)]
    y = g.op("MatMulNBits", ins, domain=MS, K=32, N=5, bits=4, block_size=16)
    g.ranks[y] = 2
    g.output(g.gemm(y, 5, 4, "W2"))
    return g.model()


def _matmul_nbits_blocks(flat: bool):
    def build():  # K = 32 in 2 blocks of 16: the blocks move whole, with their scales (and zero points)
        g = G(ms=True)
        t = g.gemm(g.input("X", [2, 3]), 3, 32, "W1")
        ins = [t, g.ints("Bq", [5, 2, 8], 0, 256, np.uint8)]
        if flat:  # scales and float zero points [N * blocks]
            ins += [g.const("Bs", g.rng.uniform(0.01, 0.05, 10)), g.const("Bz", g.rng.uniform(6, 9, 10))]
        else:  # scales [N, blocks] (onnxruntime-genai's builder), symmetric
            ins += [g.const("Bs", g.rng.uniform(0.01, 0.05, (5, 2)))]
        y = g.op("MatMulNBits", ins, domain=MS, K=32, N=5, bits=4, block_size=16)
        g.ranks[y] = 2
        g.output(g.gemm(y, 5, 4, "W2"))
        return g.model()

    return build


for _flat in (True, False):
    VARIANTS.append(Case("MatMulNBits", _matmul_nbits_blocks(_flat), _sets("W1 Bq Bs", "Bq Bs W2"), None, (), MS,
                         variant="blocks" if _flat else "blocks-2d"))


@case("DynamicQuantizeMatMul", touch=_sets("W1 Bq", "Bq Bs dqb W2"), domain=MS)
def _dynamic_quantize_matmul():
    def middle(g, t):
        ins = [t, g.ints("Bq", [C, 5], -100, 100, np.int8), g.const("Bs", g.rng.uniform(0.002, 0.01, 5)),
               g.const("Bz", np.zeros(5), np.int8), g.rand("dqb", [5], 0.1)]
        return g.op("DynamicQuantizeMatMul", ins, domain=MS)

    return _two_d(middle, ms=True)


@case("MatMulIntegerToFloat", touch=_sets("W1 Bq", "Bq Bs ib W2"), domain=MS)
def _matmul_integer_to_float():
    def middle(g, t):
        q, s, z = g.op("DynamicQuantizeLinear", [t], outputs=3)
        ins = [q, g.ints("Bq", [C, 5], 0, 255, np.uint8), s, g.const("Bs", g.rng.uniform(0.002, 0.01, 5)), z,
               g.ints("Bz", [5], 120, 136, np.uint8), g.rand("ib", [5], 0.1)]
        return g.op("MatMulIntegerToFloat", ins, domain=MS)

    return _two_d(middle, ms=True)


def _nhwc(g, t, op, *args, **attrs):
    """Quantize t (NCHW), run op on its NHWC form (ONNX Runtime's layout transformer), back to NCHW float."""
    q, s, z = g.quantize(t)
    y = g.op(op, [g.op("Transpose", [q], perm=[0, 2, 3, 1])] + [a(g, s, z) if callable(a) else a for a in args],
             domain=MS, **attrs)
    return y, s, z


@case("QLinearConv", touch=_sets("W1 Wq", "Wq Ws Bq W2"), domain=MS)
def _qlinear_conv_nhwc():
    def middle(g, t):
        ys, yz = g.scalar(0.05), g.scalar(128, np.uint8)
        w = g.ints("Wq", [5, C, 1, 1], -100, 100, np.int8)
        ws, wz = g.const("Ws", g.rng.uniform(0.002, 0.01, 5)), g.const("Wz", np.zeros(5), np.int8)
        y, s, z = _nhwc(g, t, "QLinearConv", lambda g, s, z: s, lambda g, s, z: z, w, ws, wz, ys, yz,
                        g.ints("Bq", [5], -500, 500, np.int32), channels_last=1)
        return g.dequantize(g.op("Transpose", [y], perm=[0, 3, 1, 2]), ys, yz)

    return _conv_chain(middle, out_c=5, ms=True)


@case("NhwcMaxPool", touch=_sets("W1 W2"), domain=MS)
def _nhwc_max_pool():
    def middle(g, t):
        y, s, z = _nhwc(g, t, "NhwcMaxPool", kernel_shape=[2, 2])
        return g.dequantize(g.op("Transpose", [y], perm=[0, 3, 1, 2]), s, z)

    return _conv_chain(middle, ms=True)


@variant("QLinearMul", "rank-3", None, touch=["W1a W1b W2"], free=())
def _qlinear_mul_rank3():  # a [1, 4, H] activation of a transformer: any rank
    g = G(ms=True)
    x = g.input("X", [1, 4, 6])
    a, sa, za = g.quantize(g.matmul(x, 6, H, "W1a"))
    b, sb, zb = g.quantize(g.matmul(x, 6, H, "W1b"), 0.04, 120)
    ys, yz = g.scalar(0.08), g.scalar(128, np.uint8)
    y = g.dequantize(g.op("QLinearMul", [a, sa, za, b, sb, zb, ys, yz], domain=MS), ys, yz)
    g.ranks[y] = 3
    g.output(g.matmul(y, H, 4, "W2"))
    return g.model()


@variant("QuantizeLinear", "weight-pair", None, touch=["W1 Wf", "Wf Wfs Wfz W2"], free=())
def _q_dq_weight_pair():  # a float weight fake-quantized by Q -> DQ (per output channel), as TensorRT QDQ files store it
    def middle(g, t):
        s, z = g.const("Wfs", g.rng.uniform(0.002, 0.01, 5)), g.const("Wfz", np.zeros(5), np.int8)
        w = g.op("DequantizeLinear", [g.op("QuantizeLinear", [g.rand("Wf", [5, C, 1, 1]), s, z], axis=0), s, z], axis=0)
        return g.op("Conv", [t, w])

    return _conv_chain(middle, out_c=5)


# ---- sequences: X -> Conv W1 -> a sequence of its output -> a tensor again -> Conv W2 ----------------
def _sequence_chain(middle) -> onnx.ModelProto:
    g = G()
    t = g.conv(g.input("X", [1, 3, 4, 4]), 3, C, "W1")
    g.output(g.conv(middle(g, t), C, 4, "W2"))
    return g.model()


def _joined(g, seq, axis=0, new_axis=0):
    return g.op("ConcatFromSequence", [seq], axis=axis, new_axis=new_axis)


def _inserted(g, t):  # a list built by appending: SequenceEmpty, SequenceInsert, ConcatFromSequence
    return _joined(g, g.op("SequenceInsert", [g.op("SequenceEmpty", [], dtype=TP.FLOAT), t]))


for _op, _middle in {
    "SequenceEmpty": _inserted,
    "SequenceInsert": _inserted,
    "ConcatFromSequence": lambda g, t: _joined(g, g.op("SequenceConstruct", [t, t]), axis=2),  # along H
    "SequenceConstruct": lambda g, t: _joined(g, g.op("SequenceConstruct", [t, g.op("Relu", [t])])),
    "SequenceAt": lambda g, t: g.op("SequenceAt", [g.op("SequenceConstruct", [t]), g.const("pos", 0, np.int64)]),
    "SequenceErase": lambda g, t: _joined(g, g.op("SequenceErase", [g.op("SequenceConstruct", [t, t]),
                                                                     g.const("pos", 0, np.int64)])),
    "SequenceLength": lambda g, t: g.op("Mul", [t, g.cast(g.op("SequenceLength", [g.op("SequenceConstruct", [t])]))]),
    "SplitToSequence": lambda g, t: _joined(g, g.op("SplitToSequence", [t], axis=3), axis=3),  # along W
}.items():
    case(_op, touch=_sets("W1 W2"))(lambda _middle=_middle: _sequence_chain(_middle))


# ---- ONNX Runtime's NCHWc ops (com.microsoft.nchwc): its own "all"-level save of X -> Conv W1 -> op ->
# Conv W2 with 16 channels (a multiple of the block: no padding), read back; the filters are renamed
NCHWC_OPS = {"ReorderInput": ("Relu", {}), "ReorderOutput": ("Relu", {}), "Conv": ("Relu", {}),
             "MaxPool": ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
             "AveragePool": ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
             "GlobalMaxPool": ("GlobalMaxPool", {}), "GlobalAveragePool": ("GlobalAveragePool", {}),
             "Upsample": ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                     "nearest_mode": "floor"})}


def _nchwc(op: str):
    def build():
        import tempfile
        from pathlib import Path

        import onnxruntime as ort

        g = G(opset=13)
        t = g.conv(g.input("X", [1, 16, 8, 8]), 16, 16, "W1")
        middle, attrs = NCHWC_OPS[op]
        if middle == "Resize":
            t = g.op("Resize", [t, "", g.const("scales", [1, 1, 2, 2])], **attrs)
        else:
            t = g.op(middle, [t], **attrs)
        g.ranks[t] = 4
        g.output(g.conv(t, 16, 16, "W2"))
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(Path(tmp) / "all.onnx")
            ort.InferenceSession(g.model().SerializeToString(), options, providers=["CPUExecutionProvider"])
            saved = onnx.load(options.optimized_model_filepath)
        from onnx_resync.walk.layouts import NCHWC, machine_block_size

        if machine_block_size() is not None:  # (a machine whose ONNX Runtime writes NCHWc)
            assert any(n.domain == NCHWC and n.op_type == op for n in saved.graph.node), op
        return saved

    return build


for _op in NCHWC_OPS:
    case(_op, domain="com.microsoft.nchwc")(_nchwc(_op))
