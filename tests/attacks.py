"""Structural obfuscation attacks on ONNX models, for the tests and tools (numpy + onnx only).

Neural structural obfuscation (Yan et al., USENIX Security 2023) and honest width/depth changes,
written on the walker's groups (onnx_resync.walk): a group's *slots* say which weight axes hold its
channels, and `Group.sides()` which of them set a neuron's value (+1, 0 inside a normalization)
and which read it (-1). Adding a neuron inserts one entry (one block, where a Flatten makes each
channel a block) into every slot of the group: producer rows, bias, BatchNormalization parameters,
every reader's input axis; the recorded intermediate shapes are dropped (inferred again).

- `dummies`: zero-outgoing neurons (random incoming weights);
- `cliques`: groups of 2-3 new neurons with one random incoming row, outgoing weights that cancel;
- `splits`: copies of existing neurons, incoming scaled by a > 0 (a = 1 unless the group's
  activations are positively homogeneous), outgoing split so that the two sum to the original;
- `prune`: structured pruning (Torch-Pruning's way: the neurons' rows and every reader's columns
  removed; the function changes);
- `insert_layer`: an identity (Net2Net) or monomial (permuted, positively scaled identity) 1x1 conv
  or Gemm + Relu after a Relu whose readers are all linear, the readers compensating the monomial;
  or a random one (a new layer: the function changes, nothing folds it);
- `permute_rescale`: a random permutation of every group and a neutral positive rescale;
- adaptive attackers (`noise`): nearly silent dummies, noisy split copies (the function changes a
  little: the reduction removes them approximately and reports the error).

Function-preserving attacks are applied to the groups where the layout allows it and then proven
with ONNX Runtime (`proven_groups`): a group whose width is also an attribute or a Reshape target
(attention heads, RNN units, Split sizes) is left alone, as a real attacker would have to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_resync.io import WeightStore
from onnx_resync.match.rescale import neutral_groups, undo_rescales
from onnx_resync.permute import permuted_copy, random_permutations
from onnx_resync.walk import walk

WIDTH_ATTACKS = ("dummies", "cliques", "splits")


@dataclass
class AttackLog:
    kind: str
    per_group: dict = field(default_factory=dict)  # group key (input model) -> neurons added/removed
    removed: dict = field(default_factory=dict)  # prune: group key -> the neurons removed (input model's order)
    layers: list = field(default_factory=list)  # inserted layers

    @property
    def neurons(self) -> int:
        return sum(self.per_group.values())


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _insert_at(slot, axis_len: int, k: int) -> np.ndarray | None:
    """Old-axis index before which k new neurons' blocks go (one per block entry), or None when the
    slot's layout cannot take a new neuron (a slice of one RNN direction, interleaved blocks)."""
    if slot.at is not None:
        return None
    p = slot.positions
    n, block = p.shape
    if block == 1:
        return np.full(k, p.max() + 1)
    start = p[0, 0]
    if np.array_equal(p, start + np.arange(n)[:, None] * block + np.arange(block)[None, :]):
        return np.full(k * block, start + n * block)
    return None


def layout_ok(group) -> bool:
    return all(_insert_at(s, 0, 1) is not None for s in group.slots)


def _entries(array, slot, i) -> np.ndarray:
    """Neuron i's entries in a slot: the array taken at its positions (the axis holds its block)."""
    return np.take(array, slot.positions[i], axis=slot.axis)


def widen(model: onnx.ModelProto, group, new: list[dict]) -> onnx.ModelProto:
    """A copy of `model` with neurons appended to `group`: new[t][slot index] = the entries of new
    neuron t in that slot (block along the slot's axis); `new[t]["update"]`: {(slot index, neuron):
    entries} replacing existing neurons' entries (a split source's outgoing half)."""
    return widen_many(model, [(group, new)])


