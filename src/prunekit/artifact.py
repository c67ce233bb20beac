"""Save and load pruned models as safetensors artifacts (no pickle: loading cannot execute code).

One file holds the effective weights (pruned entries are exact zeros), each pruned layer's keep-mask as
packed bits (``__mask__.<layer>``, 1 bit per weight, so the exact mask survives even where a kept weight
happens to be zero), and a JSON header in the safetensors metadata:

    {"format": "prunekit.dense", "format_version": 1, "library_version": "...",
     "model": {"name": "resnet-digits", "args": {...}} | null,
     "specs": {"layer": {"type": "unstructured", "sparsity": 0.7}, ...},
     "masks": {"layer": [shape...], ...},
     "int8": {"layers": {"layer": {"type": "QuantizedConv2d", "static": true, "bias": true,
                                   "output": "int8"}, ...},
              "folded": {"bn": "conv", ...},
              "graph": {"inputs": [...], "ops": {"int8_ops.add": "QuantizedAdd", ...}}}
             (INT8 models only, see prunekit.quant.ptq; format_version 2, or 3 with "graph")
     "sha256": "<hash of every tensor's bytes, in key order, then of this header without it>"}

The SHA-256 is checked on load: a corrupted or truncated file is a clear error, never silent garbage.
Weights are stored dense here; the compressed encodings (bitmask/CSR/N:M) are a separate format.

An INT8 model stores its layers' buffers as they are (``weight_q`` int8, ``weight_scale``, ``act_scale``,
``bias`` float32; for the integer model also each layer's ``out_scale``, ``bias_q``, ``out_mult``,
``out_shift``, ``out_range`` and the ``int8_ops.*`` operators' scales and constants), so reloading gives the
identical int8 model; the ``int8`` header entry says which float layers to turn into int8 ones first and,
for an integer model (:mod:`prunekit.quant.graph`), which integer operators to insert. Integer models are
format_version 3, other int8 models 2 (a reader of an older version would not know to build them, so it
is told to upgrade); float artifacts stay version 1. A version-2 file (written before prunekit had one
INT8 arithmetic) still loads: as an int8 model whose layers hand float outputs on, which the C export
refuses with the way to re-quantize.

A QAT-prepared model (:mod:`prunekit.quant.qat`) is refused: its ``weight`` is the fake-quantized one, so the
trained float weights would be lost. Save ``convert_qat(model).model`` (int8) or, after ``strip_qat``, the
float model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from prunekit import __version__
from prunekit.compress.encodings import pack_bits, unpack_bits
from prunekit.errors import ArtifactCorrupted, PrunekitError
from prunekit.files import atomic_write_bytes
from prunekit.limits import check_memory
from prunekit.masking import apply_masks, get_masks
from prunekit.models import MODELS
from prunekit.models.sources import is_source_name, rebuild
from prunekit.quant.fake import fake_quantized
from prunekit.quant.graph import OPS
from prunekit.quant.ptq import build_int8, int8_plan
from prunekit.spec import Spec, from_dict
from prunekit.structured.apply import apply_plan
from prunekit.tensorfile import read_tensors

log = logging.getLogger(__name__)
FORMAT = "prunekit.dense"
FORMAT_VERSION = 3  # the newest this code reads and writes (2: INT8 models, 3: integer INT8 models)
_MASK_PREFIX = "__mask__."
_BUFFERS = (".running_mean", ".running_var", ".num_batches_tracked", ".weight_scale", ".act_scale")
_INT8_OPS = f"{OPS}."  # the integer operators' scales and constants (prunekit.quant.graph)


@dataclass
class ArtifactInfo:
    path: Path
    model: dict[str, Any] | None
    specs: dict[str, Spec]
    masks: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    structured: list[dict] = field(default_factory=list)  # structured prune logs, replayed in order
    int8: dict[str, Any] | None = (
        None  # which layers are int8 (prunekit.quant.ptq.int8_plan), for INT8 models
    )


def _digest(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode() + str(list(t.shape)).encode())
        if t.numel():  # the tensor's own memory, not a copy: hashing a large file adds no memory
            h.update(t.view(-1).view(torch.uint8).numpy())
    # the header too: a flipped byte in a spec or a mask name is corruption, not a different pruning
    h.update(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return pack_bits(mask, bitorder="big")  # format_version 1 of this format packs masks big-endian


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The mask of ``shape`` from its packed bits; the shape must be the one the bits were packed from (a
    header asking for more elements than the bits hold is refused before anything is allocated)."""
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ValueError(f"mask shape {shape!r}")
    numel = math.prod(shape)
    if min(shape, default=1) < 0 or packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"mask of shape {shape} does not match its {packed.numel()} packed bytes")
    return unpack_bits(packed, numel, bitorder="big").reshape(shape)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with effective weights under their plain names (no parametrization keys)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." in f".{key}":
            continue
        state[key] = value
    for name, module in model.named_modules():
        if hasattr(module, "parametrizations"):
            for pname in module.parametrizations:
                state[f"{name}.{pname}" if name else pname] = getattr(module, pname).detach()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_artifact(
    path: str | Path,
    model: nn.Module,
    *,
    model_info: dict[str, Any] | None = None,
    specs: dict[str, Spec] | None = None,
    extra: dict[str, Any] | None = None,
    structured: list[dict] | None = None,
) -> int:
    """Write the artifact atomically; returns its size in bytes.

    ``structured``: the prune logs (``prunekit.structured`` plans) that turned the built-in architecture
    into this smaller one; loading replays them before reading the weights.
    """

    _refuse_qat(model)
    tensors = plain_state_dict(model)
    masks = get_masks(model)
    for name, mask in masks.items():
        tensors[_MASK_PREFIX + name] = _pack(mask.cpu())
    int8 = int8_plan(model)
    header = {
        "format": FORMAT,
        "format_version": (3 if "graph" in int8 else 2) if int8 else 1,
        "library_version": __version__,
        "model": model_info,
        "specs": {name: spec.to_dict() for name, spec in (specs or {}).items()},
        "masks": {name: list(mask.shape) for name, mask in masks.items()},
        "extra": extra or {},
    }
    if structured:
        header["structured"] = structured
    if int8:
        header["int8"] = int8
    header["sha256"] = _digest(tensors, header)
    data = save(tensors, metadata={"prunekit": json.dumps(header)})
    atomic_write_bytes(path, data)
    return len(data)


