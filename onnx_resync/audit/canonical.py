"""Canonical form of a model, so that a vendor's re-export can be compared with the reference.

Exporters, simplifiers and runtimes write the same network in many ways. `canonicalize` rewrites a
model into one form (pure onnx/numpy, the input is not modified):

- Constant nodes become initializers; nodes whose inputs are all constant and that only re-view or
  convert weights (Identity, Cast, DequantizeLinear, QuantizeLinear, Transpose, Reshape, Squeeze,
  Unsqueeze, elementwise arithmetic, ...) are evaluated into initializers: dequantized, cast or
  transposed weights become plain float weights;
- integer-operator quantized graphs become the float graph (dequantize.py): ConvInteger/QLinearConv
  -> Conv, MatMulInteger/QLinearMatMul -> MatMul, com.microsoft QGemm -> Gemm, QLinearAdd/Mul/
  Sigmoid/pooling/Concat -> their float ops, DynamicQuantizeLSTM -> LSTM, each with dequantized
  weights and float biases; the quantization of activations (QuantizeLinear/DequantizeLinear pairs,
  DynamicQuantizeLinear and its Cast/Mul-by-scale chains) is removed;
- every float tensor is float32: fp16/bf16/fp64 initializers are cast, Cast nodes to a float type
  cast to float32, graph inputs and outputs are declared float32;
- no-op nodes are dropped: Identity, Dropout (inference), Cast of a float tensor to float32;
- BatchNormalization, and Add/Mul/Sub by a per-channel constant, are folded into the Conv,
  ConvTranspose or Gemm before them when that is the producer's only consumer;
- Gemm with a constant B becomes MatMul (+ Add of the bias), as exporters write Linear both ways;
- a Conv/ConvTranspose without a bias gets a zero bias (so a folded and an unfolded copy have the
  same weights).

The canonical model is for comparison (walk and match), not necessarily for running. It comes with
`origins`: for every canonical weight, the input model's stored tensors it was computed from, their
storage type, the steps applied and the input model's layer (node) that reads it, so that reports
speak of the input's own names.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .dequantize import dequantize
from ..errors import UnsupportedError
from ..walk.graph import constant_node_value, node_inputs, outer_scope_names, subgraphs
from ..io import tensor_values

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
BOOL_OUTPUT = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
               "IsNaN", "IsInf"}
INT64_OUTPUT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}
# ops evaluated when every input is constant: weight views, conversions and elementwise arithmetic
FOLDABLE = {
    "Identity", "Cast", "CastLike", "DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape",
    "Squeeze", "Unsqueeze", "Flatten", "Mul", "Add", "Sub", "Div", "Neg", "Sqrt", "Reciprocal", "Pow",
    "Concat", "Slice", "Gather", "Shape", "Expand", "Tile", "Clip", "Abs", "Sign", "Floor", "Round",
}
MAX_FOLD_ELEMENTS = 1 << 27
PRODUCERS_FOLDING = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class WeightOrigin:
    """Where a canonical weight came from in the input model."""

    sources: list[str]  # stored tensors (initializers / Constant outputs) it was computed from; [] if synthetic
    dtype: str  # storage type of its main source: 'float32', 'float16', 'int8', ...
    steps: list[str] = field(default_factory=list)  # what canonicalization did to it
    layer: str = ""  # the input model's node that reads it (filled in at the end)

    @property
    def quantized(self) -> bool:
        return self.dtype.startswith(("int", "uint")) or any(s.startswith("dequantized") for s in self.steps)

    @property
    def computed(self) -> bool:
        """Arithmetic beyond a cast (folding, dequantization): rounding differs from the source's."""
        return any(not s.startswith(("cast", "view")) for s in self.steps)

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "dtype": self.dtype, "steps": list(self.steps), "layer": self.layer}


