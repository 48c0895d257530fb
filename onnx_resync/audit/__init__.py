"""audit: is a vendor's file our model? Canonical form, order-free alignment, resync, verdict.

canonical.py runs the passes (passes/, over the workspace of rewrite.py) that put a file in
canonical form; align.py pairs its layers with the reference's; report.py builds the verdict;
html.py draws it; batch.py audits many files.
"""

from .report import AuditReport, LayerRow, audit, audit_file, decision  # noqa: F401
