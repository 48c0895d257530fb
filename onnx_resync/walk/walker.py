"""The graph walker: propagate channel labels through the graph and form permutable groups.

Pure analysis of one graph: reads shapes and small constants, never weight values.
See DESIGN.md (the channel-flow model), registry.py (one declaration per op) and rules/.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx.inliner

from .channels import ElementTable, Label
from .groups import Group, GroupSlot, PinnedReason, Producer, Reader, WalkResult, slot_part  # noqa: F401
from .graph import GraphView, loop_layout, node_inputs, outer_scope_names, subgraphs
from .groups import INPUT_REASON
from .heads import split_per_head
from .layouts import nchwc_layouts
from . import registry
from .rules import resolve_weight_axes, unknown_op
from .rules.base import _is_uniform, is_zero, malformed
from .rules.layout import batch_merged_readers, carry_batch_merged
from .rules.sequence import is_empty
from ..errors import UnsupportedError


class WalkContext:
    """What a rule sees: labels of tensors, shapes, constants, and the element table."""

    def __init__(self, view: GraphView):
        self.view = view
        self.elements = ElementTable()
        self.labels: dict[str, dict[int, Label]] = {}
        self.slots: dict[tuple[str, int], Label] = {}
        self.fixed: dict[tuple[str, int], str] = {}
        self.registered: dict[int, Label] = {}  # id(label) -> label, every label seen anywhere
        # axes along which a tensor's values are constant (Expand of a size-1 axis, ConstantOfShape):
        # such a tensor may meet any channel axis without fixing its order
        self.uniform: dict[str, set[int]] = {}
        # tensors computed elementwise from weights and broadcast scalars (a quantized bias, a
        # BatchNorm written out with Sqrt/Div): axis -> the stored weight axes it is indexed by
        self.derived: dict[str, dict[int, list[tuple[str, int]]]] = {}
        self.derived_bases: dict[str, set[str]] = {}
        self.ops_without_rule: Counter = Counter()
        self.readers: dict[int, tuple[Label, set]] = {}  # id(label) -> (label, op types reading it)
        self._node_slots: set[tuple[str, int]] = set()
        self.node_index = -1  # position in view.nodes of the node being walked
        self.node: onnx.NodeProto | None = None  # the node being walked
        # unlabelled tensors that hold a graph input's values (the input itself, or it moved or
        # selected: a recurrent state's layer): tensor -> the graph input. The caller sets their order,
        # so channels that must line up with them are interface, like channels that reach outputs
        self.from_input: dict[str, str] = {name: name for name in view.graph_inputs}
        # Loop/Scan states that start without channels: (id of the node, carried index) -> axis ->
        # the layout its body writes there (walker._join_body), learnt by one pass (state_layouts) and
        # given to the body's state input by the next (states)
        self.states: dict[tuple[int, int], dict[int, tuple]] = {}
        self.state_layouts: dict[tuple[int, int], dict[int, tuple]] = {}
        # a body's state input -> axes where it starts without channels because the state of the body
        # around it does (a Loop in a Loop); speculated: such states given channels in this pass
        self.orderless_state: dict[str, set[int]] = {}
        self.speculate = False
        self.speculated: list[tuple[int, int]] = []
        # a labelled axis merged into a batch axis of symbolic length: tensor -> (axis, label of the
        # inner positions) (rules/layout.py, batch-merged records)
        self.batch_merged: dict[str, tuple[int, Label]] = {}
        # sequences: name -> the rank of the tensors in it (rules/sequence.py; ONNX shape inference
        # often gives a sequence none)
        self.sequence_ranks: dict[str, int] = {}

    # ---- reading -----------------------------------------------------------------------------
    def get(self, name: str) -> dict[int, Label]:
        """Plain labels (axis -> label); stacked ones are read with `stacked`."""
        return {a: l for a, l in self.labels.get(name, {}).items() if not isinstance(a, tuple)}

    def stacked(self, name: str) -> dict[tuple[int, int], Label]:
        """Stacked labels ((outer axis, inner axis) -> label, see channels.py)."""
        return {a: l for a, l in self.labels.get(name, {}).items() if isinstance(a, tuple)}

    def shape(self, name: str):
        return self.view.shape(name)

    def rank(self, name: str) -> int | None:
        return self.view.rank(name)

    def const(self, name: str):
        return self.view.constant(name)

    def is_weight(self, name: str) -> bool:
        return self.view.is_weight(name)

    def is_weightlike(self, name: str) -> bool:
        """A weight, or a tensor computed elementwise from weights (see `derived`) that holds no
        activation's values (not `scaled`)."""
        return self.view.is_weight(name) or (name in self.derived_bases and not self.scaled(name))

    def scaled(self, name: str) -> bool:
        """`name` is computed from weights and from a channel-free activation that varies along
        another axis (a LayerNorm's scale times the per-sample 1/std: an axis indexed by `[]`): a
        slot may land on its weights' axes, but it is data, never a producer's weight."""
        return any(not found for found in self.derived.get(name, {}).values())

    def indexed(self, name: str) -> bool:
        """A weight or a tensor derived from weights (scaled ones too): its readers account for its axes."""
        return self.view.is_weight(name) or name in self.derived_bases

    def sources(self, name: str, axis: int) -> list[tuple[str, int]] | None:
        """The stored weight axes that `name`'s `axis` is indexed by; None if it cannot be indexed."""
        if self.view.is_weight(name):
            return resolve_weight_axes(self.view, name, axis)
        if name in self.derived_bases:
            return self.derived.get(name, {}).get(axis)
        return None

    def bases(self, name: str) -> set[str]:
        """Every stored weight that `name` is computed from."""
        if name in self.derived_bases:
            return self.derived_bases[name]
        found, stack, seen = set(), [name], {name}
        while stack:
            t = stack.pop()
            if self.view.stored_tensor(t) is not None:
                found.add(t)
            elif t in self.view.producer:
                fresh = [i for i in self.view.producer[t].input if i and self.view.is_weight(i) and i not in seen]
                seen.update(fresh)  # a view that reads one weight twice must not double the work
                stack.extend(fresh)
        return found

    def derive(self, out: str, axis_sources: dict[int, list[tuple[str, int]]], inputs: list[str]) -> None:
        """Record that `out` is computed from weight-like `inputs`, indexed along some axes."""
        bases = set().union(*(self.bases(i) for i in inputs if self.indexed(i)))
        if bases:
            self.derived[out] = axis_sources
            self.derived_bases[out] = bases

    def mark_read(self, name: str, axis: int) -> None:
        """This node accounts for this axis (slotted it, or passed it on into a derived tensor)."""
        self._node_slots.add((name, axis))

    def dim(self, name: str, axis: int):
        shape = self.shape(name)
        if shape is None or axis >= len(shape):
            return None
        return shape[axis]

    # ---- writing -----------------------------------------------------------------------------
    def set(self, name: str, labels: dict[int, Label]) -> None:
        if not name:
            return
        labels = {a: l for a, l in labels.items() if len(l)}
        if labels:
            self.labels[name] = labels
            for label in labels.values():
                self.registered[id(label)] = label

    def new(self, count: int, node: onnx.NodeProto, output: str = "", kind: str = "producer") -> Label:
        label = self.elements.new(count, node=node.name or node.op_type, op=node.op_type, kind=kind, output=output,
                                  index=self.node_index)
        self.registered[id(label)] = label
        return label

    def pin(self, label: Label, reason: str) -> None:
        self.elements.pin(label.elem, self._interface_reason(reason))

    def _interface_reason(self, reason: str) -> str:
        """A pin because channels meet an unlabelled tensor that is a graph input's values names the
        input: the caller's order fixes them (interface), the rule's words are the symptom."""
        if "unlabelled" not in reason or self.node is None:
            return reason
        for name in self.node.input:
            if name in self.from_input and not self.labels.get(name):
                return f"{INPUT_REASON} {self.from_input[name]!r} ({reason})"
        return reason

    def pin_all(self, name: str, reason: str) -> None:
        for label in self.labels.get(name, {}).values():
            self.pin(label, reason)

    def tie_directions(self, name: str) -> None:
        """For a reader that does not keep the outer index of a stacked label apart (it mixes
        directions, or the walker cannot follow it): the units at one offset become one neuron, so
        every direction moves the same way (still exact) and the label turns plain."""
        stacked = self.stacked(name)
        if not stacked:
            return
        labels = self.get(name)
        for (outer, inner), label in stacked.items():
            count = self.dim(name, outer)
            if not isinstance(count, int) or count < 1 or len(label) % count or inner in labels:
                self.pin(label, "a stacked channel axis of unknown size")
                continue
            chunks = label.elem.reshape(count, -1)
            for chunk in chunks[1:]:
                self.elements.union(chunks[0], chunk)
            labels[inner] = label.take(np.arange(chunks.shape[1]))
        self.labels[name] = {}
        self.set(name, labels)

    def union(self, a: Label, b: Label) -> None:
        self.elements.union(a.elem, b.elem)

    def slot(self, tensor: str, axis: int, label: Label, at: tuple[int, int] | None = None) -> bool:
        """Record that `tensor`'s `axis` is indexed by `label`, only inside the slice `at` = (outer
        axis, index) when given (one direction of an RNN); maps weight views to stored weights."""
        if not tensor:
            return True
        self._node_slots.add((tensor, axis))
        targets = self.sources(tensor, axis)
        pieces = [(b, a, label) for b, a in targets] if targets is not None else self._mapped(tensor, axis, label)
        if targets == []:  # a weight-derived tensor's axis that only an activation varies along
            pieces = f"{tensor!r} varies along this axis with an unlabelled activation, not with a weight"
        outers = self._outer_index(tensor, at) if at is not None else {}
        if pieces is None or outers is None or isinstance(pieces, str):
            reason = pieces if isinstance(pieces, str) else f"weight {tensor!r} is computed in a way the walker cannot index"
            self.pin(label, reason)
            # the stored tensors behind it keep their order: another reader must not move them
            self._fix_all(tensor, reason.replace("{", "{{").replace("}", "}}") + " (weight {})")
            return False
        for base, base_axis, label in pieces:
            key = (base, base_axis)
            if base in outers:
                key = (base, base_axis, outers[base])
            # (a stored tensor without the outer axis, e.g. a per-row scale of both directions,
            # serves every slice: the slices' labels meet in its one slot and move together)
            stored = self.view.stored_tensor(base)
            if stored is not None and stored.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
                self.pin(label, f"weight {base!r} is not numeric")
                return False
            shape = self.view.shape(base) or []
            if not -len(shape) <= base_axis < len(shape):  # a parameter of too low a rank (a scalar BatchNorm var)
                self.pin(label, f"weight {base!r} has no axis {base_axis} for {len(label)} channels")
                return False
            dim = shape[base_axis]
            if dim != len(label):
                if dim == 1:
                    continue  # broadcast: the same value for every channel
                self.pin(label, f"weight {base!r} axis {base_axis} has {dim} entries for {len(label)} channels")
                return False
            self.registered[id(label)] = label
            if key in self.slots:
                prev = self.slots[key]
                if not np.array_equal(prev.sub, label.sub):
                    self.pin(label, f"weight {base!r} is shared by layers with different channel layouts")
                    self.pin(prev, f"weight {base!r} is shared by layers with different channel layouts")
                else:
                    self.union(prev, label)
            else:
                self.slots[key] = label
        return True

    def _mapped(self, tensor: str, axis: int, label: Label):
        """Pieces (stored, axis, its label) of a weight computed by index maps (Slice + Concat of
        stored weights: an exporter reordering gates): each stored axis gets the label of the
        positions read from it, in its own order; a reason when a stored axis is read only in part."""
        mapped = self.view.index_sources(tensor, axis)
        if mapped is None:
            return None
        pieces = []
        for base, base_axis, pos in mapped:
            dim = self.view.shape(base)[base_axis]
            valid = np.flatnonzero(pos >= 0)
            if dim == 1:
                continue  # broadcast
            if len(valid) != dim or not np.array_equal(np.sort(pos[valid]), np.arange(dim)):
                return f"weight {base!r} is read in part (or twice) through {tensor!r}"
            order = np.empty(dim, dtype=np.int64)
            order[pos[valid]] = valid
            pieces.append((base, base_axis, label.take(order)))
        return pieces

    def _outer_index(self, tensor: str, at: tuple[int, int]) -> dict | None:
        """Stored tensor -> (its outer axis, index) for the slice `at` of `tensor` (one RNN direction)."""
        found = self.sources(tensor, at[0])
        if found is not None:
            return {b: (a, at[1]) for b, a in found}
        mapped = self.view.index_sources(tensor, at[0])
        if mapped is None or not all(0 <= at[1] < len(pos) and pos[at[1]] >= 0 for _, _, pos in mapped):
            return None
        return {b: (a, int(pos[at[1]])) for b, a, pos in mapped}

    def axis_keys(self, name: str, axis: int) -> list[tuple[str, int]] | None:
        """The stored (weight, axis) pairs that `name`'s axis indexes (weight views and index maps)."""
        keys = self.sources(name, axis)
        if keys is None and self.view.is_weight(name):
            mapped = self.view.index_sources(name, axis)
            keys = None if mapped is None else [(b, a) for b, a, _ in mapped]
        return keys

    def begin_node(self) -> None:
        self._node_slots = set()

    def end_node(self, node: onnx.NodeProto) -> None:
        """Weight axes this node read without a slot must keep their order; so must every weight its
        subgraphs read where the walker does not follow them (a Loop/Scan body would read the weight
        unpermuted; an If's branches are walked node by node)."""
        walked = id(node) in self.view.branches or id(node) in self.view.bodies
        for name in ([] if walked else node_inputs(node)[sum(1 for i in node.input if i):]):
            if self.indexed(name):
                self._fix_all(name, f"read inside a {node.op_type} subgraph (weight {{}})")
        for name in node.input:
            if not name or not self.indexed(name):
                continue
            reason = f"{node.op_type} {node.name!r}".replace("{", "{{").replace("}", "}}") + " reads weight {} unpermuted"
            shape = self.view.shape(name)
            if shape is None:
                self._fix_all(name, reason)
                continue
            for axis, dim in enumerate(shape):
                if dim == 1 or (name, axis) in self._node_slots:
                    continue
                keys = self.axis_keys(name, axis)
                if keys is None:
                    self._fix_all(name, reason)
                    break
                for key in keys:
                    self.fixed.setdefault(key, reason.format(repr(key[0])))

    def _fix_all(self, name: str, reason: str) -> None:
        """The node reads `name` in a way we cannot index: every axis of its weights stays put."""
        for base in self.bases(name):
            for axis in range(len(self.view.shape(base) or [])):
                self.fixed.setdefault((base, axis), reason.format(repr(base)))