def widen_many(model: onnx.ModelProto, edits: list[tuple]) -> onnx.ModelProto:
    """widen() for several groups of one walk at once, [(group, new)], every insertion in the walk's
    positions (each head of an attention block widened by one dim: the heads stay equal)."""
    out = copy_model(model)
    store = WeightStore(out)
    arrays: dict[str, np.ndarray] = {}
    inserts: dict[tuple[str, int], list] = {}
    for group, new in edits:
        for k, slot in enumerate(group.slots):
            array = arrays.setdefault(slot.weight, store.get(slot.weight).astype(np.float64))
            for t in new:
                for (sk, neuron), values in t.get("update", {}).items():
                    if sk == k:
                        view = np.moveaxis(array, slot.axis, 0)
                        view[slot.positions[neuron]] = np.moveaxis(values, slot.axis, 0)
            at = _insert_at(slot, array.shape[slot.axis], len(new))
            inserts.setdefault((slot.weight, slot.axis), []).append(
                (at, np.concatenate([t[k] for t in new], axis=slot.axis)))
    for (name, axis), parts in inserts.items():
        at = np.concatenate([a for a, _ in parts])
        arrays[name] = np.insert(arrays[name], at, np.concatenate([v for _, v in parts], axis=axis), axis=axis)
    for name, array in arrays.items():
        store.set(name, array)
    del out.graph.value_info[:]
    return out


def _random_like(array, slot, rng, i) -> np.ndarray:
    e = _entries(array, slot, i)
    scale = float(np.std(array)) or 1.0
    return rng.normal(0, scale, e.shape)


def _count(group, fraction: float) -> int:
    return max(1, int(round(fraction * group.size)))


def _new_neurons(model, group, kind: str, fraction: float, rng, neutral: bool, noise: float = 0.0) -> list[dict]:
    store = WeightStore(model)
    arrays = [store.get(s.weight).astype(np.float64) for s in group.slots]
    sides = group.sides()
    count = _count(group, fraction)
    new = []

    def incoming(source: int) -> dict:
        t = {}
        for k, (slot, side) in enumerate(zip(group.slots, sides)):
            if side == 1:
                t[k] = _random_like(arrays[k], slot, rng, source)
            elif side == 0:  # inside a normalization (variance > 0): a real neuron's entries
                t[k] = _entries(arrays[k], slot, source)
        return t

    if kind == "dummies":
        for _ in range(count):
            t = incoming(int(rng.integers(group.size)))
            for k, (slot, side) in enumerate(zip(group.slots, sides)):
                if side == -1:  # (an adaptive attacker: nearly silent instead of silent)
                    e = _entries(arrays[k], slot, 0)
                    t[k] = noise * (float(np.std(arrays[k])) or 1.0) * rng.standard_normal(e.shape)
            new.append(t)
    elif kind == "cliques":
        while len(new) < count:
            size = int(min(rng.integers(2, 4), max(2, count - len(new))))
            base = incoming(int(rng.integers(group.size)))
            outs = {k: [rng.normal(0, float(np.std(arrays[k])) or 1.0, _entries(arrays[k], s, 0).shape)
                        for _ in range(size - 1)] for k, (s, side) in enumerate(zip(group.slots, sides)) if side == -1}
            for k in outs:
                outs[k].append(-np.sum(outs[k], axis=0))
            for m in range(size):
                t = dict(base)
                for k in outs:
                    t[k] = outs[k][m]
                new.append(t)
    elif kind == "splits":
        for source in rng.choice(group.size, size=min(count, group.size), replace=False):
            a = float(rng.uniform(0.5, 2.0)) if neutral else 1.0
            t, update = {}, {}
            for k, (slot, side) in enumerate(zip(group.slots, sides)):
                e = _entries(arrays[k], slot, source)
                if side == 1:  # (an adaptive attacker: a noisy copy)
                    t[k] = a * e + noise * (float(np.std(e)) or 1.0) * a * rng.standard_normal(e.shape)
                elif side == 0:
                    t[k] = e
                else:
                    # one share per slot: rows that are copies of each other (another group's splits)
                    # stay copies
                    r = float(rng.uniform(0.2, 0.8))
                    t[k] = (1 - r) * e / a
                    update[(k, int(source))] = r * e
            t["update"] = update
            new.append(t)
    else:
        raise ValueError(kind)
    return new


