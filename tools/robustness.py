#!/usr/bin/env python3
"""Robustness of `resync` against perturbations, ours vs the paper's baseline: docs/robustness.md.

For every bundled model (models/MANIFEST.json, or models/*.onnx) and several seeds: permute every
group with a seeded random permutation, then perturb every weight tensor, resync against the
unperturbed reference, and count the neurons put back in their original place (neurons with an
identical twin, in either model, count as correct whichever twin they got). Alongside: the accuracy
of the perturbed model on the bundled test set (ONNX Runtime), and the same count for the baseline
that the paper's code uses (per layer, argmax of the cosine of incoming weights only, layers taken one
at a time in topological order with the input axis aligned by the previous layers' answers).

Perturbations ("weight tensors" = float kernels and matrices, 2+ dimensions larger than 1; biases
and normalization parameters are left alone, as pruning and quantization schemes do):
  noise k     Gaussian, std = k x std of the tensor, k in 0.1 0.5 1 2 5
  quant b     uniform per-tensor min-max quantization to b bits (2^b levels), b in 8 6 4 3 2
  prune p     the fraction p of each tensor with the smallest |w| set to 0, p in 0.1 .. 0.9
  finetune    models/variants/<name>_ft10/_ft50.onnx (trained further), then permuted
  rescale s   every neuron of every group whose readers are positively homogeneous (ReLU, max pool,
              linear ops) scaled by a ~ log-uniform[1/s, s] on its producer's rows and bias, 1/a on
              the other slots (consumer columns): the function is unchanged (checked)
Also the not-derived check: models/variants/<name>_seed1.onnx and an inconsistent shuffle (every
weight axis of every slot permuted on its own) against the reference.

Usage: python tools/robustness.py [--models models] [--seeds 3] [--only mlp,vgg] [--out docs]
Needs onnxruntime and matplotlib (not dependencies of the package).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_resync.io import WeightStore, load_model  # noqa: E402
from onnx_resync.match.matcher import _reindex, _rows, _summarize, _unit, match  # noqa: E402
from onnx_resync.permute import PermutationRecord, apply_permutations, random_permutations  # noqa: E402
from onnx_resync.match.rescale import neutral_groups, rescaled, undo_rescales  # noqa: E402
from onnx_resync.resync import decision_statistics, restore  # noqa: E402
from onnx_resync.walk import walk  # noqa: E402

SWEEPS = {
    "noise": [0.1, 0.5, 1.0, 2.0, 5.0],
    "quant": [8, 6, 4, 3, 2],
    "prune": [0.1, 0.3, 0.5, 0.7, 0.9],
    "finetune": ["ft10", "ft50"],
    "rescale": [1.5, 4.0, 16.0],
}
LABELS = {"noise": "noise k (x tensor std)", "quant": "bits", "prune": "fraction pruned",
          "finetune": "further training", "rescale": "rescale range s (a in [1/s, s])"}


# ---- perturbations ---------------------------------------------------------------------------
def weight_names(model: onnx.ModelProto) -> list[str]:
    """The weight tensors: float kernels and matrices (2+ dims); biases and normalization
    parameters are left alone, as pruning and quantization schemes do."""
    store = WeightStore(model)
    return [n for n in store.names() if store.dtype(n).kind == "f" and sum(d > 1 for d in store.shape(n)) >= 2]


def perturb(model: onnx.ModelProto, kind: str, strength, rng: np.random.Generator) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    store = WeightStore(out)
    for name in weight_names(out):
        w = store.get(name).astype(np.float64)
        if kind == "noise":
            w = w + rng.normal(0.0, strength * w.std(), w.shape)
        elif kind == "quant":
            lo, hi = w.min(), w.max()
            levels = 2 ** int(strength) - 1
            if hi > lo:
                w = lo + np.round((w - lo) / (hi - lo) * levels) * (hi - lo) / levels
        elif kind == "prune":
            k = int(round(strength * w.size))
            if k:
                idx = np.argpartition(np.abs(w).reshape(-1), k - 1)[:k]
                w.reshape(-1)[idx] = 0.0
        else:
            raise ValueError(kind)
        store.set(name, w)
    return out


def rescale_attack(model: onnx.ModelProto, wk, s: float, rng: np.random.Generator):
    """Scale each neuron of the neutral groups by a on its producer side (a BatchNormalization's
    scale and bias where one follows the producer) and 1/a on its consumers: the undo of the
    opposite scales."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    groups = neutral_groups(wk)
    log_a = {g.key: rng.uniform(-math.log(s), math.log(s), g.size) for g in groups}
    undo_rescales(model, WeightStore(out), groups, {k: -v for k, v in log_a.items()})
    return out, sum(g.size for g in groups)