# passes over the graph at most: a Loop/Scan state that starts without channels (zeros, or a stored
# tensor) takes the channels its body writes into it, learnt in one pass and used in the next; a
# state nested in another body may need one more
MAX_STATE_PASSES = 4


def walk(model: onnx.ModelProto, view: GraphView | None = None) -> WalkResult:
    view = view or GraphView(model)
    states: dict[tuple[int, int], dict[int, tuple]] = {}
    for _ in range(MAX_STATE_PASSES):
        ctx = _walk_nodes(view, states, speculate=True)
        learnt = {key: {**states.get(key, {}), **axes} for key, axes in ctx.state_layouts.items()}
        if all(states.get(key, {}).keys() >= axes.keys() for key, axes in learnt.items()):
            break
        states = {**states, **learnt}
    if ctx.speculated:  # an inner state took channels that the outer state around it never did
        ctx = _walk_nodes(view, states, speculate=False)
    ctx.node = None
    result = _form_groups(ctx)
    _count_bodies(view, result)
    _count_functions(view, result)
    result.layouts = {w: l for w, l in nchwc_layouts(view)[1].items() if any(
        s.weight == w for g in result.groups for s in g.slots)}
    return result


def _walk_nodes(view: GraphView, states: dict, speculate: bool) -> WalkContext:
    """One pass of the rules over every node; `states`: the layouts of Loop/Scan states learnt by the
    previous pass (see _enter_body); `speculate`: see _orderless_start."""
    ctx = WalkContext(view)
    ctx.states, ctx.speculate = states, speculate
    entered: set[int] = set()  # Loop/Scan bodies whose inputs are labelled
    for index, node in enumerate(view.nodes):
        owners = []  # the bodies this node runs in, innermost first (a Loop in a Loop's body)
        owner = view.body_owner.get(id(node))
        while owner is not None and id(owner) not in entered:
            owners.append(owner)
            owner = view.body_owner.get(id(owner))
        for owner in reversed(owners):  # an outer body's inputs are labelled before an inner one's
            entered.add(id(owner))
            _enter_body(ctx, owner)
        ctx.node_index = index
        ctx.node = node
        if node.op_type == "Constant" or (view.is_weight(node.output[0]) if node.output else False):
            continue  # weights and their views are not activations
        ctx.begin_node()
        _note_readers(ctx, node)
        if ctx.batch_merged:
            batch_merged_readers(ctx, node)
        spec = registry.spec_of(node, view.opsets)
        rule = spec.rule if spec is not None else None
        try:
            if rule is None or not spec.stacked:  # a reader that cannot keep directions apart ties them
                for name in node.input:
                    ctx.tie_directions(name)
            if id(node) in view.branches:  # its branches were walked just before it
                _join_branches(ctx, node)
            elif id(node) in view.bodies:  # its body was walked just before it
                if id(node) not in entered:  # (a body without nodes)
                    entered.add(id(node))
                    _enter_body(ctx, node)
                _join_body(ctx, node)
            elif rule is None:
                ctx.ops_without_rule[f"{node.domain + '.' if node.domain else ''}{node.op_type}"] += 1
                unknown_op(ctx, node)
            else:
                rule(ctx, node)
        except Exception:
            # a node ONNX itself refuses is bad input (one line, exit 3); any other exception is a
            # rule's bug and surfaces as an internal error, never as a silent pin
            why = malformed(view, node)
            if why is None:
                raise
            raise UnsupportedError(f"node {node.name or node.op_type!r} ({node.op_type}) is malformed: {why}") from None
        if ctx.batch_merged:
            carry_batch_merged(ctx, node)
        _spread_constant_fill(ctx, node, spec)
        _spread_input_values(ctx, node, spec)
        ctx.end_node(node)
    return ctx


