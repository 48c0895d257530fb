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
  scale and bias, stored plain.

nchwc.Conv also carries its activation (`activation`, `activation_params`) and a residual Add as
its fourth input (Sum): y = act(conv(x) + b + sum). MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool and Upsample have nchwc forms with the plain op's attributes; elementwise Add, Sum,
Mul, Concat and activations run on blocked tensors as they are (a Reshape pair around an Add whose
shapes ORT could not prove equal only re-views the blocks).

Canonical form: what the file was before, in NCHW: a plain Conv with the filter unblocked and the
padding rows dropped (the real channel count comes from the ReorderOutput at the region's end or
the convolution that reads the tensor), + Add of the Sum input, + the activation; plain pools;
Resize (nearest, asymmetric, floor) for Upsample; the Reorder nodes and layout Reshapes gone.

B is not written in the file. It is the one block size that fits every shape in the region
(padding, alignment, which convolutions read plain input); where several fit, the block size of
this machine's ONNX Runtime (a file in NCHWc layout computes right only on a machine with its block
size), else the largest. If none fits, the region is left as it is (alignment will name it).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

from ..rewrite import STANDARD, Expansion, Workspace, attr, opset
from .fused import activation

NCHWC = "com.microsoft.nchwc"
CANDIDATES = (16, 8, 4)
_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def expand_nchwc(ws: Workspace) -> bool:
    region = [n for n in ws.nodes if n.domain == NCHWC]
    if not region:
        return False
    blocked = _blocked_tensors(ws)
    convs = [n for n in region if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in ws.constants]
    block, why = _block_size(ws, region, convs, blocked)
    if block is None:
        return False
    real = _real_channels(ws, blocked, block)
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
def _blocked_tensors(ws: Workspace) -> set[str]:
    """Tensors in blocked layout: nchwc outputs (not ReorderOutput's) and what other ops compute
    from them (ONNX Runtime reorders before any reader that does not take blocked input; what reads
    blocked tensors is elementwise, also where a later fusion made it a contrib op: QuickGelu)."""
    blocked: set[str] = set()
    for node in ws.nodes:
        if node.domain == NCHWC:
            if node.op_type != "ReorderOutput":
                blocked.update(o for o in node.output if o)
        elif any(i in blocked for i in node.input if i):
            blocked.update(o for o in node.output if o)
    return blocked


def _padded(ws: Workspace, node: onnx.NodeProto) -> int | None:
    """Channels (padded) of an nchwc Conv's output."""
    return int(ws.const(node.input[1]).shape[0]) if node.op_type == "Conv" else None


def _real_channels(ws: Workspace, blocked: set[str], b: int) -> dict[str, int]:
    """Real (unpadded) channels of blocked tensors where the file says: ReorderOutput's `channels`,
    carried back through ops that keep the channels; and, for a convolution read only by
    convolutions, the padding rows: trailing rows of its filter and bias that are zero, in the last
    block, whose columns in every reader's filter are zero too (ONNX Runtime pads a reader's input
    channels as well; dropping channels that no reader reads is exact)."""
    real: dict[str, int] = {}
    for node in reversed(ws.nodes):
        outs = [real[o] for o in node.output if o in real]
        keeps = (node.domain == NCHWC and node.op_type in _POOLS + ("Upsample",)) or \
                (node.domain != NCHWC and node.op_type not in ("Concat", "Reshape"))
        if node.domain == NCHWC and node.op_type == "Conv":
            W = ws.const(node.input[1]) if node.input[1] in ws.constants else None
            if outs and len(node.input) > 3 and node.input[3]:
                real.setdefault(node.input[3], outs[0])
            if outs and W is not None and W.ndim == 4 and W.shape[1] == 1 and int(attr(node, "group", 1)) == W.shape[0]:
                real.setdefault(node.input[0], outs[0])  # depthwise / BatchNorm: channel for channel
        elif node.domain == NCHWC and node.op_type == "ReorderOutput":
            channels = attr(node, "channels", 0)
            if channels:
                real.setdefault(node.input[0], int(channels))
        elif keeps and outs:
            for i in node.input:
                if i in blocked:
                    real.setdefault(i, outs[0])
    for node in ws.nodes:
        if node.domain == NCHWC and node.op_type == "Conv" and node.output[0] not in real:
            k = _padding_rows(ws, node, b, blocked)
            if k:
                real[node.output[0]] = int(ws.const(node.input[1]).shape[0]) - k
                for _, read in _through_activations(ws, node.output[0]) or ():
                    real.setdefault(read, real[node.output[0]])  # (an activation's output between the two)
    return real


