"""Owner tensors: which unit of a group each element of a tensor belongs to.

An owner is a LongTensor broadcastable to its value's shape: ``owner[...] = u`` means the element belongs
to unit ``u`` of the group, ``-1`` that it is not in the group. Dimensions along which the owner is
constant are kept at size 1, so an owner is usually tiny (``(1, C, 1, 1)`` for a feature map).
"""

from __future__ import annotations

import torch


class Conflict(Exception):
    """The group cannot be pruned consistently here (the message says why)."""


class SplitConflict(Conflict):
    """Units would be split across several dimensions; coarser units (e.g. whole heads) may work."""


_COMPRESSED = "_prunekit_compressed"  # set on owner tensors known to be compressed: compress is then free


def compress(owner: torch.Tensor) -> torch.Tensor:
    """Shrink every dimension along which the owner is constant to size 1."""
    if getattr(owner, _COMPRESSED, False):
        return owner
    for dim in range(owner.dim()):
        if owner.shape[dim] > 1:
            first = owner.narrow(dim, 0, 1)
            if bool((owner == first).all()):
                owner = first
    return mark(owner.contiguous())


def mark(owner: torch.Tensor) -> torch.Tensor:
    """Record that ``owner`` is compressed (it must be)."""
    setattr(owner, _COMPRESSED, True)
    return owner


def align(owner: torch.Tensor, ndim: int) -> torch.Tensor:
    """Prepend size-1 dimensions so the owner has ``ndim`` dimensions (numpy-style broadcasting)."""
    if owner.dim() == ndim:
        return owner
    if owner.dim() > ndim:
        extra = owner.shape[: owner.dim() - ndim]
        if any(s != 1 for s in extra):
            raise Conflict("owner has more dimensions than its value")
        aligned = owner.reshape(owner.shape[owner.dim() - ndim :])
    else:
        aligned = owner.reshape((1,) * (ndim - owner.dim()) + tuple(owner.shape))
    return mark(aligned) if getattr(owner, _COMPRESSED, False) else aligned  # size-1 dims keep it compressed


def to_shape(owner: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Fit an owner to a value of ``shape``: broadcast where the value is larger, and where the value has
    size 1 (it was broadcast in the op) require the owner to be constant there."""
    owner = align(owner, len(shape))
    for dim, size in enumerate(shape):
        if owner.shape[dim] == size or owner.shape[dim] == 1:
            continue
        if size == 1:
            first = owner.narrow(dim, 0, 1)
            if not bool((owner == first).all()):
                raise Conflict("a broadcast operand would need different units along one dimension")
            owner = first
        else:
            raise Conflict(f"owner shape {tuple(owner.shape)} does not fit value shape {shape}")
    return compress(owner)


def merge(old: torch.Tensor | None, new: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
    """Combine two owners of one value; returns (owner, changed). Disagreeing units are a Conflict."""
    new = to_shape(new, shape)
    if old is None:
        return new, bool((new >= 0).any())
    if old.shape == new.shape and torch.equal(old, new):
        return old, False  # the common case: a rule confirms what is known
    a, b = torch.broadcast_tensors(old, new)
    clash = (a >= 0) & (b >= 0) & (a != b)
    if bool(clash.any()):
        raise Conflict("two paths assign different units to the same channel")
    merged = compress(torch.where(a >= 0, a, b))
    changed = merged.shape != old.shape or not bool((torch.broadcast_to(old, merged.shape) == merged).all())
    return merged, changed


def full(owner: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return align(owner, len(shape)).expand(shape)


def varying_dims(owner: torch.Tensor) -> list[int]:
    return [d for d in range(owner.dim()) if owner.shape[d] > 1]


def along(n: int, dim: int, ndim: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """An owner that is ``values`` (default ``arange(n)``) along ``dim`` of an ``ndim``-d value."""
    values = torch.arange(n) if values is None else values
    shape = [1] * ndim
    shape[dim] = n
    return values.reshape(shape)


def unit_vector(owner: torch.Tensor, dim: int) -> torch.Tensor:
    """The 1-D owner along ``dim`` of an owner that only varies along ``dim``."""
    index = [0] * owner.dim()
    index[dim] = slice(None)
    return owner[tuple(index)]