def _count_bodies(view: GraphView, result: WalkResult) -> None:
    """Loop and Scan bodies the walker does not follow (a Scan before opset 9, with its batch axis):
    the channels their producers make are counted, as pinned with that reason, so a model that
    computes inside a loop never reads as having nothing to permute."""
    for node in view.nodes:
        if node.op_type not in ("Loop", "Scan") or node.domain not in ("", "ai.onnx") or id(node) in view.bodies:
            continue
        for body in subgraphs(node):
            try:
                count = walk(_body_model(view, body)).hidden_channels
            except UnsupportedError:  # a body that cannot stand alone (ONNX refuses it): not counted
                continue
            if count:
                result.hidden_channels += count
                result.pinned.append(PinnedReason(f"inside a {node.op_type} body (not followed)", count,
                                                  [node.name or node.op_type]))
    result.pinned.sort(key=lambda p: -p.channels)


def _count_functions(view: GraphView, result: WalkResult) -> None:
    """Model-local functions the graph calls (a layer written as a FunctionProto) are not expanded:
    the channels the model makes once they are inlined, beyond those walked, are counted as pinned
    with that reason, so such a model never reads as having nothing to permute."""
    model = view.model
    local = {(f.domain, f.name) for f in model.functions}
    called = sorted({n.op_type for n in view.nodes if (n.domain, n.op_type) in local})
    if not called:
        return
    try:
        inlined = walk(onnx.inliner.inline_local_functions(model))
    except (UnsupportedError, onnx.checker.ValidationError, ValueError):
        return  # functions ONNX cannot inline: their ops stay in ops_without_rule
    extra = inlined.hidden_channels - result.hidden_channels
    if extra > 0:
        result.hidden_channels += extra
        result.pinned.append(PinnedReason(f"inside local function(s) {', '.join(called)} (not expanded)", extra, called))
        result.pinned.sort(key=lambda p: -p.channels)


