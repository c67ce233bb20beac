"""Compressed artifacts: each tensor in its smallest sparse encoding, values in float or int8.

``save_compressed(model_or_state, path, value_dtype="int8")`` / ``load_compressed(path)``; the format is
documented in docs/format.md.
"""

from prunekit.compress.container import (
    FORMAT,
    FORMAT_VERSION,
    ArtifactCorrupted,
    TensorInfo,
    load_compressed,
    read_header,
    save_compressed,
    tensor_infos,
)
from prunekit.compress.encodings import ENCODINGS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ENCODINGS",
    "ArtifactCorrupted",
    "TensorInfo",
    "load_compressed",
    "read_header",
    "save_compressed",
    "tensor_infos",
]
