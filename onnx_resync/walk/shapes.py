"""Symbolic shape values: what a graph computes from tensor shapes, element by element.

Exporters rarely write a Reshape target, a Pad's pads or a Slice's bounds as constants: they compute
them from `Shape` (torch dynamo merging batch and heads, Paddle reshaping attention blocks back to
NCHW, SAME pads). This module evaluates such computations without running the graph.

Vocabulary:

- a *dim* is an int or a *symbol*: a dim the file leaves open, named by its dim_param ("batch") or,
  where shape inference gave it no name, "?X:k" (tensor X, axis k; see graph.py).
- a *term* (`Term`) is an integer polynomial over symbols (`4*batch`, `h + 2`); a sum, difference or
  product of terms is exact, and so is a quotient that divides. What cannot be written as a
  polynomial (a floor division that does not divide, Mod, Min, a comparison of two different
  terms) becomes an *opaque* symbol named by its expression: two computations of the same thing
  still compare equal, and nothing is guessed.
- a *value* is a small numpy object array whose elements are ints, Fractions (float tensors), bools
  or terms, with a *kind* ("i", "f", "b"); `ShapeValues.value(name)` computes the value of a tensor
  from the nodes that produce it, or None where it is not determined by constants and shapes (a
  graph input's data, a tensor of more than MAX_ELEMENTS elements, an op this module does not know).
- `to_dim` / `from_dim` convert an element to and from graph.py's dim form (int, or a string that
  is a product of symbols, "4*batch").
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import numpy as np

# values beyond this many elements are not shape computations: not evaluated
MAX_ELEMENTS = 4096


class Term:
    """An integer polynomial over symbols: {monomial (sorted symbol names): coefficient}."""

    __slots__ = ("poly", "_key")

    def __init__(self, poly: dict[tuple[str, ...], int]):
        self.poly = {m: c for m, c in poly.items() if c}
        self._key = tuple(sorted(self.poly.items()))

    @staticmethod
    def make(poly: dict) -> "int | Term":
        poly = {m: c for m, c in poly.items() if c}
        if not poly:
            return 0
        if list(poly) == [()]:
            return poly[()]
        return Term(poly)

    @staticmethod
    def symbol(name: str) -> "Term":
        return Term({(name,): 1})

    @staticmethod
    def opaque(text: str) -> "Term":
        return Term.symbol("[" + text.replace("*", "\u00b7") + "]")

    def __eq__(self, other) -> bool:
        return isinstance(other, Term) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        parts = []
        for mono, c in self._key:
            names = list(mono)
            parts.append("*".join(([str(c)] if c != 1 or not names else []) + names))
        return "+".join(parts).replace("+-", "-")

    # arithmetic: ints and terms mix; results are ints again when no symbol is left
    def __add__(self, other):
        other = _poly(other)
        if other is None:
            return NotImplemented
        out = dict(self.poly)
        for m, c in other.items():
            out[m] = out.get(m, 0) + c
        return Term.make(out)

    __radd__ = __add__

    def __neg__(self):
        return Term.make({m: -c for m, c in self.poly.items()})

    def __sub__(self, other):
        other = _poly(other)
        if other is None:
            return NotImplemented
        return self + Term.make({m: -c for m, c in other.items()})

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        other = _poly(other)
        if other is None:
            return NotImplemented
        out: dict = {}
        for m1, c1 in self.poly.items():
            for m2, c2 in other.items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, 0) + c1 * c2
        return Term.make(out)

    __rmul__ = __mul__


def _poly(x) -> dict | None:
    if isinstance(x, Term):
        return x.poly
    if isinstance(x, (bool, np.bool_)):
        return {(): int(x)}
    if isinstance(x, (int, np.integer)):
        return {(): int(x)}
    return None


def exact_quotient(a, b):
    """a / b as an int or term when b divides a exactly (b an int or a monomial), else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    pa, pb = _poly(a), _poly(b)
    if pa is None or pb is None or len(pb) != 1:
        return None
    (mb, cb), = pb.items()
    if cb == 0:
        return None
    out = {}
    for m, c in pa.items():
        rest = list(m)
        for s in mb:
            if s not in rest:
                return None
            rest.remove(s)
        if c % cb:
            return None
        out[tuple(rest)] = c // cb
    return Term.make(out)