def _padding_rows(ws: Workspace, node: onnx.NodeProto, b: int, blocked: set[str]) -> int:
    """How many trailing channels of an nchwc Conv's output are padding that no reader reads (0: none
    or not known)."""
    D = ws.const(node.input[1])
    padded = D.shape[0]
    readers = ws.consumers(node.output[0])
    if node.output[0] in ws.protected or not readers or len(node.input) > 3 and node.input[3]:
        return 0
    if D.ndim != 4 or padded % b or int(attr(node, "group", 1)) != 1:
        return 0
    inner = node.input[0] in blocked and D.shape[1] % b == 0
    rows = unblock(D, b, inner).reshape(padded, -1)
    bias = ws.const(node.input[2]) if len(node.input) > 2 and node.input[2] in ws.constants else np.zeros(padded)
    if bias.shape != (padded,):
        return 0
    k = _trailing(lambda i: not rows[i].any() and bias[i] == 0, padded, b)
    readers = _through_activations(ws, node.output[0])
    if readers is None:
        return 0
    for r, read in readers:
        R = ws.const(r.input[1]) if r.domain == NCHWC and r.op_type == "Conv" and len(r.input) > 1 \
            and r.input[1] in ws.constants else None
        if R is None or R.ndim != 4 or r.input[0] != read or int(attr(r, "group", 1)) != 1 \
                or R.shape[1] != padded or R.shape[0] % b or list(r.input[1:]).count(read):
            return 0
        cols = unblock(R, b, True)
        k = min(k, _trailing(lambda j: not cols[:, j].any(), padded, b))
    return k


# one input, one output, channel by channel (ONNX Runtime's NCHWc region keeps the fused activations its
# optimizer wrote between two nchwc Convs, QuickGelu among them): a padded channel stays one channel
_PER_CHANNEL = {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus",
                "QuickGelu", "Gelu"}


def _through_activations(ws: Workspace, name: str, depth: int = 0) -> list | None:
    """(reader, the tensor it reads) of a tensor, through per-channel activations; None where an
    activation's output is a graph output or goes on elsewhere unknown."""
    out = []
    for r in ws.consumers(name):
        if r.op_type in _PER_CHANNEL and len(r.input) == 1 and len(r.output) == 1 and depth < 8:
            if r.output[0] in ws.protected:
                return None
            more = _through_activations(ws, r.output[0], depth + 1)
            if more is None or not more:
                return None
            out += more
        else:
            out.append((r, name))
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


@functools.lru_cache(maxsize=1)
def machine_block_size() -> int | None:
    """The NCHWc block size of this machine's ONNX Runtime (None: it writes no NCHWc), read from the
    filter it stores for a small convolution."""
    import tempfile
    from pathlib import Path

    from onnx import TensorProto, helper, numpy_helper

    c = max(CANDIDATES)
    W = np.arange(c * c, dtype=np.float32).reshape(c, c, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 2, 2])], [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="onnx-resync-nchwc-") as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            saved = onnx.load(options.optimized_model_filepath)
    except Exception:
        return None
    inits = {t.name: t for t in saved.graph.initializer}
    for node in saved.graph.node:
        if node.domain == NCHWC and node.op_type == "Conv" and node.input[1] in inits:
            D = numpy_helper.to_array(inits[node.input[1]])
            for b in CANDIDATES:
                if np.array_equal(unblock(D, b, inner=True), W):
                    return b
    return None


def unblock(D: np.ndarray, b: int, inner: bool) -> np.ndarray:
    """The OIHW filter of a stored NCHWc filter: OIHWBiBo (inner: input channels blocked too) or OIHWBo."""
    O, I, kh, kw = D.shape
    k = kh * kw
    if inner:
        return D.reshape(O // b, I // b, k, b, b).transpose(0, 4, 1, 3, 2).reshape(O, I, kh, kw)
    return D.reshape(O // b, I, k, b).transpose(0, 3, 1, 2).reshape(O, I, kh, kw)


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

