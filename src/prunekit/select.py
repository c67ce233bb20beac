"""Turn importance scores into boolean keep-masks (True = keep), exactly and without big copies.

Everything here is pure: tensors in, masks out. The comparison group is always explicit:

* ``"layer"``  -- the lowest-scoring fraction of each layer is removed;
* ``"row"``    -- the lowest-scoring fraction of each output row (Wanda's comparison group);
* ``"global"`` -- one threshold across all layers given (one ranking of every score).

Counts are exact: ``round(sparsity * units)`` units are removed in each comparison group. Ties at the
threshold are broken by position (layer order, then flat index), so results are deterministic.
Positions already pruned (``existing`` mask False) are ranked below everything: masks only shrink.

Global selection never concatenates the scores: an exact two-pass radix select over order-preserving
32-bit keys (histograms of the high then the low 16 bits) finds the k-th smallest score while holding
one layer's scores at a time, so peak extra memory is one layer plus the boolean masks (and 16 MB buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial

import torch

from prunekit.errors import PrunekitError
from prunekit.spec import NM, Block, Spec, Unstructured

ScoreSource = torch.Tensor | Callable[[], torch.Tensor]
GROUPS = ("layer", "row", "global")
_CHUNK = 1 << 22  # elements per histogram step: reused 16 MB buffers; big steps mean few ops on a busy CPU
_PLUS_INF_BITS = 0x7F800000


def _materialise(source: ScoreSource) -> torch.Tensor:
    return source() if callable(source) else source


def check_group(group: str) -> None:
    """Raise unless ``group`` is one of :data:`GROUPS`."""
    if group not in GROUPS:
        raise PrunekitError(f"comparison group must be one of {', '.join(GROUPS)}, got {group!r}")


def _keys_into(x: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys (``a < b`` iff ``key(a) < key(b)``) of a float32 chunk, written into the
    int32 buffer ``out`` (``tmp`` is scratch)."""
    torch.add(x, 0.0, out=out.view(torch.float32))  # + 0.0 turns -0.0 into +0.0
    torch.bitwise_right_shift(out, 31, out=tmp)
    tmp &= 0x7FFFFFFF
    out ^= tmp
    return out


def _is_plain(bits: torch.Tensor) -> bool:
    """Whether every value is in [+0.0, +inf] (no sign bit, no NaN): the raw bits are then the keys."""
    lo, hi = torch.aminmax(bits)
    return int(lo) >= 0 and int(hi) <= _PLUS_INF_BITS


def _check_nan(scores: torch.Tensor) -> None:
    if torch.isnan(scores).any():
        raise PrunekitError("importance scores contain NaN; check the model weights and calibration data")


def _chunks(sources: Iterable[ScoreSource]) -> Iterator[torch.Tensor]:
    """Contiguous float32 chunks of at most ``_CHUNK`` scores, one source materialised at a time."""
    for source in sources:
        flat = _materialise(source).detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            yield flat[start : start + _CHUNK].to(torch.float32).contiguous()


def _select(
    sources: Callable[[], Iterable[ScoreSource]], count: Callable[[int], int]
) -> tuple[float, int, int, int] | None:
    """Radix select of the ``k = count(total)``-th smallest score.

    Returns ``(value, below, equal, k)`` -- how many scores are strictly below ``value`` and equal to it --
    or None when ``k <= 0``. Raises on NaN scores. Chunks of non-negative scores (the usual case:
    magnitudes, Wanda, Taylor) take a fast path: their raw float bits are already order-preserving keys.
    """
    buf = torch.empty(_CHUNK, dtype=torch.int32)
    tmp = torch.empty(_CHUNK, dtype=torch.int32)
    hit_mask = torch.empty(_CHUNK, dtype=torch.bool)
    high_hist = torch.zeros(1 << 16, dtype=torch.int64)
    plain: list[bool] = []  # per chunk, so the second pass knows which path it took
    total = 0
    for x in _chunks(sources()):
        n = x.numel()
        total += n
        bits, b = x.view(torch.int32), buf[:n]
        plain.append(_is_plain(bits))
        if plain[-1]:  # high 16 bits of a non-negative key, in 0..32767: bins 32768.. of the histogram
            torch.bitwise_right_shift(bits, 16, out=b)
            high_hist[1 << 15 :] += torch.bincount(b, minlength=1 << 15)
        else:
            _check_nan(x)
            _keys_into(x, b, tmp[:n])
            b >>= 16
            b += 1 << 15
            high_hist += torch.bincount(b, minlength=1 << 16)
    k = count(total)
    if k <= 0:
        return None
    cum = torch.cumsum(high_hist, 0)
    high = int(torch.searchsorted(cum, k))  # first bin whose cumulative count reaches k
    below_high = int(cum[high - 1]) if high > 0 else 0
    target = high - (1 << 15)  # the key's high 16 bits, signed
    low_hist = torch.zeros(1 << 16, dtype=torch.int64)
    flags = iter(plain)
    for x in _chunks(sources()):
        n = x.numel()
        if next(flags):
            if target < 0:  # non-negative scores cannot fall in a negative bin
                continue
            keys = x.view(torch.int32)
            shifted = torch.bitwise_right_shift(keys, 16, out=buf[:n])
        else:
            keys = _keys_into(x, buf[:n], tmp[:n])
            shifted = torch.bitwise_right_shift(keys, 16, out=tmp[:n])
        hit = keys[torch.eq(shifted, target, out=hit_mask[:n])]
        if hit.numel():
            low_hist += torch.bincount(hit & 0xFFFF, minlength=1 << 16)
    cum_low = torch.cumsum(low_hist, 0)
    low = int(torch.searchsorted(cum_low, k - below_high))
    below = below_high + (int(cum_low[low - 1]) if low > 0 else 0)
    key_t = torch.tensor([(target << 16) | low], dtype=torch.int32)
    bits = key_t ^ ((key_t >> 31) & 0x7FFFFFFF)
    return float(bits.view(torch.float32)), below, int(low_hist[low]), k


