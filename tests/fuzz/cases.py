"""Seed models and the mutations that turn them hostile.

A `Case` is a small folder: the model under test at `model/m.onnx` (with external data files, links
and files outside its folder where the mutation needs them). Every mutation takes a `random.Random`,
so hypothesis (st.randoms) and the long campaign (random.Random(seed)) drive the same code.

Categories (each one a family of mutations named in DESIGN/issue 7):
  truncate, bitflip, splice        byte-level damage of a valid file
  dtype                            a tensor's data_type changed (unknown, string, sub-byte, ...)
  shape                            dims that disagree with the data (more, fewer, zero, negative)
  huge                             huge declared dims with little data (inline, external, inputs)
  shadow                           initializers that shadow graph inputs (same or other shape/type)
  duplicate                        duplicated initializer / node output / input / output names
  dangling                         node inputs nobody produces
  cycle                            cycles (self loops, back edges)
  empty                            graphs without nodes, outputs, inputs
  domain                           unknown domains, unknown/missing/ancient opsets, unknown ops
  constant                         Constant nodes with sparse, string, missing or double values
  attribute                        broken attributes (Conv group 0, bad perms, axes out of range)
  external                         external-data locations: ../, absolute, links, missing, short,
                                   bad offsets/lengths, the model itself, a folder
  random_graph                     random small graphs of random ops
  any_op (walker only)             random graphs of any op at any opset 7..22, weights of every dtype
  interface                        valid models whose weights are read where the walker does not
                                   follow (If/Loop/Scan bodies, graph outputs and inputs, run-time
                                   axes): every written model is checked on every branch
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
MODEL = "model/m.onnx"


@dataclass
class Case:
    category: str
    detail: str
    files: dict[str, bytes] = field(default_factory=dict)  # path relative to the case folder -> bytes
    links: dict[str, str] = field(default_factory=dict)  # link path -> target (as written)
    seed_model: str = "mlp"  # the unmutated seed (the good reference for resync/verify)
    model: str = MODEL

    def write(self, folder: str | os.PathLike) -> str:
        """Write the case under `folder`; returns the model's path."""
        folder = os.fspath(folder)
        for rel, data in self.files.items():
            path = os.path.join(folder, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
        for rel, target in self.links.items():
            path = os.path.join(folder, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            target = target.replace("{case}", folder)
            os.symlink(target, path)
        return os.path.join(folder, self.model)

    def describe(self) -> dict:
        return {"category": self.category, "detail": self.detail, "seed_model": self.seed_model,
                "files": {k: len(v) for k, v in self.files.items()}, "links": dict(self.links)}


# ---- seed models -------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits, name="seed") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])


def _w(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def mlp(seed: int = 0, hidden: int = 12) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "W3", "b3"], ["y"], name="head", transB=1),
    ]
    inits = [_w(rng, "W1", 8, hidden), _w(rng, "b1", hidden), _w(rng, "W2", hidden, hidden),
             _w(rng, "b2", hidden), _w(rng, "W3", 4, hidden), _w(rng, "b3", 4)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits, "mlp")


