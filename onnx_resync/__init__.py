"""onnx-resync: find, apply, undo and recover neuron permutations in ONNX models."""

__version__ = "0.1.0"
