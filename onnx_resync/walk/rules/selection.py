"""Selection: ops that cut, gather or join an axis (Gather, Concat, Split, Slice)."""

from __future__ import annotations

import numpy as np

from ..channels import Label
from .base import _inputs, _norm_axis, attr, const_ints, norm_axes
from .layout import _cut_stacked, _distinct_copies
from ..registry import declare


def gather(ctx, node) -> None:
    data, indices = node.input[0], node.input[1]
    out = node.output[0]
    axis = int(attr(node, "axis"))
    r = ctx.rank(data)
    axis = _norm_axis(axis, r)
    if ctx.is_weight(data) and not ctx.get(data):
        # embedding lookup: rows are picked by index, the remaining axes are weight axes
        shape = ctx.shape(data)
        if axis == 0 and shape is not None and len(shape) == 2:
            fresh = ctx.new(shape[1], node, out)
            ctx.slot(data, 1, fresh)
            ro = ctx.rank(out)
            if ro is not None:
                ctx.set(out, {ro - 1: fresh})
            else:
                ctx.pin(fresh, "embedding output of unknown rank")
            ctx.pin_all(indices, "used as Gather indices")
        return
    idx = ctx.const(indices)
    if idx is not None and idx.dtype.kind not in "iu":
        idx = None  # ONNX refuses indices of another type
    ctx.pin_all(indices, "used as Gather indices")
    if axis is None or idx is None or idx.ndim > 1 or any(axis == i for _, i in ctx.stacked(data)):
        ctx.tie_directions(data)  # directions are picked whole, along the outer axis
    labels = ctx.get(data)
    if not ctx.labels.get(data):
        return
    if axis is None:
        ctx.pin_all(data, "Gather with unknown rank")
        return
    idx_rank = 0 if idx is None else idx.ndim
    out_labels = {}
    for a, label in labels.items():
        if a < axis:
            out_labels[a] = label
        elif a > axis:
            out_labels[a + idx_rank - 1] = label
        elif idx is not None and idx.ndim == 1 and np.all((idx >= -len(label)) & (idx < len(label))):
            out_labels[a] = _distinct_copies(label.take(np.where(idx < 0, idx + len(label), idx)))
        elif idx is not None and idx.ndim == 0 and -len(label) <= int(idx) < len(label):
            # one position read by a fixed index (q, k or v out of a packed projection's (3, ...)
            # axis): the element there keeps its place, the others still move; the axis is gone
            ctx.pin(label.take(np.array([int(idx) % len(label)])), "picked by a constant Gather index")
        else:
            ctx.pin(label, "Gather on the channel axis with non-constant or multi-dim indices")
    if idx is not None and ctx.stacked(data):
        # the cut counts negative indices from the axis's end: its length is the label's (n), so a
        # symbolic dim (a name, not a number) is never added to the indices
        flat = idx.reshape(-1).astype(np.int64)
        where = {a: a if a < axis else a + idx_rank - 1 for a in range(r) if a != axis or idx_rank == 1}
        out_labels.update(_cut_stacked(ctx, data, lambda a, n: np.where(flat < 0, flat + n, flat) if a == axis
                                       else None, where))
    ctx.set(out, out_labels)


def concat(ctx, node) -> None:
    out = node.output[0]
    names = [n for n in node.input if n]
    r = ctx.rank(out)
    axis = _norm_axis(int(attr(node, "axis")), r)
    if not any(ctx.get(n) for n in names):
        return
    if axis is None:
        for n in names:
            ctx.pin_all(n, "Concat with unknown rank")
        return
    pieces = []
    for n in names:
        label = ctx.get(n).get(axis)
        if label is None:
            dim = ctx.dim(n, axis)
            if not isinstance(dim, int):
                for m in names:
                    ctx.pin_all(m, "Concat with an unlabelled piece of unknown size")
                return
            if dim == 0:
                continue
            label = ctx.new(dim, node, n, kind="fixed")
            ctx.pin(label, "concatenated with an unlabelled tensor")
        pieces.append(label)
    has = any(ctx.get(n).get(axis) is not None for n in names)
    out_labels = {axis: _distinct_copies(Label.concat(pieces))} if has else {}
    # other axes behave like an elementwise op
    other: dict[int, Label] = {}
    for n in names:
        for a, label in ctx.get(n).items():
            if a == axis:
                continue
            if a in other:
                ctx.union(other[a], label)
            else:
                other[a] = label
    for a, label in other.items():
        for n in names:
            if a not in ctx.get(n) and ctx.dim(n, a) != 1:
                ctx.pin(label, "Concat along another axis with an unlabelled tensor")
    out_labels.update(other)
    ctx.set(out, out_labels)