def _refuse_qat(model: nn.Module) -> None:
    """A QAT-prepared model would be stored with its fake-quantized weights (the trained latent float ones
    lost) and reload as a plain float model or not at all: refuse it."""

    layers = fake_quantized(model)
    if layers:
        shown = ", ".join(f"'{n}'" for n in layers[:5]) + (
            f" and {len(layers) - 5} more" if len(layers) > 5 else ""
        )
        raise PrunekitError(
            f"cannot save a QAT-prepared model (fake quantization on {shown}): its weights would be stored "
            f"fake-quantized and the trained float weights lost; convert_qat(model) first to save the int8 "
            f"model, or prunekit.quant.fake.strip_qat(model) to save the float one"
        )


def _fit_error(exc: RuntimeError) -> str:
    """load_state_dict's message in one line: its heading and every line naming keys (each shortened)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(line if len(line) <= 400 else line[:397] + "..." for line in lines)


def read_artifact(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
    """Read and verify an artifact: tensors (weights only) and its header.

    Memory: the tensors are views of the file's bytes (prunekit.tensorfile), read once, and the hash reads
    them in place. ``verify=False`` skips the SHA-256 (inspect ``--no-verify``); nothing else is skipped."""

    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"artifact not found: {path}")
    try:
        tensors, meta, size = read_tensors(path)  # views of the file's bytes: the file is held once
        header = json.loads(meta["prunekit"])
        if not isinstance(header, dict):
            raise ValueError("the 'prunekit' metadata is not a JSON object")
    except (KeyError, ValueError, OSError) as exc:
        if isinstance(exc, ArtifactCorrupted):
            raise
        raise ArtifactCorrupted(
            f"artifact {path} is corrupted, truncated or not a prunekit file: {_first_line(exc)}"
        ) from None
    if header.get("format") != FORMAT:
        raise PrunekitError(
            f"artifact {path}: unsupported format {header.get('format')!r} (expected {FORMAT!r})"
        )
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise PrunekitError(f"artifact {path}: malformed prunekit header: format_version {version!r}")
    if version > FORMAT_VERSION:
        raise PrunekitError(
            f"artifact {path}: format version {header['format_version']} is newer than this "
            f"prunekit reads ({FORMAT_VERSION}); upgrade prunekit"
        )
    if verify and _digest(tensors, header) != header.get("sha256"):
        raise ArtifactCorrupted(f"artifact {path} is corrupted: its contents do not match the stored SHA-256")
    try:  # a hand-made header can still be malformed: say so rather than raise a KeyError
        model = header.get("model")
        if model is not None and not (isinstance(model, dict) and isinstance(model.get("name"), str)):
            raise ValueError(f"'model' must be null or {{'name': ..., 'args': {{...}}}}, got {model!r}")
        if model is not None and not isinstance(model.get("args", {}), dict):
            raise ValueError(f"'model.args' must be an object, got {model.get('args')!r}")
        for key, kind in (("masks", dict), ("specs", dict), ("extra", dict), ("structured", list)):
            if not isinstance(header.get(key, kind()), kind):
                raise ValueError(f"'{key}' must be a JSON {kind.__name__}")
        if header.get("int8") is not None and not isinstance(header["int8"], dict):
            raise ValueError("'int8' must be null or an object")
        masks = {
            name: _unpack(tensors.pop(_MASK_PREFIX + name), shape) for name, shape in header["masks"].items()
        }
        info = ArtifactInfo(
            path=path,
            model=model,
            specs={name: from_dict(d) for name, d in header.get("specs", {}).items()},
            masks=masks,
            extra=header.get("extra", {}),
            size_bytes=size,
            structured=list(header.get("structured", [])),
            int8=header.get("int8"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PrunekitError(f"artifact {path}: malformed prunekit header: {_first_line(exc)}") from None
    return tensors, info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _model_class(path: Path, name: str) -> type[nn.Module]:
    """The class a header's model name stands for: a registered name, or a ``module:Class`` reference to a
    module this process has already imported (loading a file never imports code: a crafted header naming
    ``os:system`` would otherwise run a command) whose attribute is an ``nn.Module`` class."""
    if name in MODELS or ":" not in name:
        return MODELS.get(name)  # an unknown plain name: one line with a suggestion
    module_name, _, attr = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        raise PrunekitError(
            f"artifact {path} names its model by the reference {name!r}; loading a file never imports code: "
            f"import {module_name} first, or pass the model: load_artifact(path, model)"
        )
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise PrunekitError(
            f"artifact {path} names its model {name!r}, which is not an nn.Module class; pass the model: "
            "load_artifact(path, model)"
        )
    return obj


def _build(path: Path, name: str, args: dict[str, Any] | None) -> nn.Module:
    if is_source_name(name):  # torchvision / Hugging Face config: rebuilt; a user's factory: refused
        return rebuild({"name": name, "args": args}, allow_code=False)
    cls = _model_class(path, name)
    try:
        return cls(**(args or {}))
    except TypeError as exc:
        raise PrunekitError(f"model '{name}': bad arguments {sorted(args or {})}: {exc}") from None


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _check_against_tensors(path: Path, info: ArtifactInfo, tensors: dict[str, torch.Tensor]) -> None:
    """Build the model the header describes on the meta device (no memory), replay its structured logs and
    int8 layers there, and compare every parameter's and buffer's shape with the tensors the file holds:
    a header that asks for another (say, a 150 GB) model is refused before anything real is allocated."""
    name, args = info.model["name"], info.model.get("args")
    try:
        with torch.device("meta"):
            skeleton = _build(path, name, args)
    except PrunekitError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, NotImplementedError) as exc:
        # a registered model whose constructor needs real memory (reads a file, computes on its weights):
        # no estimate; the real build below says what is wrong, if anything
        log.warning("artifact %s: model %s cannot be built on the meta device (%s)", path, name, exc)
        return
    check_memory(_state_bytes(skeleton), f"the model {path}'s header describes ({name} {args or {}})")
    skeleton = _replay(path, skeleton, info)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    present = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != present:
        missing = sorted(set(expected) - set(present))[:3]
        unexpected = sorted(set(present) - set(expected))[:3]
        shapes = [k for k in sorted(set(expected) & set(present)) if expected[k] != present[k]][:3]
        detail = "; ".join(
            f"{what}: {', '.join(keys)}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("other shapes", [f"{k} {list(present[k])} (model: {list(expected[k])})" for k in shapes]),
            )
            if keys
        )
        raise PrunekitError(
            f"artifact {path}: its header's model does not fit the tensors it holds: {detail}"
        )


def _replay(path: Path, model: nn.Module, info: ArtifactInfo) -> nn.Module:
    """``model`` (meta or real) with the header's structured prune logs applied and its int8 layers built
    (an integer INT8 model is a new graph module: use the returned model)."""
    if info.structured:
        try:
            for plan in info.structured:
                apply_plan(model, plan)
        except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            raise PrunekitError(
                f"artifact {path}: its structured prune log does not fit the model: {_first_line(exc)}"
            ) from None
    if info.int8:
        try:
            model = build_int8(model, info.int8)
        except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
            if isinstance(exc, PrunekitError):
                raise
            raise PrunekitError(
                f"artifact {path}: its int8 layers do not fit the model: {_first_line(exc)}"
            ) from None
    return model


def load_artifact(
    path: str | Path, model: nn.Module | None = None, masked: bool = True
) -> tuple[nn.Module, ArtifactInfo]:
    """Rebuild the model (built-in architectures by name, or into ``model``) and load the weights.

    With ``masked=True`` the masks are re-attached, so fine-tuning keeps the pruned entries at zero. A
    built-in model is first built on the meta device and checked against the file's tensors, so nothing
    is allocated for a model the file does not hold.
    """
    path = Path(path)
    tensors, info = read_artifact(path)
    if model is None:
        if not info.model:
            raise PrunekitError(
                f"artifact {path} records no built-in architecture; pass the model to load into"
            )
        _check_against_tensors(path, info, tensors)
        try:
            model = _build(path, info.model["name"], info.model.get("args"))
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            if isinstance(exc, PrunekitError):
                raise
            raise PrunekitError(f"artifact {path}: its model cannot be built: {_first_line(exc)}") from None
    model = _replay(path, model, info)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise PrunekitError(f"artifact {path} does not fit the model: {_fit_error(exc)}") from None
    if masked and info.masks:
        try:
            apply_masks(model, info.masks)
        except (KeyError, AttributeError, RuntimeError, ValueError) as exc:
            raise PrunekitError(
                f"artifact {path}: its masks do not fit the model: {_first_line(exc)}"
            ) from None
    return model, info


def inspect_artifact(path: str | Path, verify: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-tensor rows (tensor, shape, params, nonzero, sparsity, pattern) and totals for an artifact;
    ``verify=False`` skips the SHA-256 (``totals["verified"]`` says which)."""
    tensors, info = read_artifact(path, verify=verify)
    rows = []
    for key in sorted(tensors):
        value = tensors[key]
        int8_weight = key.endswith(".weight_q") and value.dtype == torch.int8
        integer_op = key.startswith(_INT8_OPS) or key.endswith(".out_scale")
        if (not value.is_floating_point() and not int8_weight) or key.endswith(_BUFFERS) or integer_op:
            continue  # BatchNorm statistics and counters (and int8 scales) are buffers, not parameters
        layer = key.rsplit(".", 1)[0]
        nonzero = int(torch.count_nonzero(value))
        is_weight = key.endswith(".weight") or int8_weight
        pattern = str(info.specs[layer]) if is_weight and layer in info.specs else "dense"
        rows.append(
            {
                "tensor": key,
                "shape": list(value.shape),
                "params": value.numel(),
                "nonzero": nonzero,
                "sparsity": 1 - nonzero / value.numel() if value.numel() else 0.0,
                "pattern": pattern,
            }
        )
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    totals = {
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1 - nonzero / params if params else 0.0,
        "size_bytes": info.size_bytes,
        "verified": verify,
    }
    return rows, totals
