"""Weights that differ from the reference only by an order that no neuron group reaches.

resync puts back the neurons of the reference walk's groups. Where the walk pins a layer (an
LSTM inside an If body whose shapes it cannot follow, a state input it cannot label), that layer
keeps whatever order the suspect gave it, and so does the side of its neighbours that faces it: a
permuted copy then differs from the reference there although no value was changed. Called
"perturbed", that would be a wrong kind of change.

`explained_by_order` tells that order apart from a change. Every aligned weight whose restored
values lie beyond its float storage's bound (subgraphs.STORAGE_BOUND, per element: relative plus
an absolute floor, the suspect's own format) must

1. have an axis (of two or more entries) that no slot of the reference walk's groups covers, and
2. equal the reference's once its rows, then its columns, are matched by their values
   (subgraphs._distance: every element within the bound after the matching).

Then the names of those weights are returned (the verdict says "permuted" and lists them);
otherwise None: what differs is a change, not an order. A random or retrained weight is nowhere
near (its elements differ by about their own size after any matching). A quantized suspect
(integer storage: its own bound is the step, measured elsewhere) gives None, as does a difference
spread over more than MAX_ELEMENTS elements (the matching is quadratic in a side).
"""

from __future__ import annotations

import numpy as np
import onnx

from .storage import storage_dtype
from .subgraphs import STORAGE_BOUND, SubgraphWeight, _distance

MAX_ELEMENTS = 1 << 24  # elements of the weights matched by value, in all
_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
           "bfloat16": onnx.TensorProto.BFLOAT16, "float64": onnx.TensorProto.DOUBLE}


def explained_by_order(alignment, ref_walk, ref_store, res_store, sus_c,
                       restored: set[str] | None = None) -> list[str] | None:
    """The reference weights that equal the restored ones only up to an order no group reaches,
    when they are all that differs beyond the bound; else None (module docstring). `restored`: the
    keys of the groups resync put back (default: every group of the walk); a group it did not
    (unmatched, dropped) reaches nothing."""
    covered: dict[str, set[int]] = {}
    for g in ref_walk.groups:
        if restored is not None and g.key not in restored:
            continue
        for slot in g.slots:
            covered.setdefault(slot.weight, set()).add(slot.axis)
    differing: list[tuple[str, int]] = []
    total = 0
    for rw, sw in alignment.weight_map.items():
        dtype = _DTYPES.get(storage_dtype(sus_c.origins.get(sw)))
        origin = sus_c.origins.get(sw)
        if dtype is None or (origin is not None and origin.quantized):
            return None
        r = np.asarray(ref_store.get(rw), dtype=np.float64)
        s = np.asarray(res_store.get(rw), dtype=np.float64).reshape(r.shape)
        rel, floor = STORAGE_BOUND[dtype]
        if np.all(np.abs(s - r) <= rel * np.abs(r) + floor):
            continue
        free = [a for a, d in enumerate(r.shape) if d >= 2 and a not in covered.get(rw, set())]
        total += r.size
        if not free or total > MAX_ELEMENTS:
            return None  # a covered weight that differs, or too much to match: a change
        differing.append((rw, dtype))
    out = []
    for rw, dtype in differing:
        r = np.asarray(ref_store.get(rw), dtype=np.float64)
        s = np.asarray(res_store.get(rw), dtype=np.float64).reshape(r.shape)
        d, _, _ = _distance(SubgraphWeight((), rw, dtype, r), SubgraphWeight((), rw, dtype, s))
        if d > 1.0:
            return None
        out.append(rw)
    return out or None