def inconsistent_shuffle(model: onnx.ModelProto, wk, rng) -> onnx.ModelProto:
    """Every slot of every group permuted with its own permutation: not a symmetry."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    store = WeightStore(out)
    arrays: dict[str, np.ndarray] = {}
    for g in wk.groups:
        for slot in g.slots:
            arr = arrays.setdefault(slot.weight, store.get(slot.weight).copy())
            _reindex(*slot.part(arr), slot.positions, rng.permutation(g.size))
    for name, arr in arrays.items():
        store.set(name, arr)
    return out


# ---- scoring ---------------------------------------------------------------------------------
def success(groups, truth: PermutationRecord) -> tuple[int, int]:
    """(neurons back in place, neurons): found perm vs the true one; interchangeable twins count."""
    good = total = 0
    for gm in groups:
        true = np.asarray(truth.perms[gm.key])  # suspect neuron j holds reference neuron true[j]
        origin = true[gm.perm]  # reference neuron that the suspect neuron matched to i really is
        i = np.arange(gm.size)
        inv = np.argsort(true)  # where reference neuron i sits in the suspect
        ok = origin == i
        ok |= (gm.ref_class[i] >= 0) & (gm.ref_class[origin] == gm.ref_class[i])
        ok |= (gm.sus_class[gm.perm] >= 0) & (gm.sus_class[gm.perm] == gm.sus_class[inv])
        good += int(ok.sum())
        total += gm.size
    return good, total


def baseline(model: onnx.ModelProto, ref: WeightStore, sus: WeightStore, wk) -> dict[str, np.ndarray]:
    """The paper's re-synchronization: per layer, argmax of incoming-weight cosine, one layer at a time."""
    nodes = {n.name or n.op_type: n for n in model.graph.node}
    found: dict[int, np.ndarray] = {}
    axis_groups = {}
    for gi, g in enumerate(wk.groups):
        for slot in g.slots:
            axis_groups.setdefault((slot.weight, slot.axis), []).append((gi, slot))
    out = {}
    for gi, g in enumerate(wk.groups):
        producer_inputs = {i for p in g.producers if p.name in nodes for i in nodes[p.name].input}
        slots = [s for s in g.slots if s.weight in producer_inputs and len(ref.shape(s.weight)) >= 2]
        slots = slots or [s for s in g.slots if len(ref.shape(s.weight)) >= 2] or g.slots
        xr, xs = [], []
        for slot in slots:
            r = ref.get(slot.weight).astype(np.float32)
            s = sus.get(slot.weight).astype(np.float32)
            pending = {}
            for o in range(r.ndim):
                for hj, hslot in axis_groups.get((slot.weight, o), ()):
                    if o == slot.axis:
                        continue
                    if hj in found:
                        s = s.copy()
                        _reindex(s, o, hslot.positions, found[hj])
                    else:
                        pending.setdefault(o, []).append(hslot.positions)
            a, b = _rows(r, slot.axis, slot.positions), _rows(s, slot.axis, slot.positions)
            for o in sorted(pending, reverse=True):
                axis = 2 + (o if o < slot.axis else o - 1)
                a, b = _summarize(a, axis, pending[o]), _summarize(b, axis, pending[o])
            xr.append(a.reshape(g.size, -1))
            xs.append(b.reshape(g.size, -1))
        fr, fs = np.concatenate(xr, axis=1), np.concatenate(xs, axis=1)
        C = _unit(fr, np.linalg.norm(fr, axis=1)) @ _unit(fs, np.linalg.norm(fs, axis=1)).T
        found[gi] = C.argmax(axis=1)
        out[g.key] = found[gi]
    return out


