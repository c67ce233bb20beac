"""Resource limits checked before allocating: what a file header, a recipe or a command-line option asks
for is estimated first, and refused in one line when it would not fit.

The memory limit is the memory available now (``MemAvailable`` from ``/proc/meminfo``; the physical
memory where that is not readable), or ``PRUNEKIT_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix: ``64G``)
where set. Every refusal names what asked, how much, the limit, and the variable that raises it, so a user
with swap or a bigger machine is never stuck.

An example input of a given shape is estimated with one forward pass on the meta device (no memory): the
input plus twice the largest activation must fit, or the shape is refused naming it.

Text inputs (calibration and evaluation files) are read up to ``PRUNEKIT_TEXT_LIMIT`` bytes (default 256
MiB: a hundred times what calibration uses); ``/dev/zero`` is refused instead of read forever.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError

MEMORY_ENV = "PRUNEKIT_MEMORY_LIMIT"
TEXT_ENV = "PRUNEKIT_TEXT_LIMIT"
TEXT_DEFAULT = 256 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", re.IGNORECASE)


def parse_size(text: str, field: str) -> int:
    """``"64G"`` / ``"512M"`` / ``"1000000"`` -> bytes; anything else is one line naming ``field``."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise PrunekitError(
            f"{field} must be a number of bytes with an optional K/M/G/T suffix, got {text!r}"
        )
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise PrunekitError(f"{field} must be at least 1 byte, got {text!r}")
    return value


def human(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover (the loop returns)


def _available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):  # not POSIX: no limit we can know
        return 1 << 62


def memory_limit() -> tuple[int, str]:
    """(bytes, where the number comes from)."""
    if os.environ.get(MEMORY_ENV):
        return parse_size(os.environ[MEMORY_ENV], MEMORY_ENV), f"{MEMORY_ENV}={os.environ[MEMORY_ENV]}"
    return _available(), "the memory available now"


def check_memory(nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` (an estimate for ``what``) when it exceeds the memory limit."""
    limit, source = memory_limit()
    if nbytes > limit:
        raise PrunekitError(
            f"{what} needs about {human(nbytes)}, more than the limit of {human(limit)} ({source}); "
            f"set {MEMORY_ENV} (e.g. {MEMORY_ENV}=64G) to allow more"
        )


def text_limit() -> int:
    if os.environ.get(TEXT_ENV):
        return parse_size(os.environ[TEXT_ENV], TEXT_ENV)
    return TEXT_DEFAULT


def read_bounded(path: str | Path, field: str) -> bytes:
    """The bytes of ``path``, refused in one line when there are more than the text limit (read in pieces,
    so an endless file such as /dev/zero stops at the limit)."""
    limit = text_limit()
    path = Path(path)
    chunks, size = [], 0
    with open(path, "rb") as handle:
        while chunk := handle.read(min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise PrunekitError(
                    f"{field}: {path} holds more than {human(limit)} of text (the limit); set {TEXT_ENV} "
                    f"(e.g. {TEXT_ENV}=1G) to allow more"
                )
    return b"".join(chunks)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def forward_bytes(model: nn.Module, shape: Sequence[int]) -> int:
    """The input's bytes plus twice the largest module output of one float32 forward pass at ``shape``,
    run on the meta device (nothing is allocated). A lower bound of what running the model needs; a model
    that cannot run on the meta device is estimated by its input alone."""
    sizes = [0]
    state = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(_nbytes(out))) for m in model.modules()]
    try:
        example = torch.empty(tuple(shape), device="meta")
        with torch.no_grad():
            torch.func.functional_call(model, state, (example,), strict=False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError, AttributeError):
        sizes = [0]  # no estimate beyond the input
    finally:
        for hook in hooks:
            hook.remove()
    return math.prod(shape) * 4 + 2 * max(sizes)


# inputs below the limit / this are not traced: no CNN or transformer grows them that much
ACTIVATION_RATIO = 4096


def check_input(model: nn.Module, shape: Sequence[int], field: str = "--input-shape") -> None:
    """Refuse an input shape the model could not run on in this much memory (one line naming it).

    Small inputs skip the meta forward pass (its first use imports torch._dynamo: seconds)."""
    shown = ",".join(map(str, shape))
    size, limit = math.prod(shape) * 4, memory_limit()[0]
    check_memory(size, f"{field} {shown} (the input alone)")
    if size * ACTIVATION_RATIO > limit:
        what = f"{field} {shown} (input and activations of one forward pass)"
        check_memory(forward_bytes(model, shape), what)
