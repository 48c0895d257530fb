"""Helpers every rule family uses, and the fallbacks: an op without a rule pins what it touches.

A rule reads `ctx.get(tensor)` (axis -> Label), writes `ctx.set(output, labels)`, declares weight
slots with `ctx.slot(weight, axis, label)`, creates elements with `ctx.new(...)` (producers), unions
elements that must move together, and pins what it cannot follow: nothing is guessed. Attributes are
read with `attr(node, name)`, whose default is the one the op's registry entry declares.
"""

from __future__ import annotations


import numpy as np

from ...io import tensor_values
from ..registry import attr  # noqa: F401  (rules read attributes through their declarations)


def _norm_axis(axis: int, rank: int | None) -> int | None:
    if axis < 0:
        return None if rank is None else axis + rank
    return axis


def _inputs(node, idx):
    return node.input[idx] if len(node.input) > idx and node.input[idx] else ""


def const_ints(ctx, name: str) -> list[int] | None:
    """A constant integer operand (axes, split sizes, pads, Slice bounds, repeats) as a list; None
    when it is absent, not constant, or not a scalar/1-D integer tensor: ONNX refuses such a node,
    so a rule treats the operand as unknown (a pin), never as numbers it guessed."""
    value = ctx.const(name) if name else None
    if value is None or np.ndim(value) > 1 or np.asarray(value).dtype.kind not in "iu":
        return None
    return [int(v) for v in np.atleast_1d(value)]


def norm_axes(axes, rank: int | None) -> list[int] | None:
    """Axes in [-rank, rank) made non-negative; None when the rank is unknown or an axis is out of
    range or repeated (ONNX refuses the node; a modulo would silently name another axis)."""
    if axes is None or rank is None or not all(-rank <= int(a) < rank for a in axes):
        return None
    out = [int(a) % rank for a in axes]
    return out if len(set(out)) == len(out) else None


# ---- fallbacks ------------------------------------------------------------------------------
def unknown_op(ctx, node) -> None:
    """No rule: every labelled input pins; outputs carry no label."""
    for name in node.input:
        ctx.pin_all(name, f"consumed by {node.op_type} (no rule)")
    from ..graph import node_inputs

    for name in node_inputs(node)[sum(1 for i in node.input if i):]:
        ctx.pin_all(name, f"read inside a {node.op_type} subgraph")


def pin_op(reason: str):
    def rule(ctx, node):
        for name in node.input:
            ctx.pin_all(name, reason.format(op=node.op_type))

    return rule


def passthrough(ctx, node) -> None:
    """Elementwise on one data input: every output carries the input's labels (stacked ones too)."""
    labels = ctx.labels.get(node.input[0], {}) if node.input else {}
    uniform = ctx.uniform.get(node.input[0]) if node.input else None
    for out in node.output:
        ctx.set(out, labels)
        if uniform:
            ctx.uniform[out] = set(uniform)
    if node.input and ctx.indexed(node.input[0]) and node.output:
        _derive_mapped(ctx, node, {a: a for a in range(ctx.rank(node.input[0]) or 0)})


def _derive_reshaped(ctx, node) -> None:
    """Reshape/Squeeze/Unsqueeze of a weight-like tensor that only adds or drops size-1 axes."""
    src, out = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(src), ctx.shape(out)
    if not ctx.indexed(src) or in_shape is None or out_shape is None:
        return
    in_real = [i for i, d in enumerate(in_shape) if d != 1]
    out_real = [i for i, d in enumerate(out_shape) if d != 1]
    if [in_shape[i] for i in in_real] == [out_shape[i] for i in out_real]:
        _derive_mapped(ctx, node, dict(zip(in_real, out_real)))


def _derive_mapped(ctx, node, axis_map: dict[int, int]) -> None:
    """A weight-like tensor moved by a layout op: its indexed axes move with it."""
    src = node.input[0]
    axis_sources = {}
    for ia, oa in axis_map.items():
        found = ctx.sources(src, ia)
        if found is not None:
            axis_sources[oa] = found
            ctx.mark_read(src, ia)
    ctx.derive(node.output[0], axis_sources, [src])


def constant_of_shape(ctx, node) -> None:
    """A filled tensor is the same along every axis."""
    rank = ctx.rank(node.output[0])
    if rank is not None:
        ctx.uniform[node.output[0]] = set(range(rank))


