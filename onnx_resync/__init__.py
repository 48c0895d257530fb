"""onnx-resync: find, apply, undo and recover neuron permutations in ONNX models.

The verbs live in `onnx_resync.api`: groups (walk a graph), permute (apply/undo), resync (recover
against a reference), verify (ONNX Runtime equivalence), audit (a re-exported file against its
reference). Each returns dataclasses with to_dict(). They are not re-exported here: the modules
`onnx_resync.verify`, `.resync` and `.audit` share their names, and Python binds a package attribute
to a submodule once that is imported, which would make `onnx_resync.verify` sometimes a function and
sometimes a module.
"""

__version__ = "0.1.0"
