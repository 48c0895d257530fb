"""ONNX Runtime's NCHWc layout (com.microsoft.nchwc, saved at the "all" optimization level on CPU)
back to plain NCHW.

ONNX Runtime's NchwcTransformer rewrites convolutions into blocked ones for its MLAS kernels: a
tensor in that region holds its channels in blocks of B (8 with AVX2, 16 with AVX-512; zero padded
to a multiple of B), ReorderInput / ReorderOutput convert at the region's edges, and a Conv's filter
is stored reordered (same 4-D shape, rows padded to a multiple of B):

- OIHWBiBo, D[o/B, i/B, kh, kw, i%B, o%B], for a convolution reading a blocked tensor;
- OIHWBo, D[o/B, i, kh, kw, o%B], for a depthwise convolution and for one reading a plain NCHW
  tensor of fewer than B channels (an image);
- a BatchNormalization becomes a depthwise 1x1 nchwc Conv (group = padded channels) of the folded
  scale and bias, stored plain (a plain depthwise 1x1 Conv here; affine.py folds it or writes it as
  Mul + Add, as it writes the BatchNormalization of the file before).

nchwc.Conv also carries its activation (`activation`, `activation_params`) and a residual Add as
its fourth input (Sum): y = act(conv(x) + b + sum). MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool and Upsample have nchwc forms with the plain op's attributes; elementwise Add, Sum,
Mul, Concat and activations run on blocked tensors as they are (a Reshape pair around an Add whose
shapes ORT could not prove equal only re-views the blocks).

A tensor of C channels is padded to P (C rounded up to the block): ReorderInput fills the padding
with zeros, a convolution's filter and bias have zero rows for it and its reader zero columns, a
depthwise convolution zero weights; ReorderOutput's `channels` drops it. The tensors that hold the
same channels (through per-channel ops, depthwise convolutions, elementwise ops, Sum inputs, pools)
share one C (see _real_channels).

Canonical form: what the file was before, in NCHW: a plain Conv with the filter unblocked and the
padding rows and columns dropped, + Add of the Sum input, + the activation; plain pools;
Resize (nearest, asymmetric, floor) for Upsample; the Reorder nodes and layout Reshapes gone.

B is not written in the file. It is the one block size that fits every shape in the region
(padding, alignment, which convolutions read plain input); where several fit, the block size of
this machine's ONNX Runtime (a file in NCHWc layout computes right only on a machine with its block
size), else the largest. If none fits, the region is left as it is (alignment will name it).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..rewrite import STANDARD, Expansion, Workspace, attr, opset
from .fused import activation
from ...walk.layouts import CANDIDATES, NCHWC, Blocked, blocked_tensors, machine_block_size  # the layout facts, said once

_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def expand_nchwc(ws: Workspace) -> bool:
    region = [n for n in ws.nodes if n.domain == NCHWC]
    if not region:
        return False
    blocked = blocked_tensors(ws)  # the walker's rule: nchwc outputs and what is computed from them
    convs = [n for n in region if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in ws.constants]
    block, why = _block_size(ws, region, convs, blocked)
    if block is None:
        return False
    real = _real_channels(ws, blocked, block)
    if real is None:
        return False
    changed = False
    for node in ws.nodes:
        if node.domain == NCHWC:
            changed |= _rewrite(ws, node, block, blocked, real)
        elif node.domain in STANDARD and node.op_type == "Reshape" and node.input and node.input[0] in blocked:
            e = Expansion(ws, node)  # a re-view of the blocks around an elementwise op
            e.op("Identity", [node.input[0]], output=node.output[0])
            e.commit("NCHWc layout Reshape removed")
            changed = True
    if changed:
        ws.record(f"NCHWc block size {block} ({why})")
    return changed


# ---- the region ---------------------------------------------------------------------------------
def _real_channels(ws: Workspace, blocked: set[str], b: int) -> dict[str, int] | None:
    """Real (unpadded) channels of every blocked tensor; None where the file contradicts itself or
    padding that a reader would read cannot be dropped exactly (the region is then left as it is).

    ONNX Runtime pads a tensor of C channels to P = C rounded up to the block. Tensors that hold the
    same channels (through per-channel ops, depthwise convolutions, elementwise ops of two blocked
    tensors, a Conv's Sum input, pools, layout Reshapes) form a class with one real C, which the file
    says at the class's edges: a ReorderOutput's `channels`, or the plain channels of what a
    ReorderInput reads (padded with zeros). A class with neither (a convolution read only by
    convolutions) is padded where the trailing rows of every convolution writing it and the trailing
    columns of every one reading it are zero, in the last block. Padding is dropped only where each
    convolution reading the class has zero columns there (so nothing it computes reads them); a class
    that anything else reads (a Concat, an op of the standard domain that mixes channels) keeps P."""
    classes = _classes(ws, blocked)
    if classes is None:
        return None
    members, padded, fixed = classes
    said: dict[str, set[int]] = {}  # class root -> channel counts the file says
    plain = _plain_shapes(ws) if any(n.op_type == "ReorderInput" for n in ws.nodes if n.domain == NCHWC) else {}
    for node in ws.nodes:
        if node.domain != NCHWC or node.op_type not in ("ReorderInput", "ReorderOutput"):
            continue
        last = bool(attr(node, "channels_last", 0))
        if node.op_type == "ReorderOutput":
            c, t = int(attr(node, "channels", 0) or 0), node.input[0]
        else:
            dims, t = plain.get(node.input[0]), node.output[0]
            c = dims[-1 if last else 1] if dims and len(dims) == 4 and dims[-1 if last else 1] else 0
        if c:
            said.setdefault(members.find(t), set()).add(c)
    real: dict[str, int] = {}
    for root, names in members.groups().items():
        ps = {padded[n] for n in names if n in padded}
        if len(ps) > 1:
            return None
        p = ps.pop() if ps else None
        cs = said.get(root, set())
        if len(cs) > 1 or (p is not None and any(-(-c // b) * b != p for c in cs)):
            return None
        if p is None:
            continue
        c = cs.pop() if cs else (p if root in fixed else p - _padding(ws, names, p, b, blocked))
        if c < p and (root in fixed or not _unread(ws, names, c, p, b)):
            return None
        real.update((n, c) for n in names)
    return real


class _Classes:
    """Union-find over tensor names."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, *xs: str) -> None:
        roots = [self.find(x) for x in xs if x]
        for r in roots[1:]:
            self.parent[r] = roots[0]

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return out


# one input, one output, channel by channel (ONNX Runtime's NCHWc region keeps the fused activations its
# optimizer wrote between two nchwc Convs, QuickGelu among them): a padded channel stays one channel
_PER_CHANNEL = {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus",
                "QuickGelu", "Gelu"}
# elementwise ops of the standard domain that ONNX Runtime runs on blocked tensors as they are
_ELEMENTWISE = {"Add", "Sum", "Mul", "Sub", "Div", "Max", "Min", "Mean"}


def _classes(ws: Workspace, blocked: set[str]):
    """(classes of blocked tensors, padded channels of a tensor, roots of the classes that must keep
    their padding); None for a region this pass does not know."""
    members = _Classes()
    padded: dict[str, int] = {}
    fixed: set[str] = set()
    for t in blocked:
        members.find(t)
    for node in ws.nodes:
        ins = [i for i in node.input if i in blocked]
        outs = [o for o in node.output if o in blocked]
        if node.domain == NCHWC:
            if node.op_type == "Conv":
                W = ws.const(node.input[1]) if len(node.input) > 1 and node.input[1] in ws.constants else None
                if W is None or W.ndim != 4:
                    return None
                group = int(attr(node, "group", 1))
                padded[node.output[0]] = int(W.shape[0])
                if group == 1 and node.input[0] in blocked:
                    padded[node.input[0]] = int(W.shape[1])
                if group > 1 and W.shape[1] == 1 and group == W.shape[0]:
                    members.union(node.input[0], node.output[0])  # depthwise: channel for channel
                elif group > 1:
                    fixed.update((node.input[0], node.output[0]))  # grouped: its padding is not known
                if len(node.input) > 3 and node.input[3]:
                    members.union(node.input[3], node.output[0])  # Sum: added channel for channel
            elif node.op_type in _POOLS + ("Upsample",):
                members.union(node.input[0], node.output[0])
            elif node.op_type not in ("ReorderInput", "ReorderOutput"):
                return None
        elif ins:
            consts = [i for i in node.input if i and i not in blocked]
            scalar = all(i in ws.constants and ws.const(i).size == 1 for i in consts)
            if len(node.output) == 1 and (node.op_type in _PER_CHANNEL and len(ins) == 1 and not consts
                                          or node.op_type in _ELEMENTWISE and scalar
                                          or node.op_type == "Reshape" and node.input[0] in blocked):
                members.union(*ins, node.output[0])
            else:
                fixed.update(ins + outs)  # a Concat, or an op that reads channels as they are stored
        for o in node.output:
            if o in blocked and o in ws.protected:
                fixed.add(o)
    return members, padded, {members.find(t) for t in fixed}


def _readers(ws: Workspace, names: list[str]) -> list[onnx.NodeProto]:
    """The nchwc Convs of group 1 that read a tensor of the class as their convolution input."""
    return [r for t in names for r in ws.consumers(t)
            if r.domain == NCHWC and r.op_type == "Conv" and int(attr(r, "group", 1)) == 1 and r.input[0] == t]


def _padding(ws: Workspace, names: list[str], p: int, b: int, blocked: set[str]) -> int:
    """Trailing channels (fewer than a block) of a class that the file says nothing of and that are
    zero padding: zero rows and bias in every group-1 convolution writing it, zero weights and bias
    in every depthwise one, zero columns in every convolution reading it (0: none, or not known)."""
    readers = _readers(ws, names)
    if not readers:
        return 0
    k = b - 1
    for t in names:
        node = ws.producer(t)
        if node is None or node.domain != NCHWC or node.op_type != "Conv":
            continue
        D = ws.const(node.input[1])
        inner = node.input[0] in blocked and int(attr(node, "group", 1)) == 1 and D.shape[1] % b == 0
        rows = unblock(D, b, inner).reshape(p, -1)
        bias = ws.const(node.input[2]) if len(node.input) > 2 and node.input[2] in ws.constants else np.zeros(p)
        if bias.shape != (p,):
            return 0
        k = min(k, _trailing(lambda i: not rows[i].any() and bias[i] == 0, p, b))
    for r in readers:
        R = ws.const(r.input[1])
        if R.ndim != 4 or R.shape[1] != p or R.shape[0] % b:
            return 0
        cols = unblock(R, b, True)
        k = min(k, _trailing(lambda j: not cols[:, j].any(), p, b))
    return k


def _unread(ws: Workspace, names: list[str], c: int, p: int, b: int) -> bool:
    """Whether every group-1 convolution reading the class has zero columns for channels c..p-1:
    dropping those channels is then exact (a Sum input of the class is dropped with them)."""
    for r in _readers(ws, names):
        R = ws.const(r.input[1]) if len(r.input) > 1 and r.input[1] in ws.constants else None
        if R is None or R.ndim != 4 or R.shape[1] != p or R.shape[0] % b or p % b:
            return False
        if unblock(R, b, True)[:, c:].any():
            return False
    return True


def _plain_shapes(ws: Workspace) -> dict[str, list]:
    """Shapes (None: a dim not known) of the tensors outside the region, as far as the nodes that
    feed a ReorderInput need them: the graph's inputs, constants, ReorderOutput (`channels`),
    convolutions, and ops that keep or broadcast their input's shape (ONNX shape inference stops at
    the region's contrib ops)."""
    shapes: dict[str, list] = {}
    for vi in ws.graph.input:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    def shape(name):
        if name in ws.constants:
            return list(ws.const(name).shape)
        return shapes.get(name)

    for node in ws.nodes:
        if not node.output or not node.output[0]:
            continue
        x = shape(node.input[0]) if node.input else None
        out = None
        if node.domain == NCHWC and node.op_type == "ReorderOutput":
            c = int(attr(node, "channels", 0) or 0)
            out = [None, None, None, c] if attr(node, "channels_last", 0) else [None, c, None, None]
        elif node.domain not in STANDARD:
            out = x if node.op_type in _PER_CHANNEL else None
        elif node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in ws.constants:
            W = ws.const(node.input[1])
            rows = W.shape[0] if node.op_type == "Conv" else W.shape[1] * int(attr(node, "group", 1))
            out = [x[0] if x else None, int(rows)] + [None] * (W.ndim - 2)
        elif node.op_type in _PER_CHANNEL or node.op_type in _KEEPS_SHAPE:
            out = x
        elif node.op_type in _POOLS or node.op_type in ("Resize", "Upsample", "MaxPool", "LpPool"):
            out = x[:2] + [None] * (len(x) - 2) if x else None
        elif node.op_type in _ELEMENTWISE | {"Pow", "Where", "PRelu"}:
            out = _broadcast([shape(i) for i in node.input if i])
        elif node.op_type == "Transpose" and x:
            perm = list(attr(node, "perm", []) or reversed(range(len(x))))
            out = [x[k] for k in perm] if len(perm) == len(x) else None
        if out is not None:
            shapes[node.output[0]] = out
    return shapes


_KEEPS_SHAPE = {"Identity", "Cast", "Clip", "Dropout", "BatchNormalization", "InstanceNormalization", "LRN", "Abs",
                "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Erf", "Sin", "Cos", "Softsign",
                "Mish", "ThresholdedRelu", "Celu"}


def _broadcast(shapes: list) -> list | None:
    """The broadcast of shapes (None: a dim not known); None if one of them is not known."""
    if any(s is None for s in shapes) or not shapes:
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        dims = [s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0]
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            return None
        out.append(known.pop() if known else (None if None in dims else 1))
    return out


def _trailing(zero, n: int, b: int) -> int:
    """Trailing positions (fewer than a block) for which zero(i) holds."""
    k = 0
    while k < b - 1 and k < n - 1 and zero(n - 1 - k):
        k += 1
    return k


# ---- block size ---------------------------------------------------------------------------------
def _block_size(ws: Workspace, region, convs, blocked) -> tuple[int | None, str]:
    fits = [b for b in CANDIDATES if _fits(ws, region, convs, blocked, b)]
    if not fits:
        return None, ""
    if len(fits) == 1:
        return fits[0], "the only one the shapes allow"
    machine = machine_block_size()
    if machine in fits:
        return machine, "this machine's ONNX Runtime's; the shapes also allow " + \
            ", ".join(str(b) for b in fits if b != machine)
    return fits[0], "assumed: the shapes allow " + ", ".join(map(str, fits))


def _fits(ws: Workspace, region, convs, blocked, b: int) -> bool:
    producer_pad = {}
    for node in convs:
        W = ws.const(node.input[1])
        if W.ndim != 4 or W.shape[0] % b:
            return False
        group = int(attr(node, "group", 1))
        producer_pad[node.output[0]] = W.shape[0]
        if node.input[0] not in blocked:
            if group != 1 or W.shape[1] >= b:  # plain input: a small-input convolution only
                return False
        elif not (group > 1 and W.shape[1] == 1) and W.shape[1] % b:
            return False
    for node in region:
        if node.op_type == "ReorderOutput":
            channels = int(attr(node, "channels", 0) or 0)
            padded = producer_pad.get(node.input[0])
            if channels and padded is not None and padded != -(-channels // b) * b:
                return False
    return True


def unblock(D: np.ndarray, b: int, inner: bool) -> np.ndarray:
    """The OIHW filter of a stored NCHWc filter (walk/layouts.py's Blocked: OIHWBiBo or OIHWBo)."""
    return Blocked(b, inner=inner).logical(D)


# ---- the rewrite --------------------------------------------------------------------------------
def _rewrite(ws: Workspace, node: onnx.NodeProto, b: int, blocked: set[str], real: dict[str, int]) -> bool:
    op = node.op_type
    if op == "Conv":
        return _conv(ws, node, b, blocked, real)
    e = Expansion(ws, node)
    if op in ("ReorderInput", "ReorderOutput"):
        x, y = node.input[0], node.output[0]
        if attr(node, "channels_last", 0):
            perm = [0, 3, 1, 2] if op == "ReorderInput" else [0, 2, 3, 1]
            e.op("Transpose", [x], output=y, perm=perm)
        else:
            e.op("Identity", [x], output=y)
        e.commit(f"NCHWc {op} removed")
        return True
    if op in _POOLS:
        e.op(op, list(node.input), output=node.output[0],
             **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        e.commit(f"NCHWc {op} written as {op}")
        return True
    if op == "Upsample" and opset(ws) >= 11:
        scales = [float(s) for s in attr(node, "scales", [])]
        if len(scales) != 4:
            return False
        e.op("Resize", [node.input[0], "", e.scalar("scales", scales)], output=node.output[0], mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        e.commit("NCHWc Upsample written as Resize")
        return True
    return False


def _conv(ws: Workspace, node: onnx.NodeProto, b: int, blocked: set[str], real: dict[str, int]) -> bool:
    if len(node.input) < 2 or node.input[1] not in ws.constants:
        return False
    D = ws.const(node.input[1])
    group = int(attr(node, "group", 1))
    if D.ndim != 4:
        return False
    padded = D.shape[0]
    depthwise = group > 1 and D.shape[1] == 1 and group == padded
    inner = not depthwise and node.input[0] in blocked
    if padded % b or (inner and D.shape[1] % b):
        return False
    act = attr(node, "activation", b"")
    act = act.decode() if isinstance(act, bytes) else str(act)
    act_nodes = activation(ws, act, list(attr(node, "activation_params", []) or []), node)
    if act_nodes is None:
        return False
    out = real.get(node.output[0], padded)
    if out > padded or (group > 1 and not depthwise and out != padded):
        return False
    W = unblock(D, b, inner)[:out]
    cin = real.get(node.input[0], W.shape[1])
    if group == 1 and inner and cin < W.shape[1]:
        W = W[:, :cin]  # the reader's padded input columns (zero) go with the padded rows
    layout = "OIHWBiBo" if inner else "OIHWBo"
    e = Expansion(ws, node)
    w_name = e.weight("weight", np.ascontiguousarray(W), [node.input[1]],
                      f"view NCHWc filter {layout} (block {b}) -> OIHW")
    inputs = [node.input[0], w_name]
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias:
        if bias not in ws.constants:
            return False
        B = ws.const(bias)
        if B.shape != (padded,) and B.shape != (out,):
            return False
        inputs.append(e.weight("bias", np.ascontiguousarray(B[:out]), [bias], "view NCHWc bias"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
             if not a.name.startswith("activation")}
    if depthwise:
        attrs["group"] = out
    y = node.output[0]
    z = node.input[3] if len(node.input) > 3 else ""
    mid = e.op("Conv", inputs, output=None if (z or act_nodes) else y, **attrs)
    if z:
        mid = e.op("Add", [mid, z], output=None if act_nodes else y)
    for k, (op, act_attrs, extra) in enumerate(act_nodes):
        mid = e.op(op, [mid] + extra, output=y if k == len(act_nodes) - 1 else None, **act_attrs)
    e.commit("NCHWc Conv written as Conv" + (" + Add" if z else "") + (" + activation" if act_nodes else ""))
    return True

