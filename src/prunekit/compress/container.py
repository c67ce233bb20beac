"""The compressed artifact: one safetensors file whose tensors are the parts of each weight's encoding,
and whose JSON header (safetensors metadata ``prunekit``) says how to decode them. See docs/format.md.

Each tensor gets the smallest of dense / bitmask / CSR / N:M for its value type. Values stay in their
float type, or become float16 / bfloat16, or int8 with one symmetric scale per output channel (weights of
two or more dimensions only; zeros stay exactly zero). A SHA-256 of every decoded tensor (and of its
scales) is checked on load: corrupted or truncated files raise :class:`ArtifactCorrupted`, never give
silent garbage. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prunekit import __version__
from prunekit.compress.encodings import ENCODINGS, Encoded, decode, nonzero_mask, smallest
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_bytes, safetensors_metadata
from prunekit.quant.rounding import dequantize, quantize_int8

FORMAT = "prunekit.compressed"
FORMAT_VERSION = 1
VALUE_DTYPES = {
    "keep": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
_SEP = "::"


class ArtifactCorrupted(PrunekitError):
    """The file is not a complete, unmodified prunekit compressed artifact."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the decoded tensor's dtype (int8 for quantized weights)
    source_dtype: str  # the dtype it had before compression
    encoding: str
    nonzero: int
    value_bytes: int
    index_bytes: int
    scale_bytes: int
    spec: dict | None

    @property
    def total_bytes(self) -> int:
        return self.value_bytes + self.index_bytes + self.scale_bytes