def baseline_success(groups, base: dict[str, np.ndarray], truth: PermutationRecord) -> tuple[int, int]:
    good = total = 0
    for gm in groups:
        true = np.asarray(truth.perms[gm.key])
        origin = true[base[gm.key]]
        i = np.arange(gm.size)
        inv = np.argsort(true)
        ok = origin == i
        ok |= (gm.ref_class[i] >= 0) & (gm.ref_class[origin] == gm.ref_class[i])
        ok |= (gm.sus_class[base[gm.key]] >= 0) & (gm.sus_class[base[gm.key]] == gm.sus_class[inv])
        good += int(ok.sum())
        total += gm.size
    return good, total


def max_relative_difference(ref: WeightStore, other: WeightStore) -> float:
    """max |other - ref| / max |ref| over the float weights."""
    worst = 0.0
    for name in ref.names():
        r = ref.get(name)
        if r.dtype.kind == "f" and r.size:
            scale = float(np.abs(r).max()) or 1.0
            worst = max(worst, float(np.abs(other.get(name).astype(np.float64) - r).max()) / scale)
    return worst



def accuracy(model: onnx.ModelProto, data) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: data["input"]})[0]
    return float((np.argmax(logits, axis=-1) == data["labels"]).mean())


# ---- experiment ------------------------------------------------------------------------------
def run_one(ref_model, ref_store, wk, suspect_unpermuted, seed, data, perturbation=None):
    """Permute the suspect with `seed`, then perturb it (kind, strength, rng), resync, score ours
    and the baseline."""
    truth = random_permutations(wk, seed)
    sus = onnx.ModelProto()
    sus.CopyFrom(suspect_unpermuted)
    apply_permutations(sus, wk, truth)
    if perturbation is not None:
        sus = perturb(sus, *perturbation)
    sus_store = WeightStore(sus)
    t = time.perf_counter()
    result = match(ref_store, sus_store, wk)
    seconds = time.perf_counter() - t
    good, total = success(result.groups, truth)
    restored, scales = restore(sus, ref_model, wk, result)
    exact_rescales = rescaled(scales)
    rel = max_relative_difference(ref_store, WeightStore(restored))
    bgood, _ = baseline_success(result.groups, baseline(ref_model, ref_store, sus_store, wk), truth)
    return {
        "ours": good / total, "baseline": bgood / total, "neurons": total, "seconds": seconds,
        "evidence": decision_statistics(result.groups)[0], "evidence_median": decision_statistics(result.groups)[1],
        "accuracy": accuracy(sus, data) if data is not None else None,
        "rescaled": sum(g.rescale_detected for g in result.groups),
        "rescale_exact": exact_rescales, "restored_max_rel_diff": rel,
        "one_sided": sum(g.rescale_one_sided for g in result.groups),
        "result": result, "suspect": sus, "truth": truth,
    }


def model_list(models_dir: Path, only: list[str] | None) -> list[str]:
    manifest = models_dir / "MANIFEST.json"
    names = []
    if manifest.exists():
        data = json.loads(manifest.read_text())
        entries = data.get("models", data) if isinstance(data, dict) else data
        names = list(entries) if isinstance(entries, dict) else [e.get("name") for e in entries]
    if not names:
        names = sorted(p.stem for p in models_dir.glob("*.onnx"))
    names = [n for n in names if n and (models_dir / f"{n}.onnx").exists()]
    return [n for n in names if not only or n in only]


