"""The reduction: a model without its structural padding, each rewrite proven by ONNX Runtime.

First the inserted layers (layers.py), one at a time; then rounds over the walker's groups
(neurons.py): every group's dead neurons and copies are found on one walk and removed together
(widths.py); the candidate model is run against the input model (verify.verify) and kept only when
equivalent. When a round's joint rewrite fails, each group's rewrite is tried alone and the ones
that fail are refused (reported, never applied). Rounds repeat until nothing is left, so a dummy
that fed only dummies goes once they are gone, and a clique's representative once its copies are
merged.
"""

from __future__ import annotations

import time

import onnx

from ..match.rescale import neutral_groups
from ..walk import walk
import numpy as np

from . import constants, layers, neurons, targets
from .report import LayerReduction, ReduceReport
from .widths import Widths, editable

MAX_ROUNDS = 32
NEAR_ERROR = 0.05  # an approximate reduction may change the outputs by this much (normalized), reported


def reduce_model(model: onnx.ModelProto, *, verify_options: dict | None = None
                 ) -> tuple[onnx.ModelProto, ReduceReport]:
    """A reduced copy of `model` (the input is not changed) and what was removed."""
    t0 = time.perf_counter()
    report = ReduceReport()
    proof = _Proof(model, verify_options or {})
    current = _copy(model)
    current = _fold_layers(current, proof, report)
    current = _fold_constants(current, proof, report, verify_options or {})
    current = _reduce_neurons(current, proof, report)
    report.verified = proof.last is not None and proof.last.equivalent or not report.changed
    report.verify = proof.last.to_dict() if proof.last is not None else None
    report.seconds = time.perf_counter() - t0
    return current, report


class _Proof:
    """verify(input model, candidate): the last equivalent report is the proof of the result."""

    def __init__(self, model: onnx.ModelProto, options: dict):
        self.model, self.options, self.last, self.runs = model, options, None, 0
        self._feed_shapes = None

    def feed_shapes(self) -> dict:
        """The input plan's shapes (graph input -> shape): what targets.refit infers shapes with."""
        if self._feed_shapes is None:
            self._feed_shapes = _feed_shapes(self.model, self.options)
        return self._feed_shapes

    def __call__(self, candidate: onnx.ModelProto) -> tuple[bool, str]:
        from ..errors import ModelMismatchError
        from ..verify import CandidateRefused, explain, verify

        self.runs += 1
        try:
            result = verify(self.model, candidate, **self.options)
        except (CandidateRefused, ModelMismatchError) as exc:  # the rewritten model itself: not proven
            return False, f"the rewritten model is refused: {exc}"
        except Exception as exc:  # noqa: BLE001 - the check did not run: nothing is proven, the rewrite not blamed
            return False, f"the check could not run on the input model (not the rewrite's doing): {exc}"
        if result.equivalent:
            self.last = result
            return True, ""
        return False, explain(result, rewrite="the rewrite")


def _feed_shapes(model: onnx.ModelProto, options: dict) -> dict:
    from ..verify import plan_report

    try:
        _, feed = plan_report(model, **{k: v for k, v in options.items() if k in ("shapes", "device")})
    except Exception:  # noqa: BLE001 - no plan: targets are not fitted (ORT then refuses the rewrite)
        return {}
    return {name: tuple(np.shape(value)) for name, value in feed.items()}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _fold_layers(current: onnx.ModelProto, proof: _Proof, report: ReduceReport) -> onnx.ModelProto:
    refused: set[str] = set()
    while True:
        folds = [f for f in layers.find(current) if f.name not in refused]
        if not folds:
            return current
        fold = folds[0]
        trial = _copy(current)
        layers.apply(trial, fold)
        ok, why = proof(trial)
        if ok:
            current = trial
            report.folded.append(fold.to_dict())
        else:
            refused.add(fold.name)
            report.refused.append({"what": f"fold of an inserted {fold.kind} layer", "where": fold.name,
                                   "reason": why})


