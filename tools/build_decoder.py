#!/usr/bin/env python3
"""Build the decoder family of the exporter zoo (issue 14): a small Llama-style decoder exported the
ways a vendor does, written into the zoo's cache (tools/build_zoo.py: ``<cache>/decoder/``, the
``decoder`` entry of ``<cache>/manifest.json``), audited by tools/zoo_audit.py like the rest.

The model: transformers ``LlamaConfig`` (DECODER_CONFIG: grouped-query attention, 4 query heads and
2 KV heads, rotary embeddings, SwiGLU MLP, RMSNorm whose scales are drawn in [0.5, 1.5), 2 layers,
hidden 64, vocabulary 256), random init from a seed; seed 0 is the reference, seed 1 the unrelated
twin. Variants (file ``<cache>/decoder/<variant>.onnx``; the genai ones in a folder of their own,
``model.onnx`` with its external ``model.onnx.data``, as the builder writes them):

================  ==========================================================================
variant           what writes it
================  ==========================================================================
torch_dynamo      ``torch.onnx.export(dynamo=True)`` (input_ids, attention_mask -> logits,
                  no cache): the zoo's *source*, the reference every variant is audited against
torch_script      ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter), same interface
genai_fp32        ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``: GroupQueryAttention
                  (packed QKV, rotary inside), SkipSimplifiedLayerNormalization,
                  SimplifiedLayerNormalization, past/present KV cache inputs and outputs
genai_int4        the same with ``-p int4``: MatMulNBits (int4, blocks of 32)
torch_dynamo.perm ``onnx-resync permute --seed 1`` of torch_dynamo (record kept beside it:
                  ``torch_dynamo.perm.record.json``)
genai_fp32.perm   ``onnx-resync permute --seed 1`` of genai_fp32 (record kept likewise)
genai_int4.perm   ``onnx-resync permute --seed 1`` of genai_int4 (MatMulNBits' input channels move
                  in whole blocks of 32; record kept likewise)
================  ==========================================================================

Every file is run with ONNX Runtime (CPU) on 4 sequences of 12 tokens (the genai files with an
empty KV cache) and enters the zoo only when its logits agree with the seed's PyTorch logits
(normalized error max |a - b| / max |torch|: fp32 within 1e-4, int4 within 0.35); the error is
recorded either way.

transformers and onnxruntime-genai must not go into the project's .venv (onnxruntime-genai pulls the
CPU ``onnxruntime`` wheel, which clashes with onnxruntime-gpu): the export stage runs in a venv of
its own, made once with::

    python3 -m venv /root/.venv-genai
    /root/.venv-genai/bin/pip install torch==2.13.0 transformers onnxruntime-genai onnx onnxscript

(``$GENAI_PYTHON`` names another interpreter). This script runs with the project's .venv; it calls
itself with ``--export-stage`` under that interpreter for the exports, then permutes and checks.

Usage::

    python tools/build_decoder.py              # reuses what is there
    python tools/build_decoder.py --rebuild
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GENAI_PYTHON = os.environ.get("GENAI_PYTHON", "/root/.venv-genai/bin/python")
DECODER = "decoder"
DECODER_VERSION = 1  # bump when the model or a variant changes: everything is built again
DECODER_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
HEAD_SIZE = DECODER_CONFIG["hidden_size"] // DECODER_CONFIG["num_attention_heads"]
SEEDS = {"source": 0, "twin": 1}
PERMUTE_SEED = 1
BATCH, LENGTH = 4, 12
BOUNDS = {"fp32": 1e-4, "int4": 0.35}
# variant -> (how it is made, storage, permuted)
VARIANTS = {
    "torch_dynamo": ("torch_dynamo", "fp32", False),
    "torch_script": ("torch_script", "fp32", False),
    "genai_fp32": ("genai_fp32", "fp32", False),
    "genai_int4": ("genai_int4", "int4", False),
    "torch_dynamo.perm": ("torch_dynamo", "fp32", True),
    "genai_fp32.perm": ("genai_fp32", "fp32", True),
    "genai_int4.perm": ("genai_int4", "int4", True),
}


# ---------------------------------------------------------------------------------------------
# the export stage (runs under GENAI_PYTHON: torch, transformers, onnxruntime-genai)


def export_stage(seed: int, out: Path, genai: bool = True) -> None:
    """The seed's HF folder, logits.npz, torch exports and (genai) the builder's fp32 and int4 folders."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**DECODER_CONFIG, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-unit RMSNorm scales: a pairing of norms that ignores them shows
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    hf = out / "hf"
    model.save_pretrained(hf)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}  # the builder wants a tokenizer beside the model
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(hf)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = Logits(model)(ids, mask).numpy()
    np.savez(out / "logits.npz", input_ids=ids.numpy(), logits=logits)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    small = (ids[:1, :8], mask[:1, :8])
    wrapper = Logits(model).eval()
    torch.onnx.export(wrapper, small, str(out / "torch_dynamo.onnx"), dynamo=True, dynamic_shapes=axes, **names)
    torch.onnx.export(wrapper, small, str(out / "torch_script.onnx"), dynamo=False,
                      dynamic_axes={**axes, "logits": {0: "batch", 1: "seq"}}, **names)
    for precision in ("fp32", "int4") if genai else ():
        folder = out / f"genai_{precision}"
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder),
                        "-p", precision, "-e", "cpu", "-c", str(out / "builder_cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# checks and the manifest (the project's .venv)


def run_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """The file's logits for `ids` (all ones mask) on CPU; KV-cache inputs fed empty."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids.astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids, dtype=np.int64)
        elif i.name.startswith("past_key_values"):  # [batch, kv heads, 0, head size]: an empty cache
            feeds[i.name] = np.zeros([ids.shape[0], DECODER_CONFIG["num_key_value_heads"], 0, HEAD_SIZE], np.float32)
        else:
            raise ValueError(f"{path}: unexpected input {i.name}")
    return sess.run(["logits"], feeds)[0]


def file_sha256(path: Path) -> str:
    """The model file and its external data file (model.onnx.data beside it), as one hash."""
    import hashlib

    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def permute_file(src: Path, dst: Path, record: Path) -> None:
    """onnx-resync permute, verified by ONNX Runtime on the inputs the graph implies (a genai file's
    KV caches sized by GroupQueryAttention's registry entry: head size, an empty past)."""
    from onnx_resync import api

    dst.parent.mkdir(parents=True, exist_ok=True)
    api.permute(str(src), str(dst), seed=PERMUTE_SEED, record_path=str(record))


def build(cache: Path, rebuild: bool, log) -> dict:
    from build_zoo import load_manifest, op_histogram, one_line, save_manifest

    folder = cache / DECODER
    manifest = load_manifest(cache)
    entry = manifest["models"].get(DECODER) or {}
    if rebuild or entry.get("decoder_version") != DECODER_VERSION:
        entry = {"variants": {}, "decoder_version": DECODER_VERSION}
    exports = {}
    for role, seed in SEEDS.items():
        out = folder / f"_seed{seed}"
        exports[role] = out
        done = out / ("genai_int4/model.onnx" if role == "source" else "torch_dynamo.onnx")
        if rebuild or not done.exists():
            t = time.perf_counter()
            shutil.rmtree(out, ignore_errors=True)
            # the twin is compared with the reference only: its torch export is enough
            subprocess.run([GENAI_PYTHON, __file__, "--export-stage", str(seed), str(out)]
                           + ([] if role == "source" else ["--torch-only"]), check=True)
            log(f"decoder seed {seed}: exported ({time.perf_counter() - t:.0f}s)")
    src = exports["source"] / "torch_dynamo.onnx"
    entry.update(source=str(src), source_sha256=file_sha256(src), twin=str(exports["twin"] / "torch_dynamo.onnx"))
    data = np.load(exports["source"] / "logits.npz")
    ids, want = data["input_ids"], data["logits"]
    made = {"torch_dynamo": src, "torch_script": exports["source"] / "torch_script.onnx",
            "genai_fp32": exports["source"] / "genai_fp32" / "model.onnx",
            "genai_int4": exports["source"] / "genai_int4" / "model.onnx"}
    for variant, (how, storage, permuted) in VARIANTS.items():
        record = {"transform": how, "source_kind": "perm" if permuted else "src", "permuted": permuted,
                  "perturbed": False, "storage": storage, "expected": "permuted" if permuted else "identical"}
        t = time.perf_counter()
        try:
            path = made[how]
            if permuted:
                target = folder / variant / "model.onnx" if how.startswith("genai") else folder / f"{variant}.onnx"
                rec = target.with_name(f"{variant}.record.json")
                if rebuild or not target.exists() or not rec.exists():
                    permute_file(path, target, rec)
                record["record"] = str(rec)
                path = target
            err = float(np.abs(run_logits(path, ids) - want).max() / np.abs(want).max())
            record.update(file=str(path), normalized_error=err, bound=BOUNDS[storage])
            if not err <= BOUNDS[storage]:
                raise ValueError(f"logits differ from PyTorch's: normalized error {err:.3g} > {BOUNDS[storage]:g}")
            record.update(ok=True, sha256=file_sha256(path), ops=op_histogram(path))
            log(f"decoder/{variant}: ok (error {err:.2e})")
        except Exception as exc:  # noqa: BLE001 - listed, the rest goes on
            record.update(ok=False, error=one_line(exc))
            log(f"decoder/{variant}: FAILED {record['error']}")
        record["seconds"] = round(time.perf_counter() - t, 2)
        entry["variants"][variant] = record
    twin = Path(entry["twin"])
    twin_err = float(np.abs(run_logits(twin, ids) - np.load(exports["twin"] / "logits.npz")["logits"]).max())
    entry["twin_error"] = twin_err
    manifest["models"][DECODER] = entry
    save_manifest(cache, manifest)
    return entry


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--export-stage":
        export_stage(int(sys.argv[2]), Path(sys.argv[3]), genai="--torch-only" not in sys.argv[4:])
        return 0
    sys.path.insert(0, str(ROOT / "tools"))
    # $ONNX_RESYNC_SRC: another onnx_resync to permute with (as in build_zoo.py); default: this checkout
    sys.path.insert(0, os.environ.get("ONNX_RESYNC_SRC") or str(ROOT))
    from build_zoo import DEFAULT_CACHE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    entry = build(args.cache, args.rebuild, lambda m: print(m, flush=True))
    bad = [v for v, r in entry["variants"].items() if not r.get("ok")]
    print(f"decoder: {len(entry['variants']) - len(bad)} variants ok, {len(bad)} failed {bad or ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