@dataclass
class CanonicalModel:
    model: onnx.ModelProto
    origins: dict[str, WeightOrigin]  # canonical weight name -> origin
    node_origins: dict[str, str]  # canonical node name -> the input model's node name (display form)
    changes: Counter = field(default_factory=Counter)  # "BatchNormalization folded" -> count

    def layer_of(self, node_name: str) -> str:
        return self.node_origins.get(node_name, node_name)

    def changes_list(self) -> list[str]:
        return [f"{what} ({n})" if n > 1 else what for what, n in sorted(self.changes.items())]


def canonicalize(model: onnx.ModelProto) -> CanonicalModel:
    """The canonical form of `model` (see the module docstring); `model` is not modified."""
    return _Canonicalizer(model).run()


def display_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<unnamed {node.op_type} #{index}>"


def topological(nodes: list[onnx.NodeProto], known: set[str] | None = None) -> list[onnx.NodeProto]:
    """Kahn's order, ties kept in file order; refuses cycles."""
    produced = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                produced[o] = i
    users = defaultdict(list)
    remaining = []
    for i, n in enumerate(nodes):
        deps = {produced[x] for x in node_inputs(n) if x in produced and produced[x] != i}
        remaining.append(len(deps))
        for d in deps:
            users[d].append(i)
    ready = deque(i for i, r in enumerate(remaining) if r == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, r in enumerate(remaining) if r > 0)
        raise UnsupportedError(f"graph has a cycle (node {stuck.name or stuck.op_type!r} never becomes ready)")
    return order


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _dtype_name(array: np.ndarray) -> str:
    return str(array.dtype)


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name in ("bfloat16",) or array.dtype.name.startswith("float8")


