"""Measurements: accuracy and per-class recall, parameter and sparsity tables, MACs, latency.

Names are imported lazily, so a light submodule (``prunekit.analysis.perclass``, used by the CLI at start-up)
does not pull torch in with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compare_latency": "prunekit.analysis.latency",
    "measure_latency": "prunekit.analysis.latency",
    "count_macs": "prunekit.analysis.macs",
    "classification_metrics": "prunekit.analysis.metrics",
    "evaluate": "prunekit.analysis.metrics",
    "prediction_agreement": "prunekit.analysis.metrics",
    "count_params": "prunekit.analysis.sparsity",
    "layer_table": "prunekit.analysis.sparsity",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prunekit.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
