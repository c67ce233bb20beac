"""What to remove: the sparsity pattern of one layer.

A spec is a frozen, validated, hashable value. The same spec object drives mask selection, is written
into artifact metadata, and (later) tells the runtime how a tensor is laid out: nothing is inferred back
from weights.

* :class:`Unstructured` -- any individual weights, a fraction ``sparsity`` in [0, 1).
* :class:`NM` -- semi-structured N:M: at most ``n`` non-zeros in each group of ``m`` consecutive weights
  along the input dimension (NVIDIA's convention: 2:4 keeps 2 of every 4). For convolutions the groups run
  along the input channels at each (output channel, kernel position), as NVIDIA's ASP lays them out.
* :class:`Block` -- whole ``r x c`` tiles of the weight seen as a 2-D matrix
  ``(out_features, in_features * kernel_elements)``; with ``along="channels"`` the matrix is
  ``(out, kernel_elements * in)``, input channels innermost (N:M's convention), so a ``1x4`` tile is 4
  consecutive input channels at one output channel and kernel position: the shape the int8 sparse
  convolution kernels consume with one 4-way dot product (``vpdpbusd``) per tile
  (``"block:1x4@70%:channels"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prunekit.errors import PrunekitError


def check_sparsity(value: Any, field: str = "sparsity") -> float:
    """Validate a sparsity: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrunekitError(f"{field} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise PrunekitError(f"{field} must be in [0, 1), got {value!r}")
    return value


def _check_int(value: Any, field: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PrunekitError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Unstructured:
    """Remove a fraction ``sparsity`` of individual weights."""

    sparsity: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        """Any weight shape works."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "unstructured", "sparsity": self.sparsity}

    def __str__(self) -> str:
        return f"unstructured {self.sparsity:.0%}"


@dataclass(frozen=True)
class NM:
    """At most ``n`` non-zeros in every group of ``m`` consecutive input weights (1 <= n < m)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        _check_int(self.n, "n")
        _check_int(self.m, "m", minimum=2)
        if self.n >= self.m:
            raise PrunekitError(f"N:M pattern needs 1 <= N < M, got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        if len(shape) < 2:
            raise PrunekitError(
                f"layer '{layer}': N:M needs a weight with an input dimension, got shape {shape}"
            )
        if shape[1] % self.m:
            raise PrunekitError(
                f"layer '{layer}': N:M {self.n}:{self.m} needs the input dimension ({shape[1]}) "
                f"to be a multiple of M={self.m}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"type": "nm", "n": self.n, "m": self.m}

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Remove a fraction ``sparsity`` of whole ``shape = (rows, cols)`` tiles; ``along``: ``"flat"`` (the
    weight as ``(out, in * kernel)``) or ``"channels"`` (as ``(out, kernel * in)``: tiles run along the input
    channels at each kernel position)."""

    shape: tuple[int, int]
    sparsity: float
    along: str = "flat"

    def __post_init__(self) -> None:
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else None
        if shape is None or len(shape) != 2:
            raise PrunekitError(f"block shape must be two integers (rows, cols), got {self.shape!r}")
        object.__setattr__(
            self, "shape", (_check_int(shape[0], "block rows"), _check_int(shape[1], "block cols"))
        )
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.along not in BLOCK_AXES:
            raise PrunekitError(f"block along must be one of {', '.join(BLOCK_AXES)}, got {self.along!r}")

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        rows = shape[0]
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        r, c = self.shape
        if self.along == "channels" and len(shape) > 2 and shape[1] % c:
            raise PrunekitError(
                f"layer '{layer}': block {r}x{c} along channels needs the input channels ({shape[1]}) to be "
                f"a multiple of {c}"
            )
        if rows % r or cols % c:
            raise PrunekitError(
                f"layer '{layer}': block {r}x{c} does not divide its weight seen as {rows}x{cols}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = {"type": "block", "shape": list(self.shape), "sparsity": self.sparsity}
        if self.along != "flat":
            out["along"] = self.along
        return out

    def __str__(self) -> str:
        along = "" if self.along == "flat" else f" along {self.along}"
        return f"block {self.shape[0]}x{self.shape[1]} {self.sparsity:.0%}{along}"


Spec = Unstructured | NM | Block
SPEC_TYPES = ("unstructured", "nm", "block")
BLOCK_AXES = ("flat", "channels")

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(
    r"^\s*block\s*:?\s*(\d+)\s*x\s*(\d+)\s*[@:]\s*([0-9.]+%?)\s*(?::\s*([a-z]+))?\s*$", re.IGNORECASE
)


def _parse_fraction(text: str, field: str) -> float:
    text = text.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise PrunekitError(f"{field} must be a number in [0, 1) or a percentage, got {text!r}") from None
    return check_sparsity(value, field)


def parse(text: str | float | dict | Spec) -> Spec:
    """Build a spec from ``"2:4"``, ``"0.7"``, ``"70%"``, ``"block:4x4@0.5"``, a number, or a dict."""
    if isinstance(text, (Unstructured, NM, Block)):
        return text
    if isinstance(text, dict):
        return from_dict(text)
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Unstructured(text)
    if not isinstance(text, str):
        raise PrunekitError(f"cannot read a sparsity pattern from {text!r}")
    match = _NM_RE.match(text)
    if match:
        return NM(int(match.group(1)), int(match.group(2)))
    match = _BLOCK_RE.match(text)
    if match:
        shape = (int(match.group(1)), int(match.group(2)))
        along = (match.group(4) or "flat").lower()
        return Block(shape, _parse_fraction(match.group(3), "block sparsity"), along)
    if text.strip().lower().startswith("block"):
        raise PrunekitError(
            f"block pattern must look like 'block:4x4@0.5' (or 'block:1x4@0.7:channels'), got {text!r}"
        )
    return Unstructured(_parse_fraction(text, "sparsity"))


def from_dict(data: dict[str, Any]) -> Spec:
    """Inverse of ``spec.to_dict()``."""
    if not isinstance(data, Mapping):
        raise PrunekitError(f"a spec dict must be a mapping with a 'type' key, got {data!r}")
    data = dict(data)
    kind = data.pop("type", None)
    builders = {"unstructured": Unstructured, "nm": NM, "block": Block}
    if kind not in builders:
        raise PrunekitError(f"spec type must be one of {', '.join(SPEC_TYPES)}, got {kind!r}")
    try:
        return builders[kind](**data)
    except TypeError as exc:
        raise PrunekitError(f"bad fields for a '{kind}' spec: {sorted(data)}") from exc