def kth_smallest(sources: Callable[[], Iterable[ScoreSource]], k: int) -> tuple[float, int]:
    """Return ``(v, below)``: the k-th smallest score (1-based) and how many scores are strictly below it.

    ``sources`` is called twice and must yield the same score tensors (or callables) each time.
    """
    if k < 1:
        raise ValueError("k must be >= 1")

    def count(total: int) -> int:
        if k > total:
            raise ValueError(f"k={k} exceeds the number of scores ({total})")
        return k

    value, below, _, _ = _select(sources, count)
    return value, below


def _prune_lowest(
    sources: Mapping[str, ScoreSource],
    count: Callable[[int], int],
    existing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing exactly ``k = count(total)`` lowest scores of all ``sources`` (ties by position).

    Positions pruned in ``existing`` (their scores must already be ``-inf``) rank below every live score,
    genuine ``-inf`` included, so they are always among the ``k`` removed (``k`` must cover them).
    """
    names = list(sources)
    existing = existing or {}
    selected = _select(lambda: (sources[n] for n in names), count)
    if selected is None:
        return {n: torch.ones(_materialise(sources[n]).shape, dtype=torch.bool) for n in names}
    value, below, equal, k = selected
    ties_left = k - below  # how many of the `equal` scores tied at `value` are pruned: the first ones
    if value == float("-inf"):  # the dead positions are tied at -inf: they take the first places
        dead = sum(int((~existing[n].to(torch.bool)).sum()) for n in names if n in existing)
        ties_left -= dead
        equal -= dead
    masks = {}
    for name in names:
        scores = _materialise(sources[name]).detach().to(torch.float32)
        mixed = name in existing and value == float("-inf")  # live and dead positions tied
        if ties_left == 0 and not mixed:  # every remaining tie is kept
            keep = scores >= value
        elif ties_left == equal and not mixed:  # every remaining tie is pruned
            keep = scores > value
        else:
            keep = (scores > value).contiguous()
            tied = scores == value
            if name in existing:
                tied &= existing[name].to(torch.bool).reshape(tied.shape)
            tied = tied.reshape(-1).nonzero().squeeze(1)
            # the first `ties_left` tied positions (in layer order, then flat index) are pruned, the rest kept
            keep.view(-1)[tied[ties_left:]] = True
            ties_left = max(0, ties_left - tied.numel())
            equal -= tied.numel()
        masks[name] = keep.contiguous()
    return masks


def _with_existing(scores: torch.Tensor, existing: torch.Tensor | None) -> torch.Tensor:
    scores = scores.detach().to(torch.float32)
    if existing is None:
        return scores
    return scores.masked_fill(~existing.to(torch.bool), float("-inf"))


def _count(sparsity: float, units: int, already: int = 0) -> int:
    return max(int(round(sparsity * units)), already)


def unstructured_masks(
    scores: Mapping[str, ScoreSource],
    sparsity: float | Mapping[str, float],
    group: str = "layer",
    existing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Element-wise keep-masks. ``sparsity`` is one number, or one per layer (not with ``"global"``)."""
    check_group(group)
    existing = existing or {}

    def source(name: str) -> ScoreSource:
        if name not in existing:
            return scores[name]
        return lambda: _with_existing(_materialise(scores[name]), existing[name])

    def pruned(name: str) -> int:
        return int((~existing[name].to(torch.bool)).sum()) if name in existing else 0

    if group == "global":
        if isinstance(sparsity, Mapping):
            raise PrunekitError("a global comparison group takes one sparsity, not one per layer")
        already = sum(pruned(n) for n in scores)
        return _prune_lowest(
            {n: source(n) for n in scores}, partial(_count, sparsity, already=already), existing
        )
    out = {}
    for name in scores:
        s = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
        if group == "layer":
            already = pruned(name)
            out.update(_prune_lowest({name: source(name)}, partial(_count, s, already=already), existing))
        else:
            out[name] = row_mask(_materialise(scores[name]), s, existing.get(name))
    return out


def row_mask(scores: torch.Tensor, sparsity: float, existing: torch.Tensor | None = None) -> torch.Tensor:
    """Remove the ``round(sparsity * row_len)`` lowest scores in each output row (dim 0).

    Positions pruned in ``existing`` stay pruned and count towards their row's quota (a row that already
    has more pruned keeps them all pruned).
    """
    flat = scores.detach().to(torch.float32).reshape(scores.shape[0], -1)
    rows, length = flat.shape
    alive = None if existing is None else existing.to(torch.bool).reshape(rows, length)
    if alive is not None:
        flat = flat.masked_fill(~alive, float("-inf"))
    _check_nan(flat)
    k = int(round(sparsity * length))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if alive is None:
        if k:
            order = torch.sort(flat, dim=1, stable=True).indices[:, :k]
            keep.scatter_(1, order, False)
        return keep.reshape(scores.shape)
    k_row = (~alive).sum(dim=1).clamp(min=k)
    # rank: dead positions first, then live ones by score (ties by position) -- two stable sorts
    dead_first = torch.sort(alive.to(torch.uint8), dim=1, stable=True).indices
    by_score = torch.sort(flat.gather(1, dead_first), dim=1, stable=True)
    order = dead_first.gather(1, by_score.indices)
    keep.scatter_(1, order, torch.arange(length).unsqueeze(0) >= k_row.unsqueeze(1))
    return keep.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs (dim 1): the ``m - n`` lowest
    are pruned, ties by position (the earlier input is pruned first, as everywhere in this module).

    For a convolution weight ``(out, in, *kernel)`` the groups run along ``in`` at each
    ``(out, kernel position)``.
    """
    if scores.dim() < 2 or scores.shape[1] % m:
        raise PrunekitError(
            f"N:M {n}:{m} needs the input dimension to be a multiple of {m}, got {tuple(scores.shape)}"
        )
    moved = scores.detach().to(torch.float32).movedim(1, -1)  # (out, *kernel, in)
    _check_nan(moved)
    groups = moved.reshape(-1, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.sort(groups, dim=1, stable=True).indices[:, : m - n], False)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous()


def block_scores(scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sum the scores of each ``shape`` tile of the 2-D view ``(out, rest)``."""
    r, c = shape
    flat = scores.detach().to(torch.float32).reshape(scores.shape[0], -1)
    rows, cols = flat.shape
    return flat.reshape(rows // r, r, cols // c, c).sum(dim=(1, 3))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``(out, in, *kernel) -> (out, *kernel, in)`` (a no-op below 3 dimensions): blocks along channels."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def channels_first(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`channels_last`."""
    return t.movedim(-1, 1).contiguous() if t.dim() > 2 else t


def expand_blocks(block_keep: torch.Tensor, shape: tuple[int, int], like: torch.Size) -> torch.Tensor:
    r, c = shape
    return block_keep.repeat_interleave(r, 0).repeat_interleave(c, 1).reshape(like)


def select_masks(
    scores: Mapping[str, ScoreSource],
    specs: Mapping[str, Spec],
    group: str = "layer",
    existing: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks for layers that may each have a different spec.

    Layers are grouped by spec and each set is selected on its own: with ``group="global"`` the layers
    sharing one Unstructured (or Block) spec get one threshold, so an overridden layer is ranked only with
    layers of the same override; N:M layers are always selected M consecutive weights at a time.
    """
    check_group(group)
    existing = existing or {}
    out: dict[str, torch.Tensor] = {}
    by_spec: dict[Spec, list[str]] = {}
    for name in scores:
        by_spec.setdefault(specs[name], []).append(name)
    for spec, names in by_spec.items():
        if isinstance(spec, NM):
            for name in names:
                s = _with_existing(_materialise(scores[name]), existing.get(name))
                keep = nm_mask(s, spec.n, spec.m)
                out[name] = keep & existing[name] if name in existing else keep
        elif isinstance(spec, Unstructured):
            sub = {n: scores[n] for n in names}
            out.update(
                unstructured_masks(
                    sub, spec.sparsity, group, {n: existing[n] for n in names if n in existing}
                )
            )
        elif isinstance(spec, Block):
            if group == "row":
                raise PrunekitError("block patterns compare within a layer or globally, not per row")
            view = channels_last if spec.along == "channels" else (lambda t: t)
            shapes = {n: view(_materialise(scores[n])).shape for n in names}
            bscores = {n: block_scores(view(_materialise(scores[n])), spec.shape) for n in names}
            # a tile counts as pruned when all of it is pruned; pruned elements of a kept tile stay pruned
            tiles_alive = {
                n: block_scores(view(existing[n].to(torch.float32)), spec.shape) > 0
                for n in names
                if n in existing
            }
            keep = unstructured_masks(bscores, spec.sparsity, group, tiles_alive)
            for n in names:
                mask = expand_blocks(keep[n], spec.shape, shapes[n])
                out[n] = channels_first(mask) if spec.along == "channels" else mask
                if n in existing:
                    out[n] &= existing[n].to(torch.bool).reshape(out[n].shape)
        else:  # pragma: no cover - Spec is a closed union
            raise PrunekitError(f"unsupported spec {spec!r}")
    return out
