"""The compressed artifact: one safetensors file holding two byte tensors, ``index`` (every tensor's name,
shape, dtypes, encoding and non-zero count, deflated; prunekit.compress.index) and ``payload`` (the parts
of every tensor's encoding, back to back), and a small JSON header (safetensors metadata ``prunekit``)
with the format, its version and one SHA-256 of the whole file. See docs/format.md.

Each tensor gets the smallest of dense / bitmask / CSR / N:M / R x 1 blocks for its value type. Values
stay in their float type, or become float16 / bfloat16, or int8 with one symmetric scale per output channel
(weights of two or more dimensions only; zeros stay exactly zero).

Integrity: the SHA-256 covers every byte of the file (computed with its own 64 hex digits set to ``0``),
header, index and payload alike, and is checked before anything in the file is trusted; a truncated,
damaged or edited file raises :class:`ArtifactCorrupted`. The index is then checked for consistency (the
parts it implies fill the payload exactly) and the decoded size against the memory limit
(prunekit.limits) before anything is allocated. Nothing is unpickled. Files of format version 1 (one
tensor per part, per-tensor JSON) are still read: prunekit.compress.legacy.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from prunekit import __version__
from prunekit.compress import legacy
from prunekit.compress.encodings import (
    ENCODINGS,
    Encoded,
    candidates,
    decode,
    encode_dense,
    nonzero_mask,
    smallest,
)
from prunekit.compress.index import PART_ORDER, BadIndex, Record, pack_index, unpack_index
from prunekit.errors import ArtifactCorrupted, PrunekitError
from prunekit.files import atomic_write_bytes
from prunekit.limits import check_memory
from prunekit.quant.rounding import dequantize, quantize_int8
from prunekit.spec import from_dict as spec_from_dict

FORMAT = "prunekit.compressed"
FORMAT_VERSION = 3  # the version written; 1 and 2 are still read
# version 3 is version 2's layout with the index deflated against a preset dictionary (compress.index); a
# version 2 index has none, so a reader of version 2 meets a dictionary only in a file that says version 3
FIRST_WITH_DICTIONARY = 3
VALUE_DTYPES = {
    "keep": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
_SEP = legacy.SEP
_ZERO = "0" * 64  # the digest's place while the digest is computed
_HEX = re.compile(r"[0-9a-f]{64}")
MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header
_CHUNK = 1 << 20


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


def _nm_of(spec: Mapping | None) -> tuple[int, int] | None:
    if spec and spec.get("type") == "nm":
        return int(spec["n"]), int(spec["m"])
    return None


def _block_rows_of(spec: Mapping | None) -> int | None:
    """R of an R x 1 block spec (the batch-1 kernels' layout), else None."""
    if spec and spec.get("type") == "block" and list(spec["shape"])[1:] == [1]:
        return int(spec["shape"][0])
    return None


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def encode_state(
    state: Mapping[str, torch.Tensor],
    value_dtype: str = "keep",
    specs: Mapping[str, Mapping] | None = None,
    encodings=ENCODINGS,
) -> tuple[list[Record], list[bytes], list[dict]]:
    """(index records, payload pieces in order, the distinct specs the records point to) for ``state``."""

    if value_dtype not in VALUE_DTYPES:
        raise PrunekitError(f"value dtype '{value_dtype}' is not one of: {', '.join(VALUE_DTYPES)}")
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown or "dense" not in encodings:
        raise PrunekitError(f"encodings must include 'dense' and come from: {', '.join(ENCODINGS)}")
    specs = specs or {}
    records: list[Record] = []
    pieces: list[bytes] = []
    spec_list: list[dict] = []
    for name, tensor in state.items():
        if _SEP in name or not name:
            raise PrunekitError(
                f"tensor name '{name}' is empty or contains '{_SEP}', which the format reserves"
            )
        t = tensor.detach().cpu().contiguous()
        source = str(t.dtype).removeprefix("torch.")
        target = VALUE_DTYPES[value_dtype]
        scale = None
        if t.is_floating_point() and target is torch.int8 and t.dim() >= 2:
            t, scale = quantize_int8(t)
        elif t.is_floating_point() and target is not None and target is not torch.int8:
            t = t.to(target)
        if t.is_floating_point():
            t = torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)  # -0.0 -> +0.0, see encodings
        enc: Encoded = smallest(t, _nm_of(specs.get(name)), encodings, _block_rows_of(specs.get(name)))
        spec = None
        if name in specs:
            spec_dict = dict(specs[name])
            if spec_dict not in spec_list:
                spec_list.append(spec_dict)
            spec = spec_list.index(spec_dict)
        record = Record(
            name=name,
            encoding=enc.encoding,
            dtype=str(t.dtype).removeprefix("torch."),
            source_dtype=source,
            shape=tuple(t.shape),
            nonzero=int(nonzero_mask(t).sum()),
            params=dict(enc.params),
            scale=scale is not None,
            spec=spec,
        )
        for part in PART_ORDER[enc.encoding]:
            pieces.append(_bytes_of(enc.parts[part]))
        if scale is not None:
            pieces.append(_bytes_of(scale.to(torch.float32)))
        records.append(record)
    return records, pieces, spec_list


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
    records, pieces, spec_list = encode_state(state, value_dtype, specs, encodings)
    head = {"library_version": __version__, "value_dtype": value_dtype, "specs": spec_list}
    if extra:
        head["extra"] = dict(extra)
    index = pack_index(head, records)
    payload = bytearray().join(pieces)  # one buffer the payload tensor views (no second copy)
    del pieces
    tensors = {
        "index": torch.frombuffer(bytearray(index), dtype=torch.uint8),
        "payload": torch.frombuffer(payload, dtype=torch.uint8)
        if payload
        else torch.empty(0, dtype=torch.uint8),
    }
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": _ZERO}
    data = bytearray(st_save(tensors, metadata={"prunekit": json.dumps(meta, separators=(",", ":"))}))
    del tensors, payload
    end = 8 + int.from_bytes(data[:8], "little")
    at = data.find(_ZERO.encode(), 0, end)  # the digest's place: the only 64 zeros in the header
    data[at : at + 64] = hashlib.sha256(data).hexdigest().encode()
    return atomic_write_bytes(path, data)


