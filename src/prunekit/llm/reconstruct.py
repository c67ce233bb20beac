"""Block reconstruction for :func:`prunekit.llm.prune.prune_llm`: after a block's masks are chosen, refit
its kept weights (masks fixed) toward the dense block, as the block runner's ``after_visit`` hook. The
kernels are :func:`prunekit.methods.reconstruct.masked_least_squares` and
:func:`~prunekit.methods.reconstruct.fit_kept_weights`; this module finds what to fit and feeds them.

- ``layer``: closed-form least squares, layer by layer in the order the block calls them (layers fed the
  same input together): each layer's kept weights are refit so that, on the inputs it now receives in the
  pruned block ``x``, it reproduces what the dense layer produces on the dense block's own activations
  ``x_d`` at that point, ``min E||x . w - x_d . w^||^2`` per output row. Exact per layer; each layer also
  absorbs the error of the pruned layers before it in the block. Costs a partial forward of the pruned
  block and of a dense copy per layer group, and one batched Cholesky solve per layer.
- ``block``: ``reconstruct_epochs`` epochs of Adam on every kept weight of the block at once, from the
  method's weights, to the dense block's outputs on the same inputs (Wanda++'s regional optimisation).
- ``sublayer``: Adam on the block's sub-modules that hold linear layers (attention, then
  MLP), one after the other in call order: each one's weights refit to the dense sub-module's output on
  the inputs it now receives, the last one to the dense block's output (so the MLP also absorbs what is
  left of the attention's error), as Wagner et al. (2025) recommend.

Whatever the mode, the block's output error on the calibration inputs is measured before and after, and
the weights it started with are restored if it rose: reconstruction never raises a block's error.
Memory: the runner's buffers, one dense copy of the block, two ``(in, in)`` matrices per layer group and,
for ``sublayer``, one ``(N, L, H)`` buffer of targets; the optimiser holds two moments per trained weight.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.calib.blocks import BlockCall, linear_layers, out_in_weight, set_out_in_weight
from prunekit.calib.hooks import Hooks
from prunekit.calib.stats import RunningGram
from prunekit.errors import PrunekitError
from prunekit.methods.reconstruct import fit_kept_weights, masked_least_squares, output_error

log = logging.getLogger(__name__)
RECONSTRUCT_MODES = ("layer", "block", "sublayer")


class _Captured(Exception):
    """Raised by a capturing hook (:func:`_capture`): the rest of the block is not needed."""


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


def linear_stages(block: nn.Module, call: BlockCall, sample: torch.Tensor) -> list[list[str]]:
    """The block's linear layers in the order one forward of ``sample`` calls them, those fed the very
    same input tensor (q/k/v, gate/up) in one group."""
    order: list[tuple[str, torch.Tensor]] = []
    with Hooks() as hooks:
        for name, module in linear_layers(block).items():
            hooks.forward_pre(module, lambda module, args, name=name: order.append((name, args[0])))
        with torch.no_grad():
            call.run(block, sample)
    stages: list[list[str]] = []
    placed: set[str] = set()
    for name, x in order:
        if name in placed:
            continue
        placed.add(name)
        group = next((g for g in stages if any(y is x for n, y in order if n == g[0])), None)
        if group is None:
            stages.append([name])
        else:
            group.append(name)
    return stages


def _capture(block: nn.Module, call: BlockCall, x: torch.Tensor, module: nn.Module, output: bool):
    """``module``'s first input (``output`` False) or its output when ``block`` runs on ``x``; the rest
    of the block is skipped."""
    got: list[torch.Tensor] = []

    def pre_hook(module, args):
        got.append(args[0])
        raise _Captured

    def hook(module, args, out):
        got.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Captured

    with Hooks() as hooks:
        if output:
            hooks.forward(module, hook)
        else:
            hooks.forward_pre(module, pre_hook)
        with contextlib.suppress(_Captured):
            call.run(block, x)
    if not got:
        what = "sub-module" if output else "layer"
        raise PrunekitError(f"the block never called its {what} {type(module).__name__}")
    return got[0]


def _input_of(block: nn.Module, layer: nn.Module, call: BlockCall, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``block`` runs on ``x``, flattened to ``(tokens, in)``."""
    got = _capture(block, call, x, layer, output=False)
    return got.reshape(-1, got.shape[-1]).to(torch.float32)


