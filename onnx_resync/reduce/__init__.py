"""reduce: take a model's structural padding out without its reference (issue 16).

Neural structural obfuscation widens a network without changing its function: dummy neurons
(nothing reads them), split neurons (copies whose outgoing weights sum to the original), cliques
(copies whose outgoing weights cancel), inserted identity or monomial layers after a Relu.
Neurons with a constant output (no incoming weight) are folded into their readers' biases.
`reduce_model` removes them (pipeline.py), each rewrite proven by ONNX Runtime: neurons.py finds
the redundant neurons of a walker group, constants.py the constant ones, widths.py edits every slot
of the group at once, targets.py fits the Reshape targets that hold a changed width (attention
heads), layers.py folds inserted layers into their readers, report.py says what went; against.py
is the step resync and audit run (audit's own width and depth pairing: audit/widths.py, depth.py).
"""

from .pipeline import reduce_model  # noqa: F401
from .report import LayerReduction, ReduceReport  # noqa: F401
