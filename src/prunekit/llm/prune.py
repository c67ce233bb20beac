"""Prune a causal LM's decoder blocks one-shot with a method from :mod:`prunekit.methods`.

Only the linear layers inside the decoder blocks are pruned (embeddings and the LM head stay dense, as in
the Wanda and SparseGPT papers). Each block is pruned with statistics of the inputs it receives from the
already-pruned blocks before it (:func:`prunekit.calib.sequential.sequential`).

Precision: the weights stay in the model's dtype; each layer's weight is handed to the method in float32
(statistics are float32 already) and its result is written back in the layer's dtype. :func:`prune_llm`
prunes a model held in memory; :mod:`prunekit.llm.pretrained` streams a checkpoint from disk through the
same code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.allocate.owl import outlier_ratio, owl_sparsities
from prunekit.calib.blocks import find_blocks, linear_layers, out_in_weight, set_out_in_weight
from prunekit.calib.sequential import AfterVisit, BlockDone, BlockSource, Progress, RunTimes, sequential
from prunekit.criteria.activation import wanda_scores
from prunekit.errors import PrunekitError, unknown_name
from prunekit.methods.pattern import LLM_GROUPS, check_llm_pattern, check_llm_spec
from prunekit.registry import LLM_METHODS
from prunekit.spec import Spec, Unstructured

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMPruneConfig:
    """What to prune and how. Validated on construction."""

    method: (
        str  # a name in prunekit.registry.LLM_METHODS (magnitude, wanda, sparsegpt, yours) or pkg.mod:attr
    )
    spec: Spec  # Unstructured(sparsity) or NM(n, m)
    owl: bool = False  # OWL per-block sparsities (unstructured only)
    owl_m: float = 5.0  # OWL outlier threshold M: a score is an outlier above M x the block's mean score
    owl_lambda: float = 0.08  # OWL lambda: block sparsities stay within target +- lambda
    magnitude_group: str = "layer"  # magnitude compares within each layer or each output row
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    damp: float = 0.01  # SparseGPT: dampening, a fraction of the Hessian's mean diagonal
    blocks_path: str | None = None  # dotted path of the decoder blocks; found automatically when None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)  # a user method's own settings

    def __post_init__(self) -> None:
        LLM_METHODS.get(self.method)  # an unknown name fails here, with a did-you-mean
        check_llm_pattern(self.spec)
        if self.magnitude_group not in LLM_GROUPS:
            raise unknown_name("magnitude group", self.magnitude_group, LLM_GROUPS)
        if self.owl:
            if not isinstance(self.spec, Unstructured):
                raise PrunekitError("OWL allocates unstructured sparsity per block; it does not apply to N:M")
            if not self.owl_m > 0:
                raise PrunekitError(f"OWL M must be > 0, got {self.owl_m}")
            owl_sparsities([0.0, 1.0], self.spec.sparsity, self.owl_lambda)  # validates lambda

    @property
    def statistic(self) -> str | None:
        """What the method needs to know about each layer's input (prunekit.registry.LLMMethod)."""
        return LLM_METHODS.get(self.method).statistic

    @property
    def needs_data(self) -> bool:
        return self.owl or self.statistic is not None


def check_fits(model: nn.Module, config: LLMPruneConfig) -> tuple[str, int]:
    """Check the pattern against every layer before any work; return the blocks' path and count."""
    path, blocks = find_blocks(model, config.blocks_path)
    for index, block in enumerate(blocks):
        layers = linear_layers(block)
        if not layers:
            raise PrunekitError(f"block {path}.{index} has no linear layers to prune")
        for name, module in layers.items():
            check_llm_spec(config.spec, tuple(out_in_weight(module).shape), f"{path}.{index}.{name}")
    return path, len(blocks)


def owl_block_sparsities(
    model: nn.Module,
    calib: torch.Tensor,
    config: LLMPruneConfig,
    progress: Progress | None = None,
    *,
    source: BlockSource | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[float], list[float]]:
    """``(sparsities, outlier_ratios)`` per block from one dense pass (OWL)."""
    ratios: list[float] = []

    def visit(index: int, block: nn.Module, linears: dict[str, nn.Module], stats: dict) -> None:
        scores = [
            wanda_scores(out_in_weight(module).to(torch.float32), stats[name].sqrt().unsqueeze(0))
            for name, module in linears.items()
            if name in stats
        ]
        ratios.append(outlier_ratio(scores, config.owl_m))

    sequential(
        model,
        calib,
        visit,
        "sq_norm",
        modifies=False,
        blocks_path=config.blocks_path,
        progress=progress,
        source=source,
        device=device,
    )
    assert isinstance(config.spec, Unstructured)
    return owl_sparsities(ratios, config.spec.sparsity, config.owl_lambda), ratios


def _prune_layer(config: LLMPruneConfig, spec: Spec, name: str, module: nn.Module, stat) -> None:
    weight = out_in_weight(module).to(torch.float32)  # the methods' protocol: float32 in, any dtype stored
    new = LLM_METHODS.get(config.method)(weight, stat, spec, config)
    if not isinstance(new, torch.Tensor) or new.shape != weight.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise PrunekitError(
            f"LLM method '{config.method}' returned {got} for {name}, whose weight is {tuple(weight.shape)}"
        )
    set_out_in_weight(module, new)


