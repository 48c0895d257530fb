"""What a reduction did: neurons removed per layer, layers folded, rewrites refused, the proof.

Vocabulary: a *dummy* neuron had no outgoing weight (nothing read it); a *split* neuron was a copy
(equal or positively proportional incoming weights) of another, merged back into it; a *clique*
neuron was one of copies whose outgoing weights cancel (merged, then nothing was left to read); a
*constant* neuron had no incoming weight (its output, the same for every input, went into its
readers' biases);
an *inserted layer* was folded into its readers (identity, monomial or other non-negative linear
layer after a Relu). A rewrite that ONNX Runtime did not prove equivalent is *refused* and listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..jsonable import json_safe

KINDS = ("dummy", "split", "clique", "constant")


@dataclass
class LayerReduction:
    layer: str  # the producers of the group's neurons
    group: str  # the group's key in the input model
    width: int  # neurons in the input model
    reduced_to: int
    dummy: int = 0
    split: int = 0
    clique: int = 0
    constant: int = 0


@dataclass
class ReduceReport:
    layers: list[LayerReduction] = field(default_factory=list)
    folded: list[dict] = field(default_factory=list)  # Fold.to_dict() of every inserted layer folded
    refused: list[dict] = field(default_factory=list)  # {"what", "where", "reason"}
    # a pruned copy padded to its reference (match/partial.py): {"layer", "group", "removed", "of", "kept"}
    pruned: list[dict] = field(default_factory=list)
    reference: object = None  # with `pruned`: the reference without its pruned neurons (an onnx.ModelProto)
    # an adaptive attacker's near-copies and near-dummies removed to reach the reference's widths
    # (pipeline.reduce_near): per layer {"layer", "group", "removed", "dummy", "split", "clique"}, and
    # the max normalized output error the removal introduced (measured by ONNX Runtime)
    approximate: list[dict] = field(default_factory=list)
    approximate_error: float | None = None
    # layers the reference lacks that do not fold (audit/depth.py: the layer sequences aligned with
    # gaps): {"layer" (the suspect's), "kind", "weights" (shapes), "chain" (its nodes, bypassed)}
    inserted: list[dict] = field(default_factory=list)
    rounds: int = 0
    verified: bool = False  # the reduced model was proven equivalent to the input (or nothing changed)
    verify: dict | None = None
    output: str | None = None
    seconds: float = 0.0

    def count(self, kind: str) -> int:
        return sum(getattr(r, kind) for r in self.layers)

    @property
    def changed(self) -> bool:
        return bool(self.folded) or any(self.count(k) for k in KINDS)

    def pruned_phrase(self) -> str:
        """'23 of 128 channels of layer3.conv1 removed' (per pruned layer)."""
        return "; ".join(f"{p['removed']} of {p['of']} channels of {p['layer']} removed" for p in self.pruned)

    def approximate_phrase(self) -> str:
        n = sum(r["removed"] for r in self.approximate)
        return (f"{n} near-copy or near-dummy neuron{'s' * (n != 1)} removed, changing the outputs by "
                f"{self.approximate_error:.2g} (max normalized error)") if self.approximate else ""

    def verdict(self) -> str:
        """A derived suspect's verdict: 'derived, structurally obfuscated: ...; perturbed: ...;
        pruned: ...'."""
        parts = [f"structurally obfuscated: {self.phrase()}"] if self.changed else []
        parts += [f"perturbed: {self.approximate_phrase()}"] if self.approximate else []
        parts += [f"pruned: {self.pruned_phrase()}"] if self.pruned else []
        parts += [f"deepened: {self.inserted_phrase()}"] if self.inserted else []
        return "derived, " + "; ".join(parts)

    def inserted_phrase(self) -> str:
        """'1 inserted layer that does not fold (left out): /blocks.3/extra/Conv'."""
        n = len(self.inserted)
        return (f"{n} inserted layer{'s' * (n != 1)} that do{'es' * (n == 1)} not fold (left out): "
                + ", ".join(i["layer"] for i in self.inserted))

    def headline(self) -> str:
        """What was done to the suspect before it was aligned (the first line of audit's evidence)."""
        parts = []
        if self.changed:
            parts.append(f"the suspect was reduced before alignment (each rewrite proven equivalent by ONNX Runtime): "
                         f"{self.phrase()}")
        if self.approximate:
            parts.append("the suspect was still wider than the reference: its nearest-to-dead or nearest-to-copy "
                         f"neurons removed (an adaptive attacker's noisy padding): {self.approximate_phrase()}")
        if self.pruned:
            parts.append("the suspect is narrower than the reference (a pruned copy): its layers paired regardless "
                         "of width, its neurons by a rectangular assignment (audit/widths.py); judged on the matched "
                         f"neurons: {self.pruned_phrase()}")
        if self.inserted:
            parts.append("the suspect has layers the reference lacks: the layer sequences aligned with gaps "
                         f"(audit/depth.py), {self.inserted_phrase()}; the rest judged")
        return "; ".join(parts)

    def phrase(self) -> str:
        """'19 dummy neurons, 12 split, 1 inserted identity layer' (empty when nothing changed)."""
        parts = []
        if self.count("dummy"):
            parts.append(f"{self.count('dummy')} dummy neuron{'s' * (self.count('dummy') != 1)}")
        if self.count("split"):
            parts.append(f"{self.count('split')} split")
        if self.count("clique"):
            parts.append(f"{self.count('clique')} in cancelling cliques")
        if self.count("constant"):
            parts.append(f"{self.count('constant')} constant folded into biases")
        kinds: dict[str, int] = {}
        for f in self.folded:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        for kind, n in kinds.items():
            parts.append(f"{n} inserted {kind} layer{'s' * (n != 1)}")
        return ", ".join(parts)

    def lines(self) -> list[str]:
        """Per layer, then the folded layers and the refusals."""
        out = []
        for r in self.layers:
            if r.dummy or r.split or r.clique or r.constant:
                what = ", ".join(f"{getattr(r, k)} {k}" for k in KINDS if getattr(r, k))
                out.append(f"  {r.layer}: {r.width} -> {r.reduced_to} neurons ({what})")
        for f in self.folded:
            out.append(f"  {f['layer']}: inserted {f['kind']} layer of {f['width']} channels, folded into "
                       f"{', '.join(f['readers'])}")
        for r in self.refused:
            out.append(f"  refused: {r['what']} at {r['where']} ({r['reason']})")
        for r in self.approximate:
            what = ", ".join(f"{r[k]} {k}" for k in KINDS if r.get(k))
            out.append(f"  {r['layer']}: {r['removed']} removed approximately ({what})")
        for p in self.pruned:
            out.append(f"  {p['layer']}: {p['removed']} of {p['of']} reference neurons pruned (rectangular "
                       "assignment; judged on the matched ones)")
        for i in self.inserted:
            out.append(f"  {i['layer']}: inserted {i['kind']} layer (weights {', '.join(i['weights'])}), not "
                       f"foldable: left out with {', '.join(i['chain'][1:]) or 'nothing else'}")
        return out

    def summary_lines(self) -> list[str]:
        head = (f"reduced: {self.phrase()}" if self.changed else "reduced: nothing to remove (no dummy, split or "
                "clique neuron, no foldable inserted layer)")
        lines = [head] + self.lines()
        if self.verify and self.changed:
            state = "equivalent to the input" if self.verified else self.verify.get("verdict", "not checked")
            lines.append(f"verified on {self.verify.get('provider')}: reduced model {state}")
        if self.output:
            lines.append(f"wrote {self.output}")
        return lines

    def to_dict(self) -> dict:
        data = {
            "changed": self.changed,
            "summary": self.phrase(),
            "dummy": self.count("dummy"), "split": self.count("split"), "clique": self.count("clique"),
            "constant": self.count("constant"),
            "layers": [vars(r) for r in self.layers if r.dummy or r.split or r.clique or r.constant],
            "pruned": self.pruned, "inserted": self.inserted,
            "approximate": self.approximate, "approximate_error": self.approximate_error,
            "folded": self.folded, "refused": self.refused, "rounds": self.rounds, "lines": self.lines(),
            "verified": self.verified, "verify": self.verify, "output": self.output,
            "seconds": round(self.seconds, 4),
        }
        return json_safe(data)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