def _fold_constants(current: onnx.ModelProto, proof: _Proof, report: ReduceReport, options: dict
                    ) -> onnx.ModelProto:
    """Neurons with zero incoming weights: their constant output folded into the readers' biases,
    one group at a time, each proven."""
    result = walk(current)
    widths = Widths(current)
    plans = []
    for g in result.groups:
        if not editable(g, result.layouts):
            continue
        found = constants.zero_incoming(widths, g)
        alive = [int(i) for i in found if np.abs(widths.rows(g, {-1}, [i])).max(initial=0.0) > 0]
        slots = constants.readers(current, g) if alive else None
        if alive and slots:
            plans.append((g, alive, slots))
    if not plans:
        return current
    try:
        values = constants.channel_values(current, sorted({current.graph.node[k].input[0] for _, _, s in plans
                                                            for k, _ in s}), options)
    except Exception as exc:  # noqa: BLE001 - ORT cannot run the probe: nothing folded, said so
        report.refused.append({"what": "folding constant neurons", "where": "the model",
                               "reason": f"cannot read their values: {str(exc).strip().splitlines()[0][:200]}"})
        return current
    by_layer = {}
    for g, alive, slots in plans:
        keep = [i for i in alive if all(constants.constant(values[current.graph.node[k].input[0]][int(s.positions[i, 0])])
                                        for k, s in slots)]
        if not keep:
            continue
        trial = _copy(current)
        constants.fold(trial, g, keep, slots, values)
        w = Widths(trial)
        w.remove(g, keep)
        w.write()
        ok, why = proof(trial)
        if not ok:
            report.refused.append({"what": "folding constant neurons", "where": _layer(g), "reason": why})
            continue
        current = trial
        by_layer[_layer(g)] = LayerReduction(_layer(g), g.key, g.size, g.size - len(keep), constant=len(keep))
        break  # positions moved: the next group on a fresh walk
    else:
        return current
    report.layers.extend(by_layer.values())
    return _fold_constants(current, proof, report, options)


def _reduce_neurons(current: onnx.ModelProto, proof: _Proof, report: ReduceReport) -> onnx.ModelProto:
    refused: set[str] = set()
    by_layer: dict[str, LayerReduction] = {}
    for report.rounds in range(1, MAX_ROUNDS + 1):
        result = walk(current)
        neutral = {g.key for g in neutral_groups(result)}
        groups = [g for g in _readers_first(current, result.groups) if g.key not in refused and editable(g, result.layouts)]
        trial, counts = _apply(current, groups, neutral, shapes=proof.feed_shapes)
        if not counts:
            break
        ok, _ = proof(trial)
        if not ok:  # which group's rewrite is wrong: each alone, the first proven one is kept
            trial = None
            for g in [g for g in groups if g.key in {c[1] for c in counts}]:
                alone, alone_counts = _apply(current, [g], neutral, shapes=proof.feed_shapes)
                ok, why = proof(alone)
                if ok:
                    trial, counts = alone, alone_counts
                    break
                refused.add(g.key)
                report.refused.append({"what": "removing neurons", "where": _layer(g), "reason": why})
            if trial is None:
                continue
        current = trial
        for layer, group, width, after, kinds in counts:
            row = by_layer.setdefault(layer, LayerReduction(layer, group, width, width))
            row.reduced_to = after
            for kind, n in kinds.items():
                setattr(row, kind, getattr(row, kind) + n)
    report.layers.extend(by_layer.values())
    return current


def _readers_first(model: onnx.ModelProto, groups) -> list:
    """Groups whose producers come last in the graph first: a group's readers are reduced before it."""
    order = {n.name or n.op_type: k for k, n in enumerate(model.graph.node)}
    return sorted(groups, key=lambda g: -max((order.get(p.name, -1) for p in g.producers), default=-1))


def _layer(group) -> str:
    name = ", ".join(sorted({p.name for p in group.producers})) or group.key
    within = getattr(group, "within", None)
    return f"{name} (head {within[1]})" if within else name


