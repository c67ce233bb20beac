"""The binary tensor index of the compressed format, versions 2 and 3 (docs/format.md).

One record per tensor, in payload order, each a few bytes plus the part of its name it does not share
with the previous name; the byte length of every part follows from the record (shape, dtypes, encoding,
non-zero count), so nothing is stored twice and a reader checks that the parts add up to the payload
exactly. The index (a JSON head for the file-level fields, then the records) is deflate-compressed,
in version 3 with a preset dictionary (:data:`DICTIONARIES`) of the strings every index repeats, so a
small model's index does not pay for spelling them out once (zlib's FDICT: the stream names its dictionary
by Adler-32); version 2's index has none.

Records, all integers unsigned LEB128 varints unless said otherwise::

    shared            bytes of the previous name this name starts with
    suffix length, suffix bytes (UTF-8)
    encoding          1 byte: 0 dense, 1 bitmask, 2 csr, 3 nm, 4 block
    dtype, source     1 byte each: DTYPES index of the stored and of the original dtype
    flags             1 byte: 1 = int8 scales follow the parts, 2 = a spec index follows
    ndim, dims...
    nonzero
    n, m              (nm only)
    rows, blocks      (block only: R of the R x 1 blocks, the number of kept blocks)
    spec              (flag 2 only) index into the head's "specs"
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.compress.encodings import ENCODINGS, narrowest_uint
from prunekit.errors import PrunekitError

DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
    "uint16",
    "uint32",
    "uint64",
)
FLOATS = ("float32", "float16", "bfloat16", "float64")
PART_ORDER = {  # the order a tensor's parts follow each other in the payload (its scales come last)
    "dense": ("values",),
    "bitmask": ("mask", "values"),
    "csr": ("indptr", "indices", "values"),
    "nm": ("slots", "values"),
    "block": ("indptr", "indices", "values"),
}
HAS_SCALE, HAS_SPEC = 1, 2
MAX_NDIM = 64
# a deflate stream expands at most ~1032x; a real index expands 3-6x: more is a crafted file
MAX_EXPANSION = 64
_SLACK = 1 << 16

# The preset deflate dictionary (RFC 1950 FDICT) of format version 3's index: the strings heads and tensor
# names repeat, the most frequent last (deflate finds the nearest match first). Written files name it by its
# Adler-32, so this text is frozen: a better dictionary is a new entry, and readers keep every old one.
_DICTIONARY_1 = "".join(
    (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
        "mlp.up_proj.weight",
        "mlp.gate_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.q_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "model.layers.",
        "encoder.layer.",
        "attention.output.dense.weight",
        "intermediate.dense.weight",
        "output.LayerNorm.weight",
        "attention.self.query",
        "layer4.",
        "layer3.",
        "layer2.",
        "features.",
        "classifier.",
        "downsample.",
        "shortcut.",
        "layer1.0.conv1.",
        "stem.",
        "fc.",
        '"dtype":"bfloat16"',
        '{"n":2,"m":4,"type":"nm"}',
        '{"shape":[8,1],"sparsity":0.5,"type":"block"}',
        '"structured":[]',
        '"source":"pruned.safetensors"',
        '"recipe":"',
        '"model":{"args":{"blocks":',
        '"in_channels":',
        '"num_classes":',
        '"widths":[',
        '"name":"resnet-digits"',
        '"graph":{"inputs":["x"],"ops":{"int8_ops.x":"QuantizeInput"',
        '"int8_ops.pool":"QuantizedGlobalAvgPool"',
        '"int8_ops.add":"QuantizedAdd"',
        '"folded":{',
        '{"bias":true,"output":"int32","static":true,"type":"QuantizedLinear"}',
        '{"bias":true,"output":"int8","static":true,"type":"QuantizedConv2d"}',
        '{"extra":{"int8":{"layers":{',
        '"value_dtype":"int8"',
        '"library_version":"0.1.0","specs":[{"sparsity":0.5,"type":"unstructured"}],"value_dtype":"keep"}',
        "running_mean\x00\x00\x00\x00\x01",
        "running_var",
        "num_batches_tracked\x00\x08\x08\x00\x00\x01\x00",
        "bias\x00\x00\x00\x00\x01",
        "weight\x00\x00\x00\x00\x01",
        ".conv1.weight",
        ".conv2.weight",
        ".bn1.weight",
        ".bn2.weight",
    )
).encode("latin-1")
DICTIONARIES = {zlib.adler32(d): d for d in (_DICTIONARY_1,)}
WRITE_DICTIONARY = _DICTIONARY_1


class BadIndex(PrunekitError):
    """The index does not describe a valid set of tensors (the container names the file and re-raises it as
    :class:`prunekit.compress.ArtifactCorrupted`)."""


@dataclass(frozen=True)
class Record:
    name: str
    encoding: str
    dtype: str
    source_dtype: str
    shape: tuple[int, ...]
    nonzero: int
    params: dict  # {"n": .., "m": ..} for nm, {"rows": .., "blocks": ..} for block
    scale: bool
    spec: int | None  # index into the specs list

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def part_dtypes(self) -> dict[str, torch.dtype]:
        """Each part's dtype, in payload order (scales last)."""
        dtype = getattr(torch, self.dtype)
        if self.encoding == "bitmask":
            out = {"mask": torch.uint8, "values": dtype}
        elif self.encoding == "csr":
            rows, cols = csr_rows_cols(self.shape)
            out = {
                "indptr": narrowest_uint(self.nonzero),
                "indices": narrowest_uint(max(cols - 1, 0)),
                "values": dtype,
            }
        elif self.encoding == "nm":
            out = {"slots": torch.uint8, "values": dtype}
        elif self.encoding == "block":
            _, cols = csr_rows_cols(self.shape)
            out = {
                "indptr": narrowest_uint(self.params["blocks"]),
                "indices": narrowest_uint(max(cols - 1, 0)),
                "values": dtype,
            }
        else:
            out = {"values": dtype}
        if self.scale:
            out["scale"] = torch.float32
        return out

    def part_counts(self) -> dict[str, int]:
        """Elements of each part (what the writer stored for this record)."""
        numel, nnz = self.numel, self.nonzero
        if self.encoding == "dense":
            out = {"values": numel}
        elif self.encoding == "bitmask":
            out = {"mask": (numel + 7) // 8, "values": nnz}
        elif self.encoding == "csr":
            rows, _ = csr_rows_cols(self.shape)
            out = {"indptr": rows + 1, "indices": nnz, "values": nnz}
        elif self.encoding == "block":
            r, blocks = self.params["rows"], self.params["blocks"]
            out = {"indptr": self.shape[0] // r + 1, "indices": blocks, "values": blocks * r}
        else:
            n, m = self.params["n"], self.params["m"]
            slots = numel // m * n
            out = {"slots": (slots * slot_bits(m) + 7) // 8, "values": slots}
        if self.scale:
            out["scale"] = self.shape[0]
        return out

    def part_bytes(self) -> dict[str, int]:
        dtypes = self.part_dtypes()
        return {k: count * dtypes[k].itemsize for k, count in self.part_counts().items()}


def csr_rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def slot_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


# -- varints ----------------------------------------------------------------------------------------------
def _put(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise BadIndex("the index ends in the middle of a record")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:  # no field of this format needs more than 64 bits
                raise BadIndex("a number in the index is longer than 64 bits")

    def take(self, count: int) -> bytes:
        if count > len(self.data) - self.pos:
            raise BadIndex("the index ends in the middle of a name")
        self.pos += count
        return self.data[self.pos - count : self.pos]


# -- writing ----------------------------------------------------------------------------------------------
def pack_index(head: dict[str, Any], records: list[Record]) -> bytes:
    """The deflated index: a JSON head (length-prefixed), the record count, the records."""
    text = json.dumps(head, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    out = bytearray()
    _put(out, len(text))
    out += text
    _put(out, len(records))
    previous = b""
    for r in records:
        name = r.name.encode("utf-8")
        shared = 0
        while shared < min(len(name), len(previous)) and name[shared] == previous[shared]:
            shared += 1
        _put(out, shared)
        _put(out, len(name) - shared)
        out += name[shared:]
        out.append(ENCODINGS.index(r.encoding))
        out.append(DTYPES.index(r.dtype))
        out.append(DTYPES.index(r.source_dtype))
        out.append((HAS_SCALE if r.scale else 0) | (HAS_SPEC if r.spec is not None else 0))
        _put(out, len(r.shape))
        for d in r.shape:
            _put(out, d)
        _put(out, r.nonzero)
        if r.encoding == "nm":
            _put(out, r.params["n"])
            _put(out, r.params["m"])
        elif r.encoding == "block":
            _put(out, r.params["rows"])
            _put(out, r.params["blocks"])
        if r.spec is not None:
            _put(out, r.spec)
        previous = name
    deflater = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS, 9, zdict=WRITE_DICTIONARY)
    return deflater.compress(bytes(out)) + deflater.flush()


# -- reading ----------------------------------------------------------------------------------------------
def inflate(blob: bytes, dictionary: bool = True) -> bytes:
    """Decompress the index, refusing a stream that expands beyond any real index (a deflate bomb), and one
    that names a preset dictionary when ``dictionary`` is False (format version 2)."""
    limit = MAX_EXPANSION * len(blob) + _SLACK
    zdict = _dictionary_of(blob)
    if zdict and not dictionary:
        raise BadIndex("the index names a deflate dictionary, which this format version does not use")
    try:
        inflater = zlib.decompressobj(zdict=zdict)
        data = inflater.decompress(blob, limit)
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise BadIndex(
                "the index does not inflate to a complete stream of at most "
                f"{MAX_EXPANSION}x its size (truncated, damaged or crafted)"
            )
    except zlib.error as exc:
        raise BadIndex(f"the index does not inflate ({exc})") from None
    return data


def _dictionary_of(blob: bytes) -> bytes:
    """The preset dictionary a zlib stream names in its header (FDICT), or none."""
    if len(blob) < 6 or not blob[1] & 0x20:
        return b""
    dictid = int.from_bytes(blob[2:6], "big")
    if dictid not in DICTIONARIES:
        raise BadIndex(
            f"the index names deflate dictionary {dictid:#010x}, which this prunekit does not know "
            "(written by a newer prunekit, or damaged)"
        )
    return DICTIONARIES[dictid]


def unpack_index(blob: bytes, dictionary: bool = True) -> tuple[dict[str, Any], list[Record]]:
    """(head, records) of a deflated index, every field checked for range and consistency; ``dictionary``:
    whether the format version lets the index name a preset dictionary (3 and later)."""
    reader = _Reader(inflate(blob, dictionary))
    try:
        head = json.loads(reader.take(reader.varint()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadIndex(f"the index's JSON head does not parse ({exc})") from None
    if not isinstance(head, dict):
        raise BadIndex("the index's head is not a JSON object")
    specs = head.get("specs", [])
    if not isinstance(specs, list):
        raise BadIndex("the index's 'specs' is not a list")
    count = reader.varint()
    if count > len(reader.data):  # every record takes several bytes
        raise BadIndex(f"the index claims {count} tensors in {len(reader.data)} bytes")
    records, names, previous = [], set(), b""
    for _ in range(count):
        shared = reader.varint()
        if shared > len(previous):
            raise BadIndex("a tensor name shares more bytes with the previous one than it has")
        raw = previous[:shared] + reader.take(reader.varint())
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadIndex("a tensor name is not UTF-8") from None
        if not name or "::" in name or name in names:
            raise BadIndex(f"tensor name {name!r} is empty, reserved ('::') or repeated")
        names.add(name)
        previous = raw
        codes = [reader.byte() for _ in range(4)]
        if codes[0] >= len(ENCODINGS) or codes[1] >= len(DTYPES) or codes[2] >= len(DTYPES):
            raise BadIndex(f"tensor '{name}': unknown encoding or dtype code {codes[:3]}")
        if codes[3] & ~(HAS_SCALE | HAS_SPEC):
            raise BadIndex(f"tensor '{name}': unknown flags {codes[3]}")
        ndim = reader.varint()
        if ndim > MAX_NDIM:
            raise BadIndex(f"tensor '{name}': {ndim} dimensions (at most {MAX_NDIM})")
        shape = tuple(reader.varint() for _ in range(ndim))
        nonzero = reader.varint()
        encoding = ENCODINGS[codes[0]]
        params = {}
        if encoding == "nm":
            params = {"n": reader.varint(), "m": reader.varint()}
        elif encoding == "block":
            params = {"rows": reader.varint(), "blocks": reader.varint()}
        spec = reader.varint() if codes[3] & HAS_SPEC else None
        record = Record(
            name,
            encoding,
            DTYPES[codes[1]],
            DTYPES[codes[2]],
            shape,
            nonzero,
            params,
            bool(codes[3] & HAS_SCALE),
            spec,
        )
        check_record(record, len(specs))
        records.append(record)
    if reader.pos != len(reader.data):
        raise BadIndex(f"{len(reader.data) - reader.pos} bytes follow the last record of the index")
    return head, records


def check_record(r: Record, specs: int) -> None:
    """Ranges a writer never exceeds; decoding relies on them."""
    where = f"tensor '{r.name}'"
    if r.nonzero > r.numel:
        raise BadIndex(f"{where}: {r.nonzero} non-zeros in {r.numel} elements")
    if r.encoding in ("bitmask", "csr") and not r.numel:
        raise BadIndex(f"{where}: encoding {r.encoding} of an empty tensor")
    if r.encoding == "nm":
        n, m = r.params["n"], r.params["m"]
        if not (1 <= n <= m and m >= 2 and len(r.shape) >= 2 and r.shape[1] % m == 0 and r.numel):
            raise BadIndex(f"{where}: N:M {n}:{m} does not fit shape {list(r.shape)}")
        if r.nonzero > r.numel // m * n:
            raise BadIndex(f"{where}: more non-zeros than {n}:{m} slots")
    if r.encoding == "block":
        rows, blocks = r.params["rows"], r.params["blocks"]
        if not (rows >= 1 and len(r.shape) >= 2 and r.numel and r.shape[0] % rows == 0):
            raise BadIndex(f"{where}: {rows} x 1 blocks do not fit shape {list(r.shape)}")
        if blocks > r.numel // rows or r.nonzero > blocks * rows:
            raise BadIndex(f"{where}: {blocks} blocks of {rows} for {r.nonzero} non-zeros in {r.numel}")
    if r.scale and (r.dtype != "int8" or len(r.shape) < 2 or r.source_dtype not in FLOATS):
        raise BadIndex(f"{where}: int8 scales on a tensor that is not a quantized weight")
    if r.spec is not None and r.spec >= specs:
        raise BadIndex(f"{where}: spec {r.spec} of {specs}")
