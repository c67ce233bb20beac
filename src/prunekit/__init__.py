"""prunekit: make neural networks smaller and faster by pruning, and prove it with measurements.

The public API, imported lazily so ``import prunekit`` stays cheap::

    import prunekit as pk
    sparsifier = pk.Sparsifier(model, "0.7", criterion="magnitude", group="global")
    sparsifier.prune()
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PrunekitError": "prunekit.errors",
    "Unstructured": "prunekit.spec",
    "NM": "prunekit.spec",
    "Block": "prunekit.spec",
    "parse_spec": ("prunekit.spec", "parse"),
    "Targets": "prunekit.targets",
    "Sparsifier": "prunekit.sparsifier",
    "apply_masks": "prunekit.masking",
    "get_masks": "prunekit.masking",
    "squash": "prunekit.masking",
    "load_masked_state_dict": "prunekit.masking",
    "select_masks": "prunekit.select",
    "nm_mask": "prunekit.select",
    "OneShot": "prunekit.schedule",
    "Iterative": "prunekit.schedule",
    "AGP": "prunekit.schedule",
    "find_ticket": "prunekit.lottery",
    "Ticket": "prunekit.lottery",
    "TrainConfig": "prunekit.recovery",
    "train": "prunekit.recovery",
    "Distiller": "prunekit.recovery",
    "quantize_model": "prunekit.quant.ptq",
    "prepare_qat": "prunekit.quant.qat",
    "convert_qat": "prunekit.quant.qat",
    "save_artifact": "prunekit.artifact",
    "load_artifact": "prunekit.artifact",
    "Store": "prunekit.store",
    "run_recipe": "prunekit.jobs.run",
    "load_recipe": ("prunekit.jobs.recipe", "load"),
    "measure_latency": "prunekit.analysis",
    "count_params": "prunekit.analysis",
    "layer_table": "prunekit.analysis",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
