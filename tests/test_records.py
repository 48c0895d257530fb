"""Records checked before they are trusted (issue 18.3, 18.4).

Permutation records: `permute --undo` takes only a record whose every group is a permutation of the
right size for this model and which names this very file (its permuted output) by content hash;
anything else is one line on stderr, exit 2, and nothing written. Batch results: a rerun skips a file
only when its content and the reference's are those of its JSONL line; unusable lines are skipped
with a warning.

Commands run through the CLI's main in the shared worker (tests/cli_worker.py); the byte-exact undo
runs `python -m onnx_resync`, a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli_worker
from onnx_resync import api
from onnx_resync.errors import UsageError
from onnx_resync.permute import RECORD_FORMAT, PermutationRecord, model_sha256

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNX_RESYNC_MODELS", ROOT / "models"))


def _model(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing (run tools/build_models.py)")
    return path


def process(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m onnx_resync *args`, a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ONNX_RESYNC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "onnx_resync", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """The same through the CLI's main in the shared worker."""
    return cli_worker.run(*args, timeout=timeout)


def one_line_usage_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and "internal error" not in lines[0] and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def permuted(tmp_path_factory):
    """mlp permuted (seed 5) with its record, written by the API (no ORT check: speed)."""
    work = tmp_path_factory.mktemp("records")
    out, record = work / "p.onnx", work / "r.json"
    api.permute(_model("mlp"), out, seed=5, record_path=record, check=False)
    return work, out, record


def _corrupt(record: Path, target: Path, change) -> Path:
    data = json.loads(record.read_text())
    key = next(k for k, v in data["groups"].items() if len(v) > 2)
    text = change(data, key)
    target.write_text(text if isinstance(text, str) else json.dumps(data))
    return target


def _set(entry):
    def change(data, key):
        data["groups"][key][0] = entry
    return change


def _literal(token: str):
    """An entry JSON can hold but json.dumps does not write (1e400), spliced in as text."""
    def change(data, key):
        data["groups"][key][0] = "@@"
        return json.dumps(data).replace('"@@"', token)
    return change


def _duplicate(data, key):
    data["groups"][key][1] = data["groups"][key][0]


def _short(data, key):  # a permutation, but of one neuron fewer than the model's group
    data["groups"][key] = list(range(len(data["groups"][key]) - 1))


def _unknown_group(data, key):
    data["groups"]["no-such-group:0/4"] = data["groups"].pop(key)


def _deep_value(data, key):
    data["groups"][key] = "@@"
    return json.dumps(data).replace('"@@"', "[" * 100_000 + "]" * 100_000)


def _deep_file(data, key):
    return "[" * 100_000 + "]" * 100_000