# -- reading ----------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """Where things are in a version 2 or 3 file (offsets from the start of the file)."""

    meta: dict[str, Any]
    prefix: bytes  # the 8 length bytes and the safetensors JSON header
    index: tuple[int, int]
    payload: tuple[int, int]
    size: int


def _prefix(path: Path, read_at: Callable[[int, int], bytes], size: int) -> tuple[bytes, dict[str, Any]]:
    """The safetensors prefix (length + JSON header) and the parsed header, bounded by the file's size."""
    if size < 8:
        raise ArtifactCorrupted(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
    length = int.from_bytes(read_at(0, 8), "little")
    if length > min(size - 8, MAX_HEADER):
        raise ArtifactCorrupted(
            f"{path}: its header claims {length:,} bytes, the file has {size - 8:,} after the length "
            "(truncated or damaged)"
        )
    prefix = read_at(0, 8 + length)
    try:
        header = json.loads(prefix[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactCorrupted(f"{path}: damaged safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactCorrupted(f"{path}: damaged safetensors header (not a JSON object)")
    return prefix, header


def _prunekit_meta(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "prunekit" not in meta:
        raise PrunekitError(f"{path}: not a prunekit compressed artifact (no 'prunekit' header)")
    try:
        value = json.loads(meta["prunekit"]) if isinstance(meta["prunekit"], str) else None
    except ValueError as exc:
        raise ArtifactCorrupted(f"{path}: damaged 'prunekit' header ({exc})") from None
    if not isinstance(value, dict):
        raise ArtifactCorrupted(f"{path}: damaged 'prunekit' header (not a JSON object)")
    if value.get("format") != FORMAT:
        raise PrunekitError(f"{path}: format {value.get('format')!r}, expected '{FORMAT}'")
    version = value.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactCorrupted(f"{path}: damaged 'prunekit' header: format_version {version!r}")
    if version > FORMAT_VERSION:
        raise PrunekitError(
            f"{path}: format version {version} is newer than this prunekit reads ({FORMAT_VERSION}); "
            "upgrade prunekit"
        )
    return value


def _layout(path: Path, prefix: bytes, header: dict[str, Any], meta: dict[str, Any], size: int) -> _Layout:
    """Check the safetensors header lists exactly ``index`` and ``payload``, bytes filling the file."""
    if set(header) != {"__metadata__", "index", "payload"} or set(meta) != {
        "format",
        "format_version",
        "sha256",
    }:
        raise ArtifactCorrupted(f"{path}: damaged header (unexpected entries)")
    if not (isinstance(meta["sha256"], str) and _HEX.fullmatch(meta["sha256"])):
        raise ArtifactCorrupted(f"{path}: damaged header (the sha256 is not 64 hex digits)")
    body = size - len(prefix)
    spans = {}
    for name in ("index", "payload"):
        entry = header[name]
        ok = (
            isinstance(entry, dict)
            and entry.get("dtype") == "U8"
            and set(entry)
            == {
                "dtype",
                "shape",
                "data_offsets",
            }
        )
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and len(shape) == 1 and isinstance(offsets, list)
        ok = ok and len(offsets) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
        if not ok or not 0 <= offsets[0] <= offsets[1] <= body or offsets[1] - offsets[0] != shape[0]:
            raise ArtifactCorrupted(f"{path}: damaged header (tensor '{name}')")
        spans[name] = (len(prefix) + offsets[0], len(prefix) + offsets[1])
    (a, b), (c, d) = sorted(spans.values())
    if a != len(prefix) or b != c or d != size:
        raise ArtifactCorrupted(f"{path}: the tensors do not fill the file (truncated or damaged)")
    return _Layout(meta, prefix, spans["index"], spans["payload"], size)


def _check_digest(path: Path, layout: _Layout, chunks) -> None:
    """SHA-256 of the file with its digest's 64 characters set to '0', against the digest."""
    digest = layout.meta["sha256"].encode()
    at = layout.prefix.find(digest)
    if at < 0 or layout.prefix.find(digest, at + 1) >= 0:
        raise ArtifactCorrupted(f"{path}: damaged header (its SHA-256 is not where it belongs)")
    h = hashlib.sha256()
    h.update(layout.prefix[:at])
    h.update(_ZERO.encode())
    h.update(layout.prefix[at + 64 :])
    for chunk in chunks:
        h.update(chunk)
    if h.hexdigest() != layout.meta["sha256"]:
        raise ArtifactCorrupted(
            f"{path} is corrupted: its bytes do not match the SHA-256 in its header (damaged, truncated "
            "or edited)"
        )


def _head_fields(path: Path, head: dict[str, Any]) -> list[dict]:
    """Check the index head's own fields; returns the specs."""
    if set(head) - {"library_version", "value_dtype", "specs", "extra"}:
        raise ArtifactCorrupted(f"{path}: the index has unknown fields {sorted(head)}")
    if head.get("value_dtype") not in VALUE_DTYPES or not isinstance(head.get("library_version"), str):
        raise ArtifactCorrupted(f"{path}: the index's value_dtype or library_version is damaged")
    if not isinstance(head.get("extra", {}), dict):
        raise ArtifactCorrupted(f"{path}: the index's 'extra' is not an object")
    specs = head.get("specs", [])
    for spec in specs:
        try:
            spec_from_dict(spec)
        except (PrunekitError, TypeError, AttributeError) as exc:
            raise ArtifactCorrupted(f"{path}: the index holds an invalid spec {spec!r} ({exc})") from None
    return specs


def _index(path: Path, layout: _Layout, blob: bytes) -> tuple[dict[str, Any], list[Record]]:
    try:
        head, records = unpack_index(blob, dictionary=layout.meta["format_version"] >= FIRST_WITH_DICTIONARY)
    except BadIndex as exc:
        raise ArtifactCorrupted(f"{path}: {exc}") from None
    _head_fields(path, head)
    total = sum(sum(r.part_bytes().values()) for r in records)
    if total != layout.payload[1] - layout.payload[0]:
        raise ArtifactCorrupted(
            f"{path}: the index describes {total:,} payload bytes, the file holds "
            f"{layout.payload[1] - layout.payload[0]:,}"
        )
    return head, records


def _logical(head: dict[str, Any], records: list[Record], version: int) -> dict[str, Any]:
    """The header as version 1 spelled it (one entry per tensor): what read_header returns for any version."""
    specs = head.get("specs", [])
    tensors = {}
    for r in records:
        sizes = r.part_bytes()
        entry = {
            "shape": list(r.shape),
            "dtype": r.dtype,
            "source_dtype": r.source_dtype,
            "encoding": r.encoding,
            "params": dict(r.params),
            "parts": sorted(PART_ORDER[r.encoding]),
            "nonzero": r.nonzero,
            "value_bytes": sizes["values"],
            "index_bytes": sum(v for k, v in sizes.items() if k not in ("values", "scale")),
            "spec": specs[r.spec] if r.spec is not None else None,
        }
        if r.scale:
            entry["scale_bytes"] = sizes["scale"]
        tensors[r.name] = entry
    out = {
        "format": FORMAT,
        "format_version": version,
        "library_version": head["library_version"],
        "value_dtype": head["value_dtype"],
        "tensors": tensors,
    }
    if "extra" in head:
        out["extra"] = head["extra"]
    return out


def _open_file(path: Path):
    if not path.is_file():
        raise PrunekitError(f"no such file: {path}")
    try:
        return open(path, "rb")
    except OSError as exc:
        raise PrunekitError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _reader(handle) -> Callable[[int, int], bytes]:
    def read_at(offset: int, count: int) -> bytes:
        handle.seek(offset)
        return handle.read(count)

    return read_at


def _file_chunks(handle, start: int):
    handle.seek(start)
    while chunk := handle.read(_CHUNK):
        yield chunk


def read_header(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The header (format, version, value dtype, extra, and per tensor: shape, dtypes, encoding, non-zeros,
    byte counts, spec), in version 1's layout whatever the file's version.

    ``verify`` (the default) checks the file's integrity first: the SHA-256 of every byte for version 2
    (streamed: memory stays small), the decoded tensors' SHA-256s for version 1. Without it only the
    header and index are read, and a damaged header is still an error; damaged tensor data is not seen.
    """
    path = Path(path)
    with _open_file(path) as handle:
        size = path.stat().st_size
        prefix, header = _prefix(path, _reader(handle), size)
        meta = _prunekit_meta(path, header)
        if meta["format_version"] == 1:
            legacy.check_header(path, meta, VALUE_DTYPES)
            if verify:
                handle.seek(0)
                legacy.load_v1(path, handle.read(), meta, dequantize_int8=False)
            return meta
        layout = _layout(path, prefix, header, meta, size)
        if verify:
            _check_digest(path, layout, _file_chunks(handle, len(prefix)))
        blob = _reader(handle)(layout.index[0], layout.index[1] - layout.index[0])
    head, records = _index(path, layout, blob)
    return _logical(head, records, meta["format_version"])


def _part(raw: memoryview, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    if not nbytes:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw[start : start + nbytes]), dtype=torch.uint8).view(dtype)


def _decode_record(path: Path, r: Record, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    dtype = getattr(torch, r.dtype)
    encoded = Encoded(r.encoding, {k: v for k, v in parts.items() if k != "scale"}, r.params)
    try:
        if r.encoding == "bitmask" and _popcount(parts["mask"], r.numel) != r.nonzero:
            raise ValueError("the mask's bits do not count the non-zeros")
        if r.encoding in ("csr", "block"):  # block: pointers per block-row to the kept blocks
            end = r.nonzero if r.encoding == "csr" else r.params["blocks"]
            indptr = parts["indptr"].to(torch.int64)
            if int(indptr[0]) != 0 or int(indptr[-1]) != end or bool((indptr[1:] < indptr[:-1]).any()):
                raise ValueError("the row pointers are not increasing from 0 to the entry count")
        tensor = decode(encoded, r.shape, dtype)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise ArtifactCorrupted(f"{path}: tensor '{r.name}' cannot be decoded ({exc})") from None
    if tensor.dtype != dtype or tuple(tensor.shape) != r.shape:
        raise ArtifactCorrupted(f"{path}: tensor '{r.name}' decodes to another dtype or shape")
    if int(nonzero_mask(tensor).sum()) != r.nonzero:
        raise ArtifactCorrupted(f"{path}: tensor '{r.name}' has another non-zero count than its index says")
    return tensor


def _popcount(mask: torch.Tensor, count: int) -> int:
    return int(np.unpackbits(mask.numpy(), count=count, bitorder="little").sum(dtype=np.int64))


def _decoded_bytes(records: list[Record], dequantize_int8: bool) -> int:
    """What decoding allocates: every output tensor (and its float copy for dequantized int8 weights), plus
    the largest tensor's scratch (unpacked mask bits, CSR row and column numbers)."""
    total, scratch = 0, 0
    for r in records:
        out = r.numel * getattr(torch, r.dtype).itemsize
        if r.scale and dequantize_int8:
            out += r.numel * (4 + getattr(torch, r.source_dtype).itemsize)
        total += out
        scratch = max(scratch, 2 * r.numel + 16 * r.nonzero)
    return total + scratch


def _stored_records(path: Path, dequantize_int8: bool):
    """(meta, raw bytes) of a version 1 file, or (meta, [(record, parts, decoded tensor), ...]) of a version 2
    file, after its SHA-256 and memory checks."""
    with _open_file(path) as handle:
        raw = handle.read()
    view = memoryview(raw)
    prefix, header = _prefix(path, lambda offset, count: raw[offset : offset + count], len(raw))
    meta = _prunekit_meta(path, header)
    if meta["format_version"] == 1:
        legacy.check_header(path, meta, VALUE_DTYPES)
        return meta, raw
    layout = _layout(path, prefix, header, meta, len(raw))
    _check_digest(path, layout, [view[len(prefix) :]])
    head, records = _index(path, layout, raw[layout.index[0] : layout.index[1]])
    check_memory(len(raw) + _decoded_bytes(records, dequantize_int8), f"decoding {path}")
    out = []
    at = layout.payload[0]
    for r in records:
        parts, sizes = {}, r.part_bytes()
        for part, dtype in r.part_dtypes().items():
            nbytes = sizes[part]
            parts[part] = _part(view, at, nbytes, dtype)
            at += nbytes
        out.append((r, parts, _decode_record(path, r, parts)))
    return meta, out


def load_compressed(path: str | Path, dequantize_int8: bool = True) -> dict[str, torch.Tensor]:
    """Decode every tensor after checking the file's SHA-256 (version 2) or each tensor's (version 1).
    int8 weights come back as float (``q * scale``, in their original dtype) unless ``dequantize_int8=False``,
    which returns the int8 tensors (and ``name::scale``)."""
    path = Path(path)
    meta, stored = _stored_records(path, dequantize_int8)
    if meta["format_version"] == 1:
        return legacy.load_v1(path, stored, meta, dequantize_int8)
    out: dict[str, torch.Tensor] = {}
    for r, parts, tensor in stored:
        if r.scale:
            if dequantize_int8:
                tensor = dequantize(tensor, parts["scale"], getattr(torch, r.source_dtype))
            else:
                out[f"{r.name}{_SEP}scale"] = parts["scale"]
        out[r.name] = tensor
    return out


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the file holds it (the file checked first): its encoding and parts, the decoded tensor,
    and the int8 scales (None for other values)."""

    encoded: Encoded
    tensor: torch.Tensor
    scale: torch.Tensor | None
    source_dtype: torch.dtype


def load_stored(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor with its stored encoding (e.g. the R x 1 blocks a batch-1 kernel runs as they are), after
    the same checks as :func:`load_compressed`. A version 1 file's encodings are derived again from the
    decoded tensors and their specs, as its writer chose them."""
    path = Path(path)
    meta, stored = _stored_records(path, dequantize_int8=False)
    out: dict[str, StoredTensor] = {}
    if meta["format_version"] == 1:
        tensors = legacy.load_v1(path, stored, meta, dequantize_int8=False)
        for name, entry in meta["tensors"].items():
            t, spec = tensors[name], entry.get("spec")
            options = candidates(t, _nm_of(spec), _block_rows_of(spec))
            encoded = next((e for e in options if e.encoding == entry["encoding"]), encode_dense(t))
            scale = tensors.get(f"{name}{_SEP}scale")
            out[name] = StoredTensor(encoded, t, scale, getattr(torch, entry["source_dtype"]))
        return out
    for r, parts, tensor in stored:
        encoded = Encoded(r.encoding, {k: v for k, v in parts.items() if k != "scale"}, dict(r.params))
        scale = parts["scale"] if r.scale else None
        out[r.name] = StoredTensor(encoded, tensor, scale, getattr(torch, r.source_dtype))
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
    """Whether ``path`` claims to be a compressed artifact (only its format field is read)."""
    path = Path(path)
    try:
        with _open_file(path) as handle:
            _, header = _prefix(path, _reader(handle), path.stat().st_size)
        meta = header.get("__metadata__")
        value = json.loads(meta["prunekit"]) if isinstance(meta, dict) else None
    except (PrunekitError, OSError, KeyError, TypeError, ValueError):
        return False  # unreadable files are reported by whichever reader the caller falls back to
    return isinstance(value, dict) and value.get("format") == FORMAT