def widen_groups(model: onnx.ModelProto, kind: str, fraction: float, seed: int = 0,
                 keys: list[str] | None = None, noise: float = 0.0) -> tuple[onnx.ModelProto, AttackLog]:
    """`kind` (dummies, cliques, splits) on `fraction` of each chosen group's width (at least 1);
    keys: the groups (default: proven_groups of the model). Not verified here (see attack())."""
    rng = np.random.default_rng(seed)
    log = AttackLog(kind)
    result = walk(model)
    keys = keys if keys is not None else [g.key for g in result.groups if layout_ok(g)]
    # producers first: a split's outgoing half rewrites its readers' rows, which later copies copy
    order = {n.name or n.op_type: k for k, n in enumerate(model.graph.node)}
    first = {g.key: min((order.get(p.name, 0) for p in g.producers), default=0) for g in result.groups}
    current = model
    for key in sorted(keys, key=lambda k: first.get(k, 0)):
        result = walk(current)  # positions move as other groups widen; keys name the original groups
        neutral = {g.key for g in neutral_groups(result)}
        group = next((g for g in result.groups if _same_group(g.key, key)), None)
        if group is None or not layout_ok(group):
            continue
        new = _new_neurons(current, group, kind, fraction, rng, group.key in neutral, noise)
        current = widen(current, group, new)
        log.per_group[key] = len(new)
    return current, log


def _same_group(key: str, original: str) -> bool:
    """Group keys are first slot + size: the same first slot names the same group after widening."""
    return key.split("/")[0] == original.split("/")[0]


@functools.lru_cache(maxsize=None)
def proven_groups(path: str, kind: str) -> tuple[str, ...]:
    """The groups of the model at `path` where `kind` keeps the function (ONNX Runtime), tried one
    group at a time with one new neuron: what the tests attack."""
    from onnx_resync.verify import verify

    model = onnx.load(path)
    keys = []
    for g in walk(model).groups:
        if not layout_ok(g):
            continue
        attacked, _ = widen_groups(model, kind, 0.0, seed=1, keys=[g.key])
        try:
            if verify(model, attacked).equivalent:
                keys.append(g.key)
        except Exception:  # noqa: BLE001 - ORT refuses the widened graph (a Reshape target, a Split size)
            pass
    return tuple(keys)


def prune(model: onnx.ModelProto, fraction: float, seed: int = 0, keys: list[str] | None = None
          ) -> tuple[onnx.ModelProto, AttackLog]:
    """Remove `fraction` of each chosen group's neurons (rows of the producer, columns of readers)."""
    from onnx_resync.reduce.widths import Widths
    from onnx_resync.verify import verify

    rng = np.random.default_rng(seed)
    log = AttackLog("prune")
    current = model
    result = walk(model)
    keys = keys if keys is not None else [g.key for g in result.groups if layout_ok(g)]
    for key in keys:
        group = next((g for g in walk(current).groups if _same_group(g.key, key)), None)
        if group is None or group.size < 4:
            continue
        k = min(group.size - 2, max(1, int(round(fraction * group.size))))
        drop = rng.choice(group.size, size=k, replace=False)
        trial = copy_model(current)
        w = Widths(trial)
        w.remove(group, drop.tolist())
        w.write()
        try:  # the width may also be elsewhere (a Split's sizes, a Reshape into heads): then left alone
            walk(trial)
            if verify(model, trial).verdict == "cannot check":
                continue
        except Exception:  # noqa: BLE001 - ONNX or ONNX Runtime refuses the pruned graph
            continue
        current = trial
        log.per_group[key] = k
        log.removed[key] = sorted(drop.tolist())
    return current, log


