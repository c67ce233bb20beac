"""Measurements: accuracy and per-class recall, parameter and sparsity tables, MACs, latency."""

from prunekit.analysis.latency import compare_latency, measure_latency
from prunekit.analysis.macs import count_macs
from prunekit.analysis.metrics import classification_metrics, evaluate, prediction_agreement
from prunekit.analysis.sparsity import count_params, layer_table

__all__ = [
    "compare_latency",
    "count_macs",
    "measure_latency",
    "classification_metrics",
    "evaluate",
    "prediction_agreement",
    "count_params",
    "layer_table",
]