# ---- Loop/Scan bodies -------------------------------------------------------------------------
# A body is walked once, as one iteration: its carried-state inputs hold the initial state's labels,
# a Scan's per-step inputs the scanned tensor's labels without the scan axis. After it, a carried
# state must come out holding the channels it came in with, position by position (they are unioned:
# one neuron in every iteration); where it does not (the body makes the state from a producer, or
# moves it elsewhere) both sides pin. Scan outputs get the scan axis back.
BODY_STATE = "the carried state of {op} {name!r} does not line up (the body maps state channels elsewhere)"


def _enter_body(ctx: WalkContext, node: onnx.NodeProto) -> None:
    """Label a body's inputs from the Loop/Scan's own inputs, before the body's first node. A state
    that starts without channels on an axis where the previous pass saw the body write channels
    (`_learn_state`) gets fresh state elements laid out like them; _join_body unites the two."""
    carried, ins, _ = loop_layout(node, ctx.view.bodies[id(node)])
    for i, (outer, inner, _, _) in enumerate(carried):
        if outer:
            ctx.tie_directions(outer)
            labels = ctx.get(outer)
            for axis in range(ctx.rank(outer) or 0):
                if axis not in labels and _orderless_start(ctx, outer, axis) is not None:
                    ctx.orderless_state.setdefault(inner, set()).add(axis)
            for axis, (count, pattern, sub) in ctx.states.get((id(node), i), {}).items():
                how = _orderless_start(ctx, outer, axis)
                if axis in labels or how is None or (how == "speculated" and not ctx.speculate):
                    continue
                if how == "speculated":
                    ctx.speculated.append((id(node), i))
                fresh = ctx.new(count, node, output=inner, kind="state")
                labels[axis] = Label.of(fresh.elem[pattern], sub)
            ctx.set(inner, labels)
            if outer in ctx.from_input:
                ctx.from_input[inner] = ctx.from_input[outer]
    for outer, inner, axis in ins:
        ctx.tie_directions(outer)
        rank = ctx.rank(outer)
        labels = ctx.get(outer)
        if labels and rank is None:
            ctx.pin_all(outer, f"{node.op_type} input of unknown rank")
            continue
        axis = axis % rank if rank else 0
        if axis in labels:
            ctx.pin(labels[axis], f"{node.op_type} iterates over a channel axis")
        ctx.set(inner, {a - (a > axis): l for a, l in labels.items() if a != axis})
        if outer in ctx.from_input:
            ctx.from_input[inner] = ctx.from_input[outer]


