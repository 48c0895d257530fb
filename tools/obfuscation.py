#!/usr/bin/env python3
"""Structural obfuscation against resync and audit: docs/obfuscation.md (table attack x model).

For every bundled model and every attack of tests/attacks.py (dummy, clique and split neurons at 5%
and 50% of every group the attack can widen; an inserted identity or monomial layer; structured
pruning of 10% and 50%; constant neurons at 10% (zero incoming weights, the readers' biases
compensating; groups read by Gemm or an unpadded Conv only); adaptive attackers: nearly silent
dummies and noisy split copies at 10%; attention heads: a dummy head per block, a split value dim in
every head; deepened: a random 1x1 conv (Gemm) + Relu inserted, which nothing folds), each followed
by a random permutation of every group and a neutral positive rescale (pruning: permutation only):
resync the attacked copy against the reference and record the verdict, what the reduction removed,
the share of reference neurons matched, the evidence and whether the restored model was verified
equivalent to the suspect, and audit the same copy; then attack the model's `_seed1` variant
(trained from another seed: unrelated) the same way and resync and audit it against the same
reference: it must stay not derived.

Usage: python tools/obfuscation.py [--models models] [--only mlp,vgg] [--out docs/obfuscation.md]
"""

from __future__ import annotations

import argparse
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import attacks  # noqa: E402

from onnx_resync import api  # noqa: E402
from onnx_resync.errors import ResyncError  # noqa: E402

ATTACKS = [("dummies", 0.05), ("dummies", 0.5), ("cliques", 0.05), ("cliques", 0.5), ("splits", 0.05),
           ("splits", 0.5), ("identity", 0.0), ("monomial", 0.0), ("prune", 0.1), ("prune", 0.5),
           ("constants", 0.1), ("noisy dummies", 0.1), ("noisy splits", 0.1), ("dummy heads", 0.0),
           ("split heads", 0.0), ("deepened", 0.0)]
NOISE = 0.01  # adaptive attackers: x the std of the weights (dummies' outgoing, split copies' incoming)
MODELS = ["mlp", "vgg", "resnet", "mobilenet", "csp", "transformer", "gru"]


def _attacked(path: str, kind: str, fraction: float, seed: int):
    if kind.startswith("noisy "):
        return attacks.attack(path, kind.split()[1], fraction, seed, shuffle=True, noise=NOISE)
    if kind == "constants":
        model, log = attacks.constants(path, fraction, seed)
        return attacks.permute_rescale(model, seed), log
    if kind == "deepened":  # a random 1x1 conv (Gemm) + Relu: a new layer, nothing folds it
        model, log = attacks.insert_layer(onnx.load(path), "random", seed)
        return attacks.permute_rescale(model, seed), log
    if kind in attacks.HEAD_ATTACKS:
        model, log = attacks.heads(path, kind, seed)
        return attacks.permute_rescale(model, seed), log
    if kind == "prune":
        pruned, log = attacks.prune(onnx.load(path), fraction, seed)
        return attacks.permute_rescale(pruned, seed, rescale=False), log
    return attacks.attack(path, kind, fraction, seed, shuffle=True)


def _one(path: str, reference: str, kind: str, fraction: float, seed: int, work: Path) -> dict:
    try:
        model, log = _attacked(path, kind, fraction, seed)
    except ValueError as exc:  # no site for the attack (no Relu read only by linear layers)
        return {"cell": f"n/a ({exc})"}
    if kind not in ("identity", "monomial", "deepened") and not log.per_group:
        return {"cell": "n/a (no group the attack can change)"}
    suspect, out = work / "suspect.onnx", work / "restored.onnx"
    onnx.save(model, suspect)
    t0 = time.perf_counter()
    try:
        _, report = api.resync(str(suspect), reference, out)
    except ResyncError as exc:
        return {"cell": f"error (exit {exc.exit_code}): {str(exc)[:80]}", "derived": None,
                "audit": _audit(suspect, reference)}
    seconds = time.perf_counter() - t0
    red = report.reduction or {}
    removed = sum(red.get(k, 0) for k in ("dummy", "split", "clique", "constant"))
    pruned = sum(p["removed"] for p in red.get("pruned", []))
    near = sum(p["removed"] for p in red.get("approximate", []))
    what = ", ".join(x for x in (
        f"{removed} removed" if removed else "", f"{len(red.get('folded', []))} layer folded" if red.get("folded") else "",
        f"{pruned} pruned" if pruned else "",
        f"{near} removed approximately (output error {red['approximate_error']:.1e})" if near else "") if x)
    share = 100 * report.matched / max(report.neurons, 1)
    evidence = "inf" if report.evidence == float("inf") else f"{report.evidence:.2f}"
    word = "derived" if report.derived else "not derived"
    cell = f"{word}; {what or 'nothing reduced'}; {share:.1f}% matched; ev {evidence}" + ("" if report.verified else
                                                                                          "; NOT verified")
    added = log.neurons if kind not in ("identity", "monomial") else 1
    return {"cell": cell, "derived": report.derived, "seconds": seconds, "added": added,
            "audit": _audit(suspect, reference)}


