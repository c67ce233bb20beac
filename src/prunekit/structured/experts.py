"""Whole-expert pruning of mixture-of-experts blocks, ranked on calibration data by a router-weighted
criterion; the router and the config shrink with the experts, so the result loads with plain
``from_pretrained``.

Layout: the Hugging Face transformers >= 5 MoE convention (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...): a
block with a router ``gate`` whose ``weight`` has one row per expert (plus per-expert biases, if any) and
an ``experts`` module holding every expert's weights stacked along dim 0, called as
``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``. Each expert's output on the tokens
routed to it is recomputed with the module's own forward (only that expert selected, weight 1), so any
expert implementation of that convention is measured as it runs.

Criteria, for expert ``j`` with ``X_j`` the calibration tokens routed to it (among the router's top k),
``g_j(x)`` the weight the router gives it for token ``x`` (the one the block multiplies its output by) and
``f_j(x)`` its output, over ``N`` tokens:

- ``reap``, :func:`reap` -- router-weighted expert activation, ``S_j = 1/|X_j| sum_{x in X_j} g_j(x)
  ||f_j(x)||_2`` (0 for an expert no token reaches): Lasby, Lazarevich, Sinnadurai, Lie, Ioannou &
  Thangarasa, "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression", 2025.
- ``frequency``, :func:`frequency_norm` -- activation frequency times mean output norm, ``|X_j| / N *
  1/|X_j| sum_{x in X_j} ||f_j(x)||_2``: how often an expert is chosen (Lu et al., "Not All Experts are
  Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts LLMs", ACL 2024, prune by routing
  frequency) weighted by how much it writes when chosen.

Removing expert ``j`` gives exactly the original model with ``j``'s router logit set to -inf: the softmax
over the remaining logits, the top-k choice and its renormalisation are what the original computes with
``j`` masked (the tests check this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.errors import PrunekitError

CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # Mixtral / Qwen-MoE, OLMoE / DeepSeek
CRITERIA = ("reap", "frequency")


@dataclass
class MoEBlock:
    name: str  # module path of the block, e.g. "model.layers.0.mlp"
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)


@dataclass
class ExpertStats:
    """Calibration sums of one block: tokens seen, and per expert the tokens routed to it, the sum of its
    output norms and of its output norms times its router weight."""

    experts: int
    tokens: int = 0
    routed: torch.Tensor = field(init=False)
    norm_sum: torch.Tensor = field(init=False)
    gated_norm_sum: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.routed = torch.zeros(self.experts, dtype=torch.float64)
        self.norm_sum = torch.zeros(self.experts, dtype=torch.float64)
        self.gated_norm_sum = torch.zeros(self.experts, dtype=torch.float64)


def reap(routed: torch.Tensor, gated_norm_sum: torch.Tensor) -> torch.Tensor:
    """REAP saliency: mean over the tokens routed to each expert of router weight x output L2 norm."""
    return torch.where(routed > 0, gated_norm_sum / routed.clamp_min(1), torch.zeros_like(gated_norm_sum))


def frequency_norm(routed: torch.Tensor, norm_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """Routing frequency (share of tokens routed to the expert) x mean output L2 norm when routed."""
    if tokens <= 0:
        raise ValueError("frequency_norm needs at least one calibration token")
    mean = torch.where(routed > 0, norm_sum / routed.clamp_min(1), torch.zeros_like(norm_sum))
    return routed / tokens * mean


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every module with an ``experts`` child (stacked experts, ``num_experts``) and a router child
    (``gate`` or ``router``) with one weight row per expert."""
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        router = router if isinstance(router, nn.Module) else getattr(module, "router", None)
        count = getattr(experts, "num_experts", None)
        weight = getattr(router, "weight", None)
        if (
            isinstance(experts, nn.Module)
            and not isinstance(experts, nn.ModuleList)
            and isinstance(count, int)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.shape[0] == count
        ):
            blocks.append(MoEBlock(name, router, experts))
    return blocks


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise PrunekitError(
            "the experts module is not called as experts(hidden_states, top_k_index, top_k_weights) "
            "(the transformers >= 5 mixture-of-experts layout); this model's experts cannot be measured"
        )
    return values[0], values[1], values[2]


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    blocks: Sequence[MoEBlock],
    batches: Iterable[torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, ExpertStats]:
    """Run the model on every batch of token ids and accumulate each block's :class:`ExpertStats`."""
    stats = {b.name: ExpertStats(b.num_experts) for b in blocks}
    batches = list(batches)

    def hook_for(block: MoEBlock):
        def hook(module, args, kwargs):
            hidden, index, weights = _routing_args(args, kwargs)
            acc = stats[block.name]
            acc.tokens += hidden.shape[0]
            for j in torch.unique(index).tolist():
                if not 0 <= j < block.num_experts:
                    continue  # a sentinel index some routers use for "no expert"
                token, slot = (index == j).nonzero(as_tuple=True)
                only = torch.full((token.numel(), 1), j, dtype=index.dtype, device=index.device)
                ones = torch.ones((token.numel(), 1), dtype=weights.dtype, device=weights.device)
                out = module.forward(hidden[token], only, ones)  # forward, not __call__: no hook again
                norms = torch.linalg.vector_norm(out.float(), dim=-1).double().cpu()
                gates = weights[token, slot].double().cpu()
                acc.routed[j] += token.numel()
                acc.norm_sum[j] += norms.sum()
                acc.gated_norm_sum[j] += (gates * norms).sum()

        return hook

    handles = [b.experts.register_forward_pre_hook(hook_for(b), with_kwargs=True) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        for i, ids in enumerate(batches):
            model(ids if ids.dim() == 2 else ids.unsqueeze(0))
            if progress is not None:
                progress(i + 1, len(batches))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return stats


def scores(stats: ExpertStats, criterion: str) -> torch.Tensor:
    if criterion == "reap":
        return reap(stats.routed, stats.gated_norm_sum)
    if criterion == "frequency":
        return frequency_norm(stats.routed, stats.norm_sum, stats.tokens)
    raise PrunekitError(f"expert criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def _slice_rows(module: nn.Module, count: int, keep: torch.Tensor) -> None:
    """Keep rows ``keep`` of every parameter/buffer of ``module`` itself whose dim 0 has ``count`` rows."""
    for store in (module._parameters, module._buffers):
        for key, tensor in list(store.items()):
            if tensor is None or tensor.dim() == 0 or tensor.shape[0] != count:
                continue
            new = tensor.detach().index_select(0, keep.to(tensor.device))
            store[key] = nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new


def remove_experts(model: nn.Module, blocks: Sequence[MoEBlock], removed: dict[str, list[int]]) -> None:
    """Remove the listed experts of every block: their stacked weights, their router rows (and per-expert
    router biases), the modules' expert counts and the config's."""
    counts = {len(removed.get(b.name, [])) for b in blocks}
    if len(counts) > 1:
        raise PrunekitError(
            "every block must lose the same number of experts (one config describes them all)"
        )
    before = {b.num_experts for b in blocks}
    for block in blocks:
        drop = sorted(set(removed.get(block.name, [])))
        count = block.num_experts
        if any(not 0 <= j < count for j in drop):
            raise PrunekitError(f"{block.name}: expert indices must lie in [0, {count})")
        keep = torch.tensor([j for j in range(count) if j not in drop], dtype=torch.long)
        top_k = getattr(block.router, "top_k", 1)
        if keep.numel() < top_k:
            raise PrunekitError(f"{block.name} routes each token to {top_k} experts: keep at least {top_k}")
        for module in (block.experts, block.router):
            _slice_rows(module, count, keep)
            if getattr(module, "num_experts", None) == count:
                module.num_experts = keep.numel()
    config = getattr(model, "config", None)
    if config is not None and len(before) == 1 and blocks:
        old, new = before.pop(), blocks[0].num_experts
        for key in CONFIG_KEYS:
            if getattr(config, key, None) == old:
                setattr(config, key, new)


@dataclass
class ExpertPruneResult:
    removed: dict[str, list[int]]  # block -> removed expert indices (of the original numbering)
    scores: dict[str, list[float]]  # block -> every expert's score
    experts_before: int
    experts_after: int
    params_before: int
    params_after: int


def prune_experts(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    ratio: float = 0.25,
    criterion: str = "reap",
    progress: Callable[[int, int], None] | None = None,
) -> ExpertPruneResult:
    """Remove ``ratio`` of the experts of every MoE block (the same count in each, the lowest scores),
    ranked on calibration ``batches`` of token ids; in place."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise PrunekitError(f"the share of experts to remove must be in (0, 1), got {ratio!r}")
    if criterion not in CRITERIA:
        raise PrunekitError(f"expert criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    blocks = find_moe_blocks(model)
    if not blocks:
        raise PrunekitError(
            "no mixture-of-experts blocks found (a module with a router 'gate' and stacked 'experts', the "
            "transformers >= 5 layout)"
        )
    counts = {b.num_experts for b in blocks}
    if len(counts) != 1:
        raise PrunekitError(f"the MoE blocks have different expert counts ({sorted(counts)})")
    experts = counts.pop()
    drop = round(ratio * experts)
    if drop < 1:
        raise PrunekitError(f"--experts {ratio} removes no expert of {experts}; give a larger share")
    params_before = sum(p.numel() for p in model.parameters())
    stats = collect_stats(model, blocks, batches, progress)
    removed, ranked = {}, {}
    for block in blocks:
        s = scores(stats[block.name], criterion)
        ranked[block.name] = [float(v) for v in s]
        removed[block.name] = sorted(torch.argsort(s, stable=True)[:drop].tolist())
    remove_experts(model, blocks, removed)
    return ExpertPruneResult(
        removed, ranked, experts, experts - drop, params_before, sum(p.numel() for p in model.parameters())
    )
