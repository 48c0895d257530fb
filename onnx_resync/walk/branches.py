"""Ifs whose running branch the graph itself decides.

torch writes shape-dependent Python as If nodes: `x.squeeze(1)` on a traced tensor becomes
If(shape(x)[1] == 1, Squeeze, Identity), `if x.dim() == 2: x = x.unsqueeze(0)` becomes
If(rank == 2, Unsqueeze, Identity). The branches differ in rank, so ONNX shape inference gives the
If's outputs no shape and every rule after them meets an unknown rank. Two things decide the branch:

- *shapes*: the condition is a value shapes.py computes (the tested dim is a number in the file, the
  rank is known): `condition` reads it.
- *rank*: the condition stays open (a symbolic length tested against 1) but only one branch lets the
  graph run. `by_rank` puts each branch in the If's place in a copy of the skeleton (every If decided
  by shapes replaced by its branch as well) and asks ONNX shape inference, strict: a node refused
  with one branch's shapes and none with the other's decides it (silero_vad_op15: `squeeze(-1)` of
  the encoder's output feeds an LSTM cell that takes 2-D input only). A refusal inside another open
  If or a Loop/Scan body proves nothing (that node may never run) and leaves the If open, as does
  a skeleton that inference refuses before any branch is chosen.

Vocabulary: *runs* maps an If, by its first output's name (names are unique across scopes), to the
branch that runs (True: then_branch).
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable

import onnx

from . import graph as walk_graph  # (graph.py imports this module: its functions are read when called)

# Ifs tried by rank per model: each trial infers the skeleton a few times per branch. At most
# MAX_TRIALS, and fewer in a large skeleton: trials x its nodes stays under TRIAL_NODES
# (silero_vad_if's 700 nodes: all 16; 20,000 nodes: 2). silero_vad_if walks in 1.9 s (0.13 s without)
MAX_TRIALS = 16
TRIAL_NODES = 50_000
_CONTROL = ("If", "Loop", "Scan")
_CHAIN = re.compile(r"\(op_type:(\w+), node name: ([^)]*)\)")


def condition(node: onnx.NodeProto, values, runs: dict[str, bool]) -> bool | None:
    """The branch an If runs (True: then), or None when nothing decides it."""
    if node.output and node.output[0] in runs:
        return runs[node.output[0]]
    cond = values.numeric(node.input[0]) if node.input and node.input[0] else None
    if cond is None or cond.size != 1:
        return None
    return bool(cond.reshape(-1)[0])


def branch(node: onnx.NodeProto, then: bool) -> onnx.GraphProto | None:
    return next((a.g for a in node.attribute if a.name == ("then_branch" if then else "else_branch")), None)


def _ifs(graph: onnx.GraphProto, ancestors=()):
    """(If node, the graph holding it, names of the If/Loop/Scan nodes around it), at any depth."""
    for node in graph.node:
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            yield node, graph, list(ancestors)
        for attr in node.attribute:
            inner = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for g in inner:
                yield from _ifs(g, (*ancestors, node.name))


def decided_shapes(skeleton: onnx.ModelProto, shapes: dict, values, runs: dict[str, bool], sharper) -> list:
    """[(graph holding the If, output, dims, element type)] for each decided If whose outputs the
    running branch's shapes say more about than inference did."""
    found = []
    for node, graph, _ in _ifs(skeleton.graph):
        flag = condition(node, values, runs)
        chosen = branch(node, flag) if flag is not None else None
        if chosen is None:
            continue
        for name, result in zip(node.output, chosen.output):
            dims = shapes.get(result.name)
            if name and dims is not None and dims != shapes.get(name) and sharper(dims, shapes.get(name)) \
                    and result.type.HasField("tensor_type"):
                found.append((graph, name, dims, result.type.tensor_type.elem_type))
    return found


def _inline(graph: onnx.GraphProto, chosen: dict[str, bool]) -> bool:
    """Replace each If of `chosen` (at any depth) by its branch's nodes and an Identity per output."""
    done = False
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                done |= _inline(g, chosen)
        flag = chosen.get(node.output[0]) if node.op_type == "If" and node.output else None
        body = branch(node, flag) if flag is not None else None
        if body is None:
            nodes.append(node)
            continue
        _inline(body, chosen)
        nodes.extend(body.node)
        graph.initializer.extend(body.initializer)
        graph.value_info.extend(body.value_info)
        nodes.extend(onnx.helper.make_node("Identity", [r.name], [o]) for o, r in zip(node.output, body.output) if o)
        done = True
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _inline_decided(inferred: onnx.ModelProto, shapes: dict, values_of: Callable) -> bool:
    """One round: every If of `inferred` (at any depth) that shapes decide replaced by its branch, in
    place; False when shapes decide none (nothing changed)."""
    values = values_of(inferred, shapes)
    chosen = {node.output[0]: flag for node, _, _ in _ifs(inferred.graph) if node.output
              for flag in [condition(node, values, {})] if flag is not None}
    return bool(chosen) and _inline(inferred.graph, chosen)


