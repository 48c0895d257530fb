"""The Python API: the same verbs as the CLI, returning dataclasses that serialize to JSON.

    from onnx_resync import api
    api.groups(path) / api.permute(...) / api.resync(...) / api.verify(...) / api.audit(...)

resync, verify and audit load on first use (they bring scipy and ONNX Runtime).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import CheckFailed, UsageError
from .io import check_output_path, check_tensor_data, load_model, refuse_overwrite, save_model, write_text_atomic
from .permute import PermutationRecord, permuted_copy, random_permutations
from .walk import WalkResult, walk

ModelLike = str | os.PathLike | onnx.ModelProto


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

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "groups_permuted": self.groups_permuted,
            "neurons_moved": self.neurons_moved,
            "weights_changed": self.weights_changed,
            "verified": self.verified,
            "verify": self.verify,
            "record": self.record.to_dict(),
        }


def load_record(path: str | os.PathLike) -> PermutationRecord:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such permutation record") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a JSON permutation record ({type(exc).__name__})") from None
    return PermutationRecord.from_dict(data)


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
    if output is not None:
        refuse_overwrite(output, inputs)
        check_output_path(output)
    if record_path is not None:
        refuse_overwrite(record_path, inputs + ([output] if output else []))
        check_output_path(record_path)
    original = _load(model)
    result_walk = walk(original)
    if undo is not None:
        record = (undo if isinstance(undo, PermutationRecord) else load_record(undo)).inverse()
    else:
        record = random_permutations(result_walk, seed, group_keys)
    permuted, changed = permuted_copy(original, result_walk, record)
    moved = sum(sum(1 for i, p in enumerate(perm) if i != p) for perm in record.perms.values())
    report = None
    if check:
        from .verify import verify

        report = verify(original, permuted, **(verify_options or {}))
        if report.verdict == "cannot check":
            raise CheckFailed(f"cannot check the permuted model: {report.reason}; nothing written "
                              "(give --inputs or --shape that the check can compare, or --no-verify)")
        if not report.equivalent:
            raise CheckFailed("the permuted model is not equivalent to the input; nothing written "
                              "(please report this model: a walker rule is wrong)")
    if output is not None:
        save_model(permuted, output, inputs=inputs)
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
    )
    return permuted, result


def __getattr__(name: str):
    # the heavier verbs load on first use, so `groups` and `permute --no-verify` start fast
    if name == "verify":
        from .verify import verify

        return verify
    if name == "resync":
        from .resync import resync

        return resync
    if name == "audit":
        from .audit import audit

        return audit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