def insert_layer(model: onnx.ModelProto, kind: str = "identity", seed: int = 0, index: int = 0
                 ) -> tuple[onnx.ModelProto, AttackLog]:
    """Insert a linear layer + Relu after the index-th Relu whose readers are all Conv (group 1) or
    Gemm: identity, or monomial (y_k = d_k x_p(k), d > 0; the readers divide it back out)."""
    rng = np.random.default_rng(seed)
    out = copy_model(model)
    g = out.graph
    store = WeightStore(out)
    readers_of: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers_of.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    sites = []
    for n in g.node:
        if n.op_type != "Relu" or n.output[0] in outputs:
            continue
        rs = readers_of.get(n.output[0], [])
        ok = rs and all(
            r.input[0] == n.output[0] and len(r.input) > 1 and r.input[1] in store and (
                (r.op_type == "Conv" and all(a.i == 1 for a in r.attribute if a.name == "group"))
                or (r.op_type == "Gemm" and not any(a.name == "transA" and a.i for a in r.attribute)))
            for r in rs)
        if ok:
            sites.append((n, rs))
    if not sites:
        raise ValueError("no Relu whose readers are all linear")
    relu, rs = sites[index % len(sites)]
    first = rs[0]
    conv = first.op_type == "Conv"
    axis_of = {}
    for r in rs:
        trans_b = any(a.name == "transB" and a.i for a in r.attribute)
        axis_of[r.input[1]] = 1 if (r.op_type == "Conv" or trans_b) else 0
    c = store.shape(first.input[1])[axis_of[first.input[1]]]
    perm = np.arange(c) if kind in ("identity", "random") else rng.permutation(c)
    d = np.ones(c) if kind in ("identity", "random") else rng.uniform(0.5, 2.0, c)
    m = np.zeros((c, c))
    m[np.arange(c), perm] = d  # y_k = d_k x_perm(k)
    if kind == "random":  # a new layer (the function changes; nothing folds it): the readers left as they are
        m = rng.normal(0, 1 / np.sqrt(c), (c, c))
    for r in rs:  # W'[:, k] = W[:, perm(k)] / d_k
        name, axis = r.input[1], axis_of[r.input[1]]
        w = np.take(store.get(name).astype(np.float64), perm, axis=axis)
        shape = [1] * w.ndim
        shape[axis] = c
        store.set(name, w / d.reshape(shape))
    tag = f"inserted_{kind}_{index}"
    weight = numpy_helper.from_array((m.reshape(c, c, 1, 1) if conv else m).astype(np.float32), f"{tag}.weight")
    bias = numpy_helper.from_array(np.zeros(c, np.float32), f"{tag}.bias")
    g.initializer.extend([weight, bias])
    mid, act = f"{tag}.linear_out", f"{tag}.relu_out"
    layer = (helper.make_node("Conv", [relu.output[0], weight.name, bias.name], [mid], name=f"{tag}.conv",
                              kernel_shape=[1, 1]) if conv else
             helper.make_node("Gemm", [relu.output[0], weight.name, bias.name], [mid], name=f"{tag}.gemm", transB=1))
    act_node = helper.make_node("Relu", [mid], [act], name=f"{tag}.relu")
    for r in rs:
        r.input[0] = act
    nodes = list(g.node)
    k = next(i for i, n in enumerate(nodes) if n.output[0] == relu.output[0])
    new_nodes = [onnx.NodeProto() for _ in range(2)]
    new_nodes[0].CopyFrom(layer)
    new_nodes[1].CopyFrom(act_node)
    copies = [copy_node(n) for n in nodes[:k + 1]] + new_nodes + [copy_node(n) for n in nodes[k + 1:]]
    del g.node[:]
    g.node.extend(copies)
    log = AttackLog(f"insert_{kind}", layers=[layer.name])
    return out, log


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def permute_rescale(model: onnx.ModelProto, seed: int = 0, rescale: bool = True) -> onnx.ModelProto:
    """Every group permuted at random, every neutral group's neurons rescaled by a in [0.5, 2]."""
    result = walk(model)
    permuted, _ = permuted_copy(model, result, random_permutations(result, seed))
    if rescale:
        rng = np.random.default_rng(seed + 1)
        result = walk(permuted)
        groups = neutral_groups(result)
        scales = {g.key: -rng.uniform(np.log(0.5), np.log(2.0), g.size) for g in groups}
        undo_rescales(permuted, WeightStore(permuted), groups, scales)  # undo of -log a applies a
    return permuted


def attack(path: str, kind: str, fraction: float = 0.05, seed: int = 0, *, shuffle: bool = False,
           noise: float = 0.0) -> tuple[onnx.ModelProto, AttackLog]:
    """One attack on the model at `path` (on its proven groups), optionally followed by a
    permutation and a neutral rescale. noise (adaptive attackers, dummies and splits): dummies'
    outgoing weights and split copies' incoming ones get Gaussian noise of noise x their std (the
    function then changes a little)."""
    model = onnx.load(path)
    if kind in WIDTH_ATTACKS:
        attacked, log = widen_groups(model, kind, fraction, seed, keys=list(proven_groups(path, kind)), noise=noise)
    elif kind == "prune":
        attacked, log = prune(model, fraction, seed)
    elif kind in ("identity", "monomial"):
        attacked, log = insert_layer(model, kind, seed)
    else:
        raise ValueError(kind)
    if shuffle:
        attacked = permute_rescale(attacked, seed)
    return attacked, log


