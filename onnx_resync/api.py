"""The Python API: the same verbs as the CLI, returning dataclasses that serialize to JSON.

    from onnx_resync import api
    api.groups(path) / api.permute(...) / api.resync(...) / api.verify(...) / api.audit(...)
    api.reduce(path, "reduced.onnx")  # dummy/split neurons and inserted layers out, proven by ORT
    api.inputs(path, save="feeds.npz")  # what the checks feed the model, and why
    api.audit_many(paths, reference, jobs=4, jsonl="results.jsonl")

resync, verify and audit load on first use (they bring scipy and ONNX Runtime).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import CheckFailed, UsageError
from .inputs import MAX_SAMPLES  # noqa: F401  (the bound on --samples; commands read it here)
from .io import check_outputs, check_tensor_data, load_model, read_input, save_model, write_text_atomic
from .io.layout import problem as layout_problem
from .permute import MAX_SEED, PermutationRecord, check_seed, model_sha256, permuted_copy, random_permutations
from .walk import WalkResult, walk

ModelLike = str | os.PathLike | onnx.ModelProto
MAX_JOBS = 256  # audit_many's processes


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        check_tensor_data(model)  # what load_model checks of a file's tensors, for a model in memory
        return model
    return load_model(model)


def groups(model: ModelLike) -> WalkResult:
    """Every permutable channel group of a model, the pinned channels with reasons, and coverage."""
    return walk(_load(model))


@dataclass
class PermuteResult:
    output: str | None
    record: PermutationRecord
    groups_permuted: int
    neurons_moved: int
    weights_changed: int
    verified: bool
    verify: dict | None = None
    walk: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "groups_permuted": self.groups_permuted,
            "neurons_moved": self.neurons_moved,
            "weights_changed": self.weights_changed,
            "verified": self.verified,
            "verify": self.verify,
            "record": self.record.to_dict(),
            "notes": self.notes,
        }


def load_record(path: str | os.PathLike) -> PermutationRecord:
    """Read a permutation record and validate its structure (every group a permutation of 0..n-1,
    integers only, a known format); `permute(undo=...)` then checks it against the model."""
    try:  # a regular file only (a FIFO would block, a device be read until memory runs out), bounded
        data = json.loads(read_input(path, what="permutation record").decode("utf-8"))
    except RecursionError:
        raise UsageError(f"{path}: not a permutation record (JSON nested too deep)") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not a JSON permutation record ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a JSON permutation record (not UTF-8 text)") from None
    except ValueError:  # an integer of more than 4300 digits
        raise UsageError(f"{path}: not a permutation record (a number too long to read)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the permutation record ({exc.strerror or exc})") from None
    return PermutationRecord.from_dict(data, where=str(path))


def permute(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    group_keys: list[str] | None = None,
    undo: str | os.PathLike | PermutationRecord | None = None,
    record_path: str | os.PathLike | None = None,
    check: bool = True,
    verify_options: dict | None = None,
) -> tuple[onnx.ModelProto, PermuteResult]:
    """Permute every (or the chosen) group with a seeded random permutation, or undo a record.

    The permuted model is verified against the input (unless check=False); a model that does not
    verify is an error and nothing is written.
    """
    inputs = [model] if not isinstance(model, onnx.ModelProto) else []
    check_outputs([record_path], inputs + ([undo] if isinstance(undo, (str, os.PathLike)) else []), models=[output])
    notes: list[str] = []
    given = None
    if undo is not None:
        given = undo if isinstance(undo, PermutationRecord) else load_record(undo)
        where = str(undo) if not isinstance(undo, PermutationRecord) else "the record"
    else:
        check_seed(seed)
    # the input's content hash (checked against an undo record, or named in a new one) is read in a
    # thread beside the load and the walk
    hashing = _hash_later(model) if undo is not None or output is not None else None
    original = _load(model)
    result_walk = walk(original)
    if given is not None:
        _check_record_model(given, model, hashing, where, notes)
        given.check_groups(result_walk, where)
        record = given.inverse()
    else:
        record = random_permutations(result_walk, seed, group_keys)
    permuted, changed = permuted_copy(original, result_walk, record)
    moved = sum(sum(1 for i, p in enumerate(perm) if i != p) for perm in record.perms.values())
    report = None
    if check:
        from .verify import explain, verify

        report = verify(original, permuted, **(verify_options or {}))
        if report.verdict == "cannot check":
            raise CheckFailed(f"cannot check the permuted model: {report.reason}; nothing written "
                              "(give --inputs or --shape that the check can compare, or --no-verify)")
        if not report.equivalent:
            raise CheckFailed(f"the permuted model is not equivalent to the input; nothing written: {explain(report)}")
    if output is not None:
        why = layout_problem(permuted)  # the input's external-data layout, kept by the save where it can be
        if why is not None:
            notes.append(f"external data written anew, not in the input's layout: {why}")
            record.notes["external_data"] = f"written anew, not in the input's layout: {why}"
        save_model(permuted, output, inputs=inputs)
        if undo is None:  # the record names the file it permuted and the file it wrote
            record.source_sha256 = hashing.result()
            record.permuted_sha256 = model_sha256(output)
    if record_path is not None and undo is None:
        write_text_atomic(record_path, record.to_json())
    result = PermuteResult(
        output=str(output) if output is not None else None,
        record=record,
        groups_permuted=len(record.perms),
        neurons_moved=moved,
        weights_changed=changed,
        verified=bool(report and report.equivalent),
        verify=report.to_dict() if report else None,
        notes=notes,
    )
    return permuted, result


def _check_record_model(record: PermutationRecord, model: ModelLike, hashing, where: str, notes: list[str]) -> None:
    """An undo record must name the file it is applied to (its permuted output) by content hash."""
    if isinstance(model, onnx.ModelProto):
        return  # a model in memory has no file bytes to compare; the group check still applies
    if not record.has_hashes:
        notes.append(f"{where} is a {record.format!r} record (no model hash): not checked that it was made "
                     f"for {model}")
        return
    if record.permuted_sha256 is None:
        notes.append(f"{where} names no permuted file (written without an output): not checked that it was "
                     f"made for {model}")
        return
    actual = hashing.result()
    if actual == record.permuted_sha256:
        return
    if actual == record.source_sha256:
        raise UsageError(f"{where} was made from {model}, not for it: undo takes the permuted file it wrote")
    raise UsageError(f"{where} was made for another model (it names sha256 {record.permuted_sha256[:12]}..., "
                     f"{model} has {actual[:12]}...)")


def _hash_later(model: ModelLike):
    """model_sha256 of a file, computed when asked for (in this thread: a hashing thread's own memory
    pushed a lazy permute's peak past its bound); None for a model in memory."""
    return _Later(None if isinstance(model, onnx.ModelProto) else model)


class _Later:
    def __init__(self, path):
        self.path = path

    def result(self):
        return None if self.path is None else model_sha256(self.path)


def audit(suspect: ModelLike, reference: ModelLike, *, html: str | os.PathLike | None = None,
          json_path: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
          verify_options: dict | None = None, **options):
    """Audit one suspect against its reference (audit.report.audit: canonical form, alignment, resync,
    verdict); an HTML or JSON output that names an input is refused. `output`: when derived, the
    suspect's own file (graph, dtypes, quantization tensors) with its neurons in the reference's order,
    verified equivalent to the suspect with ONNX Runtime (`verify_options`: verify's keywords), is
    written there (report.restored says what was restored); a failed check raises CheckFailed (exit
    4 cannot check, 7 not equivalent) and writes nothing."""
    check_outputs([html, json_path], [m for m in (suspect, reference) if not isinstance(m, onnx.ModelProto)],
                  models=[output])
    from .audit import audit as run

    return run(suspect, reference, html=html, json_path=json_path, output=output, verify_options=verify_options,
               **options)


def audit_many(
    suspects,
    reference: str | os.PathLike,
    *,
    jobs: int = 1,
    jsonl: str | os.PathLike | None = None,
    retry_errors: bool = False,
    detail: bool = False,
    log=None,
):
    """Audit many suspect files against one reference, `jobs` processes at a time (each worker's BLAS
    gets its share of the cores). Returns an iterable (audit.batch.BatchAudit) of one JSON-ready record
    per file: reused ones first (from `jsonl`, marked "from_earlier_run"), then each new one as it
    finishes. With `jsonl`, each new record is appended there (flushed) and a rerun skips a file only
    when its content hash and the reference's equal those of its latest line; a changed file is audited
    again ("reaudited" says why). `retry_errors` audits the failed ones again. `log(message)` gets the
    warnings (unusable JSONL lines) and defaults to stderr. Arguments are checked on the call; the
    audits run as the result is iterated.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise UsageError(f"jobs must be an integer in 1..{MAX_JOBS}")
    from .audit.batch import BatchAudit, log_to_stderr

    return BatchAudit(suspects, reference, jobs=jobs, jsonl=jsonl, retry_errors=retry_errors, detail=detail,
                      log=log if log is not None else log_to_stderr)


def inputs(model: ModelLike, *, shapes: dict[str, list[int]] | None = None, seed: int = 0, device: str = "auto",
           save: str | os.PathLike | None = None):
    """Each input's declared and chosen shape, dtype, value range and why (the input plan that
    verify, permute and resync use, tried in ONNX Runtime); `save` writes the feed as an .npz that
    `--inputs` takes. Returns verify.InputsReport."""
    check_seed(seed)
    check_outputs([save], [] if isinstance(model, onnx.ModelProto) else [model])
    from .verify import plan_report

    report, feed = plan_report(model, shapes=shapes, seed=seed, device=device)
    if save is not None:
        _write_npz(save, feed)
        report.saved = str(save)
    return report


def _write_npz(path: str | os.PathLike, arrays: dict) -> None:
    """An .npz of `arrays` (keys are the names; any name, even 'file'), written to a temporary file
    beside `path` and renamed into place."""
    import tempfile
    import zipfile

    import numpy as np

    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def reduce(model: ModelLike, output: str | os.PathLike | None = None, *,
           report_path: str | os.PathLike | None = None, verify_options: dict | None = None):
    """Remove structural padding without a reference (dummy, split and clique neurons; inserted
    identity/monomial layers after a Relu), each rewrite proven equivalent with ONNX Runtime
    (reduce.reduce_model); writes the reduced model to `output`. Returns (model, ReduceReport)."""
    inputs = [model] if not isinstance(model, onnx.ModelProto) else []
    check_outputs([report_path], inputs, models=[output])
    from .reduce import reduce_model

    reduced, report = reduce_model(_load(model), verify_options=verify_options)
    if output is not None:
        save_model(reduced, output, inputs=inputs)
        report.output = str(output)
    if report_path is not None:
        write_text_atomic(report_path, report.to_json())
    return reduced, report


def __getattr__(name: str):
    # the heavier verbs load on first use, so `groups` and `permute --no-verify` start fast
    if name == "verify":
        from .verify import verify

        return verify
    if name == "resync":
        from .resync import resync

        return resync
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
