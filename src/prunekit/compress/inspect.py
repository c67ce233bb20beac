"""Exact size accounting of a compressed artifact: per tensor and in total, with index bytes apart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prunekit.compress.container import dense_bytes, read_header, tensor_infos


def inspect_compressed(path: str | Path, verify: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (tensor, shape, encoding, dtype, nonzero, sparsity, value/index/scale bytes, dense bytes) and
    totals, including the file's own overhead (the safetensors header, the tensor index, alignment).

    ``verify`` (the default) checks the file's integrity first (see
    :func:`prunekit.compress.container.read_header`); ``totals["verified"]`` says whether it was."""
    path = Path(path)
    header = read_header(path, verify=verify)
    rows = []
    for info in tensor_infos(header):
        numel = math.prod(info.shape)
        rows.append(
            {
                "tensor": info.name,
                "shape": list(info.shape),
                "encoding": info.encoding,
                "dtype": info.dtype,
                "nonzero": info.nonzero,
                "sparsity": 1 - info.nonzero / numel if numel else 0.0,
                "value_bytes": info.value_bytes,
                "index_bytes": info.index_bytes,
                "scale_bytes": info.scale_bytes,
                "bytes": info.total_bytes,
                "dense_bytes": dense_bytes(info),
            }
        )
    size = path.stat().st_size
    payload = sum(r["bytes"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    totals = {
        "value_bytes": sum(r["value_bytes"] for r in rows),
        "index_bytes": sum(r["index_bytes"] for r in rows),
        "scale_bytes": sum(r["scale_bytes"] for r in rows),
        "payload_bytes": payload,
        "file_overhead_bytes": size - payload,
        "file_bytes": size,
        "dense_bytes": dense,
        "ratio_vs_dense": dense / size if size else 0.0,
        "value_dtype": header.get("value_dtype"),
        "format_version": header.get("format_version"),
        "verified": verify,
    }
    return rows, totals