def _join_body(ctx: WalkContext, node: onnx.NodeProto) -> None:
    """After the body: carried states line up with what came in (unioned) or pin; outputs labelled."""
    carried, _, scans = loop_layout(node, ctx.view.bodies[id(node)])
    reason = BODY_STATE.format(op=node.op_type, name=node.name or node.op_type)
    for outer, inner, body_out, out in carried + [("", "", b, "") for b, _, _ in scans]:
        if body_out and ctx.indexed(body_out):  # a weight that leaves the body keeps its order
            ctx._fix_all(body_out, f"weight {{}} is an output of {node.op_type} {node.name or node.op_type!r}")
    for i, (outer, inner, body_out, out) in enumerate(carried):
        ctx.tie_directions(body_out)
        before, after = ctx.get(inner), ctx.get(body_out)
        started = ctx.get(outer) if outer else {}
        # a state the caller feeds (a graph input's values) fixes the order of what lines up with it
        why = (f"{INPUT_REASON} {ctx.from_input[outer]!r} ({reason})" if outer in ctx.from_input and not started
               else reason)
        joined = {}
        for axis in sorted(set(before) | set(after)):
            a, b = before.get(axis), after.get(axis)
            if a is None and b is not None:
                _learn_state(ctx, node, i, outer, axis, b)
            if a is None or b is None or len(a) != len(b) or not np.array_equal(a.sub, b.sub):
                for l in (a, b):
                    if l is not None:
                        ctx.pin(l, why)
                continue
            ctx.union(a, b)
            joined[axis] = a
            if axis not in started and outer and ctx.is_weightlike(outer):
                ctx.slot(outer, axis, a)  # a stored initial state moves with the state's channels
        ctx.set(out, joined)
        if body_out in ctx.sequence_ranks and out:
            ctx.sequence_ranks[out] = ctx.sequence_ranks[body_out]
    for body_out, out, axis in scans:
        ctx.tie_directions(body_out)
        rank = ctx.rank(out)
        labels = ctx.get(body_out)
        if labels and rank is None:
            ctx.pin_all(body_out, f"{node.op_type} output of unknown rank")
            continue
        axis = axis % rank if rank else 0
        ctx.set(out, {a + (a >= axis): l for a, l in labels.items()})


def _learn_state(ctx: WalkContext, node: onnx.NodeProto, index: int, outer: str, axis: int, written: Label) -> None:
    """The body writes channels on `axis` of a state that came in without: the state may carry them
    from the first iteration on where its initial value has no order along that axis (filled with one
    value: zeros from ConstantOfShape) or is a stored tensor (a slot then moves it with them). Not a
    graph input's values: the caller's order fixes those (interface)."""
    dim = ctx.dim(outer, axis) if outer else None
    if _orderless_start(ctx, outer, axis) is None or (isinstance(dim, int) and dim != len(written)):
        return
    elems, pattern = np.unique(written.elem, return_inverse=True)
    ctx.state_layouts.setdefault((id(node), index), {})[axis] = (len(elems), pattern.reshape(-1), written.sub.copy())


def _orderless_start(ctx: WalkContext, outer: str, axis: int) -> str | None:
    """Why a state's initial value `outer` may take any channel order along `axis`: 'stored' (a
    weight: a slot moves it), 'uniform' (one value along the axis: zeros; an empty sequence), 'speculated' (the state
    input of a body around, itself starting so: right only if that state takes channels too, which
    a later pass shows; a last pass without speculation runs where it did not); None: its order is
    fixed (a graph input's values: the caller's order, interface)."""
    if not outer or outer in ctx.from_input:
        return None
    if ctx.is_weightlike(outer):
        return "stored"
    if _is_uniform(ctx, outer, axis) or is_zero(ctx, outer) or is_empty(ctx, outer):
        return "uniform"
    if axis in ctx.orderless_state.get(outer, ()):
        return "speculated"
    return None


def _body_model(view: GraphView, body: onnx.GraphProto) -> onnx.ModelProto:
    """A body as a model of its own: what it reads from outside becomes an input, or the stored
    weight itself (so its producers are found as in the graph)."""
    inputs, stored = list(body.input), []
    for name in sorted(outer_scope_names(body)):
        tensor = view.stored_tensor(name)
        if tensor is not None:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = name
            stored.append(copy)
        else:
            shape = view.shape(name)
            inputs.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None if shape is None else [d if isinstance(d, (int, str)) else None
                                                                        for d in shape]))
    graph = onnx.helper.make_graph(list(body.node), body.name or "body", inputs, list(body.output),
                                   list(body.initializer) + stored)
    model = onnx.helper.make_model(graph, opset_imports=list(view.model.opset_import))
    model.ir_version = view.model.ir_version
    return model


def _join_branches(ctx: WalkContext, node: onnx.NodeProto) -> None:
    """An If's outputs are its walked branches' outputs: a channel axis that reaches an output must
    carry the same channels, in the same layout, in every branch (their elements are unified so they
    move together); otherwise they pin. A weight that leaves a branch keeps its order (the If's
    output is not followed as a weight)."""
    branches = ctx.view.branches[id(node)]
    for i, out in enumerate(node.output):
        names = [g.output[i].name for g in branches if i < len(g.output)]
        if not out or len(names) != len(branches):
            continue
        for name in names:
            ctx.tie_directions(name)
            if ctx.indexed(name):  # (a scaled one too: its weights are read as stored)
                ctx._fix_all(name, f"weight {{}} is an output of If {node.name or node.op_type!r}".replace(
                    "{{}}", "{}"))
        per = [{} if ctx.is_weightlike(n) else ctx.get(n) for n in names]
        joined = {}
        for axis in sorted(set().union(*per)):
            labels = [p.get(axis) for p in per]
            first = labels[0]
            if any(l is None or len(l) != len(first) or not np.array_equal(l.sub, first.sub) for l in labels):
                for l in labels:
                    if l is not None:
                        ctx.pin(l, f"If {node.name or node.op_type!r}: its branches carry different channels "
                                   f"to output {out!r}")
                continue
            for l in labels[1:]:
                ctx.union(first, l)
            joined[axis] = first
        ctx.set(out, joined)
        uniform = [ctx.uniform.get(n, set()) for n in names]
        if all(uniform):
            ctx.uniform[out] = set.intersection(*uniform)
        if all(n in ctx.from_input for n in names) and not joined:
            ctx.from_input[out] = ctx.from_input[names[0]]


def _spread_input_values(ctx: WalkContext, node: onnx.NodeProto, spec) -> None:
    """A layout op (Gather, Slice, Reshape...) of a graph input's values still holds them."""
    if spec is None or not (spec.layout or spec.weight_view):
        return
    source = next((ctx.from_input[n] for n in node.input[:1] if n in ctx.from_input), None)
    if source is not None:
        for out in node.output:
            if out and not ctx.labels.get(out):
                ctx.from_input[out] = source


