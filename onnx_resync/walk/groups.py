"""Groups: what the walker hands to the later stages (match, permute, rescale, audit).

A *group* is a set of neurons that may be reordered together; each neuron is one element class of
the channel-flow model (channels.py). A group reindexes *slots*: (weight, axis, positions) wherever a
stored weight's axis lines up with the group's channels. A group also says who made its channels and
who reads them, as records, never as display strings:

- a *producer* is a layer that creates the group's channels: its node, the output tensor, the stored
  weights the layer itself reads (its weight and bias, quantization parameters), the bias added
  right after it (MatMul + Add writes a Gemm in two nodes) and the BatchNormalization right after
  it, when that normalization is the output's only reader;
- a *reader* is an op that reads the group's activations, with how many of its inputs are labelled
  (Add of two streams, or a Mul of two activations, differ from an Add of a bias).

From these, `Producer.sides` says which weights set a neuron's scale (the producer side: +1), which
cannot see it (inside a normalization: 0) and which see its inverse (the readers: -1); match's
rescale code reads that instead of looking at the graph again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class GroupSlot:
    """One weight axis that a group reindexes: positions[i] are the positions of the group's i-th neuron."""

    weight: str
    axis: int
    positions: np.ndarray  # (size, block) int64
    # (outer axis, index): the positions lie in this slice of the weight only (one direction of a
    # bidirectional RNN, whose units move independently of the other direction's); axes count in
    # the whole weight
    at: tuple[int, int] | None = None

    def part(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        """The part of `array` that the positions index (a view) and the axis they run along there."""
        return slot_part(array, self.axis, self.at)

    def name(self) -> str:
        """weight:axis, and [index] for a slice."""
        return f"{self.weight}:{self.axis}" + (f"[{self.at[1]}]" if self.at else "")

    def to_dict(self) -> dict:
        out = {"weight": self.weight, "axis": self.axis, "block": int(self.positions.shape[1])}
        if self.at is not None:
            out["at"] = list(self.at)
        return out


def slot_part(array: np.ndarray, axis: int, at: tuple[int, int] | None) -> tuple[np.ndarray, int]:
    """`array` itself, or its slice `at` = (outer axis, index) as a view; and where `axis` is there."""
    if at is None:
        return array, axis
    outer, index = at
    return array[(slice(None),) * outer + (index,)], axis - (axis > outer)


@dataclass
class Group:
    id: int
    size: int
    producers: list["Producer"]
    slots: list[GroupSlot]
    key: str  # structural identity (independent of weight values), used to match records
    # ops that read the group's activations: lets resync tell whether rescaling a neuron is neutral
    # (only positively homogeneous readers)
    readers: list["Reader"] = field(default_factory=list)
    # (head group key, head index): the dims inside one attention head (walk/heads.py), applied
    # after the head group, at the positions of head `index` once the heads have moved
    within: tuple[str, int] | None = None

    def sides(self) -> list[int]:
        """Per slot: +1 on the producer side, 0 inside a normalization, -1 on the reader side."""
        outside = {w for p in self.producers for w in p.outside()}
        inside = {w for p in self.producers for w in p.inside()}
        return [1 if s.weight in outside else 0 if s.weight in inside else -1 for s in self.slots]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "size": self.size,
            "key": self.key,
            "producers": [p.name for p in self.producers],
            "slots": [s.to_dict() for s in self.slots],
            "readers": [r.to_dict() for r in self.readers],
            **({"within": {"heads": self.within[0], "head": self.within[1]}} if self.within else {}),
        }


@dataclass
class PinnedReason:
    reason: str
    channels: int
    producers: list[str]


# the start of the reason for channels that must line up with a graph input's values (a recurrent
# state the caller feeds): its order is the interface's, as for channels that reach an output
INPUT_REASON = "meets graph input"


@dataclass
class WalkResult:
    groups: list[Group]
    pinned: list[PinnedReason]
    hidden_channels: int  # producer output channels
    permutable_channels: int  # hidden channels in a group of two or more
    output_channels: int  # hidden channels pinned because they reach a graph output
    singleton_channels: int  # hidden channels alone in their group (nothing to swap with)
    ops_without_rule: dict[str, int] = field(default_factory=dict)
    input_channels: int = 0  # hidden channels pinned because they meet a graph input's values
    # stored weight -> its layout (walk/layouts.py: an NCHWc filter): its slots index `logical(stored)`
    layouts: dict = field(default_factory=dict)

    @property
    def interface_channels(self) -> int:
        """Channels whose order the model's callers see: they reach an output or meet an input."""
        return self.output_channels + self.input_channels

    @property
    def inner_channels(self) -> int:
        """Hidden channels that are not interface: the ones that could move."""
        return self.hidden_channels - self.interface_channels

    @property
    def coverage(self) -> float:
        """Permutable hidden channels / hidden channels that are not interface (1.0 when there are
        none: nothing is left unpermutable; reports say "nothing to permute", never 100%)."""
        denominator = self.inner_channels
        return self.permutable_channels / denominator if denominator else 1.0

    def to_dict(self) -> dict:
        return {
            "coverage": self.coverage if self.inner_channels else None,  # 0 of 0: None
            "hidden_channels": self.hidden_channels,
            "permutable_channels": self.permutable_channels,
            "output_channels": self.output_channels,
            "input_channels": self.input_channels,
            "singleton_channels": self.singleton_channels,
            "groups": [g.to_dict() for g in self.groups],
            "pinned": [asdict(p) for p in self.pinned],
            "ops_without_rule": self.ops_without_rule,
        }


@dataclass(frozen=True, order=True)
class Producer:
    """A layer that creates channels, and the weights around it that set their scale."""

    name: str  # the node's name (its op type when unnamed): what reports show
    op_type: str
    domain: str
    output: str
    weights: tuple[str, ...] = ()  # stored weights the node reads (weight, bias, quantization parameters)
    bias: tuple[str, ...] = ()  # stored weights of a bias added right after (MatMul + Add)
    norm: str | None = None  # the BatchNormalization right after, when it is the only reader
    norm_scale: tuple[str, ...] = ()  # its scale and bias: they set the scale after the normalization
    norm_stats: tuple[str, ...] = ()  # its mean and variance: they follow the producer, inside
    storage: tuple[str, ...] = ()  # integers and zero points behind a DequantizeLinear: its scale carries them

    def outside(self) -> tuple[str, ...]:
        """Weights that scale the channel as the readers see it."""
        return self.norm_scale if self.norm else self.weights + self.bias

    def inside(self) -> tuple[str, ...]:
        """Weights that a rescale leaves as they are: what a normalization after them cancels, and
        quantized storage (its scale moves instead)."""
        return (self.weights + self.bias + self.norm_stats if self.norm else ()) + self.storage

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class Reader:
    """An op that reads a group's activations, and how many of its inputs carry labels."""

    op_type: str
    domain: str = ""
    labelled: int = 1
    node: str = ""  # its name (its op type when unnamed)

    def to_dict(self) -> dict:
        return {"op": self.op_type, "domain": self.domain, "labelled_inputs": self.labelled, "node": self.node}

    def __str__(self) -> str:
        return self.op_type if self.labelled <= 1 else f"{self.op_type}/{self.labelled}"