def reduce_near(model: onnx.ModelProto, needed: dict[str, int], *, verify_options: dict | None = None,
                limit: float = NEAR_ERROR) -> tuple[onnx.ModelProto, list[dict], float]:
    """Remove `needed[group key]` neurons per group, the nearest to dead or to a copy first
    (neurons.find_near: an adaptive attacker's noisy copies); the error this introduces is
    measured with ONNX Runtime (max normalized output error against `model`) and must stay within
    `limit`. Returns (model, per layer {"layer", "group", "removed", "dummy", "split", "clique"},
    error); ValueError when the error is over the limit or nothing was found."""
    from ..verify import verify

    result = walk(model)
    neutral = {g.key for g in neutral_groups(result)}
    groups = [g for g in _readers_first(model, result.groups) if needed.get(g.key, 0) > 0 and editable(g, result.layouts)]
    trial, counts = _apply(model, groups, neutral, find=lambda w, g, n: neurons.find_near(w, g, n, needed[g.key]),
                           shapes=lambda: _feed_shapes(model, verify_options or {}))
    if not counts:
        raise ValueError("no neuron is nearly dead or nearly a copy of another")
    options = dict(verify_options or {}, tolerance=limit)
    check = verify(model, trial, **options)
    error = max((o.normalized_error for o in check.outputs), default=float("inf"))
    if not check.equivalent:
        raise ValueError(f"removing the nearest neurons changes the outputs by {error:.3g} (max normalized "
                         f"error), more than {limit:g}")
    rows = [{"layer": layer, "group": key, "removed": width - after, **kinds} for layer, key, width, after, kinds in counts]
    return trial, rows, error


def _not_gone(widths: Widths, group, found: neurons.Candidates) -> neurons.Candidates:
    """The candidates without neurons another group of this round already removed whole (a dummy
    head's dims go with the head: counted once)."""
    gone = {i for i in set(found.dead) | {j for c in found.clusters for j in [c.representative, *c.copies]}
            if widths.gone(group, i)}
    if not gone:
        return found
    found.dead = [i for i in found.dead if i not in gone]
    found.clusters = [c for c in found.clusters if c.representative not in gone and not gone & set(c.copies)]
    return found


def _apply(model: onnx.ModelProto, groups, neutral: set[str], find=neurons.find, shapes=dict
           ) -> tuple[onnx.ModelProto, list]:
    """A copy of the model with each group's dead neurons removed and its copies merged, and per
    group that changed: (layer, key, width, new width, {kind: neurons}); Reshape targets that carry
    a changed width fitted (targets.py; `shapes()`: the input plan's shapes)."""
    trial = _copy(model)
    widths = Widths(trial)
    counts, changed = [], set()
    # a whole head before its dims (walk/heads.py: a head's dims are a group `within` the head group)
    for g in sorted(groups, key=lambda g: getattr(g, "within", None) is not None):
        found = _not_gone(widths, g, find(widths, g, g.key in neutral))
        if not found:
            continue
        kinds = {"dummy": len(found.dead), "split": 0, "clique": 0}
        gone = set(found.dead)
        for cluster in found.clusters:
            for j, factor in zip(cluster.copies, cluster.factors):
                widths.add_outgoing(g, cluster.representative, j, factor)
            gone.update(cluster.copies)
            left = widths.rows(g, {-1}, [cluster.representative])
            if left.size == 0 or abs(left).max() <= neurons.ZERO_SHARE * found.scale:
                gone.add(cluster.representative)
                kinds["clique"] += len(cluster.copies) + 1
            else:
                kinds["split"] += len(cluster.copies)
        widths.remove(g, sorted(gone))
        counts.append((_layer(g), g.key, g.size, g.size - len(gone), kinds))
        changed |= targets.strides(g)
    if counts:
        widths.write()
        if targets.has_targets(trial):  # a width also in a Reshape (heads, a head's dims)
            targets.refit(model, trial, changed, shapes())
    return trial, counts
