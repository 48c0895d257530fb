"""One JSON convention for every report: numpy values become Python ones, and the non-finite floats
that JSON lacks become the strings 'inf', '-inf' and 'nan' (an infinite evidence stays readable)."""

from __future__ import annotations

import math

import numpy as np


def json_safe(obj):
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