# ---- conversion to and from graph.py's dims ----------------------------------------------------
def from_dim(d):
    """A graph dim (int, "batch", "4*batch", None) as an element."""
    if isinstance(d, (int, np.integer)):
        return int(d)
    if d is None:
        return None
    coeff, names = 1, []
    for part in str(d).split("*"):
        if part.lstrip("-").isdigit():
            coeff *= int(part)
        else:
            names.append(part)
    return Term({tuple(sorted(names)): coeff}) if names else coeff


def to_dim(e):
    """An element as a graph dim: an int, or a string naming a product of symbols."""
    if isinstance(e, (bool, np.bool_)):
        return int(e)
    if isinstance(e, (int, np.integer)):
        return int(e)
    if isinstance(e, Fraction):
        return int(e) if e.denominator == 1 else None
    if isinstance(e, Term):
        if len(e.poly) == 1:
            (mono, c), = e.poly.items()
            if c > 0:
                return "*".join(([str(c)] if c != 1 else []) + list(mono))
        return "[" + repr(e).replace("*", "\u00b7") + "]"
    return None


def is_number(e) -> bool:
    return isinstance(e, (int, np.integer, bool, np.bool_, Fraction))


# ---- elementwise operations ----------------------------------------------------------------------
def _div(a, b, kind):
    if is_number(a) and is_number(b):
        if b == 0:
            raise _Undetermined
        if kind == "f":
            return Fraction(a) / Fraction(b)
        q = abs(int(a)) // abs(int(b))  # ONNX integer Div truncates toward zero
        return q if (a >= 0) == (b >= 0) else -q
    q = exact_quotient(a, b) if not isinstance(a, Fraction) and not isinstance(b, Fraction) else None
    if q is not None:
        return q
    return Term.opaque(f"{a}/{b}" if kind == "f" else f"{a}//{b}")


def _mod(a, b, kind):
    if is_number(a) and is_number(b):
        if b == 0:
            raise _Undetermined
        return a % b if kind == "f" else int(a) % int(b)  # fmod=0: the divisor's sign, as Python's %
    if exact_quotient(a, b) is not None:
        return 0
    return Term.opaque(f"{a}%{b}")


def _minmax(fn):
    def op(a, b, kind):
        if is_number(a) and is_number(b):
            return fn(a, b)
        if a == b:
            return a
        return Term.opaque(f"{fn.__name__}({a},{b})")
    return op


def _equal(a, b, kind):
    if is_number(a) and is_number(b):
        return bool(a == b)
    if isinstance(a, Term) and isinstance(b, Term) and a == b:
        return True
    return Term.opaque(f"{a}=={b}")


def _compare(name, fn):
    def op(a, b, kind):
        if is_number(a) and is_number(b):
            return bool(fn(a, b))
        return Term.opaque(f"{a}{name}{b}")
    return op


_BINARY: dict[str, Callable] = {
    "Add": lambda a, b, k: a + b,
    "Sub": lambda a, b, k: a - b,
    "Mul": lambda a, b, k: a * b,
    "Div": _div,
    "Mod": _mod,
    "Max": _minmax(max),
    "Min": _minmax(min),
    "Equal": _equal,
    "Less": _compare("<", lambda a, b: a < b),
    "Greater": _compare(">", lambda a, b: a > b),
    "LessOrEqual": _compare("<=", lambda a, b: a <= b),
    "GreaterOrEqual": _compare(">=", lambda a, b: a >= b),
}
_BOOL_RESULT = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}


class _Undetermined(Exception):
    """The value is not determined by constants and shapes."""


class Value:
    """A small tensor's elements (a numpy object array) and its kind: "i" ints, "f" floats, "b" bools."""

    __slots__ = ("array", "kind")

    def __init__(self, array, kind: str):
        if not isinstance(array, np.ndarray):  # numpy hands back a 0-d result as the element itself
            element, array = array, np.empty((), dtype=object)
            array[()] = element
        self.array = array
        self.kind = kind

    def elements(self) -> list:
        return self.array.reshape(-1).tolist()

    def ints(self) -> list[int]:
        """Every element as an int (raises _Undetermined when one is symbolic or fractional)."""
        out = []
        for e in self.elements():
            if isinstance(e, Fraction):
                if e.denominator != 1:
                    raise _Undetermined
                e = int(e)
            if not isinstance(e, (int, bool, np.integer, np.bool_)):
                raise _Undetermined
            out.append(int(e))
        return out

    def numeric(self) -> np.ndarray | None:
        """The value as a numpy array (int64, float32 or bool) when no element is symbolic."""
        if not all(is_number(e) for e in self.elements()):
            return None
        if self.kind == "b":
            return self.array.astype(bool)
        if self.kind == "f":
            return self.array.astype(np.float64).astype(np.float32)
        return self.array.astype(np.int64)


