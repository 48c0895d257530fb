"""Quantized graphs back to the float graph they were quantized from.

onnxruntime.quantization writes a quantized model in three ways. QDQ keeps the float ops with
QuantizeLinear/DequantizeLinear pairs around them; the others replace the ops themselves:

- dynamic (`quantize_dynamic`): DynamicQuantizeLinear on each activation, ConvInteger/MatMulInteger
  on int8/uint8 weights, then Cast to float and Mul by `x_scale * w_scale` (older versions add a
  bias quantized at run time, `Cast(Floor(bias / (x_scale * w_scale)))`, before the Cast), the float
  bias Add after; com.microsoft DynamicQuantizeLSTM (W and R int8, transposed, per direction or per
  gate row scales); ONNX Runtime's optimizer may fuse these into com.microsoft
  DynamicQuantizeMatMul / MatMulIntegerToFloat;
- weight-only (`matmul_nbits_quantizer`, the onnxruntime-genai model builder): com.microsoft
  MatMulNBits, int2/int4/int8 codes packed along K in blocks with a scale (and zero point) per
  block, the weight stored transposed ([N, K]);
- static QOperator: QuantizeLinear at the input, QLinearConv, QLinearMatMul and com.microsoft
  QGemm (int32 bias at `x_scale * w_scale`), QLinearAdd/Mul, QLinearSigmoid/LeakyRelu/Softmax,
  QLinear(Global)AveragePool, QLinearConcat, QLinearReduceMean, with plain MaxPool, Reshape,
  Split, Transpose... on the int8 tensors, DequantizeLinear where a float op follows.

Canonical form: the float ops these stand for. A quantized activation is replaced by the float
tensor it encodes (`(q - zero_point) * scale`, which is the tensor that was quantized), weights by
their dequantized float values (per tensor or per output channel), biases by their float values;
the quantization ops of activations (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, the
Cast/Mul-by-scale chains) disappear, and a Relu that static quantization folded into a range
starting at 0 is put back. The result computes what the file computes up to the rounding of the
quantized activations (the file's outputs are those of the float graph, quantized). Anything that
does not follow these patterns is left as it is (alignment will then name it). Which ops move
quantized values without arithmetic, only read shapes, or stand for which float op, is the op
registry's (`quantized_view`, `shape_reader`, `float_form`).

The original of a rewritten node stays next to its float form until nothing reads it (another
reader may still need the quantized tensor); the pass ends by removing what is then unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..rewrite import STANDARD, Workspace, attr
from .cleanup import remove_unused
from .floats import lazy_weight, stored
from ...io import is_lazy_tensor
from ...io.lazy import LazyTensor
from ...walk import registry

MS = "com.microsoft"
# ops whose output is at least 0, or in [-1, 1], whatever their input; and ops whose output values
# are among (or averages of) their first input's: a lower bound passes through them
_NONNEGATIVE = ("Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp", "Sqrt", "Softplus")
_BOUNDED = ("Erf", "Tanh")
_WITHIN_INPUT = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Transpose",
                 "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Identity", "Resize", "Gather")
_ROLLBACK = (IndexError, KeyError, ValueError, TypeError, ArithmeticError)


def dequantize(ws: Workspace) -> bool:
    """Rewrite every quantized pattern into float ops; True if anything changed."""
    return _Dequantizer(ws).run()


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD), 1)


class _Dequantizer:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self.real: dict[str, str] = {}  # quantized activation -> the float tensor it encodes
        self.scale: dict[str, str] = {}  # quantized activation -> its scale tensor (dynamic or constant)
        self.pending: list[tuple[str, str, np.dtype | None]] = []  # (quantized tensor, zero point, type)
        self.outputs: list[tuple[str, str]] = []  # (graph output a DequantizeLinear wrote, its float tensor)
        self.shape_readers = registry.having("shape_reader")
        self.views = registry.having("quantized_view") | self.shape_readers | {"Concat"}
        self.float_forms = registry.having("float_form", domain=MS)
        self.changed = False

    # ---- driver ------------------------------------------------------------------------------
    def run(self) -> bool:
        ws = self.ws
        for node in ws.nodes:
            if node not in ws:
                continue  # taken in by an earlier node's rewrite
            new, keep = self._rewrite(node)
            if new and keep:
                self._rename_original(node, new)
            if keep:
                ws.add(new, after=node)
            else:
                ws.replace(node, new)
            relus = self._clamps(node)
            for relu in relus:
                ws.name_node(relu, f"{new[0].name if new else node.name}/Relu", node)
            self.changed |= bool(new) or bool(relus)
        if not self.changed:
            return False
        self._restore_outputs()
        remove_unused(ws)
        return True

    def _rewrite(self, node) -> tuple[list[onnx.NodeProto], bool]:
        """(new nodes, keep the original); ([], True) leaves the node as it is, as for a malformed
        node (missing inputs, shapes that do not broadcast): alignment will name what is left.
        A handler changes the workspace's graph only once nothing can fail."""
        try:
            return self._dispatch(node)
        except _ROLLBACK:
            for o in node.output:
                for table in (self.real, self.scale):
                    table.pop(o, None)
            self.pending = [p for p in self.pending if p[0] not in node.output]
            return [], True

    def _dispatch(self, node) -> tuple[list[onnx.NodeProto], bool]:
        op, domain, ws = node.op_type, node.domain, self.ws
        if domain in STANDARD:
            if op == "QuantizeLinear" and node.input[0] not in ws.constants:
                self.real[node.output[0]] = node.input[0]
                self.scale[node.output[0]] = node.input[1]
                zp = node.input[2] if len(node.input) > 2 else ""
                dtype = attr(node, "output_dtype", 0)
                self.pending.append((node.output[0], zp, helper.tensor_dtype_to_np_dtype(dtype) if dtype else None))
                return [], True
            if op == "DynamicQuantizeLinear":
                self.real[node.output[0]] = node.input[0]
                self.scale[node.output[0]] = node.output[1]
                return [], True
            if op == "DequantizeLinear" and node.input[0] in self.real:
                y, x = node.output[0], self.real[node.input[0]]
                if y in ws.protected:
                    self.outputs.append((y, x))
                ws.rewire(y, x)
                ws.record("activation QuantizeLinear/DequantizeLinear removed")
                self.changed = True
                return [], False
            if op in ("ConvInteger", "MatMulInteger"):
                return self._integer_op(node)
            if op == "QLinearConv":
                return self._qlinear_conv(node), True
            if op == "QLinearMatMul":
                return self._qlinear_matmul(node), True
            if op in self.views:
                return self._view(node), True
        elif domain == MS:
            if op == "QGemm":
                return self._qgemm(node), True
            if op in ("QLinearAdd", "QLinearMul"):
                return self._qlinear_binary(node), True
            if op in self.float_forms:
                return self._qlinear_unary(node), True
            if op == "QLinearConcat":
                return self._qlinear_concat(node), True
            if op == "DynamicQuantizeLSTM":
                return self._lstm(node), True
            if op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
                return self._matmul_to_float(node), True
            if op == "MatMulNBits":
                return self._matmul_nbits(node), True
        return [], True

    def _rename_original(self, node, new) -> None:
        """The first new node takes the original's name (reports use it); the original, kept until
        nothing reads it, gets another."""
        name = node.name
        self.ws.name_node(node, name + "/quantized", name)
        self._name_replacement(name, new)

    def _name_replacement(self, name: str, new) -> None:
        new[0].name = name
        for n in new[1:]:
            self.ws.name_node(n, f"{name}/{n.op_type}", name)

    # ---- helpers -----------------------------------------------------------------------------
    def _float_input(self, q: str, scale: str, zero_point: str) -> str | None:
        """The float tensor for a quantized operand: the activation it encodes, or a constant
        dequantized here."""
        if q in self.real:
            return self.real[q]
        value, s = self.ws.const(q), self.ws.const(scale)
        if value is None or s is None:
            return None
        zp = self.ws.const(zero_point)
        f = (value.astype(np.float64) - (zp.astype(np.float64) if zp is not None else 0.0)) * s.astype(np.float64)
        return self._add_const(q + "/dequantized", f, [q, scale] + ([zero_point] if zero_point else []), value)

    def _add_const(self, base: str, value: np.ndarray, sources: list[str], stored: np.ndarray) -> str:
        origin = self.ws.origin_of([s for s in sources if s], f"dequantized {stored.dtype}")
        return self.ws.add_constant(base, np.asarray(value, dtype=np.float32), origin)

    def _float_output(self, q: str, zero_point: str = "") -> str:
        """A fresh float tensor for quantized output q (and a Relu if its quantization clamps at 0)."""
        name = self.ws.new_name(q + "/float")
        self.real[q] = name
        self.pending.append((q, zero_point, None))
        return name

    def _clamps(self, anchor: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Static quantization clamps to the calibrated range; ONNX Runtime's quantizer drops a Relu
        (or Clip) whose input it quantizes, so that a range starting at 0 (zero point at the type's
        minimum) *is* the Relu. Put it back (after `anchor`), unless the tensor is non-negative anyway."""
        out = []
        for q, zp, dtype in self.pending:
            z = self.ws.const(zp)
            if zp and z is None:
                continue  # a zero point computed at run time: nothing known
            if z is None and dtype is None:
                dtype = np.dtype(np.uint8)  # no zero point: uint8, zero point 0
            kind = z.dtype if z is not None else dtype
            if kind is None or np.dtype(kind).kind not in "iu":
                continue
            lowest = np.iinfo(kind).min
            if z is not None and not (z.size >= 1 and np.all(z == lowest)):
                continue
            x = self.real[q]
            if x in self.ws.inputs or self._nonnegative(x):
                continue  # the range of a graph input is the data's, not a dropped Relu
            relu = helper.make_node("Relu", [x], [self.ws.new_name(x + "/relu")])
            self.ws.add([relu], after=anchor)
            out.append(relu)
            self.real[q] = relu.output[0]
            self.ws.record("Relu made explicit (folded into the quantization range)")
        self.pending = []
        return out

    def _nonnegative(self, name: str) -> bool:
        low = self._lower_bound(name, 8)
        return low is not None and low >= 0

    def _lower_bound(self, name: str, depth: int) -> float | None:
        """A lower bound of a float tensor's values from the ops that make it (None: unknown)."""
        if name in self.ws.constants:
            v = self.ws.const(name)
            return float(v.min()) if v.size and v.dtype.kind in "fiu" else None
        p = self.ws.producer(name)
        if p is None or p.domain not in STANDARD or depth == 0:
            return None
        op = p.op_type
        if op in _NONNEGATIVE:
            return 0.0
        if op in _BOUNDED:
            return -1.0
        if op == "Clip":
            low = self.ws.const(p.input[1]) if len(p.input) > 1 else None
            return float(low.min()) if low is not None else None
        if op in _WITHIN_INPUT:
            return self._lower_bound(p.input[0], depth - 1)
        bounds = [self._lower_bound(i, depth - 1) for i in p.input if i]
        if any(b is None for b in bounds) or not bounds:
            return None
        if op == "Add":
            return float(sum(bounds))
        if op in ("Concat", "Max", "Min"):
            return float(min(bounds))
        if op == "Mul" and all(b >= 0 for b in bounds):
            return 0.0
        return None

    def _weight(self, w: str, scale: str, zero_point: str, axis: int) -> np.ndarray | None:
        """(w - zero_point) * scale with scale / zero point per tensor or along `axis` of w."""
        W, s = self.ws.const(w), self.ws.const(scale)
        if W is None or s is None or W.dtype.kind not in "iu":
            return None
        zp = self.ws.const(zero_point)
        s = _along(s, W, axis)
        z = _along(zp, W, axis) if zp is not None else 0.0
        if s is None or z is None:
            return None
        return (W.astype(np.float64) - z) * s

    def _factors(self, name: str, x_scale: str, depth: int = 4) -> tuple[int, list[np.ndarray]] | None:
        """A scale expression as (how many times x_scale occurs, constant factors); None if it is
        something else."""
        if name == x_scale:
            return 1, []
        if name in self.ws.constants:
            return 0, [self.ws.const(name).astype(np.float64)]
        p = self.ws.producer(name)
        if p is None or p.op_type != "Mul" or p.domain not in STANDARD or depth == 0 or len(p.input) != 2:
            return None
        a, b = (self._factors(i, x_scale, depth - 1) for i in p.input)
        if a is None or b is None:
            return None
        return a[0] + b[0], a[1] + b[1]

    def _scale_sources(self, chain) -> list[str]:
        """The stored scale tensors that a Cast/Mul chain multiplies by (for the weight's origin)."""
        names = []
        for n in chain[1:]:
            stack = [i for i in n.input if i]
            depth = 0
            while stack and depth < 16:
                depth += 1
                t = stack.pop()
                if t in self.ws.constants and t not in names:
                    names.append(t)
                    continue
                p = self.ws.producer(t)
                if p is not None and p.op_type == "Mul" and p.domain in STANDARD:
                    stack.extend(i for i in p.input if i)
        return names

    # ---- dynamic quantization ----------------------------------------------------------------
    def _integer_op(self, node) -> tuple[list[onnx.NodeProto], bool]:
        """ConvInteger / MatMulInteger -> [Add int bias] -> Cast float -> Mul by scales, as one Conv /
        MatMul on the float input with the dequantized weight (and bias)."""
        ws = self.ws
        conv = node.op_type == "ConvInteger"
        x, w = node.input[0], node.input[1]
        W = ws.const(w)
        if x not in self.real or W is None or W.dtype.kind not in "iu":
            return [], True
        x_scale = self.scale.get(x, "")
        w_zp = node.input[3] if len(node.input) > 3 else ""
        channels = W.shape[0] if conv else W.shape[-1]
        chain, t = [node], node.output[0]
        bias = None
        u = ws.sole_consumer(t)
        if u is not None and u.op_type == "Add" and u.domain in STANDARD:
            other = u.input[1] if u.input[0] == t else u.input[0]
            bias = self._integer_bias(other, x_scale, channels)
            if bias is None:
                return [], True
            chain.append(u)
            t = u.output[0]
            u = ws.sole_consumer(t)
        if u is None or u.op_type != "Cast" or attr(u, "to", None) != TensorProto.FLOAT:
            return [], True
        chain.append(u)
        t = u.output[0]
        count, factors = 0, []
        while count == 0:
            u = ws.sole_consumer(t)
            if u is None or u.op_type != "Mul" or u.domain not in STANDARD or len(u.input) != 2:
                return [], True
            other = u.input[1] if u.input[0] == t else u.input[0]
            f = self._factors(other, x_scale)
            if f is None:
                return [], True
            count += f[0]
            factors += f[1]
            chain.append(u)
            t = u.output[0]
            if f[0] == 0 and x_scale in ws.constants and _product_of(ws.origins.get(other)) \
                    and x_scale in ws.origins[other].sources:
                # a constant x_scale already folded into this factor (a statically quantized A)
                factors.append(1.0 / ws.const(x_scale).astype(np.float64))
                count = 1
        if count != 1:
            return [], True
        C = _channel_vector(_product(factors), channels, W.ndim - 1 if conv else 1)
        if C is None:
            return [], True
        zp = ws.const(w_zp)
        z = _along(zp, W, 0 if conv else -1) if zp is not None else 0.0
        if z is None:
            return [], True
        Wf = (W.astype(np.float64) - z) * C.reshape((-1,) + (1,) * (W.ndim - 1) if conv else (-1,))
        w_name = self._add_const(w + "/dequantized", Wf, [w, w_zp] + self._scale_sources(chain), W)
        inputs = [self.real[x], w_name]
        b_name = ""
        if bias is not None:
            b_src, b_value = bias
            b_name = self._add_const(b_src + "/dequantized", b_value * C, [b_src], ws.const(b_src))
            ws.origins[b_name].steps[-1] = "dequantized bias (quantized at run time)"
        if conv:
            n = helper.make_node("Conv", inputs + ([b_name] if b_name else []), [t])
            n.attribute.extend(node.attribute)
            new = [n]
        elif b_name:
            mid = ws.new_name(t + "/matmul")
            new = [helper.make_node("MatMul", inputs, [mid]), helper.make_node("Add", [mid, b_name], [t])]
        else:
            new = [helper.make_node("MatMul", inputs, [t])]
        for n in chain[1:]:
            ws.remove(n)
        self._name_replacement(node.name, new)
        ws.record(f"{node.op_type} dequantized to {'Conv' if conv else 'MatMul'}")
        return new, False

    def _integer_bias(self, name: str, x_scale: str, channels: int) -> tuple[str, np.ndarray] | None:
        """A bias quantized at run time, Reshape(Cast(Floor(bias / (x_scale * c)))): (bias tensor,
        bias / c per channel), so that after the Mul by x_scale * C its float value is bias * C / c."""
        t = name
        for _ in range(6):
            p = self.ws.producer(t)
            if p is None or p.domain not in STANDARD:
                return None
            if p.op_type in ("Reshape", "Cast", "Floor", "Round", "Ceil", "Identity", "Unsqueeze", "Squeeze"):
                t = p.input[0]
                continue
            if p.op_type != "Div" or p.input[0] not in self.ws.constants:
                return None
            f = self._factors(p.input[1], x_scale)
            if f is None or f[0] != 1:
                return None
            b = self.ws.const(p.input[0]).astype(np.float64)
            d = _channel_vector(_product(f[1]), channels, 1)
            if b.size != channels or d is None:
                return None
            return p.input[0], b.reshape(-1) / d
        return None

    def _matmul_to_float(self, node) -> list[onnx.NodeProto]:
        """com.microsoft DynamicQuantizeMatMul(A, B, b_scale, b_zp, bias) and
        MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zp, b_zp, bias): MatMul (+ Add)."""
        ins = list(node.input) + [""] * 7
        if node.op_type == "DynamicQuantizeMatMul":
            a, w, w_s, wz, bias = ins[0], ins[1], ins[2], ins[3], ins[4]
        else:
            a, w, w_s, wz, bias = self.real.get(ins[0], ""), ins[1], ins[3], ins[5], ins[6]
        Wf = self._weight(w, w_s, wz, -1)
        if not a or Wf is None or (bias and bias not in self.ws.constants):
            return []
        w_name = self._add_const(w + "/dequantized", Wf, [w, w_s, wz], self.ws.const(w))
        y = node.output[0]
        quantized = self.ws.new_name(y + "/quantized")
        self.ws.record(f"{node.op_type} dequantized to MatMul")
        if not bias:
            new = [helper.make_node("MatMul", [a, w_name], [y])]
        else:
            mid = self.ws.new_name(y + "/matmul")
            new = [helper.make_node("MatMul", [a, w_name], [mid]), helper.make_node("Add", [mid, bias], [y])]
        self.ws.set_output(node, 0, quantized)
        return new

    def _matmul_nbits(self, node) -> list[onnx.NodeProto]:
        """com.microsoft MatMulNBits(A, B, scales, zero_points, g_idx, bias): MatMul (+ Add) with the
        float weight [K, N] that B (blocked codes, see `nbits_weight`) stands for."""
        ins = list(node.input) + [""] * 6
        a, b, s, z, g, bias = ins[:6]
        ws = self.ws
        if not a or (bias and bias not in ws.constants) or (g and g not in ws.constants) \
                or (z and z not in ws.constants) or b not in ws.constants or s not in ws.constants:
            return []
        bits, block = int(attr(node, "bits", 4)), int(attr(node, "block_size", 0))
        k, n = int(attr(node, "K", 0)), int(attr(node, "N", 0))
        values = [ws.constants.get(x) if x else None for x in (b, s, z, g)]

        def weight() -> np.ndarray:  # [K, N]
            B, S, Z, G = (stored(v) if v is not None else None for v in values)
            return nbits_weight(B, S, Z, G, bits, block, k, n).T

        def part(index) -> np.ndarray:  # [K, N] at index: B's rows and codes read for those alone
            B, S, Z, G = (stored(v) if v is not None else None for v in values)
            return nbits_weight(B, S, Z, G, bits, block, k, n, rows=index[1], columns=index[0]).T

        origin = ws.origin_of([x for x in (b, s, z) if x], f"dequantized int{bits} in blocks of {block} (MatMulNBits)")
        if isinstance(values[0], onnx.TensorProto) and is_lazy_tensor(values[0]):
            # a huge model's weight: checked on its first rows, computed whenever it is read
            _check_nbits(values, bits, block, k, n)
            w_name = ws.new_name(b + "/dequantized")
            t = lazy_weight(w_name, (k, n), weight, part, major=1)  # (B: rows of N)

            def flipped(index) -> tuple[np.ndarray, np.ndarray]:  # part(index) of every code moved by one
                B, S, Z, G = (stored(v) if v is not None else None for v in values)
                w, edge = nbits_weight(B, S, Z, G, bits, block, k, n, rows=index[1], columns=index[0], flip=True)
                return w.T, edge.T

            LazyTensor.of(t).codes = DequantizedCodes(b, tuple(x for x in (b, s, z, g) if x),
                                                      ("MatMulNBits", s, z, g, bits, block, k, n), bits, flipped)
            ws.set_constant(w_name, t, origin)
        else:
            w_name = ws.add_constant(b + "/dequantized", np.ascontiguousarray(weight()), origin)
        ws.origins[w_name].steps.append("view MatMulNBits layout [N, K] -> [K, N]")
        y = node.output[0]
        quantized = ws.new_name(y + "/quantized")
        ws.record("MatMulNBits dequantized to MatMul")
        if not bias:
            new = [helper.make_node("MatMul", [a, w_name], [y])]
        else:
            mid = ws.new_name(y + "/matmul")
            new = [helper.make_node("MatMul", [a, w_name], [mid]), helper.make_node("Add", [mid, bias], [y])]
        ws.set_output(node, 0, quantized)
        return new

    def _lstm(self, node) -> list[onnx.NodeProto]:
        """DynamicQuantizeLSTM: W [dir, in, 4H] and R [dir, H, 4H] int8 with per-direction or per
        gate-row scales -> LSTM with float W [dir, 4H, in] and R [dir, 4H, H]."""
        ins = list(node.input) + [""] * 12
        mats = []
        for q, s, z in ((ins[1], ins[8], ins[9]), (ins[2], ins[10], ins[11])):
            Q, S = self.ws.const(q), self.ws.const(s)
            if Q is None or S is None or Q.ndim != 3 or Q.dtype.kind not in "iu":
                return []
            Z = self.ws.const(z)
            S = S.astype(np.float64).reshape(Q.shape[0], 1, -1)
            Z = Z.astype(np.float64).reshape(Q.shape[0], 1, -1) if Z is not None else 0.0
            if S.shape[2] not in (1, Q.shape[2]):
                return []
            F = ((Q.astype(np.float64) - Z) * S).transpose(0, 2, 1)
            name = self._add_const(q + "/dequantized", F, [q, s, z], Q)
            self.ws.origins[name].steps.append("view DynamicQuantizeLSTM layout [dir, in, 4H] -> [dir, 4H, in]")
            mats.append(name)
        outs = list(node.output)
        renamed = [self.ws.new_name(o + "/quantized") if o else "" for o in outs]
        inputs = [ins[0], mats[0], mats[1]] + ins[3:8]
        while inputs and not inputs[-1]:
            inputs.pop()
        new = helper.make_node("LSTM", inputs, outs)
        new.attribute.extend(node.attribute)
        self.ws.record("DynamicQuantizeLSTM dequantized to LSTM")
        for k, o in enumerate(renamed):
            self.ws.set_output(node, k, o)
        return [new]

    # ---- static QOperator ----------------------------------------------------------------------
    def _qlinear_conv(self, node) -> list[onnx.NodeProto]:
        ins = list(node.input) + [""] * 9
        x = self._float_input(ins[0], ins[1], ins[2]) if ins[0] in self.real else None
        Wf = self._weight(ins[3], ins[4], ins[5], 0)
        if x is None or Wf is None:
            return []
        w_name = self._add_const(ins[3] + "/dequantized", Wf, ins[3:6], self.ws.const(ins[3]))
        inputs = [x, w_name]
        if ins[8]:
            b = self._bias(ins[8], ins[1], ins[4], Wf.shape[0])
            if b is None:
                return []
            inputs.append(b)
        y = self._float_output(node.output[0], ins[7])
        new = helper.make_node("Conv", inputs, [y])
        new.attribute.extend(node.attribute)
        self.ws.record("QLinearConv dequantized to Conv")
        return [new]

    def _bias(self, b: str, x_scale: str, w_scale: str, channels: int) -> str | None:
        """An int32 bias at scale x_scale * w_scale, in float."""
        B, xs, w_s = self.ws.const(b), self.ws.const(x_scale), self.ws.const(w_scale)
        if B is None or xs is None or w_s is None or xs.size != 1 or w_s.size not in (1, channels):
            return None
        value = B.astype(np.float64) * float(xs.reshape(-1)[0]) * w_s.astype(np.float64).reshape(-1)
        return self._add_const(b + "/dequantized", value, [b, x_scale, w_scale], B)

    def _qlinear_matmul(self, node) -> list[onnx.NodeProto]:
        ins = list(node.input) + [""] * 8
        a = self._float_input(ins[0], ins[1], ins[2])
        if ins[3] in self.ws.constants:
            Wf = self._weight(ins[3], ins[4], ins[5], -1)
            b = self._add_const(ins[3] + "/dequantized", Wf, ins[3:6], self.ws.const(ins[3])) if Wf is not None else None
        else:
            b = self._float_input(ins[3], ins[4], ins[5])
        if a is None or b is None:
            return []
        y = self._float_output(node.output[0], ins[7])
        self.ws.record("QLinearMatMul dequantized to MatMul")
        return [helper.make_node("MatMul", [a, b], [y])]

    def _qgemm(self, node) -> list[onnx.NodeProto]:
        """com.microsoft QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp): Gemm on floats,
        C (int32 at a_scale * b_scale) in float; the output is float when y_scale is absent."""
        ins = list(node.input) + [""] * 9
        a = self._float_input(ins[0], ins[1], ins[2])
        trans_b = int(attr(node, "transB"))
        Wf = self._weight(ins[3], ins[4], ins[5], 0 if trans_b else 1)
        if a is None or Wf is None or attr(node, "transA"):
            return []
        w_name = self._add_const(ins[3] + "/dequantized", Wf, ins[3:6], self.ws.const(ins[3]))
        inputs = [a, w_name]
        if ins[6]:
            c = self._bias(ins[6], ins[1], ins[4], Wf.shape[0] if trans_b else Wf.shape[1])
            if c is None:
                return []
            inputs.append(c)
        quantized = ""
        if ins[7]:
            y = self._float_output(node.output[0], ins[8])
        else:
            y = node.output[0]
            quantized = self.ws.new_name(y + "/quantized")
        attrs = {"transB": trans_b, "alpha": float(attr(node, "alpha", 1.0))}
        self.ws.record("QGemm dequantized to Gemm")
        new = helper.make_node("Gemm", inputs, [y], **attrs)
        if quantized:
            self.ws.set_output(node, 0, quantized)
        return [new]

    def _qlinear_binary(self, node) -> list[onnx.NodeProto]:
        ins = list(node.input) + [""] * 8
        a = self._float_input(ins[0], ins[1], ins[2])
        b = self._float_input(ins[3], ins[4], ins[5])
        if a is None or b is None or not (ins[0] in self.real or ins[3] in self.real):
            return []
        y = self._float_output(node.output[0], ins[7])
        op = node.op_type[len("QLinear"):]
        self.ws.record(f"{node.op_type} dequantized to {op}")
        return [helper.make_node(op, [a, b], [y])]

    def _qlinear_unary(self, node) -> list[onnx.NodeProto]:
        if node.input[0] not in self.real:
            return []
        op = registry.lookup(node.op_type, MS).float_form
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.pop("channels_last", 0):
            return []
        inputs = [self.real[node.input[0]]]
        if op == "Softmax":
            attrs = {"axis": attrs.get("axis", -1 if _opset(self.ws.source) >= 13 else 1)}
        if op == "ReduceMean" and _opset(self.ws.source) >= 18 and "axes" in attrs:
            axes = self.ws.new_name(node.name + "/axes")
            self.ws.set_constant(axes, np.asarray(attrs.pop("axes"), dtype=np.int64))
            inputs.append(axes)
        y = self._float_output(node.output[0], node.input[4] if len(node.input) > 4 else "")
        self.ws.record(f"{node.op_type} dequantized to {op}")
        return [helper.make_node(op, inputs, [y], **attrs)]

    def _qlinear_concat(self, node) -> list[onnx.NodeProto]:
        ins = list(node.input)
        if len(ins) < 5 or (len(ins) - 2) % 3:
            return []
        xs = [self._float_input(*ins[k:k + 3]) for k in range(2, len(ins), 3)]
        if any(x is None for x in xs) or not any(ins[k] in self.real for k in range(2, len(ins), 3)):
            return []
        y = self._float_output(node.output[0], ins[1])
        self.ws.record("QLinearConcat dequantized to Concat")
        return [helper.make_node("Concat", xs, [y], axis=int(attr(node, "axis", 1)))]

    def _view(self, node) -> list[onnx.NodeProto]:
        """MaxPool, Reshape, Split, Concat, ... on quantized tensors: the same op on the floats; a
        shape reader reads the float tensor's shape."""
        data = list(range(len(node.input))) if node.op_type == "Concat" else [0]
        if node.op_type == "Gather" and node.input and node.input[0] not in self.real:
            return self._gathered_table(node)
        if not node.input or any(node.input[k] not in self.real for k in data):
            return []
        if node.op_type == "Concat" and len({self.scale.get(node.input[k]) for k in data}) != 1:
            return []
        inputs = list(node.input)
        for k in data:
            inputs[k] = self.real[node.input[k]]
        renamed = []
        if node.op_type in self.shape_readers:
            outputs = list(node.output)
            renamed = [self.ws.new_name(o + "/quantized") for o in outputs]
        else:
            first = node.input[0]
            outputs = []
            for o in node.output:
                outputs.append(self._float_output(o) if o else "")
                if o and first in self.scale:
                    self.scale[o] = self.scale[first]
            self.pending = [p for p in self.pending if p[0] not in node.output]  # no requantization
        new = helper.make_node(node.op_type, inputs, outputs)
        new.attribute.extend(node.attribute)
        for k, o in enumerate(renamed):
            self.ws.set_output(node, k, o)
        return [new]

    def _gathered_table(self, node) -> list[onnx.NodeProto]:
        """A quantized table gathered first and dequantized after (quantize_dynamic's embeddings:
        Gather(int8 table, ids) -> [views: Transpose, Reshape, ...] -> DequantizeLinear with one
        scale): the Gather of the dequantized table, which is the same tensor when the scale and zero
        point are one for the whole table (the views then move float values: `_view`)."""
        table, out = node.input[0], node.output[0]
        # (the type alone: a float table is never read here, so a huge model's embedding stays mapped)
        if table not in self.ws.constants or self.ws.dtype(table).kind not in "iu":
            return []
        readers = self._dequantizers(out, 8)
        if readers is None:  # read by integer ops as their quantized operand A (quantize_dynamic)
            scales = self._integer_readers(out)
        else:
            scales = {tuple(r.input[1:3]) for r in readers}
        if len(scales) != 1:
            return []
        scale, zero_point = (list(next(iter(scales))) + [""])[:2]
        s, zp = self.ws.const(scale), self.ws.const(zero_point) if zero_point else None
        if s is None or s.size != 1 or (zp is not None and zp.size != 1):
            return []  # a scale per axis: which axis survives the Gather is not checked here
        dequantized = self._float_input(table, scale, zero_point)
        if dequantized is None:
            return []
        self.scale[out] = scale
        new = helper.make_node("Gather", [dequantized, node.input[1]], [self._float_output(out)])
        new.attribute.extend(node.attribute)
        self.pending = [p for p in self.pending if p[0] != out]  # no requantization
        return [new]

    def _integer_readers(self, name: str) -> set[tuple[str, str]]:
        """{(scale, zero point)} of quantized tensor `name` where only ConvInteger/MatMulInteger read
        it, as operand A with a zero point: quantize_dynamic feeds a gathered quantized table to
        MatMulInteger as it is, its zero point as A's, and multiplies the result by
        Mul(A's scale, B's scale) (operators/matmul.py: the scale names in input order). That Mul may
        already be folded into one constant: its origin's sources keep the order."""
        found = set()
        readers = self.ws.consumers(name)
        if not readers or name in self.ws.protected:
            return set()
        for r in readers:
            if r.domain not in STANDARD or r.op_type not in ("ConvInteger", "MatMulInteger") \
                    or r.input[0] != name or name in r.input[1:] or len(r.input) < 3 or not r.input[2]:
                return set()
            u = self.ws.sole_consumer(r.output[0])
            if u is not None and u.op_type == "Add":
                u = self.ws.sole_consumer(u.output[0])
            if u is None or u.op_type != "Cast":
                return set()
            m = self.ws.sole_consumer(u.output[0])
            if m is None or m.op_type != "Mul" or len(m.input) != 2:
                return set()
            product = m.input[1] if m.input[0] == u.output[0] else m.input[0]
            p = self.ws.producer(product)
            if p is not None and p.op_type == "Mul" and p.domain in STANDARD and len(p.input) == 2:
                scale = p.input[0]
            elif product in self.ws.constants and _product_of(self.ws.origins.get(product), 2):
                scale = self.ws.origins[product].sources[0]
            else:
                return set()
            s = self.ws.const(scale)
            if s is None or s.size != 1 or s.dtype.kind != "f":
                return set()
            found.add((scale, r.input[2]))
        return found

    def _dequantizers(self, name: str, depth: int) -> list[onnx.NodeProto] | None:
        """The DequantizeLinear nodes that read quantized tensor `name`, directly or through views
        (one data input: Transpose, Reshape, ...); None if anything else reads it (a shape reader
        reads only its shape)."""
        found = []
        for r in self.ws.consumers(name):
            if r.domain not in STANDARD:
                return None
            if r.op_type in self.shape_readers:
                continue
            if r.op_type == "DequantizeLinear" and r.input[0] == name and name not in r.input[1:]:
                found.append(r)
            elif r.op_type in self.views and r.op_type != "Concat" and r.input[0] == name \
                    and name not in r.input[1:] and depth > 0:
                for o in r.output:
                    more = self._dequantizers(o, depth - 1) if o else []
                    if more is None or (o and o in self.ws.protected):
                        return None
                    found += more
            else:
                return None
        return found

    # ---- clean-up ------------------------------------------------------------------------------
    def _restore_outputs(self) -> None:
        """A removed DequantizeLinear that wrote a graph output: the float tensor takes its name
        (or an Identity writes it, where the float tensor must keep its own)."""
        ws, renamed = self.ws, {}
        for y, x in self.outputs:
            while x in renamed:
                x = renamed[x]
            p = ws.producer(x)
            if p is None or x in ws.protected or x in ws.inputs:
                ws.add([helper.make_node("Identity", [x], [y], name=ws.new_name(y + "/identity"))])
                continue
            for k, o in enumerate(p.output):
                if o == x:
                    ws.set_output(p, k, y)
            ws.rewire(x, y)
            renamed[x] = y


@dataclass(frozen=True)
class DequantizedCodes:
    """What a lazy weight says of the stored codes it dequantizes (LazyTensor.codes), each element
    from one code of `codes`, by a function of `reads` alone that `recipe` names: so that
    audit.storage may derive the change of storage's probes (every code's lowest bit flipped; the
    codes at an end of their range alone) from the codes, not from moved copies canonicalized again.
    `flipped(index)`: (the values at `index` with every code's lowest bit flipped, whether each
    code is at an end of its range), by the same float operations as the values."""

    codes: str  # the stored tensor of codes
    reads: tuple[str, ...]  # every stored tensor the values are computed from (codes included)
    recipe: tuple  # the rest the values depend on (equal recipes: equal functions of `reads`)
    bits: int  # bits per code (packed several to a byte below 8)
    flipped: Callable[[list], tuple[np.ndarray, np.ndarray]]


def _check_nbits(values, bits: int, block: int, K: int, N: int) -> None:
    """nbits_weight's checks, on shapes and one row (ValueError where it would refuse the node)."""
    B, S, Z, G = values
    blocks = -(-K // block) if block > 0 else 0
    size = lambda v: int(np.prod(v.dims)) if isinstance(v, onnx.TensorProto) else int(v.size)  # noqa: E731
    if B.data_type != onnx.TensorProto.UINT8 or size(B) != N * blocks * block * bits // 8 \
            or N <= 0 or size(S) != N * blocks:
        raise ValueError("MatMulNBits shapes")
    row = lambda v: None if v is None else np.asarray(stored(v)).reshape(N, -1)[:1]  # noqa: E731
    nbits_weight(row(B), row(S), row(Z), stored(G) if G is not None else None, bits, block, K, 1)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` codes of `bits` bits along the last axis of uint8 `packed`, low bits first
    (MatMulNBits' B and packed zero points)."""
    packed = np.asarray(packed, dtype=np.uint8)
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape((1,) * packed.ndim + (per,))
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    codes = codes.reshape(packed.shape[:-1] + (-1,))
    if codes.shape[-1] < count:
        raise ValueError(f"{codes.shape[-1]} packed codes, {count} needed")
    return codes[..., :count]


def nbits_weight(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, g_idx: np.ndarray | None,
                 bits: int, block: int, K: int, N: int, rows: np.ndarray | None = None,
                 columns: np.ndarray | None = None, flip: bool = False):
    """MatMulNBits' float weight [N, K]: B [N, k_blocks, block * bits / 8] holds each row's K codes
    in blocks of `block`, low bits first; value (code - zero point) * scale with one scale and zero
    point per (row, block) (block of column k: k // block, or g_idx[k]); zero points packed like B
    ([N, ceil(k_blocks * bits / 8)] uint8) or unpacked floats [N, k_blocks]; default 2^(bits - 1).
    `rows`, `columns`: those entries alone (weight[np.ix_(rows, columns)], the same values), only
    their rows of B read and only their codes unpacked. `flip`: (the weight of every code with its
    lowest bit flipped, whether each code is at an end of its range): the values of B moved as
    storage's probes move them, by the same float operations. ValueError for what it cannot tell (the
    caller leaves the node as it is)."""
    if bits not in (2, 4, 8) or block < 16 or block & (block - 1) or K <= 0 or N <= 0:
        raise ValueError(f"MatMulNBits bits={bits} block_size={block} K={K} N={N}")
    blocks = -(-K // block)
    if B.dtype != np.uint8 or B.size != N * blocks * block * bits // 8:
        raise ValueError(f"MatMulNBits B {B.shape} {B.dtype}")
    s = np.asarray(scales).reshape(N, blocks)
    if g_idx is not None and zero_points is not None and zero_points.dtype == np.uint8:
        # ONNX Runtime's CPU kernel (1.31) reads no packed zero point beside g_idx (it uses the
        # default): which one is meant is not settled, so the node is left as it is
        raise ValueError("MatMulNBits g_idx with packed zero points")
    zp_rows = None if zero_points is None else np.asarray(zero_points).reshape(N, -1)
    if rows is not None:  # B, scales and zero points of these rows only (a mapped B: only they are read)
        rows = np.asarray(rows, dtype=np.int64)
        B, s = B.reshape(N, -1)[rows], s[rows]
        zp_rows = None if zp_rows is None else zp_rows[rows]
        N = len(rows)
    if zp_rows is not None and zp_rows.dtype != np.uint8 and zp_rows.shape[1] != blocks:
        raise ValueError(f"MatMulNBits zero points {np.shape(zero_points)}")
    if g_idx is not None:
        which = np.asarray(g_idx).reshape(-1).astype(np.int64)
        if which.size != K or which.min(initial=0) < 0 or which.max(initial=0) >= blocks:
            raise ValueError("MatMulNBits g_idx")
    mask = np.uint8((1 << bits) - 1)
    if columns is not None and 4 * len(columns) >= K:  # most columns (a permutation of them all):
        #   the rows whole, by the block path below, then gathered (cheaper than a gather per code)
        whole = nbits_weight(B, s, zp_rows, g_idx, bits, block, K, N, flip=flip)
        if flip:
            return tuple(np.take(x, np.asarray(columns), axis=1) for x in whole)
        return np.take(whole, np.asarray(columns), axis=1)
    if columns is not None:  # the codes of these columns alone (code k: bits k * bits.. of its row),
        #                      and the scales and zero points of the blocks they fall in
        k = np.asarray(columns, dtype=np.int64)
        codes = (B.reshape(N, -1)[:, k * bits // 8] >> (k * bits % 8).astype(np.uint8)) & mask
        edge = _flipped(codes, mask) if flip else None
        used, group = np.unique(k // block if g_idx is None else which[k], return_inverse=True)
        if zp_rows is None:
            zp = np.float32(1 << (bits - 1))
        elif zp_rows.dtype == np.uint8:  # packed like B
            zp = ((zp_rows[:, used * bits // 8] >> (used * bits % 8).astype(np.uint8)) & mask)[:, group]
        else:
            zp = zp_rows[:, used][:, group]
        w = (codes.astype(np.float32) - np.asarray(zp, dtype=np.float32)) * s[:, used].astype(np.float32)[:, group]
        return (w, edge) if flip else w
    s = s.astype(np.float32)
    if zp_rows is None:
        zp = np.float32(1 << (bits - 1))
    elif zp_rows.dtype == np.uint8:
        zp = unpack_codes(zp_rows, bits, blocks).astype(np.float32)
    else:
        zp = zp_rows.astype(np.float32)
    if g_idx is None:  # blocks in order: scales broadcast over each block, no gathered copies
        per = 8 // bits  # codes per byte, low bits first: shifted and masked on the bytes (no index array)
        b = B.reshape(N, blocks, block // per)
        codes = np.empty(b.shape + (per,), dtype=np.uint8)
        for j in range(per):
            np.bitwise_and(np.right_shift(b, bits * j), (1 << bits) - 1, out=codes[..., j])
        edge = _flipped(codes, mask) if flip else None
        w = codes.reshape(N, blocks, block).astype(np.float32)
        w -= zp[..., None] if np.ndim(zp) else zp
        w *= s[..., None]
        w = w.reshape(N, blocks * block)[:, :K]
        return (w, edge.reshape(N, blocks * block)[:, :K]) if flip else w
    codes = unpack_codes(B.reshape(N, -1), bits, K)
    edge = _flipped(codes, mask) if flip else None
    if np.ndim(zp):
        zp = zp[:, which]
    w = (codes.astype(np.float32) - zp) * s[:, which]
    return (w, edge) if flip else w


def _flipped(codes: np.ndarray, mask: np.uint8) -> np.ndarray:
    """Flips the lowest bit of every code in place (storage's probe of stored integers); where each
    was at an end of its range (0 or `mask`: storage's probe of the ends)."""
    edge = (codes == 0) | (codes == mask)
    codes ^= np.uint8(1)
    return edge


def _product_of(origin, count: int | None = None) -> bool:
    """Whether a folded constant is the product of its sources (Muls of stored tensors only)."""
    return origin is not None and bool(origin.steps) and all(st == "computed Mul" for st in origin.steps) \
        and (count is None or len(origin.sources) == count)


def _product(factors: list[np.ndarray]) -> np.ndarray:
    out = np.ones((), dtype=np.float64)
    for f in factors:
        out = out * f
    return out


def _along(v: np.ndarray, W: np.ndarray, axis: int):
    v = np.asarray(v, dtype=np.float64)
    if v.size == 1:
        return float(v.reshape(-1)[0])
    axis = axis % W.ndim
    if v.size != W.shape[axis]:
        return None
    shape = [1] * W.ndim
    shape[axis] = -1
    return v.reshape(shape)


def _channel_vector(c: np.ndarray, channels: int, from_end: int) -> np.ndarray | None:
    """A constant broadcast over an output whose channel axis is `from_end` axes from the last
    (a Conv's (N, C, H, W): 3; a MatMul's (..., C): 1) as one value per channel; None if it
    varies along another axis."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    dims = list(c.shape)
    nz = [k for k, d in enumerate(dims) if d != 1]
    if len(nz) != 1 or dims[nz[0]] != channels or len(dims) - nz[0] != from_end:
        return None
    return c.reshape(-1)
