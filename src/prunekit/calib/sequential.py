"""Block-by-block calibration: the one runner behind every one-shot LLM method, in memory or streamed.

The SparseGPT / Wanda reference pipeline, generic over model families. The first block's inputs are
captured for every calibration sample (the embeddings only: no block runs, :mod:`prunekit.calib.blocks`);
then, for each block ``i`` in turn:

1. ``source.load(i)``: the block, dense (in memory: the model's own; streamed: read from disk), moved to
   ``device``;
2. with ``time_dense``: the dense block over every input, timed -- the baseline ("one dense forward pass over
   the calibration tokens"), not counted as pruning;
3. forward pre-hooks on the block's linear layers accumulate float32 statistics of their inputs over all
   samples (the pass stops at the last linear layer unless the dense outputs are wanted);
4. ``visit(i, block, linears, stats)``: the method prunes the block's layers;
5. ``after_visit(BlockData)``: a per-block hook after the masks are chosen (e.g. refitting the kept weights
   to the dense block's outputs, given with ``dense_outputs=True``);
6. the pruned block is re-run on the same inputs: its outputs are the next block's inputs, so every block
   sees what the already-pruned blocks before it produce (skipped after the last block);
7. the block goes back to the host and ``source.release(i, block)`` (streamed: written to its output shard
   and freed);
8. ``block_done(i, next_inputs)``: e.g. the resume checkpoint of :mod:`prunekit.llm.resume`.

Peak memory is one block, its statistics and two ``(N, L, hidden)`` activation buffers (three with
``dense_outputs``), plus whatever the source keeps (the whole model in memory; nothing streamed).

Two things keep the passes cheap without changing a result: linear layers fed the very same input tensor
(q/k/v, gate/up) share one statistic, and the statistics pass stops at the block's last linear layer
(its output and everything after it are not needed).

Devices: each block is moved to ``device`` in turn, as the papers' code does; the activation buffers live
there too when they take at most half of the device's free memory, else on the host (each sample is then
copied over for its forward).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from prunekit.calib.blocks import (
    BlockCall,
    capture_calls,
    capture_inputs,
    find_blocks,
    linear_layers,
    logits_from_hidden,
)
from prunekit.calib.hooks import Hooks
from prunekit.calib.stats import RunningGram, RunningSqNorm
from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)

StatKind = Literal["sq_norm", "gram"]
BlockVisitor = Callable[[int, nn.Module, dict[str, nn.Module], dict[str, torch.Tensor]], None]
Progress = Callable[[int, int], None]


class BlockSource(Protocol):
    """Where the runner gets each block and hands it back (in memory: :class:`ModelBlocks`; streamed from
    disk: :class:`prunekit.llm.stream.StreamedBlocks`)."""

    def load(self, index: int) -> nn.Module: ...  # the dense block, its weights in host memory

    def release(self, index: int, block: nn.Module) -> None: ...  # the runner is done with it

    def outside(self) -> contextlib.AbstractContextManager: ...  # non-block weights in memory meanwhile


class ModelBlocks:
    """The blocks of a model held in memory: nothing to read or free."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.blocks = blocks

    def load(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release(self, index: int, block: nn.Module) -> None:
        pass

    def outside(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@dataclass
class BlockData:
    """What an ``after_visit`` hook sees: the block as pruned by ``visit`` (on ``device``), the inputs it was
    calibrated on and, with ``dense_outputs=True``, the dense block's outputs on them. ``call.run(block,
    inputs[r:r+1].to(device))`` runs the block as the model would."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Module]
    inputs: torch.Tensor  # (N, L, hidden), on device or host
    call: BlockCall
    dense_outputs: torch.Tensor | None  # (N, L, hidden), same place as inputs
    device: torch.device


AfterVisit = Callable[[BlockData], None]


@dataclass
class RunTimes:
    """Seconds spent, measured in the same run: the work itself, and the dense-forward baseline."""

    work_seconds: float = 0.0  # capture, statistics, visits, pruned passes, reads and writes
    capture_seconds: float = 0.0  # the embeddings pass that captures the first block's inputs
    dense_block_seconds: float = 0.0  # the dense blocks over every sample (with time_dense)
    dense_outside_seconds: float = 0.0  # embeddings, final norm and LM head over every sample (time_dense)
    block_seconds: list[float] = field(default_factory=list)  # work per block, this run's blocks only

    @property
    def dense_forward_seconds(self) -> float:
        return self.dense_block_seconds + self.dense_outside_seconds


BlockDone = Callable[[int, "torch.Tensor | None", RunTimes], None]  # (index, next inputs, times so far)


class _Stop(Exception):
    """Raised by the last linear layer's pre-hook: the rest of the block is not needed for statistics."""


_STATS = {"sq_norm": RunningSqNorm, "gram": RunningGram}


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError("device cuda was asked for but torch sees no CUDA device")
    return device


def activation_device(device: torch.device, nbytes: int) -> torch.device:
    """``device`` when ``nbytes`` of activations take at most half of its free memory, else the host."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= free // 2 else torch.device("cpu")


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
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of each linear layer's input over every sample in ``inputs``.

    With ``outputs`` the block runs to the end and writes its outputs there (one pass for a dense
    block); without, each forward stops after the last linear layer's statistics. Each sample is moved to
    ``device`` (default: where it is) for its forward."""
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
            x = inputs[row : row + 1]
            try:
                out = call.run(block, x if device is None else x.to(device))
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
def run_block(
    block: nn.Module,
    inputs: torch.Tensor,
    call: BlockCall,
    outputs: torch.Tensor,
    device: torch.device | None = None,
) -> None:
    """``outputs[r] = block(inputs[r])`` for every sample, each moved to ``device`` for its forward."""
    for row in range(inputs.shape[0]):
        x = inputs[row : row + 1]
        outputs[row] = call.run(block, x if device is None else x.to(device))[0]


@contextlib.contextmanager
def outside_on(model: nn.Module, blocks_path: str, device: torch.device) -> Iterator[None]:
    """Inside, every parameter and buffer outside the blocks (embeddings, final norm, LM head) is on
    ``device``; back on the host after. Nothing moves for the CPU."""
    if device.type == "cpu":
        yield
        return
    moved: list[tuple[nn.Module, str, bool]] = []
    prefix = blocks_path + "."
    for owner_name, module in model.named_modules():
        if owner_name == blocks_path or owner_name.startswith(prefix):
            continue
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for leaf, value in table.items():
                if value is not None and value.device.type not in ("meta", device.type):
                    moved.append((module, leaf, is_param))
    seen: set[int] = set()
    try:
        for module, leaf, is_param in moved:
            value = (module._parameters if is_param else module._buffers)[leaf]
            if id(value) in seen:
                continue  # tied: the same tensor reached from two modules moves once
            seen.add(id(value))
            value.data = value.data.to(device)
        yield
    finally:
        seen.clear()
        for module, leaf, is_param in moved:
            value = (module._parameters if is_param else module._buffers)[leaf]
            if id(value) not in seen:
                seen.add(id(value))
                value.data = value.data.to("cpu")


@dataclass
class _Setup:
    path: str
    blocks: nn.ModuleList
    source: BlockSource
    device: torch.device


def _setup(
    model: nn.Module,
    blocks_path: str | None,
    source: BlockSource | None,
    device: torch.device | str,
) -> _Setup:
    path, blocks = find_blocks(model, blocks_path)
    return _Setup(path, blocks, source or ModelBlocks(blocks), _resolve_device(device))


def _eta(done: int, total: int, seconds: list[float]) -> str:
    if not seconds or done >= total:
        return ""
    left = (total - done) * sum(seconds) / len(seconds)
    return f", about {left / 60:.1f} min left" if left >= 60 else f", about {left:.0f} s left"


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
    source: BlockSource | None = None,
    device: torch.device | str = "cpu",
    after_visit: AfterVisit | None = None,
    dense_outputs: bool = False,
    time_dense: bool = False,
    start: int = 0,
    inputs: torch.Tensor | None = None,
    block_done: BlockDone | None = None,
) -> RunTimes:
    """Run ``visit(index, block, linears, stats)`` on every block in order with statistics from ``samples``.

    ``samples`` is a ``(N, L)`` tensor of token ids (None only with ``kind=None``, which visits without
    data). ``modifies=False`` (the visitor only reads) lets one forward per block give both the
    statistics and the next inputs. ``source`` supplies the blocks (default: the model's own, in memory);
    ``device`` is where each block runs. ``start`` and ``inputs`` continue an interrupted run at block
    ``start`` with that block's saved inputs. The other options are the per-block hooks and the baseline
    timing described in the module docstring. Returns the times measured.
    ``kind`` may also be a factory of an ``add_batch / value`` object (DSnoT's input moments).
    """
    setup = _setup(model, blocks_path, source, device)
    blocks, source, device = setup.blocks, setup.source, setup.device
    count = len(blocks)
    times = RunTimes()
    began = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if kind is None:
            for index in range(start, count):
                block = source.load(index).to(device)
                visit(index, block, linear_layers(block), {})
                if device.type != "cpu":
                    block.to("cpu")
                source.release(index, block)
                if block_done:
                    block_done(index, None, times)
                if progress:
                    progress(index + 1, count)
            return times
        if samples is None:
            raise ValueError("statistics need calibration samples")
        tick = time.perf_counter()
        with source.outside():
            calls = capture_calls(model, blocks, samples[:1])
            if inputs is None:
                inputs = capture_inputs(model, blocks, samples)
        times.capture_seconds = time.perf_counter() - tick
        if inputs.shape[0] != samples.shape[0]:
            raise ValueError(f"{inputs.shape[0]} saved inputs for {samples.shape[0]} samples")
        buffers = 3 if dense_outputs else 2
        place = activation_device(device, buffers * inputs.numel() * inputs.element_size())
        on = None if place == device else device  # samples cross to the device one at a time
        inputs = inputs.to(place)
        outputs = torch.empty_like(inputs)
        dense = torch.empty_like(inputs) if dense_outputs else None
        calls = [call.to(device) for call in calls]
        if progress and start:
            progress(start, count)  # a resumed run: the bar (and its time estimate) starts here
        for index in range(start, count):
            begin = time.perf_counter()
            dense_seconds = 0.0
            block = source.load(index).to(device)
            linears = linear_layers(block)
            last = index == count - 1
            if time_dense:
                tick = time.perf_counter()
                run_block(block, inputs, calls[index], outputs, on)
                dense_seconds = time.perf_counter() - tick
            one_pass = not modifies and not last and dense is None
            stats = collect_input_stats(
                block,
                linears,
                inputs,
                calls[index],
                kind,
                outputs=dense if dense is not None else (outputs if one_pass else None),
                device=on,
            )
            visit(index, block, linears, stats)
            del stats
            if after_visit is not None:
                after_visit(BlockData(index, block, linears, inputs, calls[index], dense, device))
            if not last and not one_pass:
                run_block(block, inputs, calls[index], outputs, on)
            if device.type != "cpu":
                block.to("cpu")
            source.release(index, block)
            if not last:
                inputs, outputs = outputs, inputs
            times.dense_block_seconds += dense_seconds
            times.block_seconds.append(time.perf_counter() - begin - dense_seconds)
            if block_done:
                block_done(index, None if last else inputs, times)
            log.info(
                "block %d/%d done in %.1f s%s",
                index + 1,
                count,
                times.block_seconds[-1],
                _eta(index + 1, count, times.block_seconds),
            )
            if progress:
                progress(index + 1, count)
        if time_dense:  # `outputs` holds the last block's dense outputs: time what the model does around them
            tick = time.perf_counter()
            with source.outside(), outside_on(model, setup.path, device):
                setup_seconds = time.perf_counter() - tick
                returns_tuple = bool(calls[-1].returns_tuple)
                tick = time.perf_counter()
                for row in range(samples.shape[0]):
                    ids = samples[row : row + 1].to(device)
                    logits_from_hidden(model, blocks, ids, outputs[row : row + 1].to(device), returns_tuple)
                times.dense_outside_seconds = time.perf_counter() - tick
            times.work_seconds -= setup_seconds  # reading the head is neither work nor forward
        return times
    finally:
        model.train(was_training)
        times.work_seconds += time.perf_counter() - began - times.dense_forward_seconds


@torch.no_grad()
def final_hidden(
    model: nn.Module,
    samples: torch.Tensor,
    *,
    blocks_path: str | None = None,
    source: BlockSource | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[torch.Tensor, bool]:
    """The last block's outputs ``(N, L, hidden)`` for every row of ``samples`` (on the host), one block in
    memory at a time, and whether the blocks return tuples (for :func:`logits_from_hidden`)."""
    setup = _setup(model, blocks_path, source, device)
    blocks, source, device = setup.blocks, setup.source, setup.device
    was_training = model.training
    model.eval()
    try:
        with source.outside():
            calls = capture_calls(model, blocks, samples[:1])
            inputs = capture_inputs(model, blocks, samples)
        place = activation_device(device, 2 * inputs.numel() * inputs.element_size())
        on = None if place == device else device
        inputs = inputs.to(place)
        outputs = torch.empty_like(inputs)
        calls = [call.to(device) for call in calls]
        for index in range(len(blocks)):
            block = source.load(index).to(device)
            run_block(block, inputs, calls[index], outputs, on)
            if device.type != "cpu":
                block.to("cpu")
            source.release(index, block)
            inputs, outputs = outputs, inputs
            if progress:
                progress(index + 1, len(blocks))
        return inputs.to("cpu"), bool(calls[-1].returns_tuple)
    finally:
        model.train(was_training)
