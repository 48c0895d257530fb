"""onnx-resync: find, apply, undo and recover neuron permutations in ONNX models.

The verbs: groups (walk a graph), permute (apply/undo), resync (recover against a reference),
verify (ONNX Runtime equivalence). Each returns dataclasses with to_dict().
"""

__version__ = "0.1.0"

__all__ = ["groups", "permute", "resync", "verify", "__version__"]


def __getattr__(name):
    # lazy: `import onnx_resync` stays cheap; onnxruntime and scipy load only when used
    if name in ("groups", "permute"):
        from . import api

        return getattr(api, name)
    if name == "verify":
        from .verify import verify

        return verify
    if name == "resync":
        from .resync import resync

        return resync
    raise AttributeError(name)
