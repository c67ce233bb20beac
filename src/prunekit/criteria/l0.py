"""Learned masks: hard-concrete L0 gates (Louizos, Welling & Kingma, "Learning Sparse Neural Networks
through L0 Regularization", ICLR 2018).

Each gated weight (``granularity="weight"``) or output unit (``"channel"``) gets a learnable ``log_alpha``.
During training the weight is multiplied by a sampled gate (the paper's hard concrete distribution, section 4)

    u ~ U(0, 1),   s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = min(1, max(0, s (zeta - gamma) + gamma))

and at test time by the deterministic gate (the paper's test-time estimator)

    z_hat = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma)).

The probability that a gate is non-zero is ``sigmoid(log_alpha - beta log(-gamma / zeta))`` (the
paper's L0 complexity term); its sum is the expected L0 norm. Instead of the paper's ``lambda * E[L0]``
(which needs ``lambda`` tuned to reach a given sparsity) the penalty here drives the expected density
``rho = E[L0] / N`` of the ``N`` gated weights to a target ``d``:

    penalty = lam * N * (rho - d)^2

The factor ``N`` makes the penalty's gradient on a gate ``2 lam (rho - d) dP/dlog_alpha`` times the
weights it gates: independent of the model size, and as large for a channel gate as the task gradient it
competes with (which also sums over the channel's weights). ``lam`` trades reaching the target against
the task: too large and every gate is pushed down alike (the task no longer tells them apart), too small
and the density stays above the target. With ``group="layer"`` every layer is driven to its own density;
with ``"global"`` only the total is.

The target falls linearly from density 1 to ``d`` over the first ``warmup`` optimizer steps (counted by
``on_step``, which ``Sparsifier.step()`` calls), as in CoFi (Xia, Zhong & Chen 2022). Without it the
penalty pulls every gate down alike from the first step and the gates end up uniformly half-open (measured
on a tiny MLP at 75%: channel gates collapsed to chance accuracy; with a warm-up of 3/4 of the steps they
kept 94%).

At the end (:meth:`L0Gates.finish`) the gates become exact prunekit masks: the ``round(sparsity * units)``
gates with the lowest ``log_alpha`` are pruned (an exact count, whatever the gates reached), the
deterministic gate values of the kept units are folded into their weights (the function the gated model
computes at test time), and the gate parametrizations are removed; ``squash`` and export then work as for
any mask.

The gates' ``log_alpha`` are trained by their own Adam optimizer (:meth:`L0Gates.optimizer`), as in the
paper: per-parameter step sizes matter because a gate's gradient is tiny next to a weight's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.criteria.base import CRITERIA, Criterion
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, get_masks, own_class, weight_parameter
from prunekit.select import select_masks
from prunekit.spec import Block, Spec, Unstructured

# the paper's stretch interval (gamma, zeta) = (-0.1, 1.1) and temperature beta = 2/3
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
GRANULARITIES = ("weight", "channel")
_EPS = 1e-6  # keeps log u and log(1 - u) finite


def sample_gate(
    log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> torch.Tensor:
    """A hard-concrete sample for uniform noise ``u`` in (0, 1) (the hard concrete distribution)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The test-time gate ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))`` (test time)."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def prob_nonzero(
    log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> torch.Tensor:
    """P(z != 0) of each gate: ``sigmoid(log_alpha - beta log(-gamma / zeta))``."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def expected_l0(
    log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> torch.Tensor:
    """The expected number of non-zero gates, ``sum_j P(z_j != 0)``."""
    return prob_nonzero(log_alpha, beta, gamma, zeta).sum()


def density_penalty(expected: torch.Tensor, total: int, density: float, lam: float) -> torch.Tensor:
    """``lam * total * (expected / total - density)^2`` (the module docstring says why ``total``)."""
    return lam * total * (expected / total - density) ** 2


class HardConcreteGate(nn.Module):
    """Parametrization ``w -> w * z``: a sampled gate in training mode, the deterministic one in eval mode.

    ``log_alpha`` has the weight's shape (weight gates) or ``(out, 1, ...)`` (channel gates, broadcast over
    each output unit's weights).
    """

    def __init__(self, shape: tuple[int, ...], init: float, beta: float = BETA) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))
        self.beta = beta

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp_(_EPS, 1 - _EPS)
            return sample_gate(self.log_alpha, u, self.beta)
        return deterministic_gate(self.log_alpha)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate().to(weight.dtype)

    def weights_per_gate(self, weight_shape: torch.Size) -> int:
        return math.prod(weight_shape) // self.log_alpha.numel()


def gate_of(module: nn.Module) -> HardConcreteGate | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, HardConcreteGate)), None)


@CRITERIA.register("l0")
class L0Gates(Criterion):
    """Hard-concrete gates on the targeted layers, trained with the weights; ``finish`` makes them masks.

    With a :class:`~prunekit.sparsifier.Sparsifier` (``criterion="l0"``): ``configure`` it, ``prepare()``
    attaches masks and gates, train with ``optimizer()`` stepped next to yours and ``penalty()`` added to
    the loss (``prunekit.recovery.train(..., extra_optimizer=, extra_loss=)`` does both), then
    ``finish(model)`` for exact masks at the target.
    """

    needs = "gates"  # learned during training, read once at the end (not by prune rounds)
    default_group = "layer"

    def __init__(self, seed: int = 0) -> None:
        self.granularity = "weight"
        self.lam = 0.05
        self.lr = 0.05
        self.init = 3.0  # log_alpha at the start: z_hat = 1, so the gated model starts as the dense one
        self.warmup = 0  # optimizer steps over which the target density falls from 1 to the spec's
        self.steps = 0  # optimizer steps so far (on_step), for the warm-up
        self.specs: dict[str, Spec] = {}
        self.group = "layer"
        self.layers: dict[str, nn.Module] = {}

    def configure(
        self,
        specs: Mapping[str, Spec],
        group: str = "layer",
        *,
        granularity: str = "weight",
        penalty: float = 0.05,
        lr: float = 0.05,
        init: float = 3.0,
        warmup: int = 0,
    ) -> L0Gates:
        """Targets (one Unstructured spec per layer), comparison group and gate settings; call before
        the gates are attached (``Sparsifier.prepare()``)."""
        if self.layers:
            raise PrunekitError("l0: configure the gates before they are attached (before prepare())")
        if granularity not in GRANULARITIES:
            raise PrunekitError(
                f"l0 granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}"
            )
        if group not in ("layer", "global"):
            raise PrunekitError(f"l0 gates compare within a layer or globally, not per {group!r}")
        if not (penalty > 0 and lr > 0 and warmup >= 0):
            raise PrunekitError(
                f"l0 needs penalty > 0, lr > 0 and warmup >= 0, got penalty={penalty}, lr={lr}, "
                f"warmup={warmup}"
            )
        for name, spec in specs.items():
            if not isinstance(spec, Unstructured):
                raise PrunekitError(f"l0 gates learn an unstructured sparsity; layer '{name}' has {spec}")
        self.specs, self.group = dict(specs), group
        self.granularity, self.lam, self.lr, self.init = granularity, float(penalty), float(lr), float(init)
        self.warmup = int(warmup)
        return self

    # -- Criterion lifecycle ---------------------------------------------------------------------------
    def start(self, layers: Mapping[str, nn.Module]) -> None:
        """Attach a gate after each layer's mask (``Sparsifier.prepare()`` calls this)."""
        missing = [n for n in layers if n not in self.specs]
        if missing:
            raise PrunekitError(f"l0: no target sparsity for {', '.join(missing)}: call configure(specs)")
        for module in layers.values():
            if gate_of(module) is not None:
                continue
            shape = tuple(weight_parameter(module).shape)
            if self.granularity == "channel":
                shape = (shape[0],) + (1,) * (len(shape) - 1)
            gate = HardConcreteGate(shape, self.init).to(weight_parameter(module).device)
            parametrize.register_parametrization(module, "weight", gate, unsafe=True)
        self.layers = dict(layers)

    def on_step(self, layers: Mapping[str, nn.Module]) -> None:
        self.steps += 1

    def target_density(self, sparsity: float) -> float:
        """The density the penalty aims at now: linear from 1 to ``1 - sparsity`` over ``warmup`` steps."""
        progress = min(1.0, self.steps / self.warmup) if self.warmup else 1.0
        return 1.0 - sparsity * progress

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        """``log_alpha`` broadcast to the weight's shape (divided by the weights per gate for channel
        gates, so a row's block sum is its ``log_alpha``)."""
        gate = self._gate(name)
        shape = weight_parameter(module).shape  # not module.weight: that would sample the gates
        return (gate.log_alpha.detach() / gate.weights_per_gate(shape)).expand(shape).clone()

    # -- training --------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [self._gate(n).log_alpha for n in self.layers]

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def _terms(self) -> list[tuple[str, torch.Tensor, int]]:
        """(name, expected non-zero weights, gated weights) per layer."""
        out = []
        for name, module in self.layers.items():
            gate = self._gate(name)
            per = gate.weights_per_gate(weight_parameter(module).shape)
            out.append((name, expected_l0(gate.log_alpha) * per, per * gate.log_alpha.numel()))
        return out

    def penalty(self) -> torch.Tensor:
        terms = self._terms()
        if self.group == "global":
            total = sum(t[2] for t in terms)
            density = sum(t[2] * self.target_density(self.specs[t[0]].sparsity) for t in terms) / total
            expected = sum(t[1] for t in terms)
            return density_penalty(expected, total, density, self.lam)
        return sum(
            density_penalty(e, n, self.target_density(self.specs[name].sparsity), self.lam)
            for name, e, n in terms
        )

    def expected_density(self) -> dict[str, float]:
        """E[L0] / N of each layer, and of all gated weights under ``"*"``."""
        terms = self._terms()
        out = {name: float(e.detach()) / n for name, e, n in terms}
        out["*"] = float(sum(t[1] for t in terms).detach()) / sum(t[2] for t in terms)
        return out

    # -- the end ---------------------------------------------------------------------------------------
    def finish(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Exact masks at the targets (lowest ``log_alpha`` pruned), deterministic gates folded into the
        kept weights, gates removed; returns the masks (now prunekit masks on ``model``)."""
        existing = get_masks(model)
        scores = {n: self.scores(n, m) for n, m in self.layers.items()}
        if self.granularity == "channel":  # whole rows: a (1, row length) block per output unit
            specs = {
                n: Block((1, weight_parameter(m)[0].numel()), self.specs[n].sparsity)
                for n, m in self.layers.items()
            }
        else:
            specs = self.specs
        masks = select_masks(
            scores, specs, self.group, {n: existing[n] for n in self.layers if n in existing}
        )
        for name, module in self.layers.items():
            gate = self._gate(name)
            with torch.no_grad():
                z_hat = deterministic_gate(gate.log_alpha).to(weight_parameter(module).dtype)
                # a unit kept only to reach the exact count may have z_hat = 0: keep its trained weight
                scale = torch.where(z_hat > 0, z_hat, torch.ones_like(z_hat))
            own_class(module)  # removal must not strip `weight` from a deep copy sharing the class
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                module.weight.mul_(scale)
        apply_masks(model, masks)
        self.layers = {}
        return masks

    def _gate(self, name: str) -> HardConcreteGate:
        gate = gate_of(self.layers[name]) if name in self.layers else None
        if gate is None:
            raise PrunekitError(f"l0: layer '{name}' has no gate (call Sparsifier.prepare() first)")
        return gate