def least_squares_pass(
    block: nn.Module,
    dense_block: nn.Module,
    call: BlockCall,
    inputs: torch.Tensor,
    batch: int,
    damp: float = 0.01,
) -> None:
    """The ``layer`` mode's refit (module docstring) of ``block`` in place; ``dense_block`` is a copy of
    it with the dense weights."""
    pruned_layers, dense_layers = linear_layers(block), linear_layers(dense_block)
    for stage in linear_stages(block, call, inputs[:1]):
        gram, cross = RunningGram(), RunningGram()
        for first in range(0, inputs.shape[0], batch):
            x = inputs[first : first + batch]
            xp = _input_of(block, pruned_layers[stage[0]], call, x)
            xd = _input_of(dense_block, dense_layers[stage[0]], call, x)
            gram.add_batch(xp)
            cross.add_batch(xp, xd)
        for name in stage:
            keep = out_in_weight(pruned_layers[name]) != 0
            dense = out_in_weight(dense_layers[name])
            fit = masked_least_squares(dense, keep, gram.value(), cross.value(), damp)
            set_out_in_weight(pruned_layers[name], fit)


def _output_of(block: nn.Module, child: nn.Module, call: BlockCall) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> child's output`` when the block runs on ``x`` (the rest of the block is skipped)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _capture(block, call, x, child, output=True)

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
    """The runner's ``after_visit`` hook. ``dense`` maps each block linear layer (by ``id``) to its weight
    before pruning, in the module's own layout (filled by the visitor); ``errors`` collects each block's
    output error on the calibration inputs ``(index, mode, before, after)``, ``after <= before``."""

    mode: str = "layer"
    epochs: int = 1
    lr: float = 2e-3
    batch: int = 4
    damp: float = 0.01
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
        layers = linear_layers(block)
        start = {name: module.weight.detach().clone() for name, module in layers.items()}
        try:
            for p in block.parameters():
                p.requires_grad_(False)
            batch = _batch_works(block, call, inputs, self.batch)
            whole = lambda x: call.run(block, x)  # noqa: E731
            before = output_error(whole, inputs, targets, batch)
            if self.mode == "layer" or self.epochs == 0:
                if self.mode == "layer":
                    least_squares_pass(block, self._dense_copy(block), call, inputs, batch, self.damp)
                after = output_error(whole, inputs, targets, batch)
            elif self.mode == "block":
                after = self._fit(index, "block", block, whole, inputs, targets, batch)
            else:
                parts = sublayers(block, call, inputs[:1])
                for number, (name, child) in enumerate(parts):
                    if number == len(parts) - 1:
                        after = self._fit(index, name, child, whole, inputs, targets, batch)
                    else:
                        forward = _output_of(block, child, call)
                        local = self._dense_targets(child, forward, inputs, batch)
                        self._fit(index, name, child, forward, inputs, local, batch)
                        del local
            if not after <= before:  # worse than the method's own weights (or NaN): keep those
                with torch.no_grad():
                    for name, module in layers.items():
                        module.weight.copy_(start[name])
                after = before
            self.errors.append((index, self.mode, before, after))
            log.info("block %d: output error %.4g -> %.4g (%s)", index, before, after, self.mode)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self.dense.clear()

    def _dense_copy(self, block: nn.Module) -> nn.Module:
        dense = copy.deepcopy(block)
        with torch.no_grad():
            for module, twin in zip(linear_layers(block).values(), linear_layers(dense).values()):
                twin.weight.copy_(self.dense[id(module)])
        return dense

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

    def _fit(self, index, part, owner, forward, inputs, targets, batch) -> float:
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
        log.info("block %d %s: Adam, output error %.4g -> %.4g", index, part, before, after)
        return after


__all__ = ["RECONSTRUCT_MODES", "BlockReconstruction", "least_squares_pass", "linear_stages", "sublayers"]
