"""Reading format version 1 of the compressed artifact (written by prunekit before the version 2 index).

Version 1 keeps one safetensors tensor per part (``NAME::PART``) and a JSON entry per tensor in the header,
with a SHA-256 of every decoded tensor. Those hashes do not cover the header's other fields, so this reader
checks every field it can against the tensors themselves: types and ranges, the parts each encoding has,
the non-zero count and the byte counts against the decoded tensor. What no tensor can confirm (the
``extra`` entry, the library version) is unprotected in version 1; version 2 covers every byte.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import torch
from safetensors.torch import load as st_load

from prunekit.compress.encodings import ENCODINGS, Encoded, decode
from prunekit.compress.index import DTYPES, FLOATS, MAX_NDIM, PART_ORDER
from prunekit.errors import ArtifactCorrupted, PrunekitError
from prunekit.limits import check_memory
from prunekit.quant.rounding import dequantize
from prunekit.spec import from_dict as spec_from_dict

SEP = "::"
_HEX = re.compile(r"[0-9a-f]{64}")
_INT_FIELDS = ("nonzero", "value_bytes", "index_bytes")
_ENTRY_KEYS = {"shape", "source_dtype", "dtype", "encoding", "params", "parts", "value_bytes", "index_bytes"}
_ENTRY_KEYS |= {"sha256", "nonzero", "spec"}
_SCALE_KEYS = {"scale_sha256", "scale_bytes"}
_HEADER_KEYS = {"format", "format_version", "library_version", "value_dtype", "tensors", "extra"}


def sha256_of(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_entry(name: str, e: Any) -> None:
    """One tensor's header entry: every field present, of its type and in range (else ValueError)."""
    if not isinstance(e, dict):
        raise ValueError("not a JSON object")
    keys = set(e)
    if keys != _ENTRY_KEYS and keys != _ENTRY_KEYS | _SCALE_KEYS:  # a renamed key is damage, not a default
        raise ValueError(f"fields {sorted(keys ^ _ENTRY_KEYS - _SCALE_KEYS)}")
    shape = e.get("shape")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_count(d) for d in shape)):
        raise ValueError(f"shape {shape!r}")
    for key in ("dtype", "source_dtype"):
        if e.get(key) not in DTYPES:
            raise ValueError(f"{key} {e.get(key)!r}")
    encoding = e.get("encoding")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r}")
    if e.get("parts") != sorted(PART_ORDER[encoding]):
        raise ValueError(f"parts {e.get('parts')!r} of a {encoding} tensor")
    params = e.get("params")
    expected = {"n", "m"} if encoding == "nm" else set()
    if not isinstance(params, dict) or set(params) != expected or not all(_count(v) for v in params.values()):
        raise ValueError(f"params {params!r}")
    if encoding == "nm" and not (1 <= params["n"] <= params["m"] and params["m"] >= 2):
        raise ValueError(f"N:M {params}")
    for key in _INT_FIELDS:
        if not _count(e.get(key)):
            raise ValueError(f"{key} {e.get(key)!r}")
    if e["nonzero"] > math.prod(shape):
        raise ValueError(f"nonzero {e['nonzero']} of {math.prod(shape)} elements")
    if not (isinstance(e.get("sha256"), str) and _HEX.fullmatch(e["sha256"])):
        raise ValueError("sha256")
    scaled = "scale_sha256" in e or "scale_bytes" in e
    if scaled:
        if not (isinstance(e.get("scale_sha256"), str) and _HEX.fullmatch(e["scale_sha256"])):
            raise ValueError("scale_sha256")
        if not (e["dtype"] == "int8" and e["source_dtype"] in FLOATS and len(shape) >= 2):
            raise ValueError("int8 scales on a tensor that is not a quantized weight")
        if e.get("scale_bytes") != shape[0] * 4:
            raise ValueError(f"scale_bytes {e.get('scale_bytes')!r}")
    if e.get("spec") is not None:
        spec_from_dict(e["spec"])  # a PrunekitError names what is wrong
    if SEP in name:
        raise ValueError(f"the name contains '{SEP}'")