def sweep_model(models_dir: Path, name: str, seeds: list[int], log) -> list[dict]:
    ref_model = load_model(models_dir / f"{name}.onnx")
    ref_store = WeightStore(ref_model)
    wk = walk(ref_model)
    npz = models_dir / f"{name}_test.npz"
    data = dict(np.load(npz)) if npz.exists() else None
    base_acc = accuracy(ref_model, data) if data is not None else None
    rows = []

    def add(kind, strength, seed, suspect, perturbation=None):
        r = run_one(ref_model, ref_store, wk, suspect, seed, data, perturbation)
        r.update(model=name, kind=kind, strength=strength, seed=seed, reference_accuracy=base_acc)
        for k in ("result", "suspect", "truth"):
            r.pop(k)
        rows.append(r)
        log(f"{name:12s} {kind:9s} {strength!s:5s} seed {seed}: ours {100 * r['ours']:6.2f}%  "
            f"baseline {100 * r['baseline']:6.2f}%  acc {r['accuracy'] if r['accuracy'] is None else round(r['accuracy'], 3)}"
            f"  ev {r['evidence']:.2f}/{r['evidence_median']:.2f}  resc {r['rescaled']}/{r['rescale_exact']}/{r['one_sided']}  {r['seconds']:.2f}s")

    for seed in seeds:
        add("clean", 0, seed, ref_model)
        for k, kind in enumerate(("noise", "quant", "prune")):
            for j, strength in enumerate(SWEEPS[kind]):
                rng = np.random.default_rng([seed, k, j])
                add(kind, strength, seed, ref_model, (kind, strength, rng))
        for tag in SWEEPS["finetune"]:
            path = models_dir / "variants" / f"{name}_{tag}.onnx"
            if path.exists():
                add("finetune", tag, seed, load_model(path))
        for s in SWEEPS["rescale"]:
            attacked, _ = rescale_attack(ref_model, wk, s, np.random.default_rng(seed))
            add("rescale", s, seed, attacked)
        add("shuffled", "-", seed, inconsistent_shuffle(ref_model, wk, np.random.default_rng(seed)))
        other = models_dir / "variants" / f"{name}_seed1.onnx"
        if other.exists():
            add("seed1", "-", seed, load_model(other))
    return rows


# ---- report ----------------------------------------------------------------------------------
def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _cell(rows, key):
    return _mean([r[key] for r in rows])


def _collapsed(r) -> bool:
    """Task accuracy below half of the reference's (the issue's 'collapsed')."""
    return r["accuracy"] is not None and r["accuracy"] < 0.5 * r["reference_accuracy"]


def _pct(x) -> str:
    return "-" if x != x else f"{100 * x:.2f}"


def _worst(per_model: dict) -> str:
    name = min(per_model, key=per_model.get)
    return "all 100" if per_model[name] >= 1.0 else f"{_pct(per_model[name])} ({name})"