def cnn(seed: int = 0, channels: int = 6) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    c = channels
    nodes = [
        helper.make_node("Conv", ["x", "C1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "C2", "cb2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s2"], name="residual"),
        helper.make_node("Relu", ["s2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "C3", "cb3"], ["c3"], name="dw", group=c, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="head", transB=1),
    ]
    var = numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), "v1")
    inits = [_w(rng, "C1", c, 3, 3, 3), _w(rng, "g1", c), _w(rng, "be1", c), _w(rng, "m1", c), var,
             _w(rng, "C2", c, c, 3, 3), _w(rng, "cb2", c), _w(rng, "C3", c, 1, 3, 3), _w(rng, "cb3", c),
             _w(rng, "W", 3, c), _w(rng, "b", 3)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits, "cnn")


def const_mlp(seed: int = 0, hidden: int = 10) -> onnx.ModelProto:
    """Weights in Constant nodes (as some exporters write them), one stored as typed float_data."""
    base = mlp(seed, hidden)
    nodes = []
    for init in base.graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        if init.name == "W2":
            arr = numpy_helper.to_array(init)
            t = helper.make_tensor("W2", TensorProto.FLOAT, arr.shape, arr.reshape(-1).tolist())
        nodes.append(helper.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=t))
    nodes.extend(base.graph.node)
    return _model(nodes, list(base.graph.input), list(base.graph.output), [], "const_mlp")


SEEDS = {"mlp": mlp, "cnn": cnn, "const": const_mlp}


def seed_bytes(name: str) -> bytes:
    return SEEDS[name]().SerializeToString()


def external_files(model: onnx.ModelProto, data_name: str = "m.data", threshold: int = 0) -> dict[str, bytes]:
    """The model with its initializers moved to one external data file, as {relpath: bytes}."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    data = bytearray()
    for t in m.graph.initializer:
        if not t.HasField("raw_data") or len(t.raw_data) < threshold:
            continue
        raw = t.raw_data
        while len(data) % 16:
            data.append(0)
        offset = len(data)
        data += raw
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return {MODEL: m.SerializeToString(), f"model/{data_name}": bytes(data)}


# ---- helpers for mutations ---------------------------------------------------------------------
def _vi(name: str, rank: int = 2, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A value info of known rank with symbolic dims (the checker wants a shape on graph outputs)."""
    return helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(rank)])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node value tensors."""
    out = list(model.graph.initializer)
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out.append(a.t)
    return out


ALL_DTYPES = [v for v in TensorProto.DataType.values()] + [99, 1000, -1]


def mutate_dtype(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    t = rng.choice(_weights(m))
    new = rng.choice(ALL_DTYPES)
    how = rng.choice(["type-only", "type-and-input-decl"])
    t.data_type = new
    if how == "type-and-input-decl":
        m.graph.input.append(helper.make_tensor_value_info(t.name, max(new, 0) % 30, list(t.dims)))
    return m, f"{t.name} data_type={new} ({how})"


def mutate_shape(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    t = rng.choice(_weights(m))
    dims = list(t.dims)
    how = rng.choice(["grow", "shrink", "zero", "negative", "extra-dim", "drop-dim", "scalar", "swap"])
    if how == "grow" and dims:
        i = rng.randrange(len(dims))
        dims[i] += rng.randint(1, 5)
    elif how == "shrink" and dims:
        i = rng.randrange(len(dims))
        dims[i] = max(1, dims[i] - rng.randint(1, 3))
    elif how == "zero" and dims:
        dims[rng.randrange(len(dims))] = 0
    elif how == "negative" and dims:
        dims[rng.randrange(len(dims))] = -rng.randint(1, 4)
    elif how == "extra-dim":
        dims.insert(rng.randrange(len(dims) + 1), rng.choice([1, 2, 3]))
    elif how == "drop-dim" and dims:
        dims.pop(rng.randrange(len(dims)))
    elif how == "scalar":
        dims = []
    elif how == "swap" and len(dims) >= 2:
        dims = dims[::-1]
    del t.dims[:]
    t.dims.extend(dims)
    return m, f"{t.name} dims={dims} ({how})"


HUGE = [2**31, 2**32 + 3, 2**40, 2**62, 2**63 - 1, 10**12]


def mutate_huge(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    how = rng.choice(["weight-dim", "weight-dims-product-overflow", "input-dim", "reshape-target",
                      "constant-of-shape", "expand"])
    if how in ("weight-dim", "weight-dims-product-overflow"):
        t = rng.choice(_weights(m))
        dims = list(t.dims) or [1]
        if how == "weight-dim":
            dims[rng.randrange(len(dims))] = rng.choice(HUGE)
        else:
            dims = [2**32, 2**32, rng.choice([1, 2, 4])]  # product wraps int64 to a small number
        del t.dims[:]
        t.dims.extend(dims)
        return m, f"{t.name} dims={dims} ({how})"
    if how == "input-dim":
        inp = m.graph.input[0]
        shape = inp.type.tensor_type.shape
        d = shape.dim[rng.randrange(len(shape.dim))]
        d.ClearField("dim_param")
        d.dim_value = rng.choice(HUGE[:2] + [10**6, 10**9])
        return m, f"input {inp.name} dim={d.dim_value}"
    out = m.graph.output[0].name
    big = rng.choice(HUGE[:3] + [10**9])
    if how == "reshape-target":
        shp = numpy_helper.from_array(np.array([big, -1], dtype=np.int64), "huge_shape")
        m.graph.initializer.append(shp)
        m.graph.node.append(helper.make_node("Reshape", [out, "huge_shape"], ["huge_out"]))
    elif how == "constant-of-shape":
        shp = numpy_helper.from_array(np.array([big, 4], dtype=np.int64), "huge_shape")
        m.graph.initializer.append(shp)
        m.graph.node.append(helper.make_node("ConstantOfShape", ["huge_shape"], ["big"]))
        m.graph.node.append(helper.make_node("ReduceSum", ["big"], ["huge_out"], keepdims=0))
    else:
        shp = numpy_helper.from_array(np.array([big, 1], dtype=np.int64), "huge_shape")
        m.graph.initializer.append(shp)
        m.graph.node.append(helper.make_node("Expand", [out, "huge_shape"], ["huge_out"]))
    m.graph.output.append(_vi("huge_out", 0 if how == "constant-of-shape" else 2))
    return m, f"{how} {big}"


def mutate_shadow(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    how = rng.choice(["same", "other-shape", "other-type", "init-named-like-input", "twice"])
    inits = list(m.graph.initializer)
    if how == "init-named-like-input" or not inits:
        inp = m.graph.input[0]
        arr = np.zeros([d.dim_value or 1 for d in inp.type.tensor_type.shape.dim], dtype=np.float32)
        m.graph.initializer.append(numpy_helper.from_array(arr, inp.name))
        return m, f"initializer shadows input {inp.name}"
    t = rng.choice(inits)
    dims = list(t.dims)
    dtype = t.data_type
    if how == "other-shape":
        dims = dims + [2] if rng.random() < 0.5 else dims[:-1]
    elif how == "other-type":
        dtype = rng.choice([TensorProto.INT64, TensorProto.DOUBLE, TensorProto.STRING])
    vi = helper.make_tensor_value_info(t.name, dtype, dims)
    m.graph.input.append(vi)
    if how == "twice":
        m.graph.input.append(vi)
    return m, f"input declared for initializer {t.name} ({how})"


def mutate_duplicate(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    g = m.graph
    how = rng.choice(["initializer", "initializer-other-data", "node-output", "output-is-initializer",
                      "input", "output", "node-name", "output-is-input"])
    if how.startswith("initializer") and g.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(rng.choice(list(g.initializer)))
        if how == "initializer-other-data" and t.HasField("raw_data"):
            t.raw_data = bytes(len(t.raw_data))
        g.initializer.append(t)
        return m, f"{how} {t.name}"
    nodes = [n for n in g.node if n.op_type != "Constant"]
    if how == "node-output" and len(nodes) >= 2:
        a, b = rng.sample(nodes, 2)
        b.output[0] = a.output[0]
        return m, f"{a.output[0]} produced twice"
    if how == "output-is-initializer" and g.initializer and nodes:
        n = rng.choice(nodes)
        name = rng.choice(list(g.initializer)).name
        n.output[0] = name
        return m, f"node {n.name} writes initializer {name}"
    if how == "input":
        g.input.append(g.input[0])
        return m, "graph input twice"
    if how == "output":
        g.output.append(g.output[0])
        return m, "graph output twice"
    if how == "output-is-input":
        g.output.append(_vi(g.input[0].name, len(g.input[0].type.tensor_type.shape.dim)))
        return m, "graph input is also an output"
    for n in g.node:
        n.name = "same"
    return m, "every node named 'same'"


def mutate_dangling(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    nodes = [n for n in m.graph.node if n.input]
    n = rng.choice(nodes)
    i = rng.randrange(len(n.input))
    how = rng.choice(["missing", "output-missing", "empty-name"])
    if how == "missing":
        n.input[i] = "nobody_makes_this"
    elif how == "empty-name":
        n.input[i] = ""
    else:
        m.graph.output[0].name = "no_such_output"
    return m, f"{n.name} input {i} ({how})"


def mutate_cycle(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    nodes = [n for n in m.graph.node if n.op_type != "Constant" and n.input]
    how = rng.choice(["self", "back-edge", "two-node"])
    if how == "self":
        n = rng.choice(nodes)
        n.input[0] = n.output[0]
        return m, f"{n.name} reads its own output"
    if how == "back-edge" and len(nodes) >= 2:
        i, j = sorted(rng.sample(range(len(nodes)), 2))
        nodes[i].input[0] = nodes[j].output[0]
        return m, f"{nodes[i].name} reads {nodes[j].output[0]}"
    m.graph.node.extend([helper.make_node("Relu", ["cy_b"], ["cy_a"]), helper.make_node("Relu", ["cy_a"], ["cy_b"])])
    m.graph.node.append(helper.make_node("Add", [m.graph.output[0].name, "cy_a"], ["cy_out"]))
    m.graph.output.append(_vi("cy_out"))
    return m, "two-node cycle"


def mutate_empty(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    g = m.graph
    how = rng.choice(["no-nodes", "no-outputs", "no-inputs", "nothing", "identity-only", "no-graph"])
    if how in ("no-nodes", "nothing"):
        del g.node[:]
    if how in ("no-outputs", "nothing"):
        del g.output[:]
    if how in ("no-inputs", "nothing"):
        del g.input[:]
    if how == "nothing":
        del g.initializer[:]
    if how == "identity-only":
        del g.node[:]
        del g.initializer[:]
        g.node.append(helper.make_node("Identity", [g.input[0].name], [g.output[0].name]))
    if how == "no-graph":
        m.ClearField("graph")
    return m, how


def mutate_domain(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    how = rng.choice(["node-domain", "node-domain-declared", "opset-huge", "opset-zero", "opset-one",
                      "no-opset", "unknown-op", "ml-domain", "ir-version", "two-default-opsets"])
    nodes = [n for n in m.graph.node if n.op_type != "Constant"]
    if how.startswith("node-domain"):
        n = rng.choice(nodes)
        n.domain = rng.choice(["com.evil", "ai.onnx.ml", "com.microsoft", "\x00", "x" * 300])
        if how == "node-domain-declared":
            m.opset_import.append(helper.make_opsetid(n.domain, rng.choice([1, 99])))
        return m, f"{n.name} domain {n.domain[:20]!r}"
    if how == "opset-huge":
        m.opset_import[0].version = rng.choice([99, 10**6, 2**62])
    elif how == "opset-zero":
        m.opset_import[0].version = 0
    elif how == "opset-one":
        m.opset_import[0].version = 1
    elif how == "no-opset":
        del m.opset_import[:]
    elif how == "unknown-op":
        n = rng.choice(nodes)
        n.op_type = rng.choice(["FooBar", "", "conv", "Relu6", "Loop"])
        return m, f"{n.name} op {n.op_type!r}"
    elif how == "ml-domain":
        m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99))
    elif how == "ir-version":
        m.ir_version = rng.choice([1, 2, 3, 99, 2**40])
        return m, f"ir_version {m.ir_version}"
    else:
        m.opset_import.append(helper.make_opsetid("", 13))
    return m, how


def mutate_constant(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    g = m.graph
    how = rng.choice(["sparse", "sparse-bad-indices", "strings", "string-tensor", "no-attr", "two-attrs",
                      "value-float", "value-ints", "empty-tensor", "sparse-huge-dims"])
    inits = list(g.initializer)
    if inits:
        t = rng.choice(inits)
        g.initializer.remove(t)
        name, dims = t.name, list(t.dims)
        arr = numpy_helper.to_array(t)
    else:
        consts = [n for n in g.node if n.op_type == "Constant"]
        n = rng.choice(consts)
        name = n.output[0]
        g.node.remove(n)
        arr = numpy_helper.to_array(n.attribute[0].t)
        dims = list(arr.shape)
    flat = arr.reshape(-1)
    if how.startswith("sparse"):
        k = max(1, flat.size // 3)
        idx = np.sort(np.array(rng.sample(range(flat.size), k), dtype=np.int64))
        if how == "sparse-bad-indices":
            idx[-1] = flat.size + 7
        vals = numpy_helper.from_array(flat[np.clip(idx, 0, flat.size - 1)].astype(np.float32), name)
        ind = numpy_helper.from_array(idx, "")
        sdims = [2**40] + dims[1:] if how == "sparse-huge-dims" else dims
        sparse = helper.make_sparse_tensor(vals, ind, sdims)
        node = helper.make_node("Constant", [], [name], sparse_value=sparse)
    elif how == "strings":
        node = helper.make_node("Constant", [], [name], value_strings=["a", "b"])
    elif how == "string-tensor":
        node = helper.make_node("Constant", [], [name],
                                value=helper.make_tensor(name, TensorProto.STRING, [flat.size] if flat.size < 64 else [2], [b"x"] * (flat.size if flat.size < 64 else 2)))
    elif how == "no-attr":
        node = helper.make_node("Constant", [], [name])
    elif how == "two-attrs":
        node = helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name), value_float=1.0)
    elif how == "value-float":
        node = helper.make_node("Constant", [], [name], value_float=0.5)
    elif how == "value-ints":
        node = helper.make_node("Constant", [], [name], value_ints=[1, 2, 3])
    else:  # dims but no data at all
        empty = TensorProto()
        empty.name, empty.data_type = name, TensorProto.FLOAT
        empty.dims.extend(dims)
        node = helper.make_node("Constant", [], [name], value=empty)
    g.node.insert(0, node)
    return m, f"{name} as Constant ({how})"


def _attr(name: str, value) -> onnx.AttributeProto:
    if isinstance(value, list):
        return helper.make_attribute(name, value, attr_type=onnx.AttributeProto.INTS)
    return helper.make_attribute(name, value)


def mutate_attribute(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = _copy(model)
    nodes = [n for n in m.graph.node if n.op_type != "Constant"]
    n = rng.choice(nodes)
    how = rng.choice(["random-int", "drop-all", "wrong-type", "add-graph", "huge-int", "perm"])
    if how == "drop-all":
        del n.attribute[:]
    elif how == "wrong-type" and n.attribute:
        a = rng.choice(list(n.attribute))
        name = a.name
        n.attribute.remove(a)
        n.attribute.append(helper.make_attribute(name, "not-a-number"))
    elif how == "add-graph":
        sub = helper.make_graph([helper.make_node("Relu", [n.input[0]], ["sub_out"])], "sub", [],
                                [_vi("sub_out")])
        n.attribute.append(helper.make_attribute("body", sub))
    elif how == "perm":
        n.attribute.append(_attr("perm", [rng.randint(-3, 5) for _ in range(rng.randint(0, 4))]))
    else:
        name = rng.choice(["group", "axis", "transB", "transA", "kernel_shape", "pads", "strides", "epsilon",
                           "alpha", "dilations", "keepdims", "axes"])
        value = rng.choice([0, -1, 99, 2**62, -(2**62)]) if how == "huge-int" else rng.randint(-4, 8)
        if name in ("kernel_shape", "pads", "strides", "dilations", "axes"):
            value = [value] * rng.randint(0, 5)
        for a in list(n.attribute):
            if a.name == name:
                n.attribute.remove(a)
        n.attribute.append(_attr(name, value))
        return m, f"{n.name}.{name}={value}"
    return m, f"{n.name} ({how})"


RANDOM_OPS = ["Relu", "Sigmoid", "Add", "Mul", "MatMul", "Gemm", "Transpose", "Reshape", "Flatten", "Concat",
              "Split", "Slice", "Gather", "Squeeze", "Unsqueeze", "Conv", "BatchNormalization", "Softmax",
              "ReduceMean", "Identity", "Expand", "Tile", "Where", "Cast", "LayerNormalization", "Pad",
              "LSTM", "TopK", "Shape", "ConstantOfShape", "Sum", "PRelu", "InstanceNormalization",
              "GlobalAveragePool", "MaxPool", "DepthToSpace", "Resize", "Clip", "Einsum"]
_RANDOM_ATTRS = {"axis": [0, 1, -1, 2, 5], "perm": [[1, 0], [0, 2, 1], [0, 0]], "transB": [0, 1], "transA": [0, 1],
                 "group": [1, 2, 3], "axes": [[0], [1], [-1], [0, 3]], "keepdims": [0, 1], "to": [1, 7],
                 "kernel_shape": [[1, 1], [3, 3], [2]], "blocksize": [2], "hidden_size": [4, 8],
                 "equation": ["ij,jk->ik", "bij->bji", "i,i->"], "epsilon": [1e-5], "mode": ["constant"]}


def random_graph(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    """A random graph: random ops (arity and attributes from their schema) wired to random earlier
    tensors, random small weights."""
    nprng = np.random.default_rng(rng.randrange(2**32))
    tensors = ["x"]
    inits = []
    nodes = []
    ops = []
    for k in range(rng.randint(1, 10)):
        op = rng.choice(RANDOM_OPS)
        schema = onnx.defs.get_schema(op, OPSET)
        ops.append(op)
        arity = rng.randint(schema.min_input, min(schema.max_input, schema.min_input + 2, 6))
        ins = []
        for _ in range(arity):
            if rng.random() < 0.4:
                shape = [rng.choice([1, 2, 3, 4, 8]) for _ in range(rng.randint(0, 4))]
                dt = rng.choice([np.float32, np.float32, np.int64])
                arr = nprng.standard_normal(shape).astype(dt) if dt == np.float32 else nprng.integers(-2, 5, shape).astype(dt)
                name = f"w{k}_{len(ins)}"
                inits.append(numpy_helper.from_array(arr, name))
                ins.append(name)
            else:
                ins.append(rng.choice(tensors))
        attrs = {}
        for name, a in schema.attributes.items():
            if name in _RANDOM_ATTRS and (a.required or rng.random() < 0.3):
                attrs[name] = rng.choice(_RANDOM_ATTRS[name])
        out = f"t{k}"
        nodes.append(helper.make_node(op, ins, [out], name=f"n{k}", **attrs))
        tensors.append(out)
    graph = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [_vi(tensors[-1])], inits)
    m = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])
    try:  # declare the output as inference sees it, so that the checker lets more graphs through
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in inferred.graph.value_info}
        if tensors[-1] in known and known[tensors[-1]].type.tensor_type.HasField("shape"):
            m.graph.output[0].CopyFrom(known[tensors[-1]])
    except Exception:  # noqa: BLE001 - inference may well fail on a random graph
        pass
    return m, " ".join(ops)


# any op of the default domain at any opset 7..22: the ops a hand-written list misses, old forms of
# axes/sizes/pads (attributes before the input form), weights of every dtype, empty optional inputs
_ANY_OP_SKIP = {"If", "Loop", "Scan", "Constant", "Multinomial", "RandomNormal", "RandomUniform", "RandomNormalLike",
                "RandomUniformLike", "Bernoulli", "StringNormalizer", "TfIdfVectorizer", "RegexFullMatch",
                "StringConcat", "StringSplit", "ImageDecoder"}
_ANY_ATTRS = {**_RANDOM_ATTRS, "axis": [0, 1, -1, 2, -2, 3], "axes": [[0], [1], [-1], [0, 3], [1, 2]],
              "perm": [[1, 0], [0, 2, 1], [0, 1, 3, 2], [2, 0, 1]], "to": [1, 7, 10, 6, 9],
              "equation": ["ij,jk->ik", "bij->bji", "i,i->", "ij->ji", "...i,ij->...j"],
              "mode": ["constant", "reflect", "edge", "DCR", "CRD", "nearest", "linear"],
              "starts": [[0], [1], [-1]], "ends": [[2], [-1], [2**62]], "split": [[1, 1], [2, 6], [4, 4]],
              "pads": [[0, 1, 0, 1], [1, 1], [0, 0, 0, 0]], "shape": [[-1], [0, -1], [2, -1]], "k": [1, 2],
              "strides": [[1, 1], [2, 2], [1]], "dilations": [[1, 1], [2, 2]], "num_groups": [1, 2],
              "direction": ["forward", "bidirectional", "reverse"], "reverse": [0, 1], "exclusive": [0, 1],
              "largest": [0, 1], "sorted": [0, 1], "spatial": [0, 1], "ratio": [0.5], "min": [0.0], "max": [6.0],
              "alpha": [0.1, 1.0], "beta": [0.0, 1.0], "size": [3], "block_size": [0, 2], "upper": [0, 1],
              "batch_dims": [0, 1], "noop_with_empty_axes": [0, 1], "select_last_index": [0, 1],
              "output_padding": [[1, 1]], "auto_pad": ["NOTSET", "SAME_UPPER", "VALID"],
              "linear_before_reset": [0, 1], "layout": [0, 1], "p": [1, 2], "reduction": ["none", "add"]}
_ANY_DTYPES = [np.float32] * 5 + [np.int64] * 2 + [np.float16, np.int32, np.bool_, np.uint8, np.int8]
_ANY_IR = {7: 4, 8: 4, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}
_OPS_AT: dict[int, list[str]] = {}


def _ops_at(opset: int) -> list[str]:
    if opset not in _OPS_AT:
        names = set()
        for s in onnx.defs.get_all_schemas_with_history():
            if s.domain != "" or s.name in _ANY_OP_SKIP or s.deprecated:
                continue
            try:
                current = onnx.defs.get_schema(s.name, opset, "")
            except Exception:  # noqa: BLE001 - not defined at this opset
                continue
            if not current.deprecated:
                names.add(s.name)
        _OPS_AT[opset] = sorted(names)
    return _OPS_AT[opset]


def any_op_graph(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    """A random graph of any default-domain op at a random opset 7..22, fed by a hidden layer
    (x -> MatMul -> h) and often read by one: weights of every dtype (some with a 0 dim), empty
    optional inputs, attributes from a broad table. Most such graphs are invalid; a few run."""
    opset = rng.choice(range(7, 23))
    nprng = np.random.default_rng(rng.randrange(2**32))
    hidden = rng.choice([4, 6, 8])
    nodes = [helper.make_node("MatMul", ["x", "Win"], ["h"], name="fc_in")]
    inits = [numpy_helper.from_array(nprng.standard_normal((8, hidden)).astype(np.float32), "Win")]
    tensors, ops = ["x", "h", "h"], []
    for k in range(rng.randint(1, 8)):
        op = rng.choice(_ops_at(opset))
        schema = onnx.defs.get_schema(op, opset, "")
        ops.append(op)
        ins = []
        for j in range(rng.randint(schema.min_input, max(schema.min_input, min(schema.max_input, schema.min_input + 2, 8)))):
            r = rng.random()
            if r < 0.35:
                dims = [1, 2, 3, 4, 8, 8, 0] if rng.random() < 0.1 else [1, 2, 3, 4, 8]
                shape = [rng.choice(dims) for _ in range(rng.randint(0, 4))]
                dt = rng.choice(_ANY_DTYPES)
                arr = (nprng.standard_normal(shape) if dt in (np.float32, np.float16)
                       else nprng.integers(0 if dt in (np.bool_, np.uint8) else -2, 2 if dt == np.bool_ else 5, shape))
                inits.append(numpy_helper.from_array(np.asarray(arr).astype(dt), f"w{k}_{j}"))
                ins.append(f"w{k}_{j}")
            else:
                ins.append("" if r < 0.4 and j > 0 else rng.choice(tensors))
        attrs = {name: rng.choice(_ANY_ATTRS[name]) for name, a in schema.attributes.items()
                 if name in _ANY_ATTRS and (a.required or rng.random() < 0.3)}
        outs = [f"t{k}_{j}" for j in range(rng.randint(1, max(1, min(schema.max_output, 3))))]
        nodes.append(helper.make_node(op, ins, outs, name=f"n{k}", **attrs))
        tensors.extend(outs)
    last = tensors[-1]
    if rng.random() < 0.5:
        nodes.append(helper.make_node("MatMul", [last, "Wout"], ["y"], name="fc_out"))
        inits.append(numpy_helper.from_array(nprng.standard_normal((hidden, 3)).astype(np.float32), "Wout"))
        last = "y"
    graph = helper.make_graph(nodes, "any_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, ir_version=_ANY_IR[opset], opset_imports=[helper.make_opsetid("", opset)])
    try:  # the output as strict inference sees it: a valid graph passes the checker
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                 if v.type.tensor_type.HasField("shape") or not v.type.HasField("tensor_type")}
        if last in known:
            m.graph.output[0].CopyFrom(known[last])
    except Exception:  # noqa: BLE001 - inference may well fail on a random graph
        pass
    return m, f"opset{opset} " + " ".join(ops)


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for coll in (g.input, g.output, g.value_info, g.initializer):
        for v in coll:
            if v.name == old:
                v.name = new
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new


WEIRD_NAMES = ["{}", "{0}", "{x}", "}{", "%s", "a:b/c", "\u00e9\u4e2d\U0001f600", "..", "../x", "/abs", "x" * 5000,
               " ", "\t\n", "W1 ", "'\"", "%(x)s", "\\", "CON", "nul"]


def mutate_names(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    """Valid models whose node or tensor names are odd: braces (str.format), unicode, path-like, huge."""
    m = _copy(model)
    how = rng.choice(["node-names", "tensor-name", "all-tensors", "graph-name"])
    weird = rng.choice(WEIRD_NAMES)
    if how == "node-names":
        for n in m.graph.node:
            n.name = weird if rng.random() < 0.7 else ""
    elif how == "graph-name":
        m.graph.name = weird
    else:
        names = sorted({t for n in m.graph.node for t in list(n.input) + list(n.output) if t})
        chosen = names if how == "all-tensors" else [rng.choice(names)]
        for k, old in enumerate(chosen):
            _rename(m, old, f"{weird}{k}" if how == "all-tensors" else weird)
    return m, f"{how} {weird[:20]!r}"


def mutate_blowup(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    """Graphs that are cheap to store and expensive to analyse naively."""
    m = _copy(model)
    g = m.graph
    how = rng.choice(["view-diamonds", "deep-chain", "wide-concat", "nested-if"])
    out = g.output[0].name
    if how == "view-diamonds":  # each view reads the previous one twice: 2**depth paths to the weight
        w = next(t for t in g.initializer if len(t.dims) == 2) if g.initializer else None
        if w is None:
            return m, how + " (no weight)"
        prev = w.name
        for k in range(48):
            g.node.append(helper.make_node("DequantizeLinear", [prev, prev], [f"dq{k}"]))
            prev = f"dq{k}"
        g.node.append(helper.make_node("MatMul", [out, prev], ["blow_out"]))
    elif how == "deep-chain":
        prev = out
        for k in range(rng.choice([2000, 6000])):
            g.node.append(helper.make_node(rng.choice(["Relu", "Identity", "Neg"]), [prev], [f"d{k}"], name=f"d{k}"))
            prev = f"d{k}"
        g.node.append(helper.make_node("Identity", [prev], ["blow_out"]))
    elif how == "wide-concat":
        g.node.append(helper.make_node("Concat", [out] * rng.choice([500, 3000]), ["blow_out"], axis=-1))
    else:
        leaf = helper.make_graph([helper.make_node("Identity", [out], ["if_out"])], "leaf", [],
                                 [_vi("if_out")])
        body = leaf
        for depth in range(rng.choice([5, 24])):  # nested in one branch only: linear size
            node = helper.make_node("If", ["cond"], [f"if_out{depth}"], then_branch=body, else_branch=leaf)
            body = helper.make_graph([node], f"lvl{depth}", [],
                                     [_vi(f"if_out{depth}")])
        g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        g.node.append(helper.make_node("If", ["cond"], ["blow_out"], then_branch=body, else_branch=leaf))
    g.output.append(_vi("blow_out"))
    return m, how


def mutate_interface(model, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    """A valid model whose weights are read where the walker does not follow (issue 18): inside an
    If branch, a Loop or Scan body, as a graph output or an overridable graph input, or next to a
    reduction whose axes arrive at run time. A permutation of such a file must pin what it cannot
    rewrite consistently: the harness checks every written model on every branch."""
    m = _copy(model)
    g = m.graph
    weights = [t for t in g.initializer if len(t.dims) >= 1 and t.data_type == TensorProto.FLOAT]
    if not weights:
        return m, "no weight"
    w = rng.choice(weights)
    how = rng.choice(["if", "if-nested", "loop", "scan", "output", "input", "reduce-axes"])
    shape = [int(d) for d in w.dims]
    if how in ("if", "if-nested"):
        g.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        then = helper.make_graph([helper.make_node("Identity", [w.name], ["t_out"])], "then", [],
                                 [_vi("t_out", len(shape))])
        other = helper.make_graph([helper.make_node("Neg", [w.name], ["e_out"])], "else", [],
                                  [_vi("e_out", len(shape))])
        if how == "if-nested":  # the weight two levels down
            inner = helper.make_node("If", ["cond"], ["n_out"], then_branch=then, else_branch=other)
            then = helper.make_graph([inner], "outer_then", [], [_vi("n_out", len(shape))])
            other = helper.make_graph([helper.make_node("Identity", [w.name], ["o_out"])], "outer_else", [],
                                      [_vi("o_out", len(shape))])
        g.node.append(helper.make_node("If", ["cond"], ["iface_out"], then_branch=then, else_branch=other))
        g.output.append(_vi("iface_out", len(shape)))
    elif how == "loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", [w.name], ["s"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _vi("s", len(shape))])
        g.initializer.extend([numpy_helper.from_array(np.array(2, dtype=np.int64), "iface_trip"),
                              numpy_helper.from_array(np.array(True), "iface_true")])
        g.node.append(helper.make_node("Loop", ["iface_trip", "iface_true"], ["iface_out"], body=body))
        g.output.append(_vi("iface_out", len(shape) + 1))
    elif how == "scan":
        body = helper.make_graph(
            [helper.make_node("Add", ["acc_in", w.name], ["acc_out"]), helper.make_node("Identity", ["acc_out"], ["y_s"])],
            "scan_body", [helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, shape), _vi("y_s", len(shape))])
        g.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype=np.float32), "iface_acc"))
        g.node.append(helper.make_node("Scan", ["iface_acc"], ["iface_out", "iface_ys"], body=body,
                                       num_scan_inputs=0))
        g.output.append(_vi("iface_out", len(shape)))
    elif how == "output":
        g.output.append(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, shape))
    elif how == "input":
        g.input.append(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, shape))
    else:  # a hidden activation summed over axes that arrive at run time, to an output
        hidden = [n.output[0] for n in g.node if n.op_type == "Relu"]
        if not hidden:
            return m, "reduce-axes (no activation)"
        g.input.append(helper.make_tensor_value_info("iface_axes", TensorProto.INT64, [1]))
        g.node.append(helper.make_node("ReduceSum", [rng.choice(hidden), "iface_axes"], ["iface_out"], keepdims=1))
        g.output.append(_vi("iface_out", 4 if "cnn" in g.name else 2))
    return m, f"{how} reads {w.name}"


STRUCTURED = {
    "dtype": mutate_dtype, "shape": mutate_shape, "huge": mutate_huge, "shadow": mutate_shadow,
    "duplicate": mutate_duplicate, "dangling": mutate_dangling, "cycle": mutate_cycle, "empty": mutate_empty,
    "domain": mutate_domain, "constant": mutate_constant, "attribute": mutate_attribute,
    "random_graph": random_graph, "names": mutate_names, "blowup": mutate_blowup,
    "interface": mutate_interface,
}
# families drawn by the in-process walker test only (tests/fuzz/test_inprocess.py): mostly invalid
# graphs that the loader refuses, so running every command on them would cost much and find little
WALKER_ONLY = {"any_op": any_op_graph}


# ---- byte-level mutations ----------------------------------------------------------------------
def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.randrange(len(data))
    return data[:cut], f"cut at {cut}/{len(data)}"


def bitflip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    flips = []
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        pos = rng.randrange(len(out))
        bit = rng.randrange(8)
        out[pos] ^= 1 << bit
        flips.append(f"{pos}.{bit}")
    return bytes(out), "flip " + ",".join(flips)


def splice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    pos = rng.randrange(len(out))
    how = rng.choice(["insert", "delete", "varint", "overwrite"])
    if how == "insert":
        out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif how == "delete":
        del out[pos:pos + rng.randint(1, 8)]
    elif how == "varint":  # a huge length/varint: many 0xff bytes
        out[pos:pos] = b"\xff" * rng.randint(1, 10) + b"\x01"
    else:
        for i in range(pos, min(len(out), pos + rng.randint(1, 16))):
            out[i] = rng.randrange(256)
    return bytes(out), f"{how} at {pos}"


BYTES = {"truncate": truncate, "bitflip": bitflip, "splice": splice}


# ---- external data -----------------------------------------------------------------------------
EXTERNAL_KINDS = ["parent", "absolute", "symlink-outside", "symlink-dir-outside", "missing", "short",
                  "short-no-length", "offset-negative", "offset-text", "length-huge", "offset-past-end",
                  "model-itself", "folder", "nul-in-location", "backslash-parent", "empty-location",
                  "symlink-inside", "hardlink-outside", "huge-dims-small-length", "dims-disagree-length",
                  "valid"]


def external_case(kind: str, seed_model: str = "mlp", rng: random.Random | None = None) -> Case:
    """The seed model with external data, its location (or the data file) made hostile."""
    base = SEEDS[seed_model]()
    files = external_files(base)
    data = files["model/m.data"]
    model = onnx.ModelProto.FromString(files[MODEL])
    links: dict[str, str] = {}
    tensors = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    target = (rng or random.Random(0)).choice(tensors)

    def setkey(key, value, which=None):
        for t in which or [target]:
            info = {e.key: e.value for e in t.external_data}
            if value is None:
                info.pop(key, None)
            else:
                info[key] = value
            del t.external_data[:]
            for k, v in info.items():
                e = t.external_data.add()
                e.key, e.value = k, v

    if kind == "parent":
        files["secret.data"] = data
        setkey("location", "../secret.data")
    elif kind == "backslash-parent":
        files["secret.data"] = data
        setkey("location", "..\\secret.data")
    elif kind == "absolute":
        files["secret.data"] = data
        setkey("location", "{case}/secret.data")  # filled in below, once the folder is known
    elif kind == "symlink-outside":
        files["secret.data"] = data
        links["model/link.data"] = "../secret.data"
        setkey("location", "link.data")
    elif kind == "symlink-dir-outside":
        files["elsewhere/m.data"] = data
        links["model/sub"] = "{case}/elsewhere"
        setkey("location", "sub/m.data")
    elif kind == "symlink-inside":
        links["model/alias.data"] = "m.data"
        setkey("location", "alias.data")
    elif kind == "hardlink-outside":
        files["secret.data"] = data
        links["model/hard.data"] = "hardlink:../secret.data"
        setkey("location", "hard.data")
    elif kind == "missing":
        setkey("location", "gone.data")
    elif kind == "short":
        files["model/m.data"] = data[: len(data) // 2]
    elif kind == "short-no-length":
        files["model/m.data"] = data[: len(data) // 2]
        setkey("length", None, tensors)
        setkey("offset", None, tensors[:1])
    elif kind == "offset-negative":
        setkey("offset", "-16")
    elif kind == "offset-text":
        setkey("offset", "twelve")
    elif kind == "length-huge":
        setkey("length", str(2**62))
    elif kind == "offset-past-end":
        setkey("offset", str(len(data) + 4096))
    elif kind == "model-itself":
        setkey("location", "m.onnx")
    elif kind == "folder":
        files["model/dir.data/x"] = b"x"
        setkey("location", "dir.data")
    elif kind == "nul-in-location":
        setkey("location", "m.data\x00../../etc/passwd")
    elif kind == "empty-location":
        setkey("location", "")
    elif kind == "huge-dims-small-length":
        del target.dims[:]
        target.dims.extend([2**20, 2**20])
    elif kind == "dims-disagree-length":
        target.dims[0] += 1
    elif kind != "valid":
        raise ValueError(kind)
    files[MODEL] = model.SerializeToString()
    case = Case("external", kind, files, links, seed_model)
    return case


def write_external_case(case: Case, folder: str) -> str:
    """Like Case.write, plus the absolute-path and hard-link fix-ups that need the folder."""
    folder = os.path.abspath(folder)
    links = {k: v for k, v in case.links.items() if not v.startswith("hardlink:")}
    hard = {k: v[len("hardlink:"):] for k, v in case.links.items() if v.startswith("hardlink:")}
    plain = Case(case.category, case.detail, dict(case.files), links, case.seed_model, case.model)
    if b"{case}" in plain.files[MODEL]:
        model = onnx.ModelProto.FromString(plain.files[MODEL])
        for t in model.graph.initializer:
            for e in t.external_data:
                e.value = e.value.replace("{case}", folder)
        plain.files[MODEL] = model.SerializeToString()
    path = plain.write(folder)
    for rel, target in hard.items():
        src = os.path.normpath(os.path.join(folder, os.path.dirname(rel), target))
        os.link(src, os.path.join(folder, rel))
    return path


# ---- drawing a case ----------------------------------------------------------------------------
CATEGORIES = list(BYTES) + list(STRUCTURED) + ["external"]


def make_case(category: str, rng: random.Random, seed_model: str | None = None) -> Case:
    seed_model = seed_model or rng.choice(list(SEEDS))
    base = SEEDS[seed_model]()
    if category in BYTES:
        data, detail = BYTES[category](base.SerializeToString(), rng)
        return Case(category, detail, {MODEL: data}, {}, seed_model)
    if category == "external":
        kind = rng.choice(EXTERNAL_KINDS)
        return external_case(kind, seed_model if seed_model != "const" else "mlp", rng)
    model, detail = STRUCTURED[category](base, rng)
    data = model.SerializeToString()
    if rng.random() < 0.15 and category not in ("random_graph",):  # a second, byte-level hit
        data, more = BYTES[rng.choice(list(BYTES))](data, rng)
        detail += f"; then {more}"
    return Case(category, detail, {MODEL: data}, {}, seed_model)


def write_case(case: Case, folder: str) -> str:
    if case.category == "external":
        return write_external_case(case, folder)
    return case.write(folder)