def check_header(path, header: dict[str, Any], value_dtypes) -> None:
    """Every field of a version 1 header (raises ArtifactCorrupted naming the first bad one)."""
    if not set(header) <= _HEADER_KEYS or not {"format", "format_version", "value_dtype", "tensors"} <= set(
        header
    ):
        raise ArtifactCorrupted(f"{path}: damaged header: fields {sorted(set(header) ^ _HEADER_KEYS)}")
    if header.get("value_dtype") not in value_dtypes:
        raise ArtifactCorrupted(f"{path}: damaged header: value_dtype {header.get('value_dtype')!r}")
    extra, version = header.get("extra", {}), header.get("library_version", "")
    if not isinstance(version, str) or not isinstance(extra, dict):
        raise ArtifactCorrupted(f"{path}: damaged header: library_version or extra")
    tensors = header.get("tensors")
    if not isinstance(tensors, dict):
        raise ArtifactCorrupted(f"{path}: damaged header: no 'tensors' object")
    for name, entry in tensors.items():
        try:
            check_entry(name, entry)
        except (ValueError, PrunekitError) as exc:
            raise ArtifactCorrupted(f"{path}: damaged header of tensor '{name}': {exc}") from None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def load_v1(path, raw: bytes, header: dict[str, Any], dequantize_int8: bool) -> dict[str, torch.Tensor]:
    """Decode every tensor of a checked version 1 header, each against its SHA-256 and its header fields."""
    try:
        stored = st_load(raw)
    except Exception as exc:  # safetensors raises its own error types for a damaged body
        raise ArtifactCorrupted(f"{path}: damaged or truncated ({type(exc).__name__}: {exc})") from None
    expected = {f"{n}{SEP}{p}" for n, e in header["tensors"].items() for p in e["parts"]}
    expected |= {f"{n}{SEP}scale" for n, e in header["tensors"].items() if "scale_sha256" in e}
    if set(stored) != expected:
        odd = sorted(set(stored) ^ expected)[:3]
        raise ArtifactCorrupted(f"{path}: the stored tensors do not match the header (e.g. {odd})")
    decoded = sum(math.prod(e["shape"]) * 8 for e in header["tensors"].values())
    check_memory(len(raw) + decoded, f"decoding {path}")
    out: dict[str, torch.Tensor] = {}
    for name, entry in header["tensors"].items():
        parts = {p: stored[f"{name}{SEP}{p}"] for p in entry["parts"]}
        dtype = getattr(torch, entry["dtype"])
        try:
            tensor = decode(Encoded(entry["encoding"], parts, entry["params"]), tuple(entry["shape"]), dtype)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ArtifactCorrupted(f"{path}: tensor '{name}' cannot be decoded ({exc})") from None
        if tensor.dtype != dtype or sha256_of(tensor) != entry["sha256"]:
            raise ArtifactCorrupted(f"{path}: tensor '{name}' does not match its SHA-256")
        values = _nbytes(parts["values"])
        index = sum(_nbytes(t) for p, t in parts.items() if p != "values")
        if (entry["nonzero"], entry["value_bytes"], entry["index_bytes"]) != (
            int(torch.count_nonzero(tensor)) if tensor.numel() else 0,
            values,
            index,
        ):
            raise ArtifactCorrupted(f"{path}: the header's counts of tensor '{name}' do not match its data")
        if "scale_sha256" in entry:
            scale = stored[f"{name}{SEP}scale"]
            if scale.dtype != torch.float32 or sha256_of(scale) != entry["scale_sha256"]:
                raise ArtifactCorrupted(f"{path}: the scales of '{name}' do not match their SHA-256")
            if dequantize_int8:
                tensor = dequantize(tensor, scale, getattr(torch, entry["source_dtype"]))
            else:
                out[f"{name}{SEP}scale"] = scale
        out[name] = tensor
    return out