def _settled(model: onnx.ModelProto, values_of: Callable, infer: Callable) -> onnx.ModelProto:
    """The model with every If that shapes decide replaced by its branch, until none is left."""
    for _ in range(16):
        inferred, shapes = infer(model)
        if not _inline_decided(inferred, shapes, values_of):
            return inferred
        model = inferred
    return model


def _refused(model: onnx.ModelProto, ancestors: list[str], values_of: Callable, infer: Callable) -> bool:
    """Strict inference refuses, with every If that shapes decide replaced by its branch, a node that
    runs whenever the If whose ancestors these are runs. A refusal that proves nothing yet (inside an
    If not yet replaced) lets the round go on without strictness."""
    for _ in range(16):
        try:
            inferred, shapes = infer(model, strict=True)
        except Exception as exc:  # inference's own errors (InferenceError, ValidationError...)
            if _proves(str(exc), ancestors):
                return True
            inferred, shapes = infer(model)
        if not _inline_decided(inferred, shapes, values_of):
            return False
        model = inferred
    return False


def _proves(refusal: str, ancestors: list[str]) -> bool:
    """The refused node runs whenever the If does: every If/Loop/Scan on its path holds the If too."""
    chain = _CHAIN.findall(refusal)
    control = []
    for op, name in chain:
        if op not in _CONTROL:
            return bool(name) and all(control) and control == ancestors[:len(control)]
        control.append(name)
    return False  # no node named, or the refusal is an If's own: nothing proven


def by_rank(skeleton: onnx.ModelProto, shapes: dict, values_of: Callable, infer: Callable) -> dict[str, bool]:
    """runs for the Ifs that shapes leave open but that only one branch lets run (see the module).
    Remembered per skeleton (`_memo_key`): permute, verify and audit walk the same file, and copies
    of it with other weights, again."""
    key = _memo_key(skeleton)
    if key not in _MEMO:
        if len(_MEMO) >= 32:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = _by_rank(skeleton, shapes, values_of, infer)
    return dict(_MEMO[key])


_MEMO: dict[bytes, dict[str, bool]] = {}

# ops that read no value of their weight inputs to give their output's shape, and whose outputs
# shapes.py never evaluates: a float tensor only they read decides no branch
_VALUE_BLIND = {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "BatchNormalization",
                "LayerNormalization", "InstanceNormalization", "GroupNormalization", "PRelu"}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _memo_key(skeleton: onnx.ModelProto) -> bytes:
    """The skeleton's bytes without the values of the float tensors that only _VALUE_BLIND ops read
    (a permuted, perturbed or redrawn copy asks by_rank the same question)."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    readers: dict[str, set] = {}
    for g in walk_graph.nested_graphs(model.graph):
        for node in g.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.op_type)
            for inner in [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]:
                for n in inner.node:  # a body's reads of outer names count as the node's too
                    for name in n.input:
                        readers.setdefault(name, set()).add(node.op_type)

    def blind(name: str) -> bool:
        return bool(readers.get(name)) and readers[name] <= _VALUE_BLIND

    for g in walk_graph.nested_graphs(model.graph):
        tensors = [t for t in g.initializer if blind(t.name)]
        tensors += [a.t for n in g.node if n.op_type == "Constant" and n.output and blind(n.output[0])
                    for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        for t in tensors:
            if t.data_type in _FLOATS:
                for field in ("raw_data", "float_data", "double_data", "int32_data"):
                    t.ClearField(field)
    return hashlib.sha256(model.SerializeToString()).digest()


def _by_rank(skeleton: onnx.ModelProto, shapes: dict, values_of: Callable, infer: Callable) -> dict[str, bool]:
    candidates = []
    for node, _, _ in _ifs(skeleton.graph):
        then_g, else_g = branch(node, True), branch(node, False)
        if then_g is None or else_g is None or not node.output:
            continue
        ranks = [[len(shapes[o.name]) if o.name in shapes else None for o in g.output] for g in (then_g, else_g)]
        if any(a is not None and b is not None and a != b for a, b in zip(*ranks)):
            candidates.append(node.output[0])
    if not candidates:
        return {}
    base = onnx.ModelProto()
    base.CopyFrom(skeleton)
    for g in walk_graph.nested_graphs(base.graph):  # what the file (or an earlier pass) declares is not evidence
        del g.value_info[:]
        for vi in g.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    base = _settled(base, values_of, infer)
    try:
        infer(base, strict=True)
    except Exception:  # refused before any branch is chosen: no refusal can be pinned on one
        return {}
    runs: dict[str, bool] = {}
    open_ifs = {node.output[0]: ancestors for node, _, ancestors in _ifs(base.graph) if node.output}
    size = sum(len(g.node) for g in walk_graph.nested_graphs(base.graph))
    for name in [c for c in candidates if c in open_ifs][:min(MAX_TRIALS, TRIAL_NODES // max(size, 1))]:
        refused = {}
        for flag in (True, False):
            trial = onnx.ModelProto()
            trial.CopyFrom(base)
            _inline(trial.graph, {name: flag})
            refused[flag] = _refused(trial, open_ifs[name], values_of, infer)
        if refused[True] != refused[False]:
            runs[name] = not refused[True]
    return runs