def constants(path: str, fraction: float = 0.05, seed: int = 0) -> tuple[onnx.ModelProto, AttackLog]:
    """Neurons with zero incoming weights (their 1-D parameters, bias and normalization, copied from
    a real neuron: a constant output) and random outgoing weights, the readers' biases compensating
    (W[:, i] x c subtracted; c read in ONNX Runtime); on the groups read only by Gemm/Conv."""
    from onnx_resync.reduce import constants as const
    from onnx_resync.reduce.widths import Widths

    rng = np.random.default_rng(seed)
    model = onnx.load(path)
    log = AttackLog("constants")
    current = model
    for key in proven_groups(path, "dummies"):
        group = next((g for g in walk(current).groups if _same_group(g.key, key)), None)
        slots = None if group is None else const.readers(current, group)
        if slots is None or any(len(current.graph.node[k].input) < 3 or not current.graph.node[k].input[2]
                                for k, _ in slots):
            continue  # (a reader without a bias would need one added: another structure)
        store = WeightStore(current)
        arrays = [store.get(s.weight).astype(np.float64) for s in group.slots]
        new = []
        for _ in range(_count(group, fraction)):
            source = int(rng.integers(group.size))
            t = {}
            for k, (slot, side) in enumerate(zip(group.slots, group.sides())):
                e = _entries(arrays[k], slot, source)
                if side == -1:
                    t[k] = rng.normal(0, float(np.std(arrays[k])) or 1.0, e.shape)
                else:
                    t[k] = e if arrays[k].ndim == 1 else np.zeros_like(e)
            new.append(t)
        widened = widen(current, group, new)
        group = next(g for g in walk(widened).groups if _same_group(g.key, key))
        slots = const.readers(widened, group)
        tensors = sorted({widened.graph.node[k].input[0] for k, _ in slots})
        values = {t: -v for t, v in const.channel_values(widened, tensors, {}).items()}
        const.fold(widened, group, list(range(group.size - len(new), group.size)), slots, values)
        from onnx_resync.verify import verify

        if not verify(current, widened).equivalent:  # a padded Conv reader: the bias cannot hold it
            continue
        current = widened
        log.per_group[key] = len(new)
    return current, log


# ---- attention heads: a whole dummy head, or a split dim in every head ------------------------
HEAD_ATTACKS = ("dummy heads", "split heads")


def heads(path: str, kind: str, seed: int = 0) -> tuple[onnx.ModelProto, AttackLog]:
    """On every attention block the walker finds (a head group with per-head dim groups):
    `dummy heads`: one more head, random query/key/value weights, nothing read from it (its rows
    of the output projection zero); `split heads`: one value dim of every head split in two (the
    copy's incoming weights equal, the output projection's rows shared), so the heads stay equal.
    The Reshape targets that hold the number of heads or the head size follow
    (onnx_resync.reduce.targets, as the reduction's own); each block proven by ONNX Runtime."""
    from onnx_resync.reduce.pipeline import _feed_shapes
    from onnx_resync.reduce.targets import refit
    from onnx_resync.verify import verify

    if kind not in HEAD_ATTACKS:
        raise ValueError(kind)
    rng = np.random.default_rng(seed)
    model = onnx.load(path)
    shapes = _feed_shapes(model, {})
    log = AttackLog(kind)
    current = model
    for head_key in sorted({g.within[0] for g in walk(model).groups if getattr(g, "within", None)}):
        groups = walk(current).groups
        head = next((g for g in groups if _same_group(g.key, head_key)), None)
        if head is None:
            continue
        if kind == "dummy heads":
            new = _new_neurons(current, head, "dummies", 0.0, rng, False)
            edits, stride = [(head, new)], head.slots[0].positions.shape[1]
        else:  # the per-head groups that a weight reads (the value dims; query/key dims meet in a product)
            within = [g for g in groups if g.within and _same_group(g.within[0], head_key) and -1 in g.sides()]
            edits, stride = [(g, _new_neurons(current, g, "splits", 0.0, rng, False)) for g in within], 1
        if not edits or not all(layout_ok(g) for g, _ in edits):
            continue
        trial = widen_many(current, edits)
        refit(current, trial, {stride}, shapes)
        try:
            if not verify(current, trial).equivalent:
                continue
        except Exception:  # noqa: BLE001 - ORT refuses the widened graph (a target refit could not fit)
            continue
        current = trial
        log.per_group[head_key] = sum(len(new) for _, new in edits)
    return current, log
