"""The main job on a bundled model, end to end: walk, permute, perturb, re-synchronize, verify.

Lives in the package so `onnx-resync demo` and the Python API tell the same story.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import LoadError
from .io import WeightStore, load_model, save_model

DEFAULT_MODEL = "resnet"


def models_dir() -> Path:
    """Bundled models: $ONNX_RESYNC_MODELS when set, else the copy a built wheel carries
    (onnx_resync/_models, see setup.py), else models/ of the source checkout (an editable install)."""
    env = os.environ.get("ONNX_RESYNC_MODELS")
    here = Path(__file__).resolve().parent
    if env:
        folder = Path(env)
    else:
        folder = next((f for f in (here / "_models", here.parent / "models") if f.is_dir()), here / "_models")
    if not folder.is_dir():
        raise LoadError(f"bundled models not found at {folder} (install a built wheel, or from a source "
                        "checkout with `pip install -e .`, or set ONNX_RESYNC_MODELS to a folder holding them)")
    return folder


def accuracy(model: onnx.ModelProto | str | Path, npz: Path) -> float:
    from .runtime import make_session

    data = np.load(npz)
    session = make_session(model, device="cpu")
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data["input"]})[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


def add_noise(model: onnx.ModelProto, relative_std: float, seed: int) -> int:
    """Gaussian noise on every float weight matrix/kernel (rank >= 2), std = relative_std x its std.

    Biases and normalization statistics are left alone: noise on a running variance can make it
    negative, which says nothing about matching.
    """
    rng = np.random.default_rng(seed)
    store = WeightStore(model)
    touched = 0
    for name in store.names():
        if store.dtype(name).kind != "f" or len(store.shape(name)) < 2:
            continue
        w = store.get(name)
        store.set(name, w + rng.standard_normal(w.shape).astype(w.dtype) * relative_std * w.std())
        touched += 1
    return touched


@dataclass
class DemoStep:
    what: str
    result: str


@dataclass
class DemoReport:
    model: str
    steps: list[DemoStep] = field(default_factory=list)
    ok: bool = True

    def add(self, what: str, result: str) -> None:
        self.steps.append(DemoStep(what, result))


def run_demo(model_name: str = DEFAULT_MODEL, *, seed: int = 0, noise: float = 0.1,
             workdir: str | os.PathLike | None = None, log=print) -> DemoReport:
    from .api import permute
    from .walk import walk

    folder = models_dir()
    src = folder / f"{model_name}.onnx"
    npz = folder / f"{model_name}_test.npz"
    report = DemoReport(str(src))
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="onnx-resync-demo-"))
    work.mkdir(parents=True, exist_ok=True)

    reference = load_model(src)
    found = walk(reference)
    acc_ref = accuracy(reference, npz) if npz.exists() else None
    inner = found.inner_channels
    step = (f"{len(found.groups)} permutable groups, {found.permutable_channels} of {inner} hidden channels "
            f"({f'{100 * found.coverage:.0f}%' if inner else 'nothing to permute'})")
    report.add("walk", step)
    log(f"1. walk     {src.name}: {step}")

    permuted, result = permute(reference, work / "permuted.onnx", seed=seed)
    worst = max(o["normalized_error"] for o in result.verify["outputs"])
    step = (f"{result.neurons_moved} neurons moved in {result.groups_permuted} groups; ONNX Runtime "
            f"({result.verify['provider']}) says equivalent, max normalized error {worst:.1e}")
    report.add("permute", step)
    log(f"2. permute  seed {seed}: {step}")

    suspect = onnx.ModelProto()
    suspect.CopyFrom(permuted)
    touched = add_noise(suspect, noise, seed + 1)
    save_model(suspect, work / "suspect.onnx")
    acc_suspect = accuracy(suspect, npz) if npz.exists() else None
    step = f"Gaussian noise of {noise:g} x std on {touched} weight tensors"
    if acc_ref is not None:
        step += f"; test accuracy {100 * acc_ref:.1f}% -> {100 * acc_suspect:.1f}%"
    report.add("perturb", step)
    log(f"3. perturb  {step}")

    try:
        from .resync import resync
    except ImportError:
        log("4. resync   (not available in this build)")
        return report
    _, rs = resync(work / "suspect.onnx", src, work / "restored.onnx")
    lines = rs.summary_lines()
    report.add("resync", "; ".join(lines))
    log(f"4. resync   against {src.name}: {lines[0]}")
    for line in lines[1:]:
        log(f"           {line}")
    truth = result.record.inverse().heads_first(found)  # what undoes step 2, in resync's order
    correct = total = 0
    for key, perm in truth.perms.items():
        got = np.asarray(rs.record.perms.get(key, list(range(len(perm)))))
        correct += int((got == np.asarray(perm)).sum())
        total += len(perm)
    acc_restored = accuracy(work / "restored.onnx", npz) if npz.exists() else None
    step = f"{correct}/{total} neurons back in their original place ({100 * correct / max(total, 1):.2f}%)"
    if acc_restored is not None:
        step += f"; restored model's test accuracy {100 * acc_restored:.1f}% (the suspect's, as it must be)"
    report.add("check", step)
    report.ok = correct == total and rs.derived
    log(f"5. check    {step}")
    log(f"           files in {work}")
    return report
