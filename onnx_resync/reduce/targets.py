"""Reshape targets that carry a group's width: fitted after the width changed (attention heads).

A group's width can also be written in the graph: a Reshape into heads ([B, S, heads, head_dim])
holds the number of heads or the head size, the Reshape back ([B, S, heads x head_dim]) their
product. When a width edit (widths.py) removes whole heads or a dim of every head, those targets
must follow, or the graph no longer runs.

`refit(before, after, strides)` compares the static shapes of each Reshape's input in the two
models (ONNX shape inference, the graph inputs given the shapes of the input plan of `before`).
Where one input axis changed from c to c', the output axes it becomes are found by the flat layout
(row-major: an input axis is split into, or merged inside, output axes with the same flat span):

- merged: the output axis holding the span takes the same factor c'/c;
- split: the output axis whose size times c'/c is an integer; where several are, the one whose
  stride inside the span is the stride of the edited group's neurons along the channel axis
  (`strides`: a head group's neurons are head_dim apart, a head's dims 1 apart).

Entries -1 and 0 (inferred, copied) are left alone. A target shared by several Reshapes is copied
before it is changed. A target built at run time (an exporter's Concat of a Shape's entries and
constants, each maybe through Unsqueeze) has its constant entries fitted where they are. Dims that
shape inference cannot tell (a batch or sequence length behind a Slice) are None and only matter
where the changed axis's span needs them. These are candidates only: the caller proves the model
with ONNX Runtime.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper


def has_targets(model: onnx.ModelProto) -> bool:
    """Some Reshape reads a constant target (the only ones refit changes)."""
    constants = _constants(model)
    return any(n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in constants for n in model.graph.node)


def strides(group) -> set[int]:
    """The stride of a group's neurons along its slots' axes (block layouts: a head's size)."""
    out = set()
    for slot in group.slots:
        p = slot.positions
        if p.shape[0] > 1:
            out.add(int(p[1, 0] - p[0, 0]))
    return out


def refit(before: onnx.ModelProto, after: onnx.ModelProto, neuron_strides: set[int], feed_shapes: dict) -> int:
    """Fit `after`'s Reshape targets to its widths (module docstring), in place; returns how many
    targets changed. `feed_shapes`: graph input -> concrete shape (the input plan of `before`)."""
    old = _shapes(before, feed_shapes)
    changed = 0
    new = None
    for node in list(after.graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        constants = _constants(after)
        if node.input[1] not in constants and not _concat_of(after, node.input[1]):
            continue
        new = new if new is not None else _shapes(after, feed_shapes)
        i_old, i_new, o_old = old.get(node.input[0]), new.get(node.input[0]), old.get(node.output[0])
        if i_old is None or i_new is None or o_old is None or i_old == i_new or len(i_old) != len(i_new):
            continue
        if node.input[1] in constants:
            target = np.array(constants[node.input[1]], dtype=np.int64).reshape(-1)
            fitted = _fit(i_old, i_new, o_old, target, neuron_strides)
            if fitted is None or np.array_equal(fitted, target):
                continue
            _set_target(after, node, fitted)
        elif not _fit_concat(after, node, i_old, i_new, o_old, neuron_strides, constants, new):
            continue
        changed += 1
        new = None  # shapes downstream move: inferred again
    return changed


def _concat_of(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if n.output and n.output[0] == name and n.op_type == "Concat"), None)


def _fit_concat(model, node, i_old, i_new, o_old, neuron_strides, constants, shapes) -> bool:
    """A target built at run time (an exporter's Concat of a Shape's entries and constants, each
    constant maybe through Unsqueeze): the entries that are constants are fitted, in the constant
    they come from; an entry computed from a shape stays (-1 for _fit)."""
    concat = _concat_of(model, node.input[1])
    sources, target = [], []  # per target entry: (constant name, index in it) or None
    for x in concat.input:
        origin = x
        producer = next((n for n in model.graph.node if x in n.output), None)
        if producer is not None and producer.op_type == "Unsqueeze" and producer.input[0] in constants:
            origin = producer.input[0]
        if origin in constants:
            values = np.array(constants[origin], dtype=np.int64).reshape(-1)
            sources += [(origin, i) for i in range(len(values))]
            target += values.tolist()
        else:
            length = shapes.get(x)
            if length is None or len(length) != 1 or length[0] is None:
                return False
            sources += [None] * length[0]
            target += [-1] * length[0]
    target = np.array(target, dtype=np.int64)
    fitted = _fit(i_old, i_new, o_old, target, neuron_strides)
    if fitted is None or np.array_equal(fitted, target):
        return False
    for a in np.flatnonzero(fitted != target):
        name, i = sources[a]
        values = np.array(_constants(model)[name], dtype=np.int64)
        flat = values.reshape(-1)
        flat[i] = fitted[a]
        _set_constant(model, name, flat.reshape(values.shape), concat)
    return True


def _changed_in_place(model: onnx.ModelProto, name: str, values: np.ndarray) -> bool:
    """Integer constant `name` given `values` where it is stored (an initializer or a Constant node);
    False when it is neither."""
    tensor = numpy_helper.from_array(values.astype(np.int64), name)
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(tensor)
            return True
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            n.attribute[0].t.CopyFrom(tensor)
            return True
    return False


def _set_constant(model: onnx.ModelProto, name: str, values: np.ndarray, reader: onnx.NodeProto) -> None:
    """Constant `name` changed where it is when nothing else reads it, else a copy for `reader`'s
    chain (the Unsqueeze or Concat that reads it)."""
    readers = [n for n in model.graph.node if name in n.input]
    if len(readers) == 1 and _changed_in_place(model, name, values):
        return
    fresh = f"{name}.fitted"
    k = 1
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    while fresh in taken:
        fresh, k = f"{name}.fitted_{k}", k + 1
    model.graph.initializer.append(numpy_helper.from_array(values.astype(np.int64), fresh))
    user = next((n for n in readers if n.output[:1] == reader.output[:1] or (n.output and n.output[0] in reader.input)),
                readers[0])
    for k, x in enumerate(user.input):
        if x == name:
            user.input[k] = fresh


def _fit(i_old, i_new, o_old, target, neuron_strides) -> np.ndarray | None:
    """The target fitted to the input's changed axis; dims unknown to inference are None (an
    outer batch or sequence axis), and an axis whose span needs one is not fitted."""
    axes = [k for k, (a, b) in enumerate(zip(i_old, i_new)) if a != b and a is not None and b is not None]
    if len(axes) != 1 or len(target) != len(o_old):
        return None
    k = axes[0]
    inner = _prod(i_old[k + 1:])
    if inner is None:
        return None
    lo, hi = inner, inner * i_old[k]  # the axis's span: strides from `inner` up to `hi`
    ratio = i_new[k] / i_old[k]
    out_strides = [_prod(o_old[a + 1:]) if o_old[a] is not None else None for a in range(len(o_old))]
    fitted = target.copy()
    known = [a for a in range(len(o_old)) if out_strides[a] is not None]
    holding = [a for a in known if out_strides[a] <= lo and out_strides[a] * o_old[a] >= hi]
    if holding:  # merged (or kept as it is)
        a = holding[0]
        value = o_old[a] * ratio
        if value != int(value):
            return None
        if target[a] > 0:
            fitted[a] = int(value)
        return fitted
    split = [a for a in known if out_strides[a] >= lo and out_strides[a] * o_old[a] <= hi]
    if math.prod(o_old[a] for a in split) != i_old[k]:
        return None
    candidates = [a for a in split if (o_old[a] * ratio).is_integer() and target[a] > 0]
    if len(candidates) > 1:
        candidates = [a for a in candidates if out_strides[a] // lo in neuron_strides] or candidates[:0]
    if len(candidates) != 1:
        return None
    a = candidates[0]
    fitted[a] = int(o_old[a] * ratio)
    return fitted


def _prod(dims) -> int | None:
    return None if any(d is None for d in dims) else math.prod(dims)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type == onnx.TensorProto.INT64:
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _set_target(model: onnx.ModelProto, node: onnx.NodeProto, values: np.ndarray) -> None:
    """The target changed where it is (an initializer or a Constant node) when this Reshape alone
    reads it; else a new initializer for this Reshape."""
    name = node.input[1]
    if sum(name in n.input for n in model.graph.node) == 1 and _changed_in_place(model, name, values):
        return
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    base = f"{node.name or 'reshape'}.fitted_shape"
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    model.graph.initializer.append(numpy_helper.from_array(values.astype(np.int64), name))
    node.input[1] = name


def _shapes(model: onnx.ModelProto, feed_shapes: dict) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor ONNX shape inference can tell the rank of, the inputs given
    concrete shapes (a dim it cannot tell: None)."""
    probe = _without_weights(model)
    for vi in probe.graph.input:
        if vi.name in feed_shapes:
            concrete = helper.make_tensor_type_proto(1, list(feed_shapes[vi.name]))
            vi.type.tensor_type.shape.CopyFrom(concrete.tensor_type.shape)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - inference refuses the graph: nothing is fitted (ORT decides)
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims)
    return out


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with float weights as dims only (inference reads their shapes; integer
    constants, which may be shapes, are kept whole)."""
    g = model.graph
    weights = [t if t.data_type == onnx.TensorProto.INT64 else
               onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type) for t in g.initializer]
    probe = helper.make_model(helper.make_graph(list(g.node), g.name, list(g.input), list(g.output), weights),
                              opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    probe.functions.extend(model.functions)
    return probe