def _audit(suspect: Path, reference: str) -> dict:
    """The audit of the same attacked copy: its verdict (exit 3: refused)."""
    try:
        report = api.audit(str(suspect), reference)
    except ResyncError as exc:
        return {"cell": f"error (exit {exc.exit_code})", "derived": None}
    red = report.reduction or {}
    pruned = sum(p["removed"] for p in red.get("pruned", []))
    removed = sum(red.get(k, 0) for k in ("dummy", "split", "clique", "constant"))
    inserted = len(red.get("inserted", []))
    near = sum(p["removed"] for p in red.get("approximate", []))
    word = "derived" if report.derived else "not derived"
    share = 100 * report.matched / max(report.neurons, 1)
    what = "".join(x for x in (f", {removed} removed" if removed else "", f", {pruned} pruned" if pruned else "",
                               f", {near} removed approximately (output error {red['approximate_error']:.1e})"
                               if near else "", f", {inserted} inserted layer left out" if inserted else ""))
    return {"cell": f"{word}{what}; {share:.1f}% matched", "derived": report.derived}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=str(ROOT / "docs" / "obfuscation.md"))
    args = ap.parse_args()
    models = Path(args.models)
    names = [n for n in MODELS if not args.only or n in args.only.split(",")]
    rows, wrong, refused = [], [], []
    counts = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            reference = str(models / f"{name}.onnx")
            other = models / "variants" / f"{name}_seed1.onnx"
            for kind, fraction in ATTACKS:
                label = f"{kind} {int(100 * fraction)}%" if fraction else kind
                own = _one(reference, reference, kind, fraction, 0, work)
                unrelated = _one(str(other), reference, kind, fraction, 0, work) if other.exists() else {"cell": "-"}
                rows.append((name, label, own, unrelated))
                if own.get("derived") is False:
                    wrong.append(f"{name} {label}: the attacked copy is not derived")
                if own["cell"].startswith("error") and kind != "deepened":  # resync pairs weights by name
                    refused.append(f"{name} {label}")
                if unrelated.get("derived"):
                    wrong.append(f"{name} {label}: the attacked unrelated model is derived")
                own_audit, other_audit = own.get("audit", {}), unrelated.get("audit", {})
                if own_audit.get("derived") is False:
                    wrong.append(f"{name} {label}: audit: the attacked copy is not derived")
                if own_audit.get("cell", "").startswith("error"):
                    refused.append(f"{name} {label} (audit)")
                if other_audit.get("derived"):
                    wrong.append(f"{name} {label}: audit: the attacked unrelated model is derived")
                for column, result in (("own", own), ("other", unrelated)):
                    if result.get("derived") is not None:
                        counts[(column, bool(result["derived"]))] += 1
                    if result.get("audit", {}).get("derived") is not None:
                        counts[(column + " audit", bool(result["audit"]["derived"]))] += 1
                print(f"{name:12} {label:12} {own['cell']} | seed1: {unrelated['cell']} | audit: "
                      f"{own_audit.get('cell', '-')} | seed1: {other_audit.get('cell', '-')}", flush=True)
    lines = [
        "# Structural obfuscation",
        "",
        "Written by `tools/obfuscation.py` (attacks: `tests/attacks.py`; the reduction: `onnx_resync/reduce/`;",
        "pruned copies: `onnx_resync/match/partial.py`, `onnx_resync/audit/widths.py`; inserted layers:",
        "`onnx_resync/audit/depth.py`). Each width attack is applied to every group of the bundled model where",
        "it keeps the function (proven with ONNX Runtime; groups whose width is also an attribute or a Split",
        "size, such as RNN units and the CSP split, and residual streams read by LayerNormalization, are left",
        "alone, as they would be for an attacker; attention heads have attacks of their own, which rewrite the",
        "Reshape targets too), then every group is permuted and every neutral group rescaled (a in [0.5, 2];",
        "pruning: permuted only). `resync` then reduces the suspect without the reference (every rewrite",
        "proven equivalent by ONNX Runtime), pairs a pruned copy by a rectangular assignment, matches,",
        "restores (-o) and verifies the restored model against the suspect; `audit` does the same from the",
        "canonical form, pairing layers by structure (never by name).",
        "",
        "Cells: verdict; what the reduction removed (neurons; folded layers; reference neurons found pruned;",
        "inserted layers left out); the share of the (kept) reference neurons matched to their best",
        "candidate; resync's evidence (derived at >= 1, unrelated about 0). The `_seed1` columns attack the",
        "model trained from another seed the same way and resync or audit it against the same reference.",
        "",
        "| model | attack | resync: attacked copy | resync: attacked `_seed1` (unrelated) | audit: copy | "
        "audit: `_seed1` |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a} | {o['cell']} | {u['cell']} | {o.get('audit', {}).get('cell', '-')} | "
              f"{u.get('audit', {}).get('cell', '-')} |" for n, a, o, u in rows]
    lines += ["", "Verdicts counted: resync on attacked copies {} derived, {} not derived; on attacked `_seed1` {} "
              "derived, {} not derived. Audit on attacked copies {} derived, {} not derived; on attacked `_seed1` {} "
              "derived, {} not derived.".format(
                  counts[("own", True)], counts[("own", False)], counts[("other", True)], counts[("other", False)],
                  counts[("own audit", True)], counts[("own audit", False)], counts[("other audit", True)],
                  counts[("other audit", False)])]
    lines += ["", f"Wrong verdicts: {len(wrong)}" + (": " + "; ".join(wrong) if wrong else ".") + " Attacked copies "
              f"refused (exit 3, no verdict): {len(refused)}" + (": " + "; ".join(refused) if refused else "."), ""]
    lines += [
        "Notes:",
        "",
        "- identity/monomial: the inserted 1x1 conv (or Gemm) + Relu after a Relu whose readers are all linear;",
        "  after the permutation the inserted identity is a monomial layer and is reported as one.",
        "- splits with a rescale compound two positive scales (0.25x-4x): the matched share is measured once",
        "  the rescales are undone (resync.matched_as_restored; measured before, mlp permuted and rescaled",
        "  twice had 372 of 384).",
        f"- noisy: adaptive attackers, noise {NOISE} x the weights' std on the dummies' outgoing and the split",
        "  copies' incoming weights (the function changes a little); resync removes the excess nearest-to-dead",
        "  or nearest-to-copy neurons and reports the output error that introduces (ONNX Runtime). Audit takes",
        "  the same step (reduce/against.py), each suspect group's excess found by pairing layers by structure",
        "  (audit/widths.wider).",
        "- dummy heads / split heads: the Reshape targets that hold the head count or the head size follow the",
        "  width (reduce/targets.py, for the attack and for the reduction); a dummy head counts as one dummy",
        "  neuron of the head group (its dims go with it).",
        "- deepened: resync pairs weights by name and refuses the extra layer (exit 3, by design); audit aligns",
        "  the layer sequences with gaps (audit/depth.py), leaves the inserted layer out and judges the rest.",
        "  The group around the inserted layer then carries two rescales that do not cancel (its producer's and",
        "  its readers'), which the audit reports as rescaled neurons and noise.",
        "- prune: audit pairs the layers regardless of width (audit/widths.py), the neurons by a rectangular",
        "  assignment (match/partial.py), and judges the suspect against the reference without the unmatched",
        "  neurons; the JSON report lists the surviving reference neurons per pruned group (reduction.pruned).",
        "- n/a: the model has no group or site the attack can change while keeping the function (GRU: the",
        "  hidden size is an attribute; transformer: no Relu for an inserted layer; heads: only the",
        "  transformer has attention).",
        "- real files (pruning, an inserted layer, dummy/split heads of a BERT export whose Reshape targets are",
        "  built at run time): docs/obfuscation_vendor.md (tools/obfuscation_vendor.py).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}; wrong verdicts: {len(wrong)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
