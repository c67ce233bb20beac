"""Block-by-block calibration (the SparseGPT / Wanda reference pipeline, generic over model families).

The first block's inputs are captured for every calibration sample; then, for each block in turn:
forward pre-hooks on the block's linear layers accumulate statistics of their inputs over all samples, a
callback prunes the block, and the block is re-run on the same inputs to produce the next block's inputs,
so every block sees what the already-pruned blocks before it produce. Peak memory is the model, two
``(N, L, hidden)`` activation buffers and one block's statistics.

Two things keep the passes cheap without changing a result: linear layers fed the very same input tensor
(q/k/v, gate/up) share one statistic, and the statistics pass stops at the block's last linear layer
(its output and everything after it are not needed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn

from prunekit.calib.blocks import BlockCall, capture_calls, capture_inputs, find_blocks, linear_layers
from prunekit.calib.hooks import Hooks
from prunekit.calib.stats import RunningGram, RunningSqNorm

log = logging.getLogger(__name__)

StatKind = Literal["sq_norm", "gram"]
BlockVisitor = Callable[[int, nn.Module, dict[str, nn.Module], dict[str, torch.Tensor]], None]
Progress = Callable[[int, int], None]
# after_visit(index, block, inputs, dense_outputs, call): the block as the visitor left it, the (N, L, H)
# inputs it was calibrated on and the dense block's outputs on them (issue 18: block reconstruction)
AfterVisit = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, BlockCall], None]


class _Stop(Exception):
    """Raised by the last linear layer's pre-hook: the rest of the block is not needed for statistics."""


_STATS = {"sq_norm": RunningSqNorm, "gram": RunningGram}


def _new_stat(kind: StatKind | Callable[[], object]):
    """A fresh accumulator: a kind named in ``_STATS``, or any factory of an ``add_batch / value`` object."""
    return _STATS[kind]() if isinstance(kind, str) else kind()


@torch.no_grad()
def collect_input_stats(
    block: nn.Module,
    linears: Mapping[str, nn.Module],
    inputs: torch.Tensor,
    call: BlockCall,
    kind: StatKind | Callable[[], object],
    outputs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of each linear layer's input over every sample in ``inputs``.

    With ``outputs`` the block runs to the end and writes its outputs there (one pass for a dense
    block); without, each forward stops after the last linear layer's statistics."""
    stats: dict[str, object] = {}
    order: list[str] = []
    leader: dict[str, str] = {}  # follower -> the layer whose (identical) input it shares
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this sample's inputs, kept alive so ids stay unique
    first = True
    last: str | None = None

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            entry = seen.get(id(x))
            if first:
                order.append(name)
                if entry is not None and entry[0] is x and entry[1] != name:
                    leader[name] = entry[1]
                else:
                    seen[id(x)] = (x, name)
                    stats.setdefault(name, _new_stat(kind)).add_batch(x)
            elif name in leader:
                if entry is None or entry[0] is not x or entry[1] != leader[name]:
                    raise RuntimeError(f"{name} no longer shares its input with {leader[name]}")
            else:
                seen[id(x)] = (x, name)
                stats[name].add_batch(x)  # type: ignore[attr-defined]
            if name == last:
                raise _Stop

        return hook

    with Hooks() as hooks:
        for name, module in linears.items():
            hooks.forward_pre(module, hook_for(name))
        for row in range(inputs.shape[0]):
            seen.clear()
            try:
                out = call.run(block, inputs[row : row + 1])
            except _Stop:
                continue
            if outputs is not None:
                outputs[row] = out[0]
            if first:
                first = False
                called_once = len(order) == len(set(order))
                if outputs is None and called_once and order:
                    last = order[-1]
    missing = sorted(set(linears) - set(order))
    if missing:
        log.warning("linear layers never called by their block (left dense): %s", ", ".join(missing))
    values = {name: stat.value() for name, stat in stats.items()}  # type: ignore[attr-defined]
    values.update({name: values[lead] for name, lead in leader.items()})
    return values


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, call: BlockCall, outputs: torch.Tensor) -> None:
    for row in range(inputs.shape[0]):
        outputs[row] = call.run(block, inputs[row : row + 1])[0]


@torch.no_grad()
def sequential(
    model: nn.Module,
    samples: torch.Tensor | None,
    visit: BlockVisitor,
    kind: StatKind | Callable[[], object] | None,
    *,
    modifies: bool = True,
    blocks_path: str | None = None,
    progress: Progress | None = None,
    after_visit: AfterVisit | None = None,
) -> None:
    """Run ``visit(index, block, linears, stats)`` on every block in order with statistics from ``samples``.

    ``samples`` is a ``(N, L)`` tensor of token ids (None only with ``kind=None``, which visits without
    data). ``modifies=False`` (the visitor only reads) lets one forward per block give both the
    statistics and the next inputs. ``kind`` may also be a factory of an ``add_batch / value`` object.
    ``after_visit`` (needs data and ``modifies``) runs after each visit with the block's inputs and the
    dense block's outputs on them (the statistics pass then runs the block to the end to produce those:
    one more ``(N, L, H)`` buffer).
    """
    _, blocks = find_blocks(model, blocks_path)
    was_training = model.training
    model.eval()
    try:
        if kind is None:
            for index, block in enumerate(blocks):
                visit(index, block, linear_layers(block), {})
                if progress:
                    progress(index + 1, len(blocks))
            return
        if samples is None:
            raise ValueError("statistics need calibration samples")
        calls = capture_calls(model, blocks, samples[:1])
        inputs = capture_inputs(model, blocks, samples)
        outputs = torch.empty_like(inputs)
        dense = torch.empty_like(inputs) if after_visit is not None else None
        for index, block in enumerate(blocks):
            start = time.perf_counter()
            linears = linear_layers(block)
            last = index == len(blocks) - 1
            one_pass = not modifies and not last
            stats = collect_input_stats(
                block, linears, inputs, calls[index], kind, outputs=outputs if one_pass else dense
            )
            visit(index, block, linears, stats)
            del stats
            if after_visit is not None and dense is not None and modifies:
                after_visit(index, block, inputs, dense, calls[index])
            if not last:
                if not one_pass:
                    run_block(block, inputs, calls[index], outputs)
                inputs, outputs = outputs, inputs
            log.info("block %d/%d done in %.1f s", index + 1, len(blocks), time.perf_counter() - start)
            if progress:
                progress(index + 1, len(blocks))
    finally:
        model.train(was_training)
