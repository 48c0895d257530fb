"""Run-time quantization: ConvInteger / MatMulInteger on two operands quantized at run time, read as
the float op on the tensors they quantize.

onnxruntime.quantization.quantize_dynamic quantizes a weight that it does not find among the
initializers (Paddle2ONNX and others store weights as Constant nodes) the way it quantizes an
activation: DynamicQuantizeLinear of the float weight at every run (uint8, one scale and zero point
for the whole tensor, from its min and max), then the integer op on both quantized operands:

    x -> DynamicQuantizeLinear -> (x_q, x_scale, x_zp) --+
    W -> DynamicQuantizeLinear -> (W_q, w_scale, w_zp) --+-> ConvInteger(x_q, W_q, x_zp, w_zp)
         -> Cast to float -> Mul by x_scale * w_scale (and constant factors) -> y

The same form multiplies two activations (MatMulInteger of attention scores). Vocabulary: an
*operand* is one of the integer op's two inputs, its *source* the float tensor its
DynamicQuantizeLinear reads (a stored weight or an activation); the *chain* is the integer op, the
Cast and the Muls up to the one whose factors hold each operand's scale once.

Canonical form: Conv / MatMul of the two sources, with the integer op's attributes and the chain's
constant factors folded into a constant source. The file stores the float weight exactly; its
rounding to uint8 happens at run time, as an activation's does, so the canonical weight is the
stored one, and its origin carries RUN_TIME_STEP so that reports say how the file uses it
(`run_time_format`: "float32 quantized to uint8 per tensor at run time"). A chain that does not
follow this form (zero points other than the DynamicQuantizeLinear's, a bias added in integers,
other factors) is left to dequantize.py and alignment.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..rewrite import STANDARD, Workspace, attr
from .cleanup import remove_unused

RUN_TIME_STEP = "view DynamicQuantizeLinear: quantized to uint8 per tensor at run time"
RUN_TIME_FORMAT = "quantized to uint8 per tensor at run time"
_MAX_FACTOR_DEPTH = 4


def run_time_format(origin) -> str:
    """What a canonical weight's origin says of run-time quantization, to follow its storage type in
    words ("float32" + this); "" for a weight the file uses as stored."""
    return " " + RUN_TIME_FORMAT if origin is not None and RUN_TIME_STEP in origin.steps else ""


def read_run_time_quantized(ws: Workspace) -> bool:
    """Rewrite every ConvInteger / MatMulInteger on two run-time quantized operands (module
    docstring); True if anything changed."""
    changed = False
    for node in ws.nodes:
        if node in ws and node.domain in STANDARD and node.op_type in ("ConvInteger", "MatMulInteger"):
            changed |= _rewrite(ws, node)
    if changed:
        remove_unused(ws)  # the DynamicQuantizeLinear of a weight, the scale products
    return changed


def _quantizer(ws: Workspace, node: onnx.NodeProto, k: int) -> onnx.NodeProto | None:
    """The DynamicQuantizeLinear whose (value, zero point) operand k of `node` reads as its pair."""
    ins = list(node.input) + [""] * 4
    q, zp = ins[k], ins[k + 2]
    p = ws.producer(q) if q else None
    if p is None or p.op_type != "DynamicQuantizeLinear" or p.domain not in STANDARD or len(p.output) < 3:
        return None
    return p if p.output[0] == q and zp and p.output[2] == zp else None


def _rewrite(ws: Workspace, node: onnx.NodeProto) -> bool:
    quantizers = [_quantizer(ws, node, k) for k in (0, 1)]
    if any(p is None for p in quantizers) or quantizers[0] is quantizers[1]:
        return False  # (a square of one quantized tensor: its scale occurs twice, not counted here)
    scales = [p.output[1] for p in quantizers]
    chain, t = [node], node.output[0]
    cast = ws.sole_consumer(t)
    if cast is None or cast.op_type != "Cast" or cast.domain not in STANDARD \
            or attr(cast, "to", None) != TensorProto.FLOAT:
        return False
    chain.append(cast)
    t = cast.output[0]
    counts, factors = [0, 0], []
    while min(counts) < 1:
        mul = ws.sole_consumer(t)
        if mul is None or mul.op_type != "Mul" or mul.domain not in STANDARD or len(mul.input) != 2:
            return False
        other = mul.input[1] if mul.input[0] == t else mul.input[0]
        f = _factors(ws, other, scales, _MAX_FACTOR_DEPTH)
        if f is None:
            return False
        counts = [a + b for a, b in zip(counts, f[0])]
        factors += f[1]
        chain.append(mul)
        t = mul.output[0]
    if counts != [1, 1] or any(np.asarray(f).size != 1 for f in factors):
        return False  # (a factor per channel is not what run-time quantization writes)
    factor = float(np.prod([float(np.asarray(f).reshape(-1)[0]) for f in factors]))
    sources = [p.input[0] for p in quantizers]
    constant = [k for k in (0, 1) if sources[k] in ws.constants]
    if factor != 1.0 and not constant:
        return False
    for k in constant:
        value = np.asarray(ws.const(sources[k]), dtype=np.float32)
        origin = ws.origin_of([sources[k]], RUN_TIME_STEP)
        if k == constant[0] and factor != 1.0:
            value = (value.astype(np.float64) * factor).astype(np.float32)
            origin.steps.append("computed scale product")
        sources[k] = ws.add_constant(sources[k] + "/run_time", value, origin)
    op = "Conv" if node.op_type == "ConvInteger" else "MatMul"
    new = helper.make_node(op, sources, [t], name=node.name)
    new.attribute.extend(node.attribute)
    for n in chain:
        ws.remove(n)
    ws.add([new], after=node)
    ws.record(f"{node.op_type} on operands quantized at run time read as {op}")
    return True


def _factors(ws: Workspace, name: str, scales: list[str], depth: int) -> tuple[list[int], list[np.ndarray]] | None:
    """A scale expression as (how many times each of `scales` occurs, constant factors); None if it
    is something else (a Mul tree of those scales and constants)."""
    if name in scales:
        return [int(name == s) for s in scales], []
    if name in ws.constants:
        value = ws.const(name)
        return ([0] * len(scales), [value]) if value.dtype.kind == "f" else None
    p = ws.producer(name)
    if p is None or p.op_type != "Mul" or p.domain not in STANDARD or depth == 0 or len(p.input) != 2:
        return None
    parts = [_factors(ws, i, scales, depth - 1) for i in p.input]
    if any(x is None for x in parts):
        return None
    return [a + b for a, b in zip(parts[0][0], parts[1][0])], parts[0][1] + parts[1][1]
