"""Elements and labels: the vocabulary of the channel-flow model (DESIGN.md, walk).

An *element* is one hidden channel, created by a producer (Conv, Gemm, ...). A *label* says, for
each position of one tensor axis, which element sits there (`elem`) and which sub-position of that
element's block (`sub`, non-zero after Flatten merges a channel with trailing axes). Binary ops
*union* elements (a residual stream is one neuron across many producers); anything the walker
cannot follow *pins* them.

A *stacked* label sits on a pair of axes (outer, inner): the inner axis's label depends on the
index along a small outer axis (a bidirectional RNN's direction axis, each direction its own
units). It lists the inner labels of outer index 0, 1, ... one after another, which is exactly the
label of the one axis that a Reshape merging the two (outer first) makes. Tensors keep it under the
key (outer, inner) in their axis -> label maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Label:
    """Which element (and sub-position) sits at each position of one tensor axis."""

    elem: np.ndarray  # int64, one element id per position
    sub: np.ndarray  # int64, sub-position inside the element's block

    def __len__(self) -> int:
        return len(self.elem)

    @staticmethod
    def of(elem: np.ndarray, sub: np.ndarray | None = None) -> "Label":
        elem = np.asarray(elem, dtype=np.int64)
        sub = np.zeros_like(elem) if sub is None else np.asarray(sub, dtype=np.int64)
        return Label(elem, sub)

    def take(self, index: np.ndarray) -> "Label":
        """The label of a gathered/sliced axis."""
        return Label(self.elem[index], self.sub[index])

    def repeat_blocks(self, inner: int) -> "Label":
        """Each position becomes a block of `inner` positions (Flatten/Reshape merging trailing axes)."""
        if inner == 1:
            return self
        elem = np.repeat(self.elem, inner)
        sub = (self.sub[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)
        return Label(elem, sub)

    def tile(self, outer: int) -> "Label":
        """The whole label repeated `outer` times (merging with leading axes); sub tells copies apart."""
        if outer == 1:
            return self
        sub = (np.arange(outer)[:, None] * (int(self.sub.max(initial=0)) + 1) + self.sub[None, :]).reshape(-1)
        return Label(np.tile(self.elem, outer), sub)

    @staticmethod
    def concat(labels: list["Label"]) -> "Label":
        return Label(np.concatenate([l.elem for l in labels]), np.concatenate([l.sub for l in labels]))


CELL_OF_ITSELF = "a channel is a factor of its own grid cell (chunks cut across the grid meet)"


class ElementTable:
    """Allocates elements, unions them (union-find) and records pins with their reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.origin: list[int] = []  # which producer record created each element
        self.origins: list[dict] = []  # producer records: node name and index, op, output, kind
        self.pins: dict[int, str] = {}  # element -> first reason it was pinned
        self.tags: dict[int, list] = {}  # element -> extra constraints (e.g. grouped-conv block)
        # element -> (a, b, ia, ib, na, nb): the element is cell (ia, ib) of a grid whose rows are
        # the factor elements a (na of them) and columns b (nb): an attention head x a head dim, or
        # a gate chunk x a unit (a layer's output cut into chunks that meet again, rules/selection.py)
        self.products: dict[int, tuple[int, int, int, int, int, int]] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, count: int, *, node: str, op: str, kind: str = "producer", output: str = "", index: int = -1) -> Label:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        self.origin.extend([len(self.origins)] * count)
        self.origins.append({"node": node, "op": op, "kind": kind, "output": output, "start": start, "count": count,
                             "index": index})
        return Label.of(np.arange(start, start + count))

    def find(self, e: int) -> int:
        parent = self._parent
        root = e
        while parent[root] != root:
            root = parent[root]
        while parent[e] != root:
            parent[e], e = root, parent[e]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                # keep the older element as root so roots follow topological order
                if rx < ry:
                    self._parent[ry] = rx
                else:
                    self._parent[rx] = ry

    def product(self, cells: np.ndarray, rows: "Label", cols: "Label") -> bool:
        """Declare cells[i * len(cols) + j] = (rows[i], cols[j]); False if a cell is already a product."""
        na, nb = len(rows), len(cols)
        cells = np.asarray(cells).reshape(-1).tolist()
        if any(c in self.products for c in cells) or len(set(cells)) != len(cells):
            return False
        for k, c in enumerate(cells):
            i, j = divmod(k, nb)
            self.products[c] = (int(rows.elem[i]), int(cols.elem[j]), i, j, na, nb)
        return True

    def close_products(self) -> None:
        """Cells that are one neuron at the same (i, j) of grids of one shape (a weight shared by the
        unrolled steps of a recurrent cell unions their gate grids) make their factors one neuron
        too, so the grids move alike; repeated until nothing changes (factors may be cells)."""
        changed = True
        while changed:
            changed = False
            first: dict[tuple, tuple[int, int]] = {}
            for cell, (a, b, i, j, na, nb) in self.products.items():
                prev = first.setdefault((self.find(cell), i, j, na, nb), (a, b))
                for x, y in zip(prev, (a, b)):
                    if self.find(x) != self.find(y):
                        self.union(np.array([x]), np.array([y]))
                        changed = True
        # a channel that is a factor of its own cell, through any chain (a chunk cut across the
        # grid meets a chunk of it), has no place in the grid: pin the cycle
        factors: dict[int, set[int]] = {}
        for cell, (a, b, *_) in self.products.items():
            factors.setdefault(self.find(cell), set()).update((self.find(a), self.find(b)))
        state: dict[int, int] = {}  # 1: on the current path, 2: done
        for start in factors:
            if start in state:
                continue
            state[start] = 1
            stack = [(start, iter(factors[start]))]
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                elif state.get(nxt) == 1:  # back on the path: the cycle is nxt .. node
                    path = [r for r, _ in stack]
                    self.pin(np.array(path[path.index(nxt):]), CELL_OF_ITSELF)
                elif nxt not in state and nxt in factors:
                    state[nxt] = 1
                    stack.append((nxt, iter(factors[nxt])))

    def pin(self, elems: np.ndarray, reason: str) -> None:
        for e in np.unique(elems).tolist():
            self.pins.setdefault(int(e), reason)

    def tag(self, elems: np.ndarray, tags) -> None:
        for e, t in zip(np.asarray(elems).tolist(), tags):
            self.tags.setdefault(int(e), []).append(t)

    def roots(self, elems: np.ndarray) -> np.ndarray:
        # every element's root at once: parents followed by pointer jumping (each step halves the
        # longest path), not one find() per element
        parent = np.asarray(self._parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent[np.asarray(elems, dtype=np.int64)]
            parent = grand