class _Canonicalizer:
    def __init__(self, model: onnx.ModelProto):
        self.src = model
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {}
        self.origins: dict[str, WeightOrigin] = {}
        self.node_origins: dict[str, str] = {}
        self.changes: Counter = Counter()
        self.outputs = [o.name for o in self.graph.output]
        self.protected: set[str] = set(self.outputs)  # names that must keep existing
        self.nodes: list[onnx.NodeProto] = []
        self._names: set[str] = set()

    # ---- driver ------------------------------------------------------------------------------
    def run(self) -> CanonicalModel:
        self._read()
        self._unfuse()
        self._fold_constants()
        if dequantize(self):
            self._fold_constants()
        self._unify_floats()
        self._drop_noops()
        while self._fold_affine():
            pass
        self._gemm_to_matmul()
        self._zero_biases()
        return self._build()

    def _read(self) -> None:
        for t in self.graph.initializer:
            arr = tensor_values(t)
            self.consts[t.name] = arr
            self.origins[t.name] = WeightOrigin([t.name], _dtype_name(arr))
        used_names = set()
        for i, node in enumerate(self.graph.node):
            n = onnx.NodeProto()
            n.CopyFrom(node)
            name = n.name if n.name and n.name not in used_names else f"{n.op_type}_{i}"
            while name in used_names:
                name += "_"
            used_names.add(name)
            n.name = name
            self.node_origins[name] = display_name(node, i)
            for g in subgraphs(n):
                self.protected |= outer_scope_names(g)
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1 \
                    and n.output[0] not in self.protected:
                value = constant_node_value(n)
                if value is not None:
                    self.consts[n.output[0]] = value
                    self.origins[n.output[0]] = WeightOrigin([n.output[0]], _dtype_name(value))
                    self.changes["Constant node made an initializer"] += 1
                    continue
            self.nodes.append(n)
        self._names = used_names
        self.nodes = topological(self.nodes)

    def _new_name(self, base: str) -> str:
        name = base
        k = 1
        taken = self._names | set(self.consts) | {o for n in self.nodes for o in n.output}
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def _consumers(self) -> dict[str, list[onnx.NodeProto]]:
        users = defaultdict(list)
        for n in self.nodes:
            for name in node_inputs(n):
                users[name].append(n)
        return users

    def _producer(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.nodes for o in n.output if o}

    def _merge_origin(self, inputs: list[str], step: str) -> WeightOrigin:
        sources, dtype, steps = [], None, []
        for name in inputs:
            o = self.origins.get(name)
            if o is None:
                continue
            sources.extend(s for s in o.sources if s not in sources)
            if dtype is None and (o.sources or o.dtype):
                dtype = o.dtype
            steps.extend(s for s in o.steps if s not in steps)
        steps.append(step)
        return WeightOrigin(sources, dtype or "float32", steps)

    # ---- ONNX Runtime's fused ops back to standard ones ---------------------------------------
    def _unfuse(self) -> None:
        """com.microsoft FusedConv / FusedGemm (ORT_ENABLE_EXTENDED files): the op, then its activation."""
        out = []
        for node in self.nodes:
            if node.domain != "com.microsoft" or node.op_type not in ("FusedConv", "FusedGemm"):
                out.append(node)
                continue
            act = _attr(node, "activation", b"")
            act = act.decode() if isinstance(act, bytes) else str(act)
            params = list(_attr(node, "activation_params", []) or [])
            if node.op_type == "FusedGemm":
                params = [_attr(node, k) for k in ("activation_alpha", "activation_beta", "activation_gamma")]
                params = [p for p in params if p is not None]
            act_nodes = self._activation(act, params, node)
            if act_nodes is None:
                out.append(node)  # an activation we do not know: leave it (alignment will say so)
                continue
            base = "Conv" if node.op_type == "FusedConv" else "Gemm"
            keep = [a for a in node.attribute if not a.name.startswith("activation")]
            y = node.output[0]
            inputs = list(node.input[:3])
            z = node.input[3] if base == "Conv" and len(node.input) > 3 and node.input[3] else ""
            mid = self._new_name(y + "/pre_activation") if act_nodes or z else y
            core = helper.make_node(base, inputs, [mid], name=node.name)
            core.attribute.extend(keep)
            out.append(core)
            if z:
                summed = self._new_name(y + "/sum") if act_nodes else y
                name = self._new_name(node.name + "/sum")
                out.append(helper.make_node("Add", [mid, z], [summed], name=name))
                self.node_origins[name] = self.node_origins[node.name]
                mid = summed
            for k, (op, attrs, extra) in enumerate(act_nodes):
                name = self._new_name(f"{node.name}/{op}")
                out.append(helper.make_node(op, [mid] + extra, [y], name=name, **attrs))
                self.node_origins[name] = self.node_origins[node.name]
            self.changes[f"ONNX Runtime {node.op_type} split into {base} + activation"] += 1
        self.nodes = out

    def _activation(self, act: str, params: list, node) -> list | None:
        """[(op, attributes, extra constant inputs)] for a fused activation; [] for none; None if unknown."""
        if act in ("", "Identity"):
            return []
        if act in ("Relu", "Sigmoid", "Tanh"):
            return [(act, {}, [])]
        if act == "LeakyRelu":
            return [(act, {"alpha": float(params[0]) if params else 0.01}, [])]
        if act == "HardSigmoid":
            return [(act, {"alpha": float(params[0]), "beta": float(params[1])} if len(params) >= 2 else {}, [])]
        if act == "Clip" and len(params) >= 2:
            names = []
            for which, value in zip(("min", "max"), params[:2]):
                name = self._new_name(f"{node.name}/clip_{which}")
                self.consts[name] = np.array(value, dtype=np.float32)
                self.origins[name] = WeightOrigin([], "float32", ["synthetic clip bound"])
                names.append(name)
            return [("Clip", {}, names)]
        return None

    # ---- constants ---------------------------------------------------------------------------
    def _fold_constants(self) -> None:
        kept = []
        for node in self.nodes:
            inputs = [i for i in node.input if i]
            foldable = (node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and inputs
                        and all(i in self.consts for i in inputs)
                        and not any(o in self.protected for o in node.output))
            outputs = self._evaluate(node) if foldable else None
            if outputs is None:
                kept.append(node)
                continue
            step = self._step_name(node, outputs)
            for name, value in zip(node.output, outputs):
                if name:
                    self.consts[name] = value
                    self.origins[name] = self._merge_origin(inputs, step)
            self.changes[f"{node.op_type} of constants folded"] += 1
        self.nodes = kept

    def _step_name(self, node: onnx.NodeProto, outputs) -> str:
        if node.op_type == "Cast":
            src = self.consts[node.input[0]]
            return f"cast {src.dtype} -> {outputs[0].dtype}"
        if node.op_type == "DequantizeLinear":
            return f"dequantized {self.consts[node.input[0]].dtype}"
        if node.op_type in ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            return f"view {node.op_type}"
        return f"computed {node.op_type}"

    def _evaluate(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        feeds = {i: self.consts[i] for i in node.input if i}
        if node.op_type == "Identity":
            return [feeds[node.input[0]]]
        if node.op_type in ("Expand", "Tile"):
            shape = feeds.get(node.input[1])
            if shape is None or np.prod(np.maximum(shape, 1)) * max(feeds[node.input[0]].size, 1) > MAX_FOLD_ELEMENTS:
                return None
        try:
            from onnx.reference import ReferenceEvaluator

            ev = ReferenceEvaluator(node)
            out = ev.run(None, feeds)
        except Exception:
            return None  # leave it to the graph
        if any(not isinstance(o, np.ndarray) or o.size > MAX_FOLD_ELEMENTS for o in out):
            return None
        return [np.asarray(o) for o in out]

    # ---- float32 everywhere ------------------------------------------------------------------
    def _unify_floats(self) -> None:
        for name, arr in list(self.consts.items()):
            if _is_float(arr) and arr.dtype != np.float32:
                self.consts[name] = arr.astype(np.float32)
                self.origins[name].steps.append(f"cast {arr.dtype} -> float32")
                self.changes[f"{arr.dtype} weight cast to float32"] += 1
        for node in self.nodes:
            if node.op_type == "Cast" and _attr(node, "to") in FLOAT_TYPES - {TensorProto.FLOAT}:
                _set_attr(node, "to", TensorProto.FLOAT)
            if node.op_type == "ConstantOfShape":
                value = _attr(node, "value")
                if value is not None and value.data_type in FLOAT_TYPES - {TensorProto.FLOAT}:
                    arr = tensor_values(value).astype(np.float32)
                    _set_attr(node, "value", numpy_helper.from_array(arr, value.name))

    def _dtypes(self) -> dict[str, int | None]:
        """Element type of every tensor, as far as simple rules tell (None: unknown)."""
        types: dict[str, int | None] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            t = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            if t:
                types[vi.name] = TensorProto.FLOAT if t in FLOAT_TYPES else t
        for name, arr in self.consts.items():
            try:
                types[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
            except Exception:
                types[name] = None
        for node in self.nodes:
            first = next((types.get(i) for i in node.input if i and types.get(i)), None)
            op = node.op_type
            if op == "Cast":
                out = [_attr(node, "to")]
            elif op == "CastLike":
                out = [types.get(node.input[1])]
            elif op in BOOL_OUTPUT:
                out = [TensorProto.BOOL]
            elif op in INT64_OUTPUT:
                out = [TensorProto.INT64]
            elif op == "DequantizeLinear":
                out = [TensorProto.FLOAT]
            elif op in ("QuantizeLinear", "DynamicQuantizeLinear"):
                zp = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else TensorProto.UINT8
                out = [zp, TensorProto.FLOAT, TensorProto.UINT8] if op == "DynamicQuantizeLinear" else [zp]
            elif op == "ConstantOfShape":
                value = _attr(node, "value")
                out = [value.data_type if value is not None else TensorProto.FLOAT]
            elif op == "Where":
                out = [types.get(node.input[1])]
            elif op in ("TopK", "MaxPool"):
                out = [first, TensorProto.INT64]
            elif node.domain not in ("", "ai.onnx") or any(True for _ in subgraphs(node)):
                out = [None] * len(node.output)
            else:
                out = [first] * len(node.output)
            for name, t in zip(node.output, out + [None] * len(node.output)):
                if name and name not in types:
                    types[name] = t
        return types

    def _drop_noops(self) -> None:
        types = self._dtypes()
        rename: dict[str, str] = {}
        kept = []
        for node in self.nodes:
            for k, name in enumerate(node.input):
                if name in rename:
                    node.input[k] = rename[name]
            src = node.input[0] if node.input else ""
            noop = False
            if node.domain in ("", "ai.onnx") and src:
                if node.op_type == "Identity":
                    noop = True
                elif node.op_type == "Dropout":
                    training = node.input[2] if len(node.input) > 2 else ""
                    noop = (not training or (training in self.consts and not bool(self.consts[training])))
                    noop = noop and (len(node.output) < 2 or not node.output[1])
                elif node.op_type == "Cast":
                    noop = types.get(src) is not None and types.get(src) == _attr(node, "to")
                elif node.op_type == "CastLike":
                    noop = types.get(src) is not None and types.get(src) == types.get(node.input[1])
            out = node.output[0] if node.output else ""
            if noop and out and out not in self.protected:
                rename[out] = src
                self.changes[f"{node.op_type} removed"] += 1
                continue
            kept.append(node)
        self.nodes = kept

    # ---- folding into producers --------------------------------------------------------------
    def _fold_affine(self) -> bool:
        """Fold one BatchNormalization / per-channel Add, Mul, Sub into its producer; True if done."""
        users = self._consumers()
        producer = self._producer()
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx") or not node.input:
                continue
            if node.op_type == "BatchNormalization":
                x = node.input[0]
                if len(node.input) < 5 or not all(i in self.consts for i in node.input[1:5]):
                    continue
                if any(o for o in node.output[1:]) or _attr(node, "training_mode", 0):
                    continue
                scale, bias, mean, var = (self.consts[i].astype(np.float64) for i in node.input[1:5])
                if len({p.shape for p in (scale, bias, mean, var)}) != 1 or scale.ndim != 1:
                    continue  # not one value per channel: a malformed node, left to the graph
                s = scale / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))
                t = bias - mean * s
                params = list(node.input[1:5])
            elif node.op_type in ("Add", "Mul", "Sub") and len(node.input) == 2:
                a, b = node.input
                if b in self.consts and a not in self.consts:
                    x, c = a, b
                elif a in self.consts and b not in self.consts and node.op_type != "Sub":
                    x, c = b, a
                else:
                    continue
                s = t = None
                params = [c]
            else:
                continue
            p = producer.get(x)
            if p is None or p.op_type not in PRODUCERS_FOLDING or p.domain not in ("", "ai.onnx"):
                continue
            if len(users.get(x, [])) != 1 or x in self.protected or len(p.input) < 2 or p.input[1] not in self.consts:
                continue
            if len(p.input) > 2 and p.input[2] and p.input[2] not in self.consts:
                continue
            if p.op_type == "Gemm" and _attr(p, "transA", 0):
                continue
            W = self.consts[p.input[1]]
            channels = self._out_channels(p, W)
            if node.op_type != "BatchNormalization":
                vec = self._per_channel(self.consts[params[0]], p, W, channels)
                if vec is None:
                    continue
                s = vec if node.op_type == "Mul" else np.ones(channels)
                t = np.zeros(channels) if node.op_type == "Mul" else (vec if node.op_type == "Add" else -vec)
            if s.shape != (channels,) or t.shape != (channels,):
                if any(v.size != 1 and v.shape != (channels,) for v in (s, t)):
                    continue  # parameters that do not match the producer's channels
                s, t = np.broadcast_to(s, (channels,)), np.broadcast_to(t, (channels,))
            if not self._fold_into(p, W, s, t, node, params):
                continue
            p.output[0] = node.output[0]
            self.nodes = [n for n in self.nodes if n is not node]
            self.changes[f"{node.op_type} folded into {p.op_type}"] += 1
            return True
        return False

    @staticmethod
    def _out_channels(p: onnx.NodeProto, W: np.ndarray) -> int:
        if p.op_type == "Conv":
            return W.shape[0]
        if p.op_type == "ConvTranspose":
            return W.shape[1] * int(_attr(p, "group", 1))
        return W.shape[0] if _attr(p, "transB", 0) else W.shape[1]

    @staticmethod
    def _per_channel(c: np.ndarray, p: onnx.NodeProto, W: np.ndarray, channels: int) -> np.ndarray | None:
        """The constant as one value per output channel, or None if it is not broadcast that way."""
        if not _is_float(c):
            return None
        rank = W.ndim if p.op_type in ("Conv", "ConvTranspose") else 2
        if c.ndim > rank:
            return None
        shape = (1,) * (rank - c.ndim) + c.shape
        if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, channels):
            return None
        return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()

    def _fold_into(self, p, W, s, t, node, params) -> bool:
        op = p.op_type
        W64 = W.astype(np.float64)
        if op == "Conv":
            Wn = W64 * s.reshape((-1,) + (1,) * (W.ndim - 1))
        elif op == "ConvTranspose":
            g = int(_attr(p, "group", 1))
            cin, cout_g = W.shape[0], W.shape[1]
            Wn = (W64.reshape((g, cin // g, cout_g) + W.shape[2:])
                  * s.reshape((g, 1, cout_g) + (1,) * (W.ndim - 2))).reshape(W.shape)
        else:  # Gemm: Y = alpha * A @ B' + beta * C
            Wn = W64 * (s[:, None] if _attr(p, "transB", 0) else s[None, :])
        b_name = p.input[2] if len(p.input) > 2 and p.input[2] else ""
        if op == "Gemm":
            beta = float(_attr(p, "beta", 1.0))
            C = self.consts[b_name].astype(np.float64) * beta if b_name else np.zeros(len(s))
            if C.ndim == 2 and C.shape[1] == 1 and len(s) > 1:
                C = np.broadcast_to(C, (C.shape[0], len(s)))
            bn = C * s + t
            _set_attr(p, "beta", 1.0)
        else:
            b = self.consts[b_name].astype(np.float64) if b_name else np.zeros(len(s))
            bn = b * s + t
        step = f"folded {node.op_type} {self.node_origins.get(node.name, node.name)}"
        w_name = self._new_name(p.input[1] + "/folded")
        self.consts[w_name] = Wn.astype(np.float32)
        self.origins[w_name] = self._merge_origin([p.input[1]] + params, step)
        b_new = self._new_name((b_name or p.input[1]) + ("/folded" if b_name else "/bias"))
        self.consts[b_new] = np.asarray(bn, dtype=np.float32)
        self.origins[b_new] = self._merge_origin(([b_name] if b_name else []) + params, step)
        p.input[1] = w_name
        if len(p.input) > 2:
            p.input[2] = b_new
        else:
            p.input.append(b_new)
        self.node_origins[p.name] = self.node_origins.get(p.name, p.name)
        return True

    # ---- Gemm -> MatMul (+ Add) --------------------------------------------------------------
    def _gemm_to_matmul(self) -> None:
        out_nodes = []
        for p in self.nodes:
            if (p.op_type != "Gemm" or p.domain not in ("", "ai.onnx") or _attr(p, "transA", 0)
                    or len(p.input) < 2 or p.input[1] not in self.consts
                    or (len(p.input) > 2 and p.input[2] and p.input[2] not in self.consts)):
                out_nodes.append(p)
                continue
            alpha, beta = float(_attr(p, "alpha", 1.0)), float(_attr(p, "beta", 1.0))
            B = self.consts[p.input[1]]
            Bn = B.T if _attr(p, "transB", 0) else B
            if alpha != 1.0:
                Bn = (Bn.astype(np.float64) * alpha).astype(B.dtype)
            w_name = self._new_name(p.input[1] + "/matmul")
            self.consts[w_name] = np.ascontiguousarray(Bn)
            self.origins[w_name] = self._merge_origin([p.input[1]],
                                                      "view Gemm transB" if _attr(p, "transB", 0) else "view Gemm")
            if alpha != 1.0:
                self.origins[w_name].steps.append("computed Gemm alpha")
            c_name = p.input[2] if len(p.input) > 2 and p.input[2] else ""
            out = p.output[0]
            if c_name:
                C = self.consts[c_name]
                if C.ndim == 2 and C.shape[0] == 1:
                    C = C.reshape(-1)
                if beta != 1.0:
                    C = (C.astype(np.float64) * beta).astype(np.float32)
                cn = self._new_name(c_name + "/bias")
                self.consts[cn] = C
                self.origins[cn] = self._merge_origin([c_name], "view Gemm bias")
                mid = self._new_name(out + "/matmul")
                out_nodes.append(helper.make_node("MatMul", [p.input[0], w_name], [mid], name=p.name))
                add_name = self._new_name(p.name + "/bias")
                out_nodes.append(helper.make_node("Add", [mid, cn], [out], name=add_name))
                self.node_origins[add_name] = self.node_origins.get(p.name, p.name)
            else:
                out_nodes.append(helper.make_node("MatMul", [p.input[0], w_name], [out], name=p.name))
            self.changes["Gemm written as MatMul + Add"] += 1
        self.nodes = out_nodes

    def _zero_biases(self) -> None:
        for p in self.nodes:
            if p.op_type not in ("Conv", "ConvTranspose") or p.domain not in ("", "ai.onnx"):
                continue
            if len(p.input) < 2 or p.input[1] not in self.consts or (len(p.input) > 2 and p.input[2]):
                continue
            W = self.consts[p.input[1]]
            name = self._new_name(p.input[1] + "/zero_bias")
            self.consts[name] = np.zeros(self._out_channels(p, W), dtype=np.float32)
            self.origins[name] = WeightOrigin([], "float32", ["synthetic zero bias"])
            if len(p.input) > 2:
                p.input[2] = name
            else:
                p.input.append(name)
            self.changes["zero bias added"] += 1

    # ---- output ------------------------------------------------------------------------------
    def _build(self) -> CanonicalModel:
        nodes = topological(self.nodes)
        used = set(self.outputs)
        for n in nodes:
            used.update(node_inputs(n))
        g = helper.make_graph([], self.graph.name or "canonical", [], [])
        g.node.extend(nodes)
        const_names = [name for name in self.consts if name in used]
        for name in const_names:
            g.initializer.append(numpy_helper.from_array(np.array(self.consts[name], order="C"), name))  # keeps 0-d
        for vi in self.graph.input:
            if vi.name in self.consts:
                continue
            new = onnx.ValueInfoProto()
            new.CopyFrom(vi)
            _float32_type(new)
            g.input.append(new)
        for vi in self.graph.output:
            new = onnx.ValueInfoProto()
            new.CopyFrom(vi)
            _float32_type(new)
            g.output.append(new)
        g.sparse_initializer.extend(self.graph.sparse_initializer)
        model = helper.make_model(g, opset_imports=list(self.src.opset_import))
        model.ir_version = self.src.ir_version
        model.functions.extend(self.src.functions)
        readers: dict[str, str] = {}
        for n in nodes:
            for i in n.input:
                if i in self.consts and i not in readers:
                    readers[i] = self.node_origins.get(n.name, n.name)
        origins = {}
        for name in const_names:
            o = self.origins.get(name) or WeightOrigin([name], str(self.consts[name].dtype))
            o.layer = readers.get(name, "")
            origins[name] = o
        node_origins = {n.name: self.node_origins.get(n.name, n.name) for n in nodes}
        return CanonicalModel(model, origins, node_origins, self.changes)


def _float32_type(vi: onnx.ValueInfoProto) -> None:
    if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in FLOAT_TYPES:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
