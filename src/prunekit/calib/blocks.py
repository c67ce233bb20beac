"""Find a model's repeated decoder blocks and capture how the model calls each one.

Nothing here knows a model family. The blocks are the largest ``nn.ModuleList`` of identical modules whose
length is the config's layer count; the inputs of the first block and the extra arguments of every block
(attention masks, rotary embeddings, position ids -- whatever that family's forward passes) are recorded
while the model's own forward runs, so each block can later be re-run alone exactly as the model would
have run it. While recording, every block's ``forward`` is replaced by a stand-in (:func:`stand_ins`) that
returns its input: the blocks never run, so their weights need not even be in memory (streaming). The same
stand-ins turn the last block's output into logits with the model's own head (:func:`logits_from_hidden`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.calib.hooks import Hooks
from prunekit.errors import PrunekitError
from prunekit.masking import type_name


class _Captured(Exception):
    """Raised from a pre-hook to stop the forward once the first block's input is recorded."""


@dataclass
class BlockCall:
    """How the model calls one block: the arguments besides the hidden states (shared by every sample of
    the same length, as calibration windows are)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_keyword: bool
    returns_tuple: bool | None = None  # what the block returned when last run (None: not run yet)

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        self.returns_tuple = isinstance(out, (tuple, list))
        return out[0] if self.returns_tuple else out

    def to(self, device: torch.device | str) -> BlockCall:
        """The same call with every tensor argument (masks, rotary tables) on ``device``."""
        return BlockCall(
            _to(self.args, device), _to(self.kwargs, device), self.hidden_as_keyword, self.returns_tuple
        )


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(
    model: nn.Module,
    path: str | None = None,
    *,
    kinds: tuple[type[nn.Module], ...] = (nn.ModuleList,),
    min_blocks: int = 1,
    rank: str = "params",
    what: str = "decoder blocks",
) -> tuple[str, nn.Module]:
    """``(name, blocks)``: the model's repeated blocks, the container at the dotted ``path`` or found.

    Found: a container of one of ``kinds`` holding at least ``min_blocks`` modules of a single type (and,
    when the model has a Hugging Face config, as many as its layer count); of those, the one holding the
    most parameters (``rank="params"``: a language model's decoder stack, not a smaller list beside it) or
    the most blocks (``rank="length"``: the deepest stack, for whole-layer removal). ``what`` names them in
    the error when none is found.
    """
    names = " or ".join(f"nn.{k.__name__}" for k in kinds)
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError as exc:
            raise PrunekitError(f"no module named '{path}' in {type(model).__name__}") from exc
        if not isinstance(blocks, kinds) or len(blocks) < max(min_blocks, 1):
            least = f" (at least {min_blocks})" if min_blocks > 1 else ""
            raise PrunekitError(f"'{path}' is not a non-empty {names} of blocks{least}")
        return path, blocks
    want = _layer_count(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or len(module) < max(min_blocks, 1):
            continue
        if len({type(child) for child in module}) != 1 or (want is not None and len(module) != want):
            continue
        size = sum(p.numel() for p in module.parameters()) if rank == "params" else len(module)
        found.append((size, -len(found), name, module))  # ties: the first found
    if not found:
        expect = f"{want} " if want is not None else ""
        raise PrunekitError(
            f"could not find the {what} of {type(model).__name__}: no {names} of {expect}"
            "identical modules; pass the blocks' dotted path (e.g. 'model.layers')"
        )
    _, _, name, blocks = max(found, key=lambda item: item[:2])
    return name, blocks


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable linear layers of a block: ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2 style)."""
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) or type_name(module) == "Conv1D"
    }


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``: ``Conv1D`` stores it transposed."""
    weight = module.weight.detach()
    return weight.T if type_name(module) == "Conv1D" else weight


def set_out_in_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out, in)`` weight back in the module's own layout and dtype."""
    target = module.weight
    value = weight.T if type_name(module) == "Conv1D" else weight
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def _first_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), hidden_as_keyword=False)
    if "hidden_states" not in kwargs:
        raise PrunekitError("could not find the hidden states among the block's arguments")
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], BlockCall((), rest, hidden_as_keyword=True)


def _call_model(model: nn.Module, ids: torch.Tensor) -> Any:
    params = inspect.signature(model.forward).parameters
    takes_cache = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    # no KV cache: it would only cost memory, and blocks must not carry state from one sample to the next
    return model(ids, use_cache=False) if takes_cache else model(ids)


StandIn = Callable[[int, tuple, dict], Any]


@contextlib.contextmanager
def stand_ins(blocks: nn.ModuleList, fn: StandIn) -> Iterator[None]:
    """Inside, calling block ``i`` returns ``fn(i, args, kwargs)`` instead of running it (the block's
    hooks still fire); each block's own ``forward`` is back on exit."""
    saved = []
    for index, block in enumerate(blocks):
        saved.append(block.__dict__.get("forward"))
        block.forward = lambda *args, _i=index, **kwargs: fn(_i, args, kwargs)
    try:
        yield
    finally:
        for block, own in zip(blocks, saved):
            if own is None:
                del block.forward
            else:
                block.forward = own


@torch.no_grad()
def capture_calls(model: nn.Module, blocks: nn.ModuleList, sample: torch.Tensor) -> list[BlockCall]:
    """How the model calls every block, from one forward of ``sample`` (one ``(1, L)`` token row) in which
    no block runs (each hands its input on) and which stops after the last block."""
    calls: list[BlockCall | None] = [None] * len(blocks)

    def record(index: int, args: tuple, kwargs: dict):
        hidden, calls[index] = _first_hidden(args, kwargs)
        if index == len(blocks) - 1:
            raise _Captured
        return hidden

    # _Captured: raised after the last block's call is recorded
    with stand_ins(blocks, record), contextlib.suppress(_Captured):
        _call_model(model, sample)
    missing = [i for i, call in enumerate(calls) if call is None]
    if missing:
        raise PrunekitError(f"the model's forward never called blocks {missing}")
    return calls  # type: ignore[return-value]


@torch.no_grad()
def logits_from_hidden(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, hidden: torch.Tensor, returns_tuple: bool
) -> torch.Tensor:
    """The model's logits for ``ids`` ``(1, L)`` when its last block outputs ``hidden`` ``(1, L, H)``: the
    model's own forward (embeddings, final norm, LM head, soft-capping, ...) with no block run."""
    last = len(blocks) - 1

    def hand_on(index: int, args: tuple, kwargs: dict):
        out = hidden if index == last else _first_hidden(args, kwargs)[0]
        return (out,) if returns_tuple else out

    with stand_ins(blocks, hand_on):
        out = _call_model(model, ids)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor) -> torch.Tensor:
    """The first block's hidden-state inputs for each row of ``samples`` ``(N, L)``: a ``(N, L, H)`` tensor.

    The forward stops at the first block, so this costs the embeddings only."""
    inputs: torch.Tensor | None = None
    row = 0

    def hook(module, args, kwargs):
        nonlocal inputs
        hidden = _first_hidden(args, kwargs)[0]
        if inputs is None:
            inputs = hidden.new_empty((samples.shape[0], *hidden.shape[1:]))
        inputs[row] = hidden[0]
        raise _Captured

    with Hooks() as hooks:
        hooks.forward_pre(blocks[0], hook, with_kwargs=True)
        for row in range(samples.shape[0]):  # noqa: B007 -- read by the hook
            try:
                _call_model(model, samples[row : row + 1])
            except _Captured:
                continue
            raise PrunekitError("the model's forward never reached its first block")
    assert inputs is not None
    return inputs
