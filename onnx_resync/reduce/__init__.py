"""reduce: take a model's structural padding out without its reference (issue 16).

Neural structural obfuscation widens a network without changing its function: dummy neurons
(nothing reads them), split neurons (copies whose outgoing weights sum to the original), cliques
(copies whose outgoing weights cancel), inserted identity or monomial layers after a Relu.
`reduce_model` removes them (pipeline.py), each rewrite proven by ONNX Runtime: neurons.py finds
the redundant neurons of a walker group, widths.py edits every slot of the group at once, layers.py
folds inserted layers into their readers, report.py says what went.
"""

from .pipeline import reduce_model  # noqa: F401
from .report import LayerReduction, ReduceReport  # noqa: F401
