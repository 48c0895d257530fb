"""Weight layouts: a stored weight whose bytes are a fixed rearrangement of the array the walker slots.

ONNX Runtime's NCHWc convolutions (com.microsoft.nchwc.Conv, saved at the "all" optimization level on
CPU) keep their channels in blocks of B (8 with AVX2, 16 with AVX-512), zero padded to a multiple of B,
and store their filter *blocked*, in the 4-D shape of the plain filter [O, I, kh, kw] (O, and I where
the input is blocked, padded):

- OIHWBiBo, D[o/B, i/B, kh, kw, i%B, o%B], for a convolution reading a blocked tensor;
- OIHWBo, D[o/B, i, kh, kw, o%B], for a depthwise one and for one reading a plain NCHW tensor of
  fewer than B channels (an image).

A *layout* maps a stored tensor to its *logical* array (the plain OIHW filter: the same dims, each
value where a plain Conv would read it) and back. The walker slots the logical array's axes; permute
gathers there and writes the stored form back (a permutation of values: exact, undone bit for bit).
`WalkResult.layouts` names every stored weight that has one; a stage that reads slots reads weights
through a `LogicalStore` (permute reads and writes the stored form itself).

B is not written in the file. It is the one block size that fits every shape of the nchwc region
(padding, alignment, which convolutions read plain input); where several fit, the block size of this
machine's ONNX Runtime (a file in NCHWc layout computes right only on a machine with its block size);
where that does not fit either, none: the layout is not known and the walker pins the region.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..io import WeightStore

NCHWC = "com.microsoft.nchwc"
CANDIDATES = (16, 8, 4)


@dataclass(frozen=True)
class Blocked:
    """An NCHWc filter: OIHWBiBo (`inner`: input channels blocked too) or OIHWBo, blocks of `block`."""

    block: int
    inner: bool

    @property
    def name(self) -> str:
        return ("OIHWBiBo" if self.inner else "OIHWBo") + f" (block {self.block})"

    def logical(self, stored: np.ndarray) -> np.ndarray:
        """The plain OIHW filter of the stored one."""
        b = self.block
        O, I, kh, kw = stored.shape
        if self.inner:
            return stored.reshape(O // b, I // b, kh * kw, b, b).transpose(0, 4, 1, 3, 2).reshape(O, I, kh, kw)
        return stored.reshape(O // b, I, kh * kw, b).transpose(0, 3, 1, 2).reshape(O, I, kh, kw)

    def stored(self, logical: np.ndarray) -> np.ndarray:
        """The stored form of a plain OIHW filter (the inverse of `logical`)."""
        b = self.block
        O, I, kh, kw = logical.shape
        if self.inner:
            return np.ascontiguousarray(
                logical.reshape(O // b, b, I // b, b, kh * kw).transpose(0, 2, 4, 3, 1)).reshape(O, I, kh, kw)
        return np.ascontiguousarray(logical.reshape(O // b, b, I, kh * kw).transpose(0, 2, 3, 1)).reshape(O, I, kh, kw)


class LogicalStore(WeightStore):
    """A WeightStore that reads and writes each weight with a layout as its logical array (the array
    its slots index); every other weight as stored. `WeightStore.get(store, name)` still reads the
    stored form."""

    def __init__(self, model, layouts: dict, *, cache: bool = False):
        super().__init__(model, cache=cache)
        self.layouts = dict(layouts)
        self._logical: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.layouts:
            return super().get(name)
        if name not in self._logical:
            array = self.layouts[name].logical(super().get(name))
            array.flags.writeable = False  # shared by every later reader
            self._logical[name] = array
        return self._logical[name]

    def is_lazy(self, name: str) -> bool:
        return name not in self.layouts and super().is_lazy(name)

    def set(self, name: str, array: np.ndarray) -> None:
        self._logical.pop(name, None)
        super().set(name, self.layouts[name].stored(np.asarray(array)) if name in self.layouts else array)


def logical_store(model, walk, *, cache: bool = False) -> WeightStore:
    """The store through which a stage reads `walk`'s slots of `model`: a plain WeightStore where no
    weight has a layout."""
    layouts = getattr(walk, "layouts", None)
    return LogicalStore(model, layouts, cache=cache) if layouts else WeightStore(model, cache=cache)


def blocked_tensors(view) -> set[str]:
    """Tensors in blocked layout: nchwc outputs (not ReorderOutput's) and what other ops compute from
    them (ONNX Runtime reorders before any reader that does not take blocked input; what reads
    blocked tensors is elementwise, also where a later fusion made it a contrib op: QuickGelu).
    `view`: anything with `.nodes` (the walker's graph view, the audit's rewrite workspace)."""
    blocked: set[str] = set()
    for node in view.nodes:
        if node.domain == NCHWC:
            if node.op_type != "ReorderOutput":
                blocked.update(o for o in node.output if o)
        elif any(i in blocked for i in node.input if i):
            blocked.update(o for o in node.output if o)
    return blocked


def nchwc_layouts(view) -> tuple[int | None, dict[str, Blocked]]:
    """(B, stored filter -> its layout) of the view's NCHWc region; (None, {}) without one or when no
    block size fits. Cached on the view."""
    cached = view.__dict__.get("_nchwc_layouts")
    if cached is not None:
        return cached
    found: tuple[int | None, dict[str, Blocked]] = (None, {})
    convs = [n for n in view.nodes if n.domain == NCHWC and n.op_type == "Conv"]
    if any(n.domain == NCHWC for n in view.nodes):
        blocked = blocked_tensors(view)
        block = _block_size(view, convs, blocked)
        if block is not None:
            layouts = {}
            for node in convs:
                w = node.input[1] if len(node.input) > 1 else ""
                shape = view.shape(w) if view.stored_tensor(w) is not None else None
                if shape is None or len(shape) != 4:
                    continue
                group = _group(node)
                depthwise = group > 1 and shape[1] == 1 and group == shape[0]
                layout = Blocked(block, inner=not depthwise and node.input[0] in blocked)
                if layouts.setdefault(w, layout) != layout:  # one filter read in two layouts: none
                    layouts[w] = None
            found = (block, {w: l for w, l in layouts.items() if l is not None})
    view.__dict__["_nchwc_layouts"] = found
    return found


def _group(node) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def _block_size(view, convs, blocked) -> int | None:
    fits = [b for b in CANDIDATES if _fits(view, convs, blocked, b)]
    if len(fits) <= 1:
        return fits[0] if fits else None
    machine = machine_block_size()
    return machine if machine in fits else None


def _fits(view, convs, blocked, b: int) -> bool:
    padded = {}
    for node in convs:
        shape = view.shape(node.input[1]) if len(node.input) > 1 and view.stored_tensor(node.input[1]) else None
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape) or shape[0] % b:
            return False
        group = _group(node)
        padded[node.output[0]] = shape[0]
        if node.input[0] not in blocked:
            if group != 1 or shape[1] >= b:  # plain input: a small-input convolution only
                return False
        elif not (group > 1 and shape[1] == 1) and shape[1] % b:
            return False
    for node in view.nodes:
        if node.domain == NCHWC and node.op_type == "ReorderOutput":
            channels = next((int(a.i) for a in node.attribute if a.name == "channels"), 0)
            p = padded.get(node.input[0])
            if channels and p is not None and p != -(-channels // b) * b:
                return False
    return True


@functools.lru_cache(maxsize=1)
def machine_block_size() -> int | None:
    """The NCHWc block size of this machine's ONNX Runtime (None: it writes no NCHWc), read from the
    filter it stores for a small convolution."""
    import tempfile
    from pathlib import Path

    import onnx
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
    except Exception:  # noqa: BLE001 - no ONNX Runtime, or one that cannot save: block size not known
        return None
    inits = {t.name: t for t in saved.graph.initializer}
    for node in saved.graph.node:
        if node.domain == NCHWC and node.op_type == "Conv" and node.input[1] in inits:
            D = numpy_helper.to_array(inits[node.input[1]])
            for b in CANDIDATES:
                if np.array_equal(Blocked(b, inner=True).logical(D), W):
                    return b
    return None
