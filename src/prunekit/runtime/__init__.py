"""CPU execution of pruned weights: sparse kernels where measured faster, dense everywhere else.

    compiled = prunekit.runtime.compile(model, example_inputs)
    print(prunekit.runtime.report(compiled))

Imported lazily: ``import prunekit.runtime`` loads neither numba nor any kernel; kernels compile (JIT) on
their first call. See ``docs/runtime.md``. (The module is ``compiler``, not ``compile``: a submodule named
like the function would replace it as an attribute of this package once imported.)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compile": "prunekit.runtime.compiler",
    "report": "prunekit.runtime.compiler",
    "RuntimeReport": "prunekit.runtime.compiler",
    "LayerDecision": "prunekit.runtime.compiler",
    "SparseLinear": "prunekit.runtime.layers",
    "SparseLinearChain": "prunekit.runtime.layers",
    "SparseConv2d": "prunekit.runtime.layers",
    "SparseQuantizedLinear": "prunekit.runtime.layers",
    "SparseQuantizedConv2d": "prunekit.runtime.layers",
    "SparseWeight": "prunekit.runtime.formats",
    "GemvLinear": "prunekit.runtime.gemv",
    "from_compressed": "prunekit.runtime.gemv",
    "pack": "prunekit.runtime.formats",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'prunekit.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(target), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