def summary_table(rows, names) -> list[str]:
    lines = ["| perturbation | strength | ours: success % (mean) | ours: worst model | baseline: success % (mean) | "
             "baseline: worst model | accuracy / reference (mean) | models collapsed |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("clean", "noise", "quant", "prune", "finetune", "rescale"):
        strengths = SWEEPS.get(kind, [0])
        for strength in strengths:
            sel = [r for r in rows if r["kind"] == kind and r["strength"] == strength]
            if not sel:
                continue
            per_model = {n: [r for r in sel if r["model"] == n] for n in names}
            ours = {n: _cell(v, "ours") for n, v in per_model.items() if v}
            base = {n: _cell(v, "baseline") for n, v in per_model.items() if v}
            rel = [r["accuracy"] / r["reference_accuracy"] for r in sel if r["accuracy"] is not None]
            collapsed = sorted({r["model"] for r in sel if _collapsed(r)})
            lines.append(
                f"| {kind} | {strength} | {_pct(_mean(ours.values()))} | {_worst(ours)} "
                f"| {_pct(_mean(base.values()))} | {_worst(base)} | {_mean(rel):.3f} | {', '.join(collapsed) or '-'} |")
    return lines


def model_tables(rows, names) -> list[str]:
    out = []
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        out += [f"### {name}", "", f"Reference accuracy {mine[0]['reference_accuracy']:.4f}; "
                f"{mine[0]['neurons']} permutable neurons.", "",
                "| perturbation | strength | ours % | baseline % | accuracy | evidence (weakest group) | resync s |",
                "|---|---|---|---|---|---|---|"]
        for kind in ("clean", "noise", "quant", "prune", "finetune", "rescale", "shuffled", "seed1"):
            for strength in SWEEPS.get(kind, ["-" if kind in ("shuffled", "seed1") else 0]):
                sel = [r for r in mine if r["kind"] == kind and r["strength"] == strength]
                if sel:
                    acc = _cell(sel, "accuracy")
                    out.append(f"| {kind} | {strength} | {_pct(_cell(sel, 'ours'))} | {_pct(_cell(sel, 'baseline'))} | "
                               f"{acc:.3f} | {_cell(sel, 'evidence'):.2f} | {_cell(sel, 'seconds'):.2f} |")
        out.append("")
    return out


def criteria(rows, names) -> list[str]:
    """The issue's pass/fail lines."""
    def check(label, sel):
        bad = [r for r in sel if r["ours"] < 0.99]
        worst = min((r["ours"] for r in sel), default=float("nan"))
        mark = "PASS" if sel and not bad else ("FAIL" if sel else "n/a")
        detail = "; ".join(sorted({f"{r['model']} {r['kind']} {r['strength']} seed {r['seed']}: {_pct(r['ours'])}%"
                                   for r in bad}))
        return f"- **{mark}** {label}: worst {_pct(worst)}% over {len(sel)} runs" + (f" ({detail})" if bad else "")

    return [
        check("noise, wherever accuracy has not collapsed below half, >= 99%",
              [r for r in rows if r["kind"] == "noise" and not _collapsed(r)]),
        check("quantization b >= 4, >= 99%", [r for r in rows if r["kind"] == "quant" and r["strength"] >= 4]),
        check("pruning p <= 0.7, >= 99%", [r for r in rows if r["kind"] == "prune" and r["strength"] <= 0.7]),
        check("fine-tuned 10% and 50%, >= 99%", [r for r in rows if r["kind"] == "finetune"]),
        check("rescaling (all neutral groups at once), >= 99%", [r for r in rows if r["kind"] == "rescale"]),
    ]


def verdict_lines(rows, names) -> list[str]:
    derived = [r for r in rows if r["kind"] not in ("shuffled", "seed1") and not _collapsed(r)]
    lines = ["| model | seed1: evidence | shuffled: evidence | derived, accuracy not collapsed: lowest evidence (case) |",
             "|---|---|---|---|"]
    for name in names:
        s1 = [r["evidence"] for r in rows if r["model"] == name and r["kind"] == "seed1"]
        sh = [r["evidence"] for r in rows if r["model"] == name and r["kind"] == "shuffled"]
        mine = [r for r in derived if r["model"] == name]
        low = min(mine, key=lambda r: r["evidence"]) if mine else None  # inf: exact copies only
        lines.append(f"| {name} | {max(s1):.2f} (max)" if s1 else f"| {name} | -")
        lines[-1] += f" | {max(sh):.2f} (max)" if sh else " | -"
        lines[-1] += (f" | {low['evidence']:.2f} ({low['kind']} {low['strength']})" if low else " | -") + " |"
    return lines


def plot(rows, names, kind, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strengths = SWEEPS[kind]
    x = np.arange(len(strengths))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, name in enumerate(names):
        sel = [[r for r in rows if r["model"] == name and r["kind"] == kind and r["strength"] == s] for s in strengths]
        if not any(sel):
            continue
        color = f"C{k % 10}"
        ax1.plot(x, [100 * _cell(v, "ours") if v else np.nan for v in sel], "-o", color=color, label=f"{name}")
        ax1.plot(x, [100 * _cell(v, "baseline") if v else np.nan for v in sel], "--x", color=color, alpha=0.7)
        ax2.plot(x, [_cell(v, "accuracy") if v else np.nan for v in sel], "-o", color=color, label=name)
    for ax in (ax1, ax2):
        ax.set_xticks(x, [str(s) for s in strengths])
        ax.set_xlabel(LABELS[kind])
        ax.grid(alpha=0.3)
    ax1.set_ylabel("neurons back in place (%)")
    ax1.set_title(f"{kind}: ours (solid) vs baseline (dashed)")
    ax1.set_ylim(-2, 102)
    ax2.set_ylabel("test accuracy of the perturbed model")
    ax2.set_title(f"{kind}: task damage")
    ax2.set_ylim(0, 1.02)
    ax1.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(rows, out: Path, names, seeds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("noise", "quant", "prune", "finetune", "rescale"):
        if any(r["kind"] == kind for r in rows):
            plot(rows, names, kind, out / f"robustness_{kind}.png")
    rescale = [r for r in rows if r["kind"] == "rescale"]
    lines = [
        "# Robustness of `resync`",
        "",
        "Written by `tools/robustness.py` (run it again to refresh; the raw rows go to `--json`).",
        "",
        f"Protocol: for every bundled model and {seeds} seeds, every permutable group is permuted "
        "(seeded), then every weight tensor is perturbed (the float kernels and matrices: tensors with 2+ "
        "dimensions larger than 1; biases and normalization parameters are left alone, as pruning and "
        "quantization schemes do); `resync` is run against the unperturbed reference. "
        "**Success** = fraction of the permutable neurons put back in their original place (a neuron with "
        "an identical twin in either model, e.g. dead or pruned to zero, counts as placed whichever twin it "
        "got). **Accuracy** = the perturbed model's accuracy on the bundled test set (ONNX Runtime, CPU). "
        "**Baseline** = the re-synchronization of the paper's code: per layer, argmax of the cosine of the "
        "incoming weights only, layers one at a time in topological order with the input axis aligned by the "
        "previous layers' answers (not a bijection). Both run on the same perturbed suspects.",
        "",
        "Perturbations: Gaussian noise with std = k x the tensor's std; uniform per-tensor min-max "
        "quantization to b bits; magnitude pruning of a fraction p of each tensor; the bundled model trained "
        "further for 10% / 50% of its epochs (`models/variants/<name>_ft10/_ft50.onnx`); rescaling: every "
        "neuron of every group whose activations only meet positively homogeneous or linear ops (ReLU, max "
        "pool, ...) scaled by a ~ log-uniform[1/s, s] on its producer's rows and bias and by 1/a on its "
        "consumers (the function is unchanged).",
        "",
        "## The issue's criteria",
        "",
        *criteria(rows, names),
        "",
        "## Summary over models (mean of the per-model means over seeds)",
        "",
        *summary_table(rows, names),
        "",
    ]
    for kind in ("noise", "quant", "prune", "finetune", "rescale"):
        if (out / f"robustness_{kind}.png").exists():
            lines += [f"![{kind}](robustness_{kind}.png)", ""]
    if rescale:
        exact = sum(r["rescale_exact"] for r in rescale)
        worst = max(r["restored_max_rel_diff"] for r in rescale)
        lines += ["## Rescaling", "",
                  f"{len(rescale)} attacked suspects: {exact} rescaled neurons found exactly and undone in total "
                  f"(neurons with |log a| < 1e-4 are not counted); the restored weights differ from the "
                  f"reference's by at most {worst:.2e} of the tensor's largest magnitude (float rounding).", ""]
    lines += ["## Not derived", "",
              "Decision statistic (`onnx_resync/resync.py`): the weakest voting group's *evidence*, i.e. the "
              "median over its neurons of (matched similarity - best other candidate) / spread of the "
              "similarities with unrelated neurons; groups that cannot tell even an exact copy from chance "
              "abstain, and groups whose neurons are byte-identical to their matches agree by definition "
              "(a model made only of those has infinite evidence). Derived at >= 1.", "",
              *verdict_lines(rows, names), "",
              "## Per model", "", *model_tables(rows, names)]
    (out / "robustness.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--json", help="also dump the raw rows here")
    args = ap.parse_args(argv)
    models_dir = Path(args.models)
    names = model_list(models_dir, args.only.split(",") if args.only else None)
    if not names:
        print(f"no models in {models_dir}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        rows += sweep_model(models_dir, name, list(range(args.seeds)), lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    write_report(rows, Path(args.out), names, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
