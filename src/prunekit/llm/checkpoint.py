"""A Hugging Face safetensors checkpoint read lazily, and one written shard by shard.

:class:`Checkpoint` maps every tensor name to its shard (``model.safetensors.index.json``, or the single
``model.safetensors``) and reads only the tensors asked for, each shard opened with ``safe_open`` for the
duration of one read: the tensors come back backed by the file's pages (copy-on-write), so memory holds what
is in use, never the whole checkpoint.

:class:`ShardWriter` writes ``model-0000k-of-0000n.safetensors`` files, each atomically (a temporary file in
the same directory, flushed, then renamed), and the ``model.safetensors.index.json`` that
``from_pretrained`` reads to find them. A file under its final name is always complete, which is what lets
an interrupted run resume from the shards already written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, mode_for
from prunekit.tensorfile import DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The safetensors weights of a Hugging Face model directory, read tensor by tensor."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise PrunekitError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            self.files: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE).is_file():
            self.files = dict.fromkeys(self._stored(SINGLE), SINGLE)
        else:
            raise PrunekitError(f"{self.directory} has no {SINGLE} or {INDEX}")
        missing = sorted({f for f in self.files.values() if not (self.directory / f).is_file()})
        if missing:
            raise PrunekitError(f"{self.directory}: the index names missing shards: {', '.join(missing)}")
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in sorted(set(self.files.values())):
            with self._open(name) as handle:
                stored = handle.keys()
                for key in stored:
                    sliced = handle.get_slice(key)
                    self._meta[key] = (_dtype(sliced.get_dtype()), tuple(sliced.get_shape()))

    @staticmethod
    def present(directory: str | Path) -> bool:
        """Whether ``directory`` holds safetensors weights this class reads."""
        directory = Path(directory)
        return (directory / INDEX).is_file() or (directory / SINGLE).is_file()

    def _open(self, name: str):
        path = self.directory / name
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise PrunekitError(f"{path} is not a readable safetensors file: {exc}") from None

    def _stored(self, name: str) -> list[str]:
        with self._open(name) as handle:
            return list(handle.keys())

    def names(self) -> list[str]:
        return list(self.files)

    def dtype_of(self, key: str) -> torch.dtype:
        return self._meta[key][0]

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def nbytes(self, key: str) -> int:
        dtype, shape = self._meta[key]
        return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype: the one most of its floating-point bytes are stored in."""
        sizes: dict[torch.dtype, int] = {}
        for key, (dtype, _) in self._meta.items():
            if dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + self.nbytes(key)
        if not sizes:
            raise PrunekitError(f"{self.directory}: no floating-point tensors in the checkpoint")
        return max(sizes, key=lambda d: sizes[d])

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once for the read."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise PrunekitError(f"{self.directory}: no tensor '{key}' in the checkpoint")
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for name, names in by_file.items():
            with self._open(name) as handle:
                for key in names:
                    out[key] = handle.get_tensor(key)
        return out


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PrunekitError(f"unsupported safetensors dtype {name}")
    return DTYPES[name]


def shard_name(index: int, count: int) -> str:
    """``model-00001-of-00030.safetensors`` for ``index`` 0 of 30 (the names ``save_pretrained`` uses)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` atomically: complete under its final name, or not there at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}  # transformers checks format == "pt"
    mode = mode_for(path)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, mode)  # as open() would leave it: safetensors creates its files private
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class ShardWriter:
    """Writes a model as ``count`` shards plus the index ``from_pretrained`` reads."""

    def __init__(self, directory: str | Path, count: int) -> None:
        self.directory = Path(directory)
        self.count = count
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.directory / shard_name(index, self.count)

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, tensors: Mapping[str, torch.Tensor]) -> Path:
        if not 0 <= index < self.count:
            raise ValueError(f"shard {index} of {self.count}")
        return write_shard(self.path(index), tensors)

    def write_index(self) -> Path:
        """The index over every shard (all must be written), with ``total_size`` in bytes."""
        weight_map: dict[str, str] = {}
        total = 0
        for index in range(self.count):
            name = shard_name(index, self.count)
            with safe_open(str(self.directory / name), framework="pt") as handle:
                stored = handle.keys()
                for key in stored:
                    sliced = handle.get_slice(key)
                    size = torch.empty((), dtype=_dtype(sliced.get_dtype())).element_size()
                    total += torch.Size(sliced.get_shape()).numel() * size
                    weight_map[key] = name
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        return atomic_write_json(self.directory / INDEX, index_data)