CORRUPTIONS = {
    "duplicate": _duplicate,
    "negative": _set(-1),
    "out of range": _set(10 ** 6),
    "2**70": _set(2 ** 70),
    "float": _set(0.0),
    "null": _set(None),
    "dict": _set({}),
    "bool": _set(True),
    "NaN": _literal("NaN"),
    "1e400": _literal("1e400"),
    "huge integer": _literal("9" * 5000),
    "nested 100,000 deep (a group)": _deep_value,
    "nested 100,000 deep (the file)": _deep_file,
    "wrong group size": _short,
    "unknown group": _unknown_group,
    "group not a list": lambda data, key: data["groups"].__setitem__(key, "0,1,2"),
    "seed not an integer": lambda data, key: data.__setitem__("seed", [1]),
    "hash not a digest": lambda data, key: data.__setitem__("permuted_sha256", 7),
    "unknown format": lambda data, key: data.__setitem__("format", "onnx-resync/permutation/99"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_record_is_one_line_exit_2_nothing_written(permuted, case):
    work, out, record = permuted
    bad = _corrupt(record, work / f"bad-{case.replace(' ', '_')}.json", CORRUPTIONS[case])
    target = work / f"undo-{case.replace(' ', '_')}.onnx"
    done = cli("permute", out, "-o", target, "--undo", bad, "--no-verify")
    one_line_usage_error(done)
    assert not target.exists()


@pytest.mark.parametrize("case", ["duplicate", "negative", "2**70", "float", "wrong group size"])
def test_api_refuses_corrupted_record_objects(permuted, case):
    """A PermutationRecord built in Python is checked the same way before it is inverted."""
    work, out, record = permuted
    data = json.loads(record.read_text())
    key = next(k for k, v in data["groups"].items() if len(v) > 2)
    (CORRUPTIONS[case])(data, key)
    given = PermutationRecord(data["groups"], data["seed"])
    with pytest.raises(UsageError):
        api.permute(out, undo=given, check=False)


def test_record_of_another_model_is_refused(permuted):
    """Same architecture, another permutation: every group fits, only the content hash tells."""
    work, out, record = permuted
    other = work / "p7.onnx"
    api.permute(_model("mlp"), other, seed=7, check=False)
    target = work / "undo-other.onnx"
    line = one_line_usage_error(cli("permute", other, "-o", target, "--undo", record, "--no-verify"))
    assert "another model" in line and not target.exists()
    # the source it was made from is not its permuted output either
    line = one_line_usage_error(cli("permute", _model("mlp"), "-o", target, "--undo", record, "--no-verify"))
    assert "not for it" in line and not target.exists()
    # a record of another architecture
    vgg_record = work / "vgg.json"
    api.permute(_model("vgg"), work / "vgg_p.onnx", seed=1, record_path=vgg_record, check=False)
    one_line_usage_error(cli("permute", out, "-o", target, "--undo", vgg_record, "--no-verify"))
    assert not target.exists()


def test_valid_record_undoes_byte_exact(tmp_path):
    """The record names both files; undo (checked with ONNX Runtime) gives back the source's bytes."""
    src = _model("mlp")
    done = process("permute", src, "-o", tmp_path / "p.onnx", "--record", tmp_path / "r.json", "--seed", "11")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == RECORD_FORMAT
    assert data["source_sha256"] == model_sha256(src)
    assert data["permuted_sha256"] == model_sha256(tmp_path / "p.onnx")
    done = process("permute", tmp_path / "p.onnx", "-o", tmp_path / "u.onnx", "--undo", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "u.onnx").read_bytes() == src.read_bytes()


def test_format_1_record_still_undoes_with_a_note(permuted, tmp_path):
    work, out, record = permuted
    data = json.loads(record.read_text())
    old = {"format": "onnx-resync/permutation/1", "seed": data["seed"], "notes": {}, "groups": data["groups"]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    done = cli("permute", out, "-o", tmp_path / "u.onnx", "--undo", tmp_path / "old.json", "--no-verify")
    assert done.returncode == 0, done.stderr
    assert "no model hash" in done.stderr
    assert (tmp_path / "u.onnx").read_bytes() == _model("mlp").read_bytes()


def test_load_record_structure_errors(tmp_path):
    path = tmp_path / "r.json"
    for text in ("", "{", "[]", '{"format": "onnx-resync/permutation/2", "groups": []}', "[" * 100_000):
        path.write_text(text)
        with pytest.raises(UsageError):
            api.load_record(path)


def test_api_seed_is_checked():
    for seed in (-1, 2 ** 63, 1.5, "3", True):
        with pytest.raises(UsageError):
            api.permute(_model("mlp"), seed=seed, check=False)


# ---- batch results keyed by content ----------------------------------------------------------
def _audit(*args):
    return cli("audit", "--reference", _model("vgg"), *args)


def test_batch_rerun_reaudits_a_replaced_file_and_skips_an_unchanged_one(tmp_path):
    vgg = _model("vgg")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(vgg.read_bytes())
    api.permute(vgg, b, seed=3, check=False)
    out = tmp_path / "results.jsonl"
    first = _audit(a, b, "--jsonl", out)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {Path(r["file"]).name: r["verdict"] for r in lines} == {"a.onnx": "identical", "b.onnx": "permuted"}
    assert all(r["sha256"] == model_sha256(r["file"]) and r["reference_sha256"] == model_sha256(vgg) for r in lines)

    unchanged = _audit(a, b, "--jsonl", out)
    assert unchanged.returncode == 0 and "skipping 2" in unchanged.stderr
    assert len(out.read_text().splitlines()) == 2

    a.write_bytes(_model("resnet").read_bytes())  # replaced by another model, same path
    again = _audit(a, b, "--jsonl", out)
    assert again.returncode == 3, again.stderr  # resnet does not align with vgg: an error, not "identical"
    assert "skipping 1" in again.stderr and "changed" in again.stderr
    assert "audited again" in again.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and Path(lines[-1]["file"]).name == "a.onnx"
    assert lines[-1]["ok"] is False and "changed" in lines[-1]["reaudited"]

    # the latest line stands: a fourth run skips both again, and keeps the failure's exit code
    fourth = _audit(a, b, "--jsonl", out)
    assert fourth.returncode == 3 and "skipping 2" in fourth.stderr


def test_batch_rerun_when_the_reference_changes(tmp_path):
    vgg = _model("vgg")
    ref, a = tmp_path / "ref.onnx", tmp_path / "a.onnx"
    ref.write_bytes(vgg.read_bytes())
    a.write_bytes(vgg.read_bytes())
    out = tmp_path / "results.jsonl"
    assert cli("audit", "--reference", ref, a, "--jsonl", out).returncode == 0
    variant = MODELS / "variants" / "vgg_seed1.onnx"
    if not variant.exists():
        pytest.skip("models/variants missing")
    ref.write_bytes(variant.read_bytes())  # the reference is now an unrelated model
    done = cli("audit", "--reference", ref, a, "--jsonl", out)
    assert done.returncode == 1, done.stderr
    assert "reference changed" in done.stderr


def test_batch_skips_unusable_jsonl_lines_with_a_warning(tmp_path):
    vgg = _model("vgg")
    a = tmp_path / "a.onnx"
    a.write_bytes(vgg.read_bytes())
    out = tmp_path / "results.jsonl"
    out.write_text("\n".join([
        '{"file": 3, "ok": true, "exit_code": 0}',
        '{"file": null}',
        '{"file": ["a.onnx"], "ok": true, "exit_code": 0, "verdict": "identical"}',
        '[1, 2, 3]',
        '"just a string"',
        "[" * 100_000,
        json.dumps({"file": str(a), "ok": True, "exit_code": 0, "verdict": "identical"}),  # no hashes
        '{"file": "\\u0000x", "ok": true, "exit_code": 0}',
        '{"file": "a.onnx", "ok": tr',  # a line cut short by a killed run, last in the file
    ]))
    done = _audit(a, "--jsonl", out)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("warning:") >= 5
    assert "no content hash" in done.stderr  # the old-style line is not trusted
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["verdict"] == "identical" and last["sha256"] == model_sha256(a)


def test_audit_many_is_the_api(tmp_path):
    vgg = _model("vgg")
    a = tmp_path / "a.onnx"
    a.write_bytes(vgg.read_bytes())
    out = tmp_path / "r.jsonl"
    records = list(api.audit_many([a], vgg, jobs=1, jsonl=out))
    assert [r["verdict"] for r in records] == ["identical"] and out.exists()
    again = api.audit_many([a], vgg, jsonl=out)
    assert len(again.reused) == 1 and not again.todo
    assert [r.get("from_earlier_run") for r in again] == [True]
    with pytest.raises(UsageError):
        api.audit_many([a], vgg, jobs=0)
    with pytest.raises(UsageError):
        api.audit_many([a], vgg, jsonl=tmp_path / "no-such-folder" / "r.jsonl")


def test_content_hash_covers_external_data(tmp_path):
    """A model saved with external data: changing a byte of the data file changes its hash."""
    import onnx

    model = onnx.load(_model("mlp"))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = model_sha256(tmp_path / "m.onnx")
    data = bytearray((tmp_path / "m.onnx.data").read_bytes())
    data[100] ^= 1
    (tmp_path / "m.onnx.data").write_bytes(bytes(data))
    assert model_sha256(tmp_path / "m.onnx") != before
    (tmp_path / "broken.onnx").write_bytes(b"not a model")  # unreadable files still hash (their bytes)
    assert len(model_sha256(tmp_path / "broken.onnx")) == 64