def _spread_constant_fill(ctx: WalkContext, node: onnx.NodeProto, spec) -> None:
    """A layout op keeps a tensor filled with one value filled with one value."""
    if spec is None or not spec.layout:
        return
    data = [n for n in node.input[:1 if node.op_type not in ("Concat",) else None] if n]
    full = all(ctx.rank(n) is not None and ctx.uniform.get(n, set()) >= set(range(ctx.rank(n))) for n in data)
    if data and full:
        for out in node.output:
            if out and ctx.rank(out) is not None:
                ctx.uniform[out] = set(range(ctx.rank(out)))


def _note_readers(ctx: WalkContext, node: onnx.NodeProto) -> None:
    labelled = [name for name in node.input if name and ctx.labels.get(name)]
    tag = Reader(node.op_type, registry.STANDARD if node.domain == "ai.onnx" else node.domain, len(labelled),
                 node.name or node.op_type)
    for name in labelled:
        for label in ctx.labels[name].values():
            ctx.readers.setdefault(id(label), (label, set()))[1].add(tag)


def _form_groups(ctx: WalkContext) -> WalkResult:
    table = ctx.elements
    view = ctx.view
    # a weight that is also a graph output, or a graph input (an initializer a caller may override),
    # is seen from outside in its stored order: none of its axes may move
    for name in view.graph_outputs:
        if ctx.indexed(name):  # (a weight scaled by an activation too)
            ctx._fix_all(name, "weight {} is a graph output")
    for name in view.overridable:
        ctx._fix_all(name, "weight {} is also a graph input (a caller may feed it)")
    for key, label in ctx.slots.items():
        if key[:2] in ctx.fixed:
            ctx.pin(label, ctx.fixed[key[:2]])
        for whole in ([key[:2], (key[0], key[2][0])] if len(key) == 3 else []):
            if whole in ctx.slots:  # one layer moves the axis inside each slice, another the whole axis
                for l in (label, ctx.slots[whole]):
                    ctx.pin(l, f"weight {key[0]!r} is indexed both per slice and whole")
    for name in view.graph_outputs:
        ctx.pin_all(name, "reaches a graph output")
        if name in ctx.batch_merged:
            ctx.pin(ctx.batch_merged[name][1], "reaches a graph output")

    n = len(table)
    if n == 0:
        return WalkResult([], [], 0, 0, 0, 0, dict(ctx.ops_without_rule))
    table.close_products()  # cells that are one neuron tie their factors (rules/selection.py grids)
    roots = table.roots(np.arange(n))
    origin = np.asarray(table.origin, dtype=np.int64)

    pinned_roots = {}
    for e, reason in table.pins.items():
        pinned_roots.setdefault(int(roots[e]), reason)
    # a neuron tied to another channel of the same producer (e.g. x + shuffle(x)) has no clean role:
    # two of its elements with the same origin are neighbours once sorted by (neuron, origin)
    order = np.lexsort((origin, roots))
    r_sorted, o_sorted = roots[order], origin[order]
    tied = (r_sorted[1:] == r_sorted[:-1]) & (o_sorted[1:] == o_sorted[:-1])
    for r in np.unique(r_sorted[1:][tied]).tolist():
        pinned_roots.setdefault(r, "tied to another channel of the same layer")

    products = _product_roots(table, roots, pinned_roots)
    rewrite = _ProductRewriter(products, roots)
    label_pieces = [piece for label in ctx.registered.values() for piece in rewrite(label)]
    signatures = _signatures(ctx, roots, origin, label_pieces)
    by_signature: dict[bytes, list[int]] = defaultdict(list)
    for r in np.unique(roots).tolist():
        if r not in pinned_roots and r not in products:
            by_signature[signatures.get(r, b"")].append(r)

    rank_of = np.full(n, -1, dtype=np.int64)
    group_of = np.full(n, -1, dtype=np.int64)
    group_roots = [rs for rs in by_signature.values() if len(rs) >= 2]
    group_roots.sort(key=lambda rs: rs[0])
    for gid, rs in enumerate(group_roots):
        rank_of[rs] = np.arange(len(rs))
        group_of[rs] = gid

    groups = [Group(gid, len(rs), [], [], "") for gid, rs in enumerate(group_roots)]
    for key, label in sorted(ctx.slots.items()):
        weight, axis, at = key[0], key[1], (key[2] if len(key) == 3 else None)
        pieces = rewrite(label)
        elem = np.concatenate([p[0] for p in pieces])
        sub = np.concatenate([p[1] for p in pieces])
        pos = np.concatenate([p[2] for p in pieces])
        lab_roots = roots[elem]
        lab_groups = group_of[lab_roots]
        for gid in np.unique(lab_groups[lab_groups >= 0]).tolist():
            mine = np.nonzero(lab_groups == gid)[0]
            order = np.lexsort((pos[mine], sub[mine], origin[elem[mine]], rank_of[lab_roots[mine]]))
            chosen = pos[mine][order]
            size = groups[gid].size
            groups[gid].slots.append(GroupSlot(weight, axis, chosen.reshape(size, len(chosen) // size), at))

    # a group that no weight indexes (e.g. the factors of a grid read only by activations) moves
    # nothing: drop it, and count its neurons as having nothing to swap with
    kept = [g for g in groups if g.slots]
    if len(kept) != len(groups):
        renumber = np.full(len(groups) + 1, -1, dtype=np.int64)
        for new_id, g in enumerate(kept):
            renumber[g.id] = new_id
            g.id = new_id
        group_of = renumber[group_of]  # -1 stays -1 (index -1 is the extra last entry)
        groups = kept

    hidden, permutable, to_output, to_input, singletons, pin_counts = _count_channels(
        table, roots, group_of, groups, products, pinned_roots, lambda rec: _producer(ctx, rec))
    for label, tags in ctx.readers.values():
        for elem, _, _ in rewrite(label):
            gids = group_of[roots[elem]]
            for gid in np.unique(gids[gids >= 0]).tolist():
                groups[gid].readers = sorted(set(groups[gid].readers) | tags)
    for g in groups:
        g.key = _group_key(g)
    _disambiguate_keys(groups)
    # the dims inside each head by a permutation of their own, where nothing reads them without it
    groups = split_per_head(groups, ctx, roots, products, group_of, rank_of)
    pinned = [PinnedReason(reason, c, sorted(nodes)) for reason, (c, nodes) in pin_counts.items()]
    pinned.sort(key=lambda p: -p.channels)
    return WalkResult(groups, pinned, hidden, permutable, to_output, singletons, dict(ctx.ops_without_rule),
                      input_channels=to_input)


def _count_channels(table: ElementTable, roots: np.ndarray, group_of: np.ndarray, groups: list[Group],
                    products: dict, pinned_roots: dict, producer_of) -> tuple[int, int, int, int, int, dict]:
    """Every producer channel counted as permutable, pinned (per reason, with its nodes) or single,
    and each group's producer nodes listed. A layer without head x dim cells is counted at once (a
    big model has tens of thousands of channels), its outside channels per distinct neuron."""
    hidden = permutable = to_output = to_input = singletons = 0
    pin_counts: dict[str, list] = {}

    def pin(reason: str, count: int, node: str) -> None:
        nonlocal to_output, to_input
        if reason == "reaches a graph output":
            to_output += count
        elif reason.startswith(INPUT_REASON):
            to_input += count
        entry = pin_counts.setdefault(reason, [0, set()])
        entry[0] += count
        entry[1].add(node)

    records: dict[int, Producer] = {}

    def add_producer(gid: int, rec: dict) -> None:
        if rec["start"] not in records:
            records[rec["start"]] = producer_of(rec)
        if records[rec["start"]] not in groups[gid].producers:
            groups[gid].producers.append(records[rec["start"]])

    product_roots = np.fromiter(products, dtype=np.int64, count=len(products))
    for rec in table.origins:
        if rec["kind"] != "producer":
            continue
        node = rec["node"]
        rs = roots[rec["start"]:rec["start"] + rec["count"]]
        hidden += len(rs)
        if not np.isin(rs, product_roots).any():
            gids = group_of[rs]
            inside = gids >= 0
            permutable += int(inside.sum())
            for gid in np.unique(gids[inside]).tolist():
                add_producer(gid, rec)
            outside, first, counts = np.unique(rs[~inside], return_index=True, return_counts=True)
            for k in np.argsort(first, kind="stable").tolist():  # (reasons in the order met)
                reason = pinned_roots.get(int(outside[k]))
                if reason is None:
                    singletons += int(counts[k])
                else:
                    pin(reason, int(counts[k]), node)
            continue
        for r in rs.tolist():
            # a (head, dim) cell moves when its head or its dim moves
            factors = _leaf_factors(r, products, roots)
            gids = [int(group_of[f]) for f in factors]
            reason = pinned_roots.get(r)
            if reason is None and r in products:  # a cell whose head and dim are pinned: their reason
                reason = next((pinned_roots[f] for f in factors if f in pinned_roots), None)
            if reason is not None and max(gids) < 0:
                pin(reason, 1, node)
            elif max(gids) >= 0:
                permutable += 1
                for gid in gids:
                    if gid >= 0:
                        add_producer(gid, rec)
            else:
                singletons += 1
    return hidden, permutable, to_output, to_input, singletons, pin_counts


def _producer(ctx: WalkContext, rec: dict) -> Producer:
    """The typed record of one producer: its stored weights, the bias added and the BatchNormalization
    applied right after it (each only where it is the output's one reader)."""
    view = ctx.view
    node = view.nodes[rec["index"]]
    domain = registry.STANDARD if node.domain == "ai.onnx" else node.domain
    carried, stored = set(), set()
    for i in node.input:
        if i and ctx.is_weightlike(i):
            scale, storage = _dequantized(ctx, i)
            carried |= scale
            stored |= storage
    weights = tuple(sorted(carried))
    out = rec["output"] or (node.output[0] if node.output else "")
    bias: tuple[str, ...] = ()
    after = view.consumers.get(out, [])
    if len(after) == 1 and after[0].op_type in ("Add",) and after[0].domain in ("", "ai.onnx"):
        other = [i for i in after[0].input if i and i != out]
        if len(other) == 1 and ctx.is_weightlike(other[0]):
            bias = tuple(sorted(ctx.bases(other[0])))
            out = after[0].output[0]
            after = view.consumers.get(out, [])
    norm = None
    scale: tuple[str, ...] = ()
    stats: tuple[str, ...] = ()
    if (len(after) == 1 and after[0].op_type == "BatchNormalization" and after[0].input[0] == out
            and len(after[0].input) >= 5):
        bn = after[0]
        norm = bn.name or bn.op_type
        scale = tuple(sorted({b for i in bn.input[1:3] if i and ctx.is_weightlike(i) for b in ctx.bases(i)}))
        stats = tuple(sorted({b for i in bn.input[3:5] if i and ctx.is_weightlike(i) for b in ctx.bases(i)}))
    return Producer(rec["node"], node.op_type, domain, rec["output"], weights, bias, norm, scale, stats,
                    tuple(sorted(stored - carried)))


def _dequantized(ctx: WalkContext, name: str) -> tuple[set[str], set[str]]:
    """(weights that carry `name`'s scale, integer storage): through a DequantizeLinear (behind views)
    its scale carries the magnitude while the integers and zero points stay as they are."""
    node = ctx.view.producer.get(name)
    while node is not None and node.op_type in ("Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze"):
        node = ctx.view.producer.get(node.input[0]) if node.input else None
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
        return set(ctx.bases(name)), set()
    storage = set(ctx.bases(node.input[0])) | (set(ctx.bases(node.input[2])) if len(node.input) > 2 and node.input[2] else set())
    return set(ctx.bases(node.input[1])), storage


def _leaf_factors(root: int, products: dict, roots: np.ndarray, depth: int = 0) -> list[int]:
    """The neurons a cell is made of (itself if it is no cell); grids may nest (q/k/v x heads x dims)."""
    if root not in products or depth > 8:
        return [root]
    a, b = products[root][:2]
    return (_leaf_factors(int(roots[a]), products, roots, depth + 1)
            + _leaf_factors(int(roots[b]), products, roots, depth + 1))


def _product_roots(table: ElementTable, roots: np.ndarray, pinned_roots: dict) -> dict[int, tuple]:
    """Neuron (root) -> its (row, col, i, j, rows, cols) factors; conflicting or pinned cells pin."""
    products: dict[int, tuple] = {}
    for cell, rec in table.products.items():
        r = int(roots[cell])
        prev = products.setdefault(r, rec)
        same = (roots[prev[0]], roots[prev[1]], prev[2:]) == (roots[rec[0]], roots[rec[1]], rec[2:])
        if not same:
            pinned_roots.setdefault(r, "one channel is two different (head, dim) cells")
    # a cell bound to a grouped-conv or norm group may only move inside it; head and dim moves
    # do not see that constraint (tags live on the cells), so such cells pin their factors.
    # Every record counts: a channel that is two different cells pins the factors of both.
    tagged = {int(roots[e]) for e in table.tags}
    changed = True
    while changed:  # grids may nest (q/k/v x heads x dims): repeat until no new pin
        changed = False
        for cell, (a, b, *_) in table.products.items():
            r = int(roots[cell])
            reason = pinned_roots.get(r)
            if reason is None and r in tagged:
                reason = "a (head, dim) cell is also bound to a grouped conv or norm group"
            if reason is None:
                continue
            for f in (int(roots[a]), int(roots[b])):  # the cell cannot move: nor its head, nor its dim
                if f not in pinned_roots:
                    pinned_roots[f] = reason
                    changed = True
    return products


class _ProductRewriter:
    """Turns a label into pieces (elem, sub, positions); (head, dim) cells become two pieces.

    Position p holding cell (i, j) belongs to head a (sub: j) and to dim b (sub: i), so permuting
    heads moves whole rows of the grid and permuting dims moves the same column in every row.
    """

    def __init__(self, products: dict[int, tuple], roots: np.ndarray):
        self.roots = roots
        self.keys = np.fromiter(products, dtype=np.int64, count=len(products))
        self.recs = np.array(list(products.values()), dtype=np.int64).reshape(-1, 6)
        order = np.argsort(self.keys)
        self.keys, self.recs = self.keys[order], self.recs[order]

    def __call__(self, label: Label) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self.pieces(label.elem, label.sub, np.arange(len(label)))

    def pieces(self, elem, sub, pos, depth: int = 0):
        if not len(self.keys) or depth > 8:
            return [(elem, sub, pos)]
        r = self.roots[elem]
        idx = np.clip(np.searchsorted(self.keys, r), 0, len(self.keys) - 1)
        is_cell = self.keys[idx] == r
        if not is_cell.any():
            return [(elem, sub, pos)]
        keep = ~is_cell
        out = [(elem[keep], sub[keep], pos[keep])] if keep.any() else []
        a, b, i, j, na, nb = self.recs[idx[is_cell]].T
        cell_sub = sub[is_cell]
        # a factor may itself be a grid (q/k/v x heads x dims): rewrite until none is left
        out += self.pieces(a, cell_sub * nb + j, pos[is_cell], depth + 1)
        out += self.pieces(b, cell_sub * na + i, pos[is_cell], depth + 1)
        return out


def _signatures(ctx: WalkContext, roots: np.ndarray, origin: np.ndarray, pieces) -> dict[int, bytes]:
    """Per neuron (root): where it appears (label piece, producer, sub-position) plus its constraints."""
    cols = []
    for piece_id, (elem, sub, _) in enumerate(pieces):
        cols.append(np.stack([roots[elem], np.full(len(elem), piece_id), origin[elem], sub], axis=1))
    rows = np.concatenate(cols)
    rows = rows[np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))]
    starts = np.flatnonzero(np.r_[True, rows[1:, 0] != rows[:-1, 0]])
    ends = np.r_[starts[1:], len(rows)]
    tags_by_root: dict[int, list] = defaultdict(list)
    for e, tags in ctx.elements.tags.items():
        tags_by_root[int(roots[e])].extend(tags)
    sigs = {}
    for s, e in zip(starts.tolist(), ends.tolist()):
        r = int(rows[s, 0])
        h = hashlib.blake2b(rows[s:e, 1:].tobytes(), digest_size=16)
        if r in tags_by_root:
            h.update(repr(sorted(map(repr, tags_by_root[r]))).encode())
        sigs[r] = h.digest()
    return sigs


def _disambiguate_keys(groups: list[Group]) -> None:
    """Groups that share a first slot add where their first neuron sits in it: "@4" for the second
    block of a grouped conv, "@0,1" / "@0,2" for the heads / in-head dims of one channel axis.

    Slot positions come from the graph's structure alone (not from weight values), so the suffix is
    the same after a permutation; a last "#k" keeps keys unique whatever happens.
    """
    count = Counter(g.key for g in groups)
    for g in groups:
        if count[g.key] > 1:
            first = min(g.slots, key=_slot_order)
            g.key += "@" + ",".join(str(int(p)) for p in first.positions[0])
    seen: Counter = Counter()
    for g in groups:
        seen[g.key] += 1
        if seen[g.key] > 1:
            g.key += f"#{seen[g.key] - 1}"


def _slot_order(slot: GroupSlot):
    return slot.weight, slot.axis, slot.at or ()


def _group_key(group: Group) -> str:
    first = min(group.slots, key=_slot_order) if group.slots else None
    where = first.name() if first else "no-slot"
    return f"{where}/{group.size}x{len(group.slots)}"
