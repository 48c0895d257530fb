"""audit/passes/attention.py on ONNX Runtime's decoder attention ops: GroupQueryAttention (packed
or separate Q/K/V, rotary inside, KV cache), RotaryEmbedding, MultiHeadAttention. Each rewrite is
checked with ONNX Runtime: the canonical graph (standard ops only) computes what the file computes,
every output, on generated inputs (a prompt, and a decoding step over a cache); and forms the pass
does not reach are left as they are."""

from __future__ import annotations

from collections import Counter

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.audit.align import weighted_layers
from onnx_resync.audit.canonical import canonicalize

MS = "com.microsoft"
RNG = np.random.default_rng(5)
F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def _w(*shape, scale=0.3):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _run(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _same(canon, model, feeds, atol=2e-5):
    got, want = _run(canon, feeds), _run(model, feeds)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


def _std_only(model):
    return all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def _tables(positions: int, half: int, base: float = 10000.0, scale: float = 1.0):
    inv_freq = (1.0 / base ** (np.arange(0, 2 * half, 2) / (2 * half))).astype(np.float32)
    angle = np.arange(positions, dtype=np.float32)[:, None] * inv_freq
    return inv_freq, (scale * np.cos(angle)).astype(np.float32), (scale * np.sin(angle)).astype(np.float32)


HEADS, KV, SIZE, HIDDEN = 4, 2, 16, 32  # (ONNX Runtime rotates heads of a multiple of 16)


def _gqa_model(packed: bool, rotary: bool = True, tables=None, opset=17):
    inv_freq, cos, sin = tables or _tables(32, SIZE // 2)
    inits = {"cos": cos, "sin": sin}
    if packed:
        inits["w"] = _w(HIDDEN, (HEADS + 2 * KV) * SIZE)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"])]
        qkv = ["qkv", "", ""]
    else:
        inits.update(wq=_w(HIDDEN, HEADS * SIZE), wk=_w(HIDDEN, KV * SIZE), wv=_w(HIDDEN, KV * SIZE))
        nodes = [helper.make_node("MatMul", ["x", w], [w + "_out"]) for w in ("wq", "wk", "wv")]
        qkv = ["wq_out", "wk_out", "wv_out"]
    nodes.append(helper.make_node(
        "GroupQueryAttention", qkv + ["past_k", "past_v", "seqlens", "total"] + (["cos", "sin"] if rotary else []),
        ["y", "present_k", "present_v"], domain=MS, num_heads=HEADS, kv_num_heads=KV, do_rotary=int(rotary)))
    cache = ["b", KV, "p", SIZE]
    return _model(nodes, [("x", F, ["b", "s", HIDDEN]), ("past_k", F, cache), ("past_v", F, cache),
                          ("seqlens", I32, ["b"]), ("total", I32, [])],
                  [("y", F, None), ("present_k", F, None), ("present_v", F, None)], inits, opset)


def _gqa_feeds(batch: int, past: int, length: int):
    return {"x": _w(batch, length, HIDDEN, scale=1), "past_k": _w(batch, KV, past, SIZE, scale=1),
            "past_v": _w(batch, KV, past, SIZE, scale=1),
            "seqlens": np.full(batch, past + length - 1, np.int32), "total": np.array(past + length, np.int32)}


def test_group_query_attention_packed_with_rotary_is_written_out():
    """onnxruntime-genai's form: a packed QKV MatMul, rotary inside GQA, a KV cache. The canonical
    form has three projections (views of the packed weight), the frequencies as a Mul weight, and
    computes every output as ONNX Runtime does: a prompt, a prompt after a cache, a decoding step."""
    model = _gqa_model(packed=True)
    canon = canonicalize(model)
    assert _std_only(canon.model), Counter(n.op_type for n in canon.model.graph.node)
    layers = {layer.node.input[1]: layer for layer in weighted_layers(canon.model)}
    inits = {t.name: numpy_helper.to_array(t) for t in canon.model.graph.initializer}
    mats = sorted(inits[name].shape for name, layer in layers.items() if layer.node.op_type == "MatMul")
    assert mats == [(HIDDEN, KV * SIZE), (HIDDEN, KV * SIZE), (HIDDEN, HEADS * SIZE)]
    assert all(canon.origins[name].sources == ["w"] and not canon.origins[name].computed
               for name, layer in layers.items() if layer.node.op_type == "MatMul")
    freq = [name for name, layer in layers.items() if layer.node.op_type == "Mul"]
    assert len(freq) == 1 and canon.origins[freq[0]].sources == ["cos", "sin"]
    np.testing.assert_allclose(inits[freq[0]], _tables(32, SIZE // 2)[0], rtol=1e-5)
    for batch, past, length in ((2, 0, 5), (1, 3, 4), (3, 6, 1)):  # (ORT: a cache and S > 1 only at batch 1)
        _same(canon.model, model, _gqa_feeds(batch, past, length))


def test_group_query_attention_separate_inputs_without_rotary():
    model = _gqa_model(packed=False, rotary=False)
    canon = canonicalize(model)
    assert _std_only(canon.model)
    for batch, past, length in ((2, 0, 5), (1, 4, 1)):
        _same(canon.model, model, _gqa_feeds(batch, past, length))


def test_group_query_attention_rotary_with_scaled_tables_and_opset_11():
    """Tables scaled by a factor (a rope scaling's attention factor) and an old opset (Unsqueeze
    with an attribute)."""
    model = _gqa_model(packed=False, tables=_tables(32, SIZE // 2, base=500.0, scale=0.8), opset=11)
    canon = canonicalize(model)
    assert _std_only(canon.model)
    _same(canon.model, model, _gqa_feeds(1, 2, 3))


def test_group_query_attention_with_tables_not_of_rotary_form_is_left_as_it_is():
    """cos/sin tables that are not cos/sin of position x frequency (here random): no frequencies to
    write, the node stays whole (and the packed projection with it)."""
    inv_freq, cos, sin = _tables(32, SIZE // 2)
    model = _gqa_model(packed=True, tables=(inv_freq, _w(*cos.shape), _w(*sin.shape)))
    canon = canonicalize(model)
    assert Counter(n.op_type for n in canon.model.graph.node)["GroupQueryAttention"] == 1
    interleaved = _gqa_model(packed=True)
    for n in interleaved.graph.node:
        if n.op_type == "GroupQueryAttention":
            n.attribute.append(helper.make_attribute("rotary_interleaved", 1))
    assert Counter(n.op_type for n in canonicalize(interleaved).model.graph.node)["GroupQueryAttention"] == 1


def test_rotary_embedding_is_written_out():
    """com.microsoft RotaryEmbedding on [B, S, H * D] (num_heads) and [B, H, S, D] inputs, with
    position ids [B, S] and with a scalar start position."""
    inv_freq, cos, sin = _tables(64, SIZE // 2)
    for rank, pos_shape in ((3, ["b", "s"]), (4, ["b", "s"]), (3, [1])):
        shape = ["b", "s", HEADS * SIZE] if rank == 3 else ["b", HEADS, "s", SIZE]
        attrs = {"num_heads": HEADS} if rank == 3 else {}
        node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS, **attrs)
        model = _model([node], [("x", F, shape), ("pos", I64, pos_shape)], [("y", F, None)], {"cos": cos, "sin": sin})
        canon = canonicalize(model)
        assert _std_only(canon.model)
        x = _w(2, 5, HEADS * SIZE, scale=1) if rank == 3 else _w(2, HEADS, 5, SIZE, scale=1)
        pos = RNG.integers(0, 50, size=(2, 5)).astype(np.int64) if len(pos_shape) == 2 else np.array([7], np.int64)
        _same(canon.model, model, {"x": x, "pos": pos})


def test_multi_head_attention_is_written_out():
    """com.microsoft MultiHeadAttention on three projections with a packed bias and a key padding
    mask; causal (unidirectional) too."""
    h, heads = 16, 2
    inits = {"wq": _w(h, h), "wk": _w(h, h), "wv": _w(h, h), "bias": _w(3 * h)}
    proj = [helper.make_node("MatMul", ["x", w], [w + "_out"]) for w in ("wq", "wk", "wv")]
    for unidirectional in (0, 1):
        node = helper.make_node("MultiHeadAttention", ["wq_out", "wk_out", "wv_out", "bias", "mask"], ["y"],
                                domain=MS, num_heads=heads, unidirectional=unidirectional)
        model = _model(proj + [node], [("x", F, ["b", "s", h]), ("mask", I32, ["b", "s"])], [("y", F, None)], inits)
        canon = canonicalize(model)
        assert _std_only(canon.model)
        mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
        _same(canon.model, model, {"x": _w(2, 5, h, scale=1), "mask": mask})


def test_multi_head_attention_with_state_is_left_as_it_is():
    h = 16
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "", "pk", "pv"], ["y", "ok", "ov"],
                            domain=MS, num_heads=2)
    model = _model([node], [(n, F, ["b", "s", h]) for n in "qkv"] + [(n, F, ["b", 2, "p", 8]) for n in ("pk", "pv")],
                   [("y", F, None), ("ok", F, None), ("ov", F, None)], {})
    assert Counter(n.op_type for n in canonicalize(model).model.graph.node) == {"MultiHeadAttention": 1}


def test_canonical_form_keeps_the_files_shape_annotations_of_untouched_nodes():
    """value_info of a tensor that the file's own node, untouched, still writes is kept (the walker
    reads it where shapes are dynamic); that of a tensor a pass now writes is not (its node changed)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("SimplifiedLayerNormalization", ["h", "scale"], ["n"], epsilon=1e-5, axis=-1),
             helper.make_node("Relu", ["n"], ["y"])]
    model = _model(nodes, [("x", F, ["b", "s", 8])], [("y", F, ["b", "s", 8])],
                   {"w": _w(8, 8), "scale": _w(8)})
    model.graph.value_info.extend([helper.make_tensor_value_info("h", F, ["b", "s", 8]),
                                   helper.make_tensor_value_info("n", F, ["b", "s", 8])])
    canon = canonicalize(model)
    assert [vi.name for vi in canon.model.graph.value_info] == ["h"]