def _sha256(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _nm_of(spec: Mapping | None) -> tuple[int, int] | None:
    if spec and spec.get("type") == "nm":
        return int(spec["n"]), int(spec["m"])
    return None


def _block_rows_of(spec: Mapping | None) -> int | None:
    """R of an R x 1 block spec (the batch-1 kernels' layout), else None."""
    if spec and spec.get("type") == "block" and list(spec["shape"])[1:] == [1]:
        return int(spec["shape"][0])
    return None


def encode_state(
    state: Mapping[str, torch.Tensor],
    value_dtype: str = "keep",
    specs: Mapping[str, Mapping] | None = None,
    encodings=ENCODINGS,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and header of a compressed artifact for ``state`` (name -> tensor)."""

    if value_dtype not in VALUE_DTYPES:
        raise PrunekitError(f"value dtype '{value_dtype}' is not one of: {', '.join(VALUE_DTYPES)}")
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown or "dense" not in encodings:
        raise PrunekitError(f"encodings must include 'dense' and come from: {', '.join(ENCODINGS)}")
    specs = specs or {}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name, tensor in state.items():
        if _SEP in name:
            raise PrunekitError(f"tensor name '{name}' contains '{_SEP}', which the format reserves")
        t = tensor.detach().cpu().contiguous()
        entry: dict[str, Any] = {"shape": list(t.shape), "source_dtype": str(t.dtype).removeprefix("torch.")}
        target = VALUE_DTYPES[value_dtype]
        scale = None
        if t.is_floating_point() and target is torch.int8 and t.dim() >= 2:
            t, scale = quantize_int8(t)
        elif t.is_floating_point() and target is not None and target is not torch.int8:
            t = t.to(target)
        if t.is_floating_point():
            t = torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)  # -0.0 -> +0.0, see encodings
        spec = specs.get(name)
        enc: Encoded = smallest(t, _nm_of(spec), encodings, _block_rows_of(spec))
        for part, value in enc.parts.items():
            tensors[f"{name}{_SEP}{part}"] = value
        entry.update(
            dtype=str(t.dtype).removeprefix("torch."),
            encoding=enc.encoding,
            params=enc.params,
            parts=sorted(enc.parts),
            value_bytes=enc.value_bytes,
            index_bytes=enc.index_bytes,
            sha256=_sha256(t),
            nonzero=int(nonzero_mask(t).sum()),
            spec=dict(specs[name]) if name in specs else None,
        )
        if scale is not None:
            tensors[f"{name}{_SEP}scale"] = scale
            entry.update(scale_sha256=_sha256(scale), scale_bytes=scale.numel() * 4)
        entries[name] = entry
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "value_dtype": value_dtype,
        "tensors": entries,
    }
    return tensors, header


def save_compressed(
    state: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | Path,
    value_dtype: str = "keep",
    specs: Mapping[str, Mapping] | None = None,
    encodings=ENCODINGS,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state`` (a state dict, or a module's) compressed to ``path``, atomically."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors, header = encode_state(state, value_dtype, specs, encodings)
    if extra:
        header["extra"] = dict(extra)
    data = st_save(tensors, metadata={"prunekit": json.dumps(header, sort_keys=True, separators=(",", ":"))})
    return atomic_write_bytes(path, data)


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header alone (cheap: the tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"no such file: {path}")
    try:
        meta = safetensors_metadata(path)
    except PrunekitError as exc:
        raise ArtifactCorrupted(f"{exc} (truncated or damaged)") from None
    if "prunekit" not in meta:
        raise PrunekitError(f"{path}: not a prunekit compressed artifact (no 'prunekit' header)")
    try:
        header = json.loads(meta["prunekit"])
    except ValueError as exc:
        raise ArtifactCorrupted(f"{path}: damaged 'prunekit' header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else header
        raise PrunekitError(f"{path}: format '{found}', expected '{FORMAT}'")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise PrunekitError(
            f"{path}: format version {header['format_version']} is newer than this prunekit reads "
            f"({FORMAT_VERSION}); upgrade prunekit"
        )
    return header


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the file holds it (checked against its SHA-256): its encoding and parts, the decoded
    tensor, and the int8 scales (None for other values)."""

    encoded: Encoded
    tensor: torch.Tensor
    scale: torch.Tensor | None
    source_dtype: torch.dtype


def load_compressed(path: str | Path, dequantize_int8: bool = True) -> dict[str, torch.Tensor]:
    """Decode every tensor, checking each against its SHA-256. int8 weights come back as float32
    (``q * scale``) unless ``dequantize_int8=False``, which returns the int8 tensors (and ``name::scale``)."""
    out: dict[str, torch.Tensor] = {}
    for name, st in load_stored(path).items():
        if st.scale is not None and dequantize_int8:
            out[name] = dequantize(st.tensor, st.scale, st.source_dtype)
            continue
        if st.scale is not None:
            out[f"{name}{_SEP}scale"] = st.scale
        out[name] = st.tensor
    return out


def load_stored(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor with its stored encoding (e.g. the R x 1 blocks a batch-1 kernel runs as they are),
    each checked against its SHA-256."""
    path = Path(path)
    header = read_header(path)
    try:
        stored = st_load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for a damaged body
        raise ArtifactCorrupted(f"{path}: damaged or truncated ({type(exc).__name__}: {exc})") from None
    out: dict[str, StoredTensor] = {}
    for name, entry in header["tensors"].items():
        try:
            parts = {p: stored[f"{name}{_SEP}{p}"] for p in entry["parts"]}
            dtype = getattr(torch, entry["dtype"])
            encoded = Encoded(entry["encoding"], parts, entry["params"])
            tensor = decode(encoded, tuple(entry["shape"]), dtype)
        except (KeyError, RuntimeError, ValueError, IndexError) as exc:
            raise ArtifactCorrupted(f"{path}: tensor '{name}' cannot be decoded ({exc})") from None
        if tensor.dtype != dtype or _sha256(tensor) != entry["sha256"]:
            raise ArtifactCorrupted(f"{path}: tensor '{name}' does not match its SHA-256")
        scale = None
        if "scale_sha256" in entry:
            scale = stored.get(f"{name}{_SEP}scale")
            if scale is None or _sha256(scale) != entry["scale_sha256"]:
                raise ArtifactCorrupted(f"{path}: the scales of '{name}' do not match their SHA-256")
        out[name] = StoredTensor(encoded, tensor, scale, getattr(torch, entry["source_dtype"]))
    return out


def tensor_infos(header: Mapping[str, Any]) -> list[TensorInfo]:
    rows = []
    for name, e in header["tensors"].items():
        rows.append(
            TensorInfo(
                name,
                tuple(e["shape"]),
                e["dtype"],
                e["source_dtype"],
                e["encoding"],
                e["nonzero"],
                e["value_bytes"],
                e["index_bytes"],
                e.get("scale_bytes", 0),
                e.get("spec"),
            )
        )
    return rows


def dense_bytes(info: TensorInfo) -> int:
    """What the tensor takes stored dense in its source dtype (the baseline for size ratios)."""
    return math.prod(info.shape) * getattr(torch, info.source_dtype).itemsize


def is_compressed(path: str | Path) -> bool:
    """Whether ``path`` claims to be a compressed artifact (its header is checked, not its tensors)."""
    try:
        read_header(path)
    except PrunekitError:  # unreadable files are reported by whichever reader the caller falls back to
        return False
    return True
