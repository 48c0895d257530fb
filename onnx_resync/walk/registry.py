"""The op registry: one declaration per op, read by every stage.

An *op spec* says everything the package knows about one ONNX op type (in one domain, from one
opset version on): the walker *rule* that moves channel labels through it (rules/, one file per
family), the *attributes* the rule reads with their defaults (ONNX's defaults: a rule never writes
one by hand), and the *properties* that other stages ask about:

- `stacked`: the rule reads stacked labels itself (walk/channels.py); before any other rule the
  walker ties the directions of a stacked input;
- `layout`: only moves or selects values: a tensor filled with one value stays filled with one value;
- `weight_view`: a weight passed through it is still that weight (Identity, Cast, Reshape, ...);
- `homogeneous`: scaling its labelled input by a > 0 scales its output by a (ReLU, pooling, linear
  ops); `homogeneous_joint`: also with several labelled inputs (Add, Concat: a sum of scaled
  activations; not Mul: a product scales by a^2);
- `linear_producer`: creates channels by a linear map whose rows may be rescaled (not an RNN,
  whose state feeds back);
- `foldable`: audit's canonical form evaluates it when every input is a constant;
- `quantized_view`: moves or selects quantized values without arithmetic (the same op on the float
  tensor); `float_form`: the float op a quantized one computes (QLinearSigmoid -> Sigmoid);
- `trivial`: does not change what a tensor *is*, for audit's structural roles;
- `commutative`: its inputs may be given in any order; `output_type`: "bool" or "int64" when its
  output type does not follow its inputs; `shape_reader`: reads only its input's shape;
- `output_shapes`: for ops ONNX shape inference does not know (ONNX Runtime's contrib ops), a
  function (node, shape_of) -> per output its dims (None: unknown), or (dims, element type or the
  name of the input whose element type it has), where shape_of(i) is
  the dims of input i (None when absent or unknown); walk/graph.py feeds the results back;
- `input_dims`: the sizes the op's schema requires of its inputs' axes (an attention cache's heads and
  head size, a recurrent state's hidden size; a preferred size too: an empty past), a function (node, shape_of) -> {input index: {axis:
  (size, words)}}, words such as "needs head size 16"; the input plan (inputs.py) sizes a graph input's
  symbolic dims by them;
- `quantizes_activations`: the op may quantize or round its float activations before computing
  (MatMulNBits at accuracy_level 4: int8 per block of K), a function node -> the attribute values
  under which it computes on them as given (its *exact form*), or None for a node that does not:
  there a correct permutation that reorders a float sum upstream moves a value across a quantization
  step, so verify compares two such models in their exact form (verify.py).

An op that is not registered has no rule: the walker pins everything it touches (nothing is
guessed). A registered op with `rule=None` is known to the other stages and pinned by the walker.
`lookup` takes the entry with the highest `since` at or below the model's opset for that domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

STANDARD = ""
MICROSOFT = "com.microsoft"
_STANDARD_ALIASES = ("", "ai.onnx")


@dataclass(frozen=True)
class OpSpec:
    op_type: str
    domain: str = STANDARD
    rule: Callable | None = None
    since: int = 1
    attributes: dict = field(default_factory=dict)  # name -> default, for every attribute the rule reads
    stacked: bool = False
    layout: bool = False
    weight_view: bool = False
    homogeneous: bool = False
    homogeneous_joint: bool = False
    linear_producer: bool = False
    foldable: bool = False
    quantized_view: bool = False
    float_form: str | None = None
    trivial: bool = False
    commutative: bool = False
    output_type: str | None = None
    shape_reader: bool = False
    output_shapes: Callable | None = None
    input_dims: Callable | None = None
    quantizes_activations: Callable | None = None

    @property
    def name(self) -> str:
        return self.op_type if self.domain == STANDARD else f"{self.domain}.{self.op_type}"


_SPECS: dict[tuple[str, str], list[OpSpec]] = {}


def declare(op_type: str, rule: Callable | None = None, *, domain: str = STANDARD, **properties) -> OpSpec:
    """Register one op (a family file's declarations call this at import)."""
    spec = OpSpec(op_type, domain, rule, **properties)
    versions = _SPECS.setdefault((domain, op_type), [])
    if any(v.since == spec.since for v in versions):
        raise ValueError(f"{spec.name} since opset {spec.since} is declared twice")
    versions.append(spec)
    versions.sort(key=lambda v: v.since)
    return spec


def _domain(domain: str) -> str:
    return STANDARD if domain in _STANDARD_ALIASES else domain


def lookup(op_type: str, domain: str = STANDARD, opset: int | None = None) -> OpSpec | None:
    """The declaration that applies to `op_type` in `domain` at `opset` (None: the newest)."""
    _load()
    versions = _SPECS.get((_domain(domain), op_type))
    if not versions:
        return None
    if opset is None:
        return versions[-1]
    fitting = [v for v in versions if v.since <= opset]
    return fitting[-1] if fitting else versions[0]


def spec_of(node, opsets: dict[str, int] | None = None) -> OpSpec | None:
    domain = _domain(node.domain)
    return lookup(node.op_type, domain, (opsets or {}).get(domain))


def specs() -> Iterator[OpSpec]:
    """Every declaration, every version."""
    _load()
    for versions in _SPECS.values():
        yield from versions


def having(prop: str, domain: str | None = STANDARD) -> frozenset[str]:
    """Op types (of `domain`; None: every domain) with a true property in any of their versions."""
    return frozenset(s.op_type for s in specs() if getattr(s, prop) and (domain is None or s.domain == domain))


_DECLARED = object()


def attr(node, name: str, default=_DECLARED):
    """Attribute `name` of `node`; if absent, `default`, or without one the default that the op's
    registry entry declares (KeyError if it declares none: a rule may read only declared attributes)."""
    import onnx  # the registry itself stays free of onnx for readers of the table

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    if default is not _DECLARED:
        return default
    _load()
    # the newest version that declares it: versions differ in which attributes exist, never in a
    # default, and a rule reads both forms (Squeeze's axes attribute before opset 13, input after)
    for spec in reversed(_SPECS.get((_domain(node.domain), node.op_type), [])):
        if name in spec.attributes:
            return spec.attributes[name]
    raise KeyError(f"{node.op_type} declares no attribute {name!r}")


_loaded = False


def _load() -> None:
    """Import the rule families (their declarations fill the registry) on first use."""
    global _loaded
    if not _loaded:
        _loaded = True
        from . import rules  # noqa: F401
