"""Reading a safetensors file's bytes without copying them: every tensor is a view of the one buffer.

``safetensors.torch.load(bytes)`` copies each tensor out of the bytes, so a file is held twice while it
loads; a crafted header could then make the rest of the load amplify that. Here the file is read once
into a buffer and each tensor is a view of it (a copy only where a tensor's offset is not aligned to its
element size), so reading an artifact costs its size once. The layout is checked as strictly as
safetensors does: a known dtype, a shape whose bytes are exactly the tensor's span, spans that tile the
data region with no gap, overlap or trailing byte. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from prunekit.errors import ArtifactCorrupted

MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}


def _fail(path: Path, why: str) -> ArtifactCorrupted:
    return ArtifactCorrupted(f"{path} is corrupted, truncated or not a safetensors file: {why}")


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(tensors as views of the file's bytes, the string metadata, the file's size)."""
    path = Path(path)
    with open(path, "rb") as handle:  # read into one buffer (bytes -> bytearray would hold it twice)
        size = os.fstat(handle.fileno()).st_size
        raw = bytearray(size)
        size = handle.readinto(raw)
    del raw[size:]  # a file that shrank while read
    if size < 8:
        raise _fail(path, f"{size} bytes")
    length = int.from_bytes(raw[:8], "little")
    if length > min(size - 8, MAX_HEADER):
        raise _fail(path, f"a header of {length:,} bytes in a file of {size:,}")
    try:
        header = json.loads(bytes(raw[8 : 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "its metadata is not a map of strings")
    base = 8 + length
    whole = torch.frombuffer(raw, dtype=torch.uint8) if size > base else torch.empty(0, dtype=torch.uint8)
    spans, tensors = [], {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            start, end = (int(v) for v in entry["data_offsets"])
            if not isinstance(entry["shape"], list) or min(shape, default=0) < 0:
                raise ValueError("shape")
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(path, f"tensor {name!r} is described wrongly ({exc})") from None
        if not 0 <= start <= end <= size - base or end - start != math.prod(shape) * dtype.itemsize:
            raise _fail(path, f"tensor {name!r} spans bytes {start}..{end} of {size - base}")
        spans.append((start, end))
        view = whole[base + start : base + end]
        if (base + start) % dtype.itemsize:
            view = view.clone()  # unaligned: a copy of this tensor alone
        tensors[name] = view.view(dtype).reshape(shape) if end > start else torch.empty(shape, dtype=dtype)
    at = 0
    for start, end in sorted(spans):
        if start != at:
            raise _fail(path, "its tensors leave a gap or overlap")
        at = end
    if at != size - base:
        raise _fail(path, f"{size - base - at} bytes follow the last tensor (damaged or appended to)")
    return tensors, metadata, size