def _obj(values, shape=None) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr.reshape(shape if shape is not None else (len(values),))


def _kind_of_dtype(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "b"
    return "f" if np.issubdtype(dtype, np.floating) else "i"


# ONNX TensorProto element types -> kind (Cast's "to")
_CAST_KIND = {1: "f", 10: "f", 11: "f", 16: "f", 9: "b"}


class ShapeValues:
    """Evaluates tensors computed from constants and shapes (see the module docstring).

    `producer`: tensor -> node; `shape(name)`: dims (int or symbol string) or None;
    `constant(name)`: a stored constant's numpy value or None; `attr(node, name, default)`.
    """

    def __init__(self, producer: dict, shape: Callable, constant: Callable, attr: Callable):
        self.producer = producer
        self.shape = shape
        self.constant = constant
        self.attr = attr
        self.memo: dict[str, Value | None] = {}

    def value(self, name: str) -> Value | None:
        if not name:
            return None
        if name not in self.memo:
            self.memo[name] = None  # guards against cycles
            try:
                value = self._compute(name)
            except (_Undetermined, IndexError, ValueError, TypeError, ZeroDivisionError, OverflowError):
                value = None
            if value is not None and value.array.size > MAX_ELEMENTS:
                value = None
            self.memo[name] = value
        return self.memo[name]

    def elements(self, name: str) -> list | None:
        value = self.value(name)
        return None if value is None else value.elements()

    def integers(self, name: str) -> list | None:
        """The elements when every one is an integer or a symbolic integer: shape-op operands
        (Tile repeats, Pad pads, Slice bounds) of any other kind make ONNX refuse the node."""
        elements = self.elements(name)
        if elements is None or not all(isinstance(e, (int, np.integer, Term)) and not isinstance(e, (bool, np.bool_))
                                       for e in elements):
            return None
        return elements

    def dims(self, name: str) -> list | None:
        """A 1-D value as graph dims (int or symbol strings): a computed Reshape/Expand target."""
        value = self.value(name)
        if value is None or value.array.ndim > 1:
            return None
        dims = [to_dim(e) for e in value.elements()]
        return None if any(d is None for d in dims) else dims

    def numeric(self, name: str) -> np.ndarray | None:
        value = self.value(name)
        return None if value is None else value.numeric()

    # ---- evaluation ------------------------------------------------------------------------------
    def _need(self, name: str) -> Value:
        value = self.value(name)
        if value is None:
            raise _Undetermined
        return value

    def _ints(self, name: str) -> list[int]:
        return self._need(name).ints()

    def _opt_ints(self, node, idx: int, attr_name: str | None = None):
        if attr_name is not None:
            value = self.attr(node, attr_name, None)
            if value is not None:
                return [int(v) for v in value]
        if len(node.input) > idx and node.input[idx]:
            return self._ints(node.input[idx])
        return None

    def _compute(self, name: str) -> Value | None:
        stored = self.constant(name)
        if stored is not None:
            arr = np.asarray(stored)
            if arr.size > MAX_ELEMENTS:
                return None
            kind = _kind_of_dtype(arr.dtype)
            values = [Fraction(float(v)) if kind == "f" else (bool(v) if kind == "b" else int(v))
                      for v in arr.reshape(-1).tolist()]
            return Value(_obj(values, arr.shape), kind)
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op, ins = node.op_type, list(node.input)
        out_index = list(node.output).index(name)
        if op == "Shape":
            dims = self.shape(ins[0])
            if dims is None:
                return None
            start, end = int(self.attr(node, "start", 0)), self.attr(node, "end", None)
            dims = dims[slice(start, None if end is None else int(end))]
            return Value(_obj([from_dim(d) for d in dims]), "i")
        if op == "Size":
            dims = self.shape(ins[0])
            if dims is None:
                return None
            total = 1
            for d in dims:
                total = total * from_dim(d)
            return Value(_obj([total], ()), "i")
        if op == "Identity":
            return self._need(ins[0])
        if op == "Cast":
            return self._cast(self._need(ins[0]), _CAST_KIND.get(int(self.attr(node, "to", 7)), "i"))
        if op in ("Floor", "Ceil"):
            x = self._need(ins[0])
            fn = math.floor if op == "Floor" else math.ceil
            return Value(_obj([fn(e) if is_number(e) else e for e in x.elements()], x.array.shape), x.kind)
        if op == "Neg":
            x = self._need(ins[0])
            return Value(-x.array, x.kind)
        if op == "Not":
            x = self._need(ins[0])
            return Value(_obj([(not e) if is_number(e) else Term.opaque(f"not {e}") for e in x.elements()],
                              x.array.shape), "b")
        if op in _BINARY:
            return self._binary(op, self._need(ins[0]), self._need(ins[1]))
        if op == "Where":
            c, a, b = self._need(ins[0]), self._need(ins[1]), self._need(ins[2])
            cs, as_, bs = np.broadcast_arrays(c.array, a.array, b.array)
            flat = [x if cc is True else y if cc is False else (x if x == y else Term.opaque(f"{cc}?{x}:{y}"))
                    for cc, x, y in zip(cs.reshape(-1).tolist(), as_.reshape(-1).tolist(), bs.reshape(-1).tolist())]
            return Value(_obj(flat, cs.shape), a.kind)
        if op in ("Unsqueeze", "Squeeze"):
            x = self._need(ins[0])
            axes = self._opt_ints(node, 1, "axes")
            shape = list(x.array.shape)
            if op == "Unsqueeze":
                rank = len(shape) + len(axes)
                for a in sorted(a % rank for a in axes):
                    shape.insert(a, 1)
            else:
                axes = [a % len(shape) for a in axes] if axes is not None else [i for i, d in enumerate(shape) if d == 1]
                shape = [d for i, d in enumerate(shape) if i not in axes]
            return Value(x.array.reshape(shape), x.kind)
        if op == "Reshape":
            x = self._need(ins[0])
            target = self._ints(ins[1])
            target = [x.array.shape[i] if t == 0 and not self.attr(node, "allowzero", 0) else t
                      for i, t in enumerate(target)]
            return Value(x.array.reshape(target), x.kind)
        if op == "Flatten":
            x = self._need(ins[0])
            axis = int(self.attr(node, "axis", 1)) % max(x.array.ndim, 1) if x.array.ndim else 0
            return Value(x.array.reshape(int(np.prod(x.array.shape[:axis])), -1), x.kind)
        if op == "Transpose":
            x = self._need(ins[0])
            perm = self.attr(node, "perm", None)
            return Value(np.transpose(x.array, None if perm is None else list(perm)), x.kind)
        if op == "Gather":
            x, idx = self._need(ins[0]), self._need(ins[1])
            axis = int(self.attr(node, "axis", 0))
            indices = np.asarray(idx.ints(), dtype=np.int64).reshape(idx.array.shape)
            return Value(np.take(x.array, indices, axis=axis), x.kind)
        if op == "Concat":
            parts = [self._need(i) for i in ins if i]
            axis = int(self.attr(node, "axis", 0))
            return Value(np.concatenate([p.array for p in parts], axis=axis), parts[0].kind)
        if op == "Slice":
            x = self._need(ins[0])
            if self.attr(node, "starts", None) is not None:  # opset < 10: attributes
                starts, ends = list(self.attr(node, "starts")), list(self.attr(node, "ends"))
                axes, steps = self.attr(node, "axes", None), None
            else:
                starts, ends = self._ints(ins[1]), self._ints(ins[2])
                axes, steps = self._opt_ints(node, 3), self._opt_ints(node, 4)
            axes = list(range(len(starts))) if axes is None else list(axes)
            steps = [1] * len(starts) if steps is None else steps
            index = [slice(None)] * x.array.ndim
            for a, s, e, st in zip(axes, starts, ends, steps):
                index[int(a) % x.array.ndim] = slice(int(s), int(e), int(st))
            return Value(x.array[tuple(index)], x.kind)
        if op == "Split":
            x = self._need(ins[0])
            axis = int(self.attr(node, "axis", 0)) % x.array.ndim
            sizes = self._opt_ints(node, 1, "split")
            if sizes is None:
                count = len(node.output)
                sizes = [-(-x.array.shape[axis] // count)] * count
            bounds = np.cumsum([0] + list(sizes))
            index = [slice(None)] * x.array.ndim
            index[axis] = slice(int(bounds[out_index]), int(bounds[out_index + 1]))
            return Value(x.array[tuple(index)], x.kind)
        if op == "ConstantOfShape":
            dims = self._ints(ins[0])
            if int(np.prod(dims)) > MAX_ELEMENTS:
                return None
            fill = self.constant_attr(node)
            return Value(_obj([fill[0]] * int(np.prod(dims)), dims), fill[1])
        if op == "Range":
            start, limit, delta = (self._need(i).elements()[0] for i in ins[:3])
            if not all(is_number(v) for v in (start, limit, delta)) or delta == 0:
                return None
            count = max(int(math.ceil((limit - start) / delta)), 0)
            if count > MAX_ELEMENTS:
                return None
            kind = self._need(ins[0]).kind
            return Value(_obj([start + k * delta for k in range(count)]), kind)
        if op == "Expand":
            x = self._need(ins[0])
            shape = self._ints(ins[1])
            ones = np.ones(shape, dtype=np.int8) if int(np.prod(shape)) <= MAX_ELEMENTS else None
            if ones is None:
                return None
            return Value(np.broadcast_to(x.array, np.broadcast_shapes(x.array.shape, ones.shape)).copy(), x.kind)
        if op == "Tile":
            x = self._need(ins[0])
            return Value(np.tile(x.array, self._ints(ins[1])), x.kind)
        if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin"):
            return self._reduce(node, op)
        return None

    def constant_attr(self, node) -> tuple:
        """ConstantOfShape's fill value and its kind (0.0 float when absent)."""
        value = self.attr(node, "value", None)
        if value is None:
            return Fraction(0), "f"
        from ..io import tensor_values

        arr = np.asarray(tensor_values(value)).reshape(-1)
        kind = _kind_of_dtype(arr.dtype)
        v = arr[0].item()
        return (Fraction(v) if kind == "f" else bool(v) if kind == "b" else int(v)), kind

    def _cast(self, x: Value, kind: str) -> Value:
        def conv(e):
            if kind == "f":
                return Fraction(e) if is_number(e) else e
            if kind == "b":
                return bool(e) if is_number(e) else Term.opaque(f"bool({e})")
            if isinstance(e, Fraction):
                return int(e)  # truncation toward zero, as Cast to an integer type
            return int(e) if isinstance(e, (bool, np.bool_)) else e
        return Value(_obj([conv(e) for e in x.elements()], x.array.shape), kind)

    def _binary(self, op: str, a: Value, b: Value) -> Value:
        kind = "f" if "f" in (a.kind, b.kind) else a.kind
        xa, xb = np.broadcast_arrays(a.array, b.array)
        fn = _BINARY[op]
        flat = [fn(x, y, kind) for x, y in zip(xa.reshape(-1).tolist(), xb.reshape(-1).tolist())]
        if any(v is NotImplemented for v in flat):
            raise _Undetermined
        return Value(_obj(flat, xa.shape), "b" if op in _BOOL_RESULT else kind)

    def _reduce(self, node, op: str) -> Value:
        x = self._need(node.input[0])
        axes = self._opt_ints(node, 1, "axes")
        keep = bool(self.attr(node, "keepdims", 1))
        arr = x.array
        axes = list(range(arr.ndim)) if not axes else [a % arr.ndim for a in axes]
        fn = {"ReduceProd": lambda vs: _fold(vs, lambda p, q: p * q, 1),
              "ReduceSum": lambda vs: _fold(vs, lambda p, q: p + q, 0),
              "ReduceMax": lambda vs: _fold(vs, lambda p, q: _minmax(max)(p, q, x.kind), None),
              "ReduceMin": lambda vs: _fold(vs, lambda p, q: _minmax(min)(p, q, x.kind), None)}[op]
        moved = np.moveaxis(arr, axes, list(range(arr.ndim - len(axes), arr.ndim)))
        lead = moved.shape[:arr.ndim - len(axes)]
        flat = moved.reshape(int(np.prod(lead)) if lead else 1, -1)
        out = _obj([fn(row.tolist()) for row in flat], lead)
        if keep:
            out = out.reshape([1 if i in axes else d for i, d in enumerate(arr.shape)])
        return Value(out, x.kind)


def _fold(values, fn, start):
    acc = start
    for v in values:
        acc = v if acc is None else fn(acc, v)
    if acc is None:
        raise _Undetermined
    return acc