def check_calibration(calib: torch.Tensor | None, config: LLMPruneConfig) -> None:
    if config.needs_data and (calib is None or calib.dim() != 2 or calib.shape[0] < 1):
        raise PrunekitError(
            f"{config.method}{' with OWL' if config.owl else ''} needs calibration token ids (N, L)"
        )


def times_info(times: RunTimes) -> dict[str, float]:
    """The run's measured seconds, with the prune time over one dense forward pass (the issue-17 ratio)."""
    forward = times.dense_forward_seconds
    return {
        "prune_seconds": times.work_seconds,
        "dense_forward_seconds": forward,
        "dense_blocks_seconds": times.dense_block_seconds,
        "prune_over_forward": times.work_seconds / forward if forward > 0 else None,
        "prune_over_blocks_forward": (
            times.work_seconds / times.dense_block_seconds if times.dense_block_seconds > 0 else None
        ),
    }


@torch.no_grad()
def prune_blocks(
    model: nn.Module,
    calib: torch.Tensor | None,
    config: LLMPruneConfig,
    specs: list[Spec],
    *,
    progress: Progress | None = None,
    source: BlockSource | None = None,
    device: torch.device | str = "cpu",
    time_dense: bool = False,
    start: int = 0,
    inputs: torch.Tensor | None = None,
    block_done: BlockDone | None = None,
    after_visit: AfterVisit | None = None,
    dense_outputs: bool = False,
) -> RunTimes:
    """Prune every block (from ``start``) with ``specs[i]``: the pass :func:`prune_llm` and the streamed
    :func:`prunekit.llm.pretrained.prune_pretrained` share. ``after_visit`` / ``dense_outputs``: the
    runner's per-block hook after the layers are pruned (:class:`prunekit.calib.sequential.BlockData`)."""
    path, _ = find_blocks(model, config.blocks_path)

    def visit(index: int, block: nn.Module, linears: dict[str, nn.Module], stats: dict) -> None:
        for name, module in linears.items():
            stat = stats.get(name)
            if config.statistic is not None and stat is None:
                continue  # never called by the block: nothing to calibrate on (logged by the runner)
            _prune_layer(config, specs[index], f"{path}.{index}.{name}", module, stat)

    return sequential(
        model,
        calib,
        visit,
        config.statistic,  # type: ignore[arg-type]
        blocks_path=config.blocks_path,
        progress=progress,
        source=source,
        device=device,
        time_dense=time_dense and config.statistic is not None,
        start=start,
        inputs=inputs,
        block_done=block_done,
        after_visit=after_visit,
        dense_outputs=dense_outputs,
    )


@torch.no_grad()
def prune_llm(
    model: nn.Module,
    calib: torch.Tensor | None,
    config: LLMPruneConfig,
    progress: Progress | None = None,
    owl_progress: Progress | None = None,
    *,
    device: torch.device | str = "cpu",
    time_dense: bool = False,
    after_visit: AfterVisit | None = None,
    dense_outputs: bool = False,
) -> dict[str, Any]:
    """Prune ``model`` in place. ``calib`` is a ``(N, L)`` tensor of token ids (not needed for plain
    magnitude). Each block runs on ``device`` in turn (the model stays on the host). Returns what was done:
    the per-block target sparsities and, with OWL, outlier ratios; with ``time_dense``, the prune time and
    that of one dense forward pass over ``calib`` measured in the same run (:func:`times_info`).
    ``after_visit`` / ``dense_outputs``: the runner's per-block hook (:func:`prune_blocks`)."""
    path, count = check_fits(model, config)
    check_calibration(calib, config)
    info: dict[str, Any] = {"blocks": path, "block_count": count}
    specs: list[Spec] = [config.spec] * count
    owl_seconds = 0.0
    if config.owl:
        assert calib is not None
        began = time.perf_counter()
        sparsities, ratios = owl_block_sparsities(model, calib, config, owl_progress, device=device)
        owl_seconds = time.perf_counter() - began
        specs = [Unstructured(s) for s in sparsities]
        info["owl"] = {"m": config.owl_m, "lambda": config.owl_lambda, "outlier_ratios": ratios}
    info["block_sparsity_targets"] = [getattr(s, "sparsity", None) for s in specs]
    times = prune_blocks(
        model,
        calib,
        config,
        specs,
        progress=progress,
        device=device,
        time_dense=time_dense,
        after_visit=after_visit,
        dense_outputs=dense_outputs,
    )
    times.work_seconds += owl_seconds  # the OWL pass is part of pruning
    if time_dense:
        info["times"] = times_info(times)
    return info


def zero_counts(model: nn.Module, blocks_path: str | None = None) -> dict[str, tuple[int, int]]:
    """``(exact zeros, weights)`` of each prunable linear layer of the decoder blocks, by full name."""
    path, blocks = find_blocks(model, blocks_path)
    out = {}
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block).items():
            weight = module.weight.detach()
            out[f"{path}.{index}.{name}"] = (int((weight == 0).sum()), weight.numel())
    return out
