"""Block reconstruction for :func:`prunekit.llm.prune.prune_llm`: after a block's masks are chosen, refit
its kept weights to the dense block's outputs (the kernel is
:func:`prunekit.methods.reconstruct.fit_kept_weights`; this module finds what to fit and runs it as the
block runner's ``after_visit`` hook).

- ``block``: every linear layer of the block at once, to the dense block's outputs on the same inputs.
- ``sublayer``: the block's sub-modules that hold linear layers (attention, then MLP), one after the other
  in the order the block calls them: each one's weights refit to the dense sub-module's output (its dense
  weights on the inputs it now receives), the last one to the dense block's output (so the MLP also
  absorbs what is left of the attention's error), as Wagner et al. (2025) recommend.

Memory: the runner's buffers plus, for ``sublayer``, one ``(N, L, H)`` buffer of targets; the optimiser
holds two moments per trained weight of one block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.calib.blocks import BlockCall, linear_layers
from prunekit.calib.hooks import Hooks
from prunekit.errors import PrunekitError
from prunekit.methods.reconstruct import fit_kept_weights, output_error

log = logging.getLogger(__name__)
RECONSTRUCT_MODES = ("block", "sublayer")


class _Captured(Exception):
    """Raised by a sub-module's forward hook: the rest of the block is not needed."""


def sublayers(block: nn.Module, call: BlockCall, sample: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The block's direct children that hold linear layers, in the order one forward of ``sample`` calls
    them (e.g. ``self_attn`` then ``mlp``)."""
    holders = {name: child for name, child in block.named_children() if linear_layers(child)}
    order: list[str] = []
    with Hooks() as hooks:
        for name, child in holders.items():
            hooks.forward_pre(child, lambda module, args, name=name: order.append(name))
        with torch.no_grad():
            call.run(block, sample)
    seen = list(dict.fromkeys(order))
    return [(name, holders[name]) for name in seen]


def _output_of(block: nn.Module, child: nn.Module, call: BlockCall) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> child's output`` when the block runs on ``x`` (the rest of the block is skipped)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        got: list[torch.Tensor] = []

        def hook(module, args, out):
            got.append(out[0] if isinstance(out, (tuple, list)) else out)
            raise _Captured

        with Hooks() as hooks:
            hooks.forward(child, hook)
            with contextlib.suppress(_Captured):
                call.run(block, x)
        if not got:
            raise PrunekitError(f"the block never called its sub-module {type(child).__name__}")
        return got[0]

    return forward


def _batch_works(block: nn.Module, call: BlockCall, inputs: torch.Tensor, batch: int) -> int:
    """``batch`` when running several samples at once gives the per-sample results, else 1 (the runner's
    calls were recorded on one sample; most families broadcast their masks and rotary tables)."""
    if batch == 1 or inputs.shape[0] < 2:
        return 1
    with torch.no_grad():
        try:
            both = call.run(block, inputs[:2])
        except (RuntimeError, ValueError):
            return 1
        one = torch.cat([call.run(block, inputs[i : i + 1]) for i in range(2)])
    return batch if both.shape == one.shape and torch.allclose(both, one, rtol=1e-4, atol=1e-5) else 1


@dataclass
class BlockReconstruction:
    """The runner's ``after_visit`` hook. ``dense`` maps each block's linear layers to their weights before
    pruning (filled by the visitor, needed by ``sublayer``); ``errors`` collects each fit's output error
    ``(index, part, before, after)``."""

    mode: str = "block"
    epochs: int = 1
    lr: float = 1e-4
    batch: int = 4
    seed: int = 0
    dense: dict[int, torch.Tensor] = field(default_factory=dict)
    errors: list[tuple[int, str, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in RECONSTRUCT_MODES:
            raise PrunekitError(
                f"reconstruct must be one of {', '.join(RECONSTRUCT_MODES)}, got {self.mode!r}"
            )

    def __call__(
        self, index: int, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, call: BlockCall
    ) -> None:
        flags = {p: p.requires_grad for p in block.parameters()}
        try:
            for p in block.parameters():
                p.requires_grad_(False)
            batch = _batch_works(block, call, inputs, self.batch)
            if self.mode == "block":
                self._fit(index, "block", block, lambda x: call.run(block, x), inputs, targets, batch)
            else:
                parts = sublayers(block, call, inputs[:1])
                for number, (name, child) in enumerate(parts):
                    if number == len(parts) - 1:
                        self._fit(index, name, child, lambda x: call.run(block, x), inputs, targets, batch)
                    else:
                        forward = _output_of(block, child, call)
                        local = self._dense_targets(child, forward, inputs, batch)
                        self._fit(index, name, child, forward, inputs, local, batch)
                        del local
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self.dense.clear()

    def _dense_targets(self, child: nn.Module, forward, inputs: torch.Tensor, batch: int) -> torch.Tensor:
        """The child's outputs on its current inputs with its dense weights swapped in."""
        layers = linear_layers(child)
        pruned = {name: module.weight.detach().clone() for name, module in layers.items()}
        out: torch.Tensor | None = None
        try:
            with torch.no_grad():
                for module in layers.values():
                    module.weight.copy_(self.dense[id(module)])
                for first in range(0, inputs.shape[0], batch):
                    y = forward(inputs[first : first + batch])
                    if out is None:
                        out = y.new_empty((inputs.shape[0], *y.shape[1:]))
                    out[first : first + y.shape[0]] = y
        finally:
            with torch.no_grad():
                for name, module in layers.items():
                    module.weight.copy_(pruned[name])
        assert out is not None
        return out

    def _fit(self, index, part, owner, forward, inputs, targets, batch) -> None:
        weights = [module.weight for module in linear_layers(owner).values()]
        keeps = [w.detach() != 0 for w in weights]
        for w in weights:
            w.requires_grad_(True)
        try:
            before, after = fit_kept_weights(
                forward, weights, keeps, inputs, targets, epochs=self.epochs, lr=self.lr, batch=batch,
                seed=self.seed + index,
            )  # fmt: skip
        finally:
            for w in weights:
                w.requires_grad_(False)
        self.errors.append((index, part, before, after))
        log.info("block %d %s: output error %.4g -> %.4g", index, part, before, after)


__all__ = ["RECONSTRUCT_MODES", "BlockReconstruction", "output_error", "sublayers"]