def _is_uniform(ctx, name, axis) -> bool:
    """`name` holds one value along `axis` (an Expand of a size-1 axis, a filled tensor): it may meet
    channels in any order. Decided from the graph's structure, never from a stored tensor's values:
    a bias that happens to be zero (fresh from its initializer) must walk like any other."""
    return axis in ctx.uniform.get(name, ())


# producers whose output is zero when one operand is (Gemm/MatMul with a zero operand and no bias)
_ZERO_IF_ANY = {"Mul", "MatMul", "Einsum"}
# ops that keep an all-zero first input all zero
_ZERO_VIEWS = {"Identity", "Cast", "CastLike", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Tile",
               "Slice", "Gather", "Split", "Flatten", "Neg", "Relu", "Abs", "Dropout"}


def _stored_value(ctx, name: str):
    """A small stored tensor's values; None when too large or its data cannot be read (a damaged
    tensor is the loader's to refuse: here it is only not known to be uniform)."""
    if ctx.view.stored_tensor(name) is None:
        return None
    try:
        return ctx.const(name)
    except ValueError:
        return None


def is_zero(ctx, name: str, depth: int = 0) -> bool:
    """`name` is all zeros for every input (an all-zero constant, ConstantOfShape of 0, views and
    products of those): an unrolled recurrent cell's initial state. Decided from the graph alone."""
    cache = ctx.__dict__.setdefault("_zero_cache", {})
    if not name or depth > 32:
        return False
    if name in cache:
        return cache[name]
    found = False
    if ctx.view.stored_tensor(name) is not None or name in ctx.view.constant_nodes:
        value = _stored_value(ctx, name)
        found = value is not None and value.size > 0 and np.issubdtype(value.dtype, np.number) and not value.any()
    else:
        node = ctx.view.producer.get(name)
        if node is not None and node.domain in ("", "ai.onnx"):
            op = node.op_type
            if op == "ConstantOfShape":
                fill = next((a.t for a in node.attribute if a.name == "value"), None)
                found = fill is None or not np.asarray(tensor_values(fill)).any()
            elif op in _ZERO_VIEWS:
                found = is_zero(ctx, node.input[0], depth + 1)
            elif op == "Concat":
                found = all(is_zero(ctx, i, depth + 1) for i in node.input if i)
            elif op in _ZERO_IF_ANY:
                found = any(is_zero(ctx, i, depth + 1) for i in node.input if i)
            elif op == "Gemm":
                found = (any(is_zero(ctx, i, depth + 1) for i in node.input[:2])
                         and (len(node.input) < 3 or not node.input[2] or is_zero(ctx, node.input[2], depth + 1)))
            elif op in ("Add", "Sub", "Sum"):
                found = all(is_zero(ctx, i, depth + 1) for i in node.input if i)
    cache[name] = found
    return found


def zero_product(ctx, node, operands: list[str], bias: str = "") -> bool:
    """A product whose data operand (the first) is all zero (Gemm/MatMul reading a zero initial state)
    is zero, plus its bias: no weight axis it reads is fixed (a shared recurrent weight times zeros
    reads nothing), and the output is the bias broadcast (indexed by the bias's axes) or uniform
    zeros. False: the data operand is not known to be zero. (A zero *weight* is a value, not the
    graph's structure: a suspect fine-tuned from it must walk the same, so it is not looked at.)"""
    if not is_zero(ctx, operands[0]):
        return False
    for name in operands + [bias]:
        if name and ctx.is_weightlike(name):
            for axis in range(ctx.rank(name) or 0):
                ctx.mark_read(name, axis)
    out = node.output[0]
    ro = ctx.rank(out)
    if ro is None:
        return True
    br = ctx.rank(bias) if bias and not is_zero(ctx, bias) else None
    ctx.uniform[out] = {oa for oa in range(ro) if br is None or oa < ro - br or ctx.dim(bias, oa - (ro - br)) == 1}
    if br is None:
        return True
    labels = ctx.get(bias)
    if labels:  # a bias computed from activations: the output carries its labels
        ctx.set(out, {a + ro - br: l for a, l in labels.items()})
    elif ctx.is_weightlike(bias):
        axis_sources = {}
        for ia in range(br):
            found = ctx.sources(bias, ia) if ctx.dim(bias, ia) != 1 else None
            if found:
                axis_sources[ia + ro - br] = found
        ctx.derive(out, axis_sources, [bias])
    return True


