"""Benchmark: walking a ~50M-parameter model vs onnx.load of the same file (issue 3).

The walk reads shapes, not weights, so it should cost a small fraction of parsing the file.
Run: python tools/bench_walk.py [--params 50] ; prints a Markdown table row set.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_resync.walk import walk


def build(target_params: float, width: int = 512, seed: int = 0) -> onnx.ModelProto:
    """Residual blocks of 3x3 convs + BatchNorm at `width` channels, then a Gemm head."""
    rng = np.random.default_rng(seed)
    per_conv = width * width * 9
    blocks = max(1, int(target_params // (2 * per_conv)))
    nodes, inits = [], []

    def weight(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), name))
        return name

    def conv_bn(x, cin, cout, name, relu=True):
        nodes.append(helper.make_node("Conv", [x, weight(f"{name}.w", cout, cin, 3, 3)], [f"{name}.c"], pads=[1] * 4))
        params = [weight(f"{name}.{p}", cout) for p in ("s", "b", "m")]
        inits.append(numpy_helper.from_array(np.ones(cout, np.float32), f"{name}.v"))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.c", *params, f"{name}.v"], [f"{name}.bn"]))
        if not relu:
            return f"{name}.bn"
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.r"]))
        return f"{name}.r"

    x = conv_bn("input", 3, width, "stem")
    for i in range(blocks):
        h = conv_bn(x, width, width, f"b{i}.1")
        h = conv_bn(h, width, width, f"b{i}.2", relu=False)
        nodes.append(helper.make_node("Add", [x, h], [f"b{i}.add"]))
        nodes.append(helper.make_node("Relu", [f"b{i}.add"], [f"b{i}.out"]))
        x = f"b{i}.out"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", weight("fc.w", 1000, width), weight("fc.b", 1000)], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=float, default=50, help="millions of parameters")
    args = parser.parse_args()
    model = build(args.params * 1e6)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.onnx"
        onnx.save(model, str(path))
        size_mb = path.stat().st_size / 2**20
        del model
        t_load, loaded = best_of(lambda: onnx.load(str(path)))
        t_walk, result = best_of(lambda: walk(loaded))
    print("| model | parameters | file MB | onnx.load s | walk s | walk / load |")
    print("|---|---|---|---|---|---|")
    print(f"| residual conv net | {params / 1e6:.1f}M | {size_mb:.0f} "
          f"| {t_load:.3f} | {t_walk:.3f} | {t_walk / t_load:.3f} |")
    print(f"groups: {len(result.groups)}, coverage {100 * result.coverage:.1f}%")


if __name__ == "__main__":
    main()