def split(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    axis, sizes = _split_sizes(ctx, node)
    if not ctx.labels.get(x):
        if ctx.is_weightlike(x) and axis is not None and sizes is not None:
            _weight_grid(ctx, node, x, axis, sizes)
        return
    if axis is None or sizes is None:
        ctx.pin_all(x, "Split with unknown sizes")
        return
    units = (_grid_units(ctx, node, labels.get(axis), sizes, [o for o in node.output], _from_end(ctx, x, axis))
             if axis in labels else None)
    start = 0
    for out, size in zip(node.output, sizes):
        out_labels = dict(labels)
        kept = np.arange(start, start + size)
        if axis in labels:
            out_labels[axis] = labels[axis].take(kept) if units is None else Label(units.elem, units.sub)
        out_labels.update(_cut_stacked(ctx, x, lambda a, n: kept if a == axis else None))
        start += size
        ctx.set(out, out_labels)


def _split_sizes(ctx, node):
    """A Split's axis (normalized) and chunk sizes, from its attribute, its input or its outputs'
    shapes; None where unknown."""
    axis = norm_axes([int(attr(node, "axis"))], ctx.rank(node.input[0]))
    axis = None if axis is None else axis[0]
    sizes = attr(node, "split")
    if sizes is None and _inputs(node, 1):
        sizes = const_ints(ctx, node.input[1])
        if sizes is None:
            return axis, None
    if sizes is None and axis is not None:
        dims = [ctx.dim(o, axis) for o in node.output]
        sizes = dims if all(isinstance(d, int) for d in dims) else None
    n = ctx.dim(node.input[0], axis) if axis is not None else None
    if sizes is not None and (len(sizes) != len(node.output) or any(s < 0 for s in sizes)
                              or (isinstance(n, int) and sum(sizes) != n)):
        sizes = None  # ONNX refuses sizes that do not cut the axis into the outputs
    return axis, sizes


def slice_(ctx, node) -> None:
    x = node.input[0]
    labels = ctx.get(x)
    if not ctx.labels.get(x):
        return
    r = ctx.rank(x)
    bounds = _slice_bounds(ctx, node, r)
    if bounds is None:
        ctx.pin_all(x, "Slice with non-constant or malformed bounds")
        return
    starts, ends, axes, steps = bounds
    out = dict(labels)
    for a, s, e, st in zip(axes, starts, ends, steps):
        if a in labels:
            kept = np.arange(len(labels[a]))[slice(*_clamp(s, e, st, len(labels[a])))]
            units = _slice_grid(ctx, node, x, a, kept)  # (a Slice may cut time too: onnxslim merges them)
            out[a] = labels[a].take(kept) if units is None else Label(units.elem, units.sub)
    cuts = {a: slice(*_clamp(s, e, st, 0)) for a, s, e, st in zip(axes, starts, ends, steps)}
    out.update(_cut_stacked(ctx, x, lambda a, n: np.arange(n)[cuts[a]] if a in cuts else None))
    ctx.set(node.output[0], out)


# ---- grids of tied chunks ------------------------------------------------------------------
# A layer's output cut into k equal chunks that meet again elementwise (LSTM gates i*g, GLU a*sigmoid(b),
# an STFT's re^2 + im^2): its channels become the cells (chunk, unit) of a grid (channels.py, products),
# every chunk carries the *unit* label, and units move the same way inside every chunk while the
# chunks keep their places. Chunks that never meet keep their own labels (each may move freely).
_MEET_DEPTH = 12  # elementwise ops followed from each chunk when looking for where chunks meet


def _grid_units(ctx, node, label, sizes, outputs, back):
    """The unit label every chunk carries when `label` is cut into equal `sizes` that meet again."""
    if label is None or not _equal_chunks_meet(ctx, sizes, len(label), outputs, back):
        return None
    return _grid(ctx, node, label, len(sizes), sizes[0])


def _equal_chunks_meet(ctx, sizes, n, outputs, back) -> bool:
    """k >= 2 equal chunks covering all n positions, which meet again elementwise."""
    k = len(sizes)
    return (k >= 2 and len(set(sizes)) == 1 and sizes[0] >= 1 and sizes[0] * k == n
            and _chunks_meet(ctx, [[o] for o in outputs], back))


def _from_end(ctx, x, axis):
    """`axis` of `x` counted from the end (as broadcasting aligns axes), None for an unknown rank."""
    r = ctx.rank(x)
    return None if r is None else axis - r


def _weight_grid(ctx, node, x, axis, sizes) -> None:
    """A weight-like tensor cut into equal chunks that meet channels again (a recurrent bias broadcast
    by the first cell's Gemm of a zero state, cut into gates): its axis becomes a grid slot and
    every chunk carries the unit label, like a layer's output would."""
    n = ctx.dim(x, axis)
    if not isinstance(n, int) or not _equal_chunks_meet(ctx, sizes, n, list(node.output), _from_end(ctx, x, axis)):
        return
    cells = ctx.new(n, node, x, kind="weight-grid")
    units = _grid(ctx, node, cells, len(sizes), sizes[0])
    if units is None or not ctx.slot(x, axis, cells):
        return
    uniform = {a for a in ctx.uniform.get(x, ()) if a != axis}
    for a in uniform:
        ctx.mark_read(x, a)  # one value along it: read in no order
    for out in node.output:
        ctx.set(out, {axis: Label(units.elem, units.sub)})
        if uniform:
            ctx.uniform[out] = set(uniform)


def weight_chunk_units(ctx, name, axis):
    """`name` is chunk c of a stored weight cut by a Split into equal chunks that meet channels again
    (a bias an exporter folded and cut into gates): the unit label it carries along `axis`, the
    weight's axis made a grid slot once for all its chunks; None otherwise."""
    node = ctx.view.producer.get(name)
    if node is None or node.op_type != "Split" or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    cache = ctx.__dict__.setdefault("_weight_chunk_grids", {})
    key = id(node)
    if key not in cache:
        cache[key] = None
        x = node.input[0]
        split_axis, sizes = _split_sizes(ctx, node)
        n = ctx.dim(x, split_axis) if split_axis is not None else None
        if (ctx.is_weightlike(x) and sizes is not None and isinstance(n, int) and ctx.rank(x) == ctx.rank(name)
                and _equal_chunks_meet(ctx, sizes, n, list(node.output), _from_end(ctx, x, split_axis))):
            cells = ctx.new(n, node, x, kind="weight-grid")
            units = _grid(ctx, node, cells, len(sizes), sizes[0])
            if units is not None and ctx.slot(x, split_axis, cells):
                cache[key] = (split_axis, units)
    found = cache[key]
    if found is None or found[0] != axis:
        return None
    return Label(found[1].elem, found[1].sub)


def _slice_grid(ctx, node, x, axis, kept):
    """A Slice that takes chunk c of k equal ones, where a sibling Slice/Split takes another chunk
    of the same grid and the two meet again: the unit label (else None). Chunks are contiguous
    (positions c*h .. c*h + h - 1) or interleaved (a step of k: positions c, c + k, ..., as GLU or
    rotary halves of an interleaved layout are taken: unit j of chunk c at j*k + c)."""
    label = ctx.get(x).get(axis)
    n, h = len(label), len(kept)
    if h < 1 or n % h or n == h:
        return None
    k = n // h
    contiguous = _is_chunk(kept, 1, h, h)
    interleaved = not contiguous and _is_chunk(kept, k, 1, h)
    if not (contiguous or interleaved):
        return None
    step, stride = (k, 1) if interleaved else (1, h)
    siblings = []
    for other in ctx.view.consumers.get(x, []):
        if other is node or other.input[0] != x:
            continue
        if other.op_type == "Slice" and other.domain in ("", "ai.onnx"):
            rng = _slice_range(ctx, other, axis, n)
            if rng is not None and _is_chunk(rng, step, stride, h):
                siblings.append(list(other.output[:1]))
    if not siblings or not _chunks_meet(ctx, [list(node.output[:1])] + siblings, _from_end(ctx, x, axis)):
        return None
    return _grid(ctx, node, label, k, h, interleaved=interleaved)


def _is_chunk(kept, step, stride, h) -> bool:
    """Positions `kept` are one chunk: h positions `step` apart from a multiple of `stride`
    (contiguous chunks: step 1, stride h; interleaved ones: step k, stride 1)."""
    return len(kept) == h and kept[0] % stride == 0 and np.array_equal(kept, kept[0] + step * np.arange(h))


def _slice_bounds(ctx, node, r):
    """A Slice's (starts, ends, axes, steps) as integer lists of one length, axes non-negative, from
    its attributes (opset < 10) or constant inputs; None where unknown or malformed (ONNX refuses
    bounds of other types or lengths, an axis out of range or repeated, a step of 0)."""
    if attr(node, "starts") is not None:  # opset < 10
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
        starts, ends = list(starts), None if ends is None else list(ends)
    else:
        starts, ends = const_ints(ctx, _inputs(node, 1)), const_ints(ctx, _inputs(node, 2))
        axes, steps = const_ints(ctx, _inputs(node, 3)), const_ints(ctx, _inputs(node, 4))
        if (_inputs(node, 3) and axes is None) or (_inputs(node, 4) and steps is None):
            return None
    if starts is None or ends is None or r is None:
        return None
    axes = norm_axes(list(range(len(starts))) if axes is None else axes, r)
    steps = [1] * len(starts) if steps is None else list(steps)
    if axes is None or not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
        return None
    return starts, ends, axes, steps


def _slice_range(ctx, node, axis, n):
    """Positions a Slice keeps along `axis` (of length n: all of them where it cuts other axes only);
    None if its bounds are unknown."""
    bounds = _slice_bounds(ctx, node, ctx.rank(node.input[0]))
    if bounds is None:
        return None
    for s, e, a, st in zip(*bounds):
        if a == axis:
            return np.arange(n)[slice(*_clamp(s, e, st, n))]
    return np.arange(n)


def _chunks_meet(ctx, starts: list[list[str]], back) -> bool:
    """Do tensors reached elementwise from two different chunks meet in one node? Besides elementwise
    ops, a Slice that leaves the chunk axis (`back`: counted from the end) whole is followed (an
    STFT's real part sliced again along time before re^2 + im^2)."""
    from .base import passthrough
    from .elementwise import broadcast, clip, prelu, variadic, where
    from ..registry import spec_of

    elementwise = {passthrough, broadcast, clip, prelu, variadic, where}
    reached: dict[int, int] = {}  # id(node) -> chunk that reached it
    for chunk, names in enumerate(starts):
        frontier, seen = list(names), set()
        for _ in range(_MEET_DEPTH):
            nxt = []
            for name in frontier:
                for reader in ctx.view.consumers.get(name, []):
                    spec = spec_of(reader, ctx.view.opsets)
                    if spec is None or id(reader) in seen or not (
                            spec.rule in elementwise or _keeps_axis(ctx, reader, name, back)):
                        continue
                    seen.add(id(reader))
                    if reached.setdefault(id(reader), chunk) != chunk:
                        return True
                    nxt.extend(o for o in reader.output if o)
            frontier = nxt
    return False


def _keeps_axis(ctx, node, name, back) -> bool:
    """`node` is a Slice of `name` that keeps every position of its axis `back` (from the end)."""
    if back is None or node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or node.input[0] != name:
        return False
    r = ctx.rank(name)
    if r is None or not -r <= back < 0:
        return False
    n = ctx.dim(name, r + back)
    if isinstance(n, int):
        rng = _slice_range(ctx, node, r + back, n)
        return rng is not None and np.array_equal(rng, np.arange(n))
    bounds = _slice_bounds(ctx, node, r)
    return bounds is not None and r + back not in bounds[2]  # it cuts other axes only


def _grid(ctx, node, label, k, h, interleaved: bool = False):
    """Make `label`'s elements the cells (chunk c, unit j) at position c*h + j (interleaved: the
    cells (unit j, chunk c) at j*k + c) or find that they already are, pin the chunk factors, and
    return the unit label; None where they cannot be."""
    products = ctx.elements.products
    cells = label.elem
    if label.sub.any() or len(np.unique(cells)) != len(cells):
        return None
    n_rows, n_cols = (h, k) if interleaved else (k, h)
    if not any(int(e) in products for e in cells.tolist()):
        rows = ctx.new(n_rows, node, node.output[0], kind="factor")
        cols = ctx.new(n_cols, node, node.output[0], kind="factor")
        if not ctx.elements.product(cells, rows, cols):
            return None
        # chunks are read apart (sigmoid gates, a tanh gate, real and imaginary parts): each keeps
        # its place, told apart by its index (never a group), while units move inside every chunk
        chunks, units = (cols, rows) if interleaved else (rows, cols)
        ctx.elements.tag(chunks.elem, [("grid chunk", c) for c in range(k)])
        return units
    recs = [products.get(int(e)) for e in cells.tolist()]
    if any(r is None or r[4:] != (n_rows, n_cols) or r[2:4] != divmod(p, n_cols) for p, r in enumerate(recs)):
        return None  # cells of another grid: the chunks keep their own labels
    rows, cols = [r[0] for r in recs[::n_cols]], [r[1] for r in recs[:n_cols]]
    if (len(set(rows)) != n_rows or len(set(cols)) != n_cols
            or any(r[1] != cols[p % n_cols] or r[0] != rows[p // n_cols] for p, r in enumerate(recs))):
        return None
    return Label.of(np.asarray(rows if interleaved else cols, dtype=np.int64))


def _clamp(start, end, step, n):
    # numpy slicing already clamps; only the INT64 sentinels need taming
    big = 1 << 62
    start = max(min(start, big), -big)
    end = max(min(end, big), -big)
    return int(start), int(end), int(step)


# ---- declarations ---------------------------------------------------------------------------
declare("Gather", gather, attributes={"axis": 0}, stacked=True, layout=True, homogeneous=True, foldable=True,
        quantized_view=True)
declare("Concat", concat, attributes={"axis": 0}, layout=True, homogeneous=True, homogeneous_joint=True,
        foldable=True, weight_view=True)  # weight views: graph.GraphView.index_sources maps their positions
_SPLIT = dict(stacked=True, layout=True, homogeneous=True, quantized_view=True, weight_view=True)
declare("Split", split, attributes={"axis": 0, "split": None}, **_SPLIT)  # sizes: an attribute,
declare("Split", split, since=13, attributes={"axis": 0}, **_SPLIT)  # then an input
_SLICE = dict(stacked=True, layout=True, homogeneous=True, foldable=True, quantized_view=True, weight_view=True)
declare("Slice", slice_, attributes={"starts": None, "ends": None, "axes": None}, **_SLICE)  # attributes,
declare("Slice", slice_, since=10, **_SLICE)  # then inputs
