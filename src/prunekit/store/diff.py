"""``diff A B``: two entries' metrics and per-layer sparsity side by side, with B - A.

Metrics are flattened to dotted keys (``latency_ms.p50``, ``per_class_recall.3``) so nested and per-class
numbers line up; only numbers (and None where one side lacks the key) are compared. Layers are matched by
name; a layer present on one side only (a structured pruning removed it, say) shows None on the other.
"""

from __future__ import annotations

from typing import Any

from prunekit.store.manifest import Entry

# shown first, in this order; the rest follow sorted
_FIRST = (
    "accuracy",
    "sparsity",
    "params",
    "nonzero_params",
    "size_bytes",
    "compressed_size_bytes",
    "latency_ms.p50",
    "latency_ms.p99",
)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """The numbers of nested dicts under dotted keys; lists only when all numbers (per-class recall), so
    per-layer timing tables and the like (lists of dicts) stay out of the comparison."""
    out: dict[str, float | int] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _number(value):
            out[name] = value
        elif isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(_number(v) for v in value):
            out.update({f"{name}.{i}": v for i, v in enumerate(value)})
    return out


def _delta(a: Any, b: Any) -> float | int | None:
    return b - a if _number(a) and _number(b) else None


def _rows(a: dict[str, Any], b: dict[str, Any], first: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    keys = [k for k in first if k in a or k in b]
    keys += sorted((set(a) | set(b)) - set(keys))
    return [{"key": k, "a": a.get(k), "b": b.get(k), "delta": _delta(a.get(k), b.get(k))} for k in keys]


def _layer_sparsity(entry: Entry) -> dict[str, float]:
    return {row["layer"]: row["sparsity"] for row in entry.manifest.get("layers") or []}


def diff_entries(a: Entry, b: Entry) -> dict[str, Any]:
    """{a, b, metrics: [{key, a, b, delta}], layers: [...], files: [...], same_files: bool}."""
    # support: the test set's class counts, a property of the data, not of either model
    metrics_a = {
        k: v for k, v in flatten(a.manifest.get("metrics") or {}).items() if not k.startswith("support.")
    }
    metrics_b = {
        k: v for k, v in flatten(b.manifest.get("metrics") or {}).items() if not k.startswith("support.")
    }
    for side, entry in ((metrics_a, a), (metrics_b, b)):
        recovery = entry.manifest.get("recovery")
        side["recovery_epochs"] = recovery["epochs"] if recovery else None
    files = [
        {"file": name, "a": a.files.get(name, {}).get("sha256"), "b": b.files.get(name, {}).get("sha256")}
        for name in sorted(set(a.files) | set(b.files))
    ]
    return {
        "a": {"name": a.name, "hash": a.hash, "parent": a.parent},
        "b": {"name": b.name, "hash": b.hash, "parent": b.parent},
        "metrics": _rows(metrics_a, metrics_b, _FIRST + ("recovery_epochs",)),
        "layers": _layer_rows(_layer_sparsity(a), _layer_sparsity(b)),
        "files": files,
    }


def _layer_rows(a: dict[str, float], b: dict[str, float]) -> list[dict[str, Any]]:
    order = list(a) + [k for k in b if k not in a]  # the model's own layer order, not alphabetical
    return [{"layer": k, "a": a.get(k), "b": b.get(k), "delta": _delta(a.get(k), b.get(k))} for k in order]
