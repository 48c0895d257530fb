"""Which neurons of a group are redundant, found from the weights alone (no reference).

- *dead*: every outgoing entry is zero (to ZERO_SHARE of the largest outgoing entry of the group):
  nothing reads it; it is removed;
- *copies*: neurons whose incoming entries are equal (inside a normalization: equal; where the
  value is set: equal, or positively proportional when the group's activations only meet
  positively homogeneous ops, `match.rescale.neutral_groups`). A copy computes a times its
  representative, so it is removed after adding a times its outgoing entries to the
  representative's: split neurons merge back into one; copies whose outgoing entries cancel (a
  clique) leave a representative that is dead, and go with it.

These are candidates: the pass that applies them proves the result with ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..walk import Group
from .widths import Widths

ZERO_SHARE = 1e-5  # outgoing entries below this share of the group's largest one count as zero
SAME_DIRECTION = 1e-9  # 1 - cosine of incoming entries below this: one direction (float32 copies: ~1e-14)
SAME_INSIDE = 1e-6  # relative difference of entries inside a normalization still counted equal
SAME_SCALE = 1e-5  # |a - 1| below this is an equal copy (a merge allowed across any activation)


@dataclass
class Cluster:
    representative: int
    copies: list[int]
    factors: list[float]  # copy = factor x representative


@dataclass
class Candidates:
    dead: list[int] = field(default_factory=list)
    clusters: list[Cluster] = field(default_factory=list)
    scale: float = 1.0  # the group's largest outgoing entry: what "zero" is measured against

    def __bool__(self) -> bool:
        return bool(self.dead or self.clusters)


def find(widths: Widths, group: Group, neutral: bool) -> Candidates:
    """Dead neurons and clusters of copies in one group (a neuron is in at most one of them), on
    the weights as the pending edits leave them."""
    out = Candidates()
    outgoing = widths.rows(group, {-1})
    if outgoing.shape[1] == 0:
        return out  # nothing reads the group through a weight: no way to tell dead neurons
    scale = out.scale = float(np.abs(outgoing).max() or 1.0)
    dead = np.abs(outgoing).max(axis=1) <= ZERO_SHARE * scale
    out.dead = np.flatnonzero(dead).tolist()
    value = widths.rows(group, {1})
    inside = widths.rows(group, {0})
    if value.shape[1] == 0:
        return out
    norms = np.linalg.norm(value, axis=1)
    alive = np.flatnonzero(~dead & (norms > 0))
    if len(alive) < 2:
        return out
    unit = value[alive] / norms[alive, None]
    cosine = unit @ unit.T
    factor = norms[alive][None, :] / norms[alive][:, None]  # [a, b]: b = factor x a
    ok = np.triu(cosine > 1 - SAME_DIRECTION, k=1)
    if not neutral:
        ok &= np.abs(factor - 1) <= SAME_SCALE
    pairs = [(int(a), int(b)) for a, b in np.argwhere(ok) if _same_inside(inside, alive[a], alive[b])]
    parent = list(range(len(alive)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in pairs:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    valid = {(a, b) for a, b in pairs}
    members: dict[int, list[int]] = {}
    for k in range(len(alive)):
        members.setdefault(root(k), []).append(k)
    for rep, ks in members.items():
        cluster = Cluster(int(alive[rep]), [], [])
        for k in ks:
            if (rep, k) in valid:  # a copy of the representative itself, not only of a copy of it
                cluster.copies.append(int(alive[k]))
                cluster.factors.append(float(factor[rep, k]))
        if cluster.copies:
            out.clusters.append(cluster)
    return out


def _same_inside(inside: np.ndarray, i: int, j: int) -> bool:
    """Equal entries inside a normalization (none: equal)."""
    if not inside.shape[1]:
        return True
    return bool(np.allclose(inside[j], inside[i], rtol=SAME_INSIDE,
                            atol=SAME_INSIDE * (np.abs(inside[i]).max() or 1.0)))


# ---- adaptive attackers: near-dead neurons and near-copies (an approximate reduction) ----------
NEAR_ZERO = 0.05  # outgoing norm below this share of the group's median one: nearly dead
NEAR_DIRECTION = 1e-2  # 1 - cosine of incoming entries below this: nearly a copy (unrelated: ~0.5)
NEAR_INSIDE = 1e-2  # relative difference of entries inside a normalization still nearly equal
NEAR_SCALE = 0.05  # |a - 1| for a near-copy across an activation that is not positively homogeneous


def find_near(widths: Widths, group: Group, neutral: bool, needed: int) -> Candidates:
    """At most `needed` neurons to remove, the closest to dead or to a copy first (an adaptive
    attacker's noisy copies and nearly silent dummies). Not exact: the caller measures the error
    the removal introduces and reports it."""
    out = Candidates()
    outgoing = widths.rows(group, {-1})
    if outgoing.shape[1] == 0 or needed <= 0:
        return out
    out.scale = float(np.abs(outgoing).max() or 1.0)
    carried = np.linalg.norm(outgoing, axis=1)
    share = carried / (np.median(carried) or 1.0)  # against a typical neuron's outgoing weights
    value, inside = widths.rows(group, {1}), widths.rows(group, {0})
    norms = np.linalg.norm(value, axis=1)
    options = [(float(share[i]) / NEAR_ZERO, "dead", int(i), -1, 1.0) for i in np.flatnonzero(share <= NEAR_ZERO)]
    alive = np.flatnonzero(norms > 0)
    if len(alive) > 1 and value.shape[1]:
        unit = value[alive] / norms[alive, None]
        distance = 1 - unit @ unit.T
        for a, b in np.argwhere(np.triu(distance < NEAR_DIRECTION, k=1)):
            i, j = int(alive[a]), int(alive[b])
            factor = float(norms[j] / norms[i])
            if not neutral and abs(factor - 1) > NEAR_SCALE:
                continue
            if inside.shape[1]:
                spread = np.abs(inside[i]).max() or 1.0
                if np.abs(inside[j] - inside[i]).max() > NEAR_INSIDE * spread:
                    continue
            options.append((float(distance[a, b]) / NEAR_DIRECTION, "copy", i, j, factor))
    used: set[int] = set()
    clusters: dict[int, Cluster] = {}
    for _, kind, i, j, factor in sorted(options):
        if len(used) >= needed:
            break
        if kind == "dead" and i not in used and i not in clusters:
            out.dead.append(i)
            used.add(i)
        elif kind == "copy" and j not in used and j not in clusters and i not in used:
            cluster = clusters.setdefault(i, Cluster(i, [], []))
            cluster.copies.append(j)
            cluster.factors.append(factor)
            used.add(j)
    out.clusters = list(clusters.values())
    return out