def shape_only(ctx, node) -> None:
    """Reads shapes, not data: no constraint."""


def resolve_weight_axes(view, name: str, axis: int):
    """Map an axis of a weight (or of a view of weights) to the stored tensors' axes it indexes.

    Returns [(stored_name, axis), ...], or None when the view scrambles axes (cannot index).
    """
    if view.stored_tensor(name) is not None:
        return [(name, axis)]
    node = view.producer.get(name)
    if node is None:
        return None
    op = node.op_type
    src = node.input[0]
    if op in ("Identity", "Cast"):
        return resolve_weight_axes(view, src, axis)
    if op in ("DequantizeLinear", "QuantizeLinear"):  # (a Q -> DQ pair on a float weight: fake quantization)
        targets = resolve_weight_axes(view, src, axis)
        if targets is None or int(attr(node, "block_size")):  # blocked scales: rows may not leave a block
            return None
        scale_shape = view.shape(node.input[1])
        q_axis = attr(node, "axis")
        rank = view.rank(src)
        if scale_shape and len(scale_shape) == 1 and scale_shape[0] > 1 and rank and q_axis % rank == axis:
            for extra in node.input[1:3]:
                if extra:
                    more = resolve_weight_axes(view, extra, 0)
                    if more is None:
                        return None
                    targets = targets + more
        return targets
    if op == "Transpose":
        perm = attr(node, "perm")
        rank = view.rank(src)
        perm = list(perm) if perm is not None else list(reversed(range(rank or 0)))
        return resolve_weight_axes(view, src, perm[axis]) if axis < len(perm) else None
    if op in ("Unsqueeze", "Squeeze", "Reshape"):
        in_shape, out_shape = view.shape(src), view.shape(name)
        if in_shape is None or out_shape is None:
            return None
        in_real = [i for i, d in enumerate(in_shape) if d != 1]
        out_real = [i for i, d in enumerate(out_shape) if d != 1]
        if [in_shape[i] for i in in_real] != [out_shape[i] for i in out_real] or axis not in out_real:
            return None
        return resolve_weight_axes(view, src, in_real[out_real.index(axis)])
    return None


# ---- malformed nodes ------------------------------------------------------------------------
def malformed(view, node) -> str | None:
    """ONNX's own word on a node that a rule could not follow: the message of strict shape inference
    on the node alone, with the input types, shapes and small constants the graph gives it (a Conv
    with a weight of rank 1), or None when ONNX accepts the node: then the rule's exception is a bug."""
    import onnx

    graph = view.model.graph
    types = {i.name: i.type.tensor_type.elem_type for i in list(graph.input) + list(graph.value_info)
             + list(graph.output) if i.type.HasField("tensor_type")}
    inputs, initializers = [], []
    for name in dict.fromkeys(n for n in node.input if n):
        stored = view.stored_tensor(name)
        shape = view.shape(name)
        dims = None if shape is None else [d if isinstance(d, (int, str)) else None for d in shape]
        inputs.append(onnx.helper.make_tensor_value_info(
            name, stored.data_type if stored is not None else types.get(name, onnx.TensorProto.FLOAT), dims))
        try:
            small = stored is not None and view.constant(name) is not None
        except ValueError:  # its data cannot be read: inference gets its type and shape only
            small = False
        if small:  # values that inference reads (axes, shapes)
            value = onnx.TensorProto()
            value.CopyFrom(stored)
            value.name = name
            initializers.append(value)
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    one = onnx.helper.make_model(onnx.helper.make_graph([node], "node", inputs, outputs, initializers),
                                 opset_imports=list(view.model.opset_import))
    one.ir_version = view.model.ir_version
    try:  # attributes of the type and count the op's schema declares
        onnx.checker.check_node(node, _checker_context(view))
    except Exception as exc:  # noqa: BLE001
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    # the node alone, then the whole graph (a node fed by a malformed one has unknown input shapes,
    # which the node's own inference takes on trust)
    for candidate in (one, view.model):
        try:
            onnx.shape_inference.infer_shapes(candidate, check_type=True, strict_mode=True, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - ONNX's verdict, worded on one line
            return " ".join(str(exc).split())[:300] or type(exc).__name__
    return None


def _checker_context(view):
    import onnx

    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = view.model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in view.model.opset_import}
    return ctx
