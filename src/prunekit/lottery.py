"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks", ICLR 2019:
train the network, remove ``rate`` of the remaining weights with the smallest magnitude, reset the
survivors to their initial values, and repeat until the target sparsity; the resulting sub-network (the
"winning ticket") trains in isolation to the accuracy of the dense one.

Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
ICML 2020: for deeper networks, rewind the survivors to their values at an early training step ``k``
instead of initialisation ("rewinding to step k").

    init = capture_state(model)                         # rewind to init (what the default does) ...
    # ... or train k steps yourself, then capture: the first round continues from step k
    ticket = find_ticket(model, train, target=0.9, rate=0.2, rewind_state=init)
    ticket.apply(make_model())                          # trainable in isolation; pruned weights stay 0

``train(model)`` trains the masked model in place; create the optimizer inside it, so every round starts
with fresh optimizer state, as after a rewind it should. When rewinding to step ``k``, ``train`` should run
the remaining ``T - k`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, get_masks
from prunekit.schedule import geometric_rounds
from prunekit.select import check_group
from prunekit.sparsifier import Sparsifier
from prunekit.spec import Unstructured
from prunekit.targets import Targets

_ORIGINAL = "parametrizations.weight.original"
_MASK = "parametrizations.weight.0.mask"


@dataclass
class Ticket:
    """A sparse sub-network: keep-masks plus the rewound weights it is meant to be trained from."""

    masks: dict[str, torch.Tensor]  # module name -> bool keep-mask (True = kept)
    weights: dict[str, torch.Tensor]  # plain state dict of the rewound model (zeros at pruned positions)
    sparsity: float  # fraction of pruned weights over the masked layers
    rounds: list[float] = field(default_factory=list)  # sparsity reached after each pruning round

    def apply(self, model: nn.Module) -> nn.Module:
        """Attach the masks and load the rewound weights into ``model`` (same architecture); returns it."""
        apply_masks(model, self.masks)
        load_plain_state(model, self.weights)
        return model


def capture_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's effective state, with plain keys (``"fc.weight"``).

    Masked weights are stored as the model sees them (zeros at pruned positions), and no parametrization
    keys appear, so the result can be loaded into masked and unmasked copies of the architecture alike.
    Call it at initialisation, or after step ``k`` of training to rewind there later.
    """
    state = {}
    prefixes = _parametrized_prefixes(model)
    for key, value in model.state_dict().items():
        prefix = next((p for p in prefixes if key.startswith(p + "parametrizations.")), None)
        if prefix is None:
            state[key] = value.detach().to("cpu", copy=True)
            continue
        tensor_name = key[len(prefix + "parametrizations.") :].split(".")[0]
        if prefix + tensor_name not in state:  # the effective tensor, once, where its original was
            with torch.no_grad():
                value = getattr(prefixes[prefix], tensor_name)
            state[prefix + tensor_name] = value.detach().to("cpu", copy=True)
    return state


def load_plain_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a plain state dict (see :func:`capture_state`) into a possibly masked model.

    Masks are kept as they are: kept positions get the values from ``state``, pruned positions stay zero.
    ``state`` may also be a raw ``state_dict()`` of a masked model (its masks are then applied to the
    stored originals first). Parameters keep their identity, so an optimizer built on them keeps working.
    """
    masks = get_masks(model)
    model.load_state_dict(_full_state(model, _plain(state), masks))
    apply_masks(model, masks)  # zero the pruned positions of the stored originals again


def find_ticket(
    model: nn.Module,
    train: Callable[[nn.Module], None],
    target: float,
    rate: float = 0.2,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    group: str = "global",
    targets: Targets | None = None,
    seed: int = 0,
    *,
    criterion: str = "magnitude",
) -> Ticket:
    """Iterative magnitude pruning with rewinding; returns the ticket after the last round.

    Each round: ``train(model)`` (masked, in place), prune to the next sparsity of
    ``geometric_rounds(target, rate)`` (masks only shrink, compared within ``group``), then rewind the kept
    weights to ``rewind_state`` (default: the model's state at call time, i.e. its initialisation).
    ``criterion`` may be a weight-only criterion: ``"magnitude"`` (the paper) or ``"random"`` (the
    paper's random-pruning control, drawn with ``seed``). The model is left masked and rewound.
    """
    schedule = geometric_rounds(target, rate)  # validates target and rate
    if not callable(train):
        raise PrunekitError(f"train must be a callable taking the model, got {train!r}")
    check_group(group)
    sparsifier = Sparsifier(
        model, Unstructured(schedule[-1]), criterion=criterion, group=group, targets=targets, seed=seed
    )
    if sparsifier.criterion.needs != "weights":
        raise PrunekitError(
            f"find_ticket prunes by weights only; criterion '{criterion}' needs {sparsifier.criterion.needs}"
        )
    sparsifier.prepare()
    rewind = capture_state(model) if rewind_state is None else _plain(rewind_state)
    _full_state(model, rewind, get_masks(model))  # fail before any training on another architecture
    reached = []
    for sparsity in schedule:
        train(model)
        sparsifier.prune(sparsity)
        load_plain_state(model, rewind)
        reached.append(_sparsity(sparsifier.masks()))
    return Ticket(
        masks=sparsifier.masks(), weights=capture_state(model), sparsity=reached[-1], rounds=reached
    )


# -- helpers ---------------------------------------------------------------------------------------------
def _parametrized_prefixes(model: nn.Module) -> dict[str, nn.Module]:
    return {
        (f"{name}." if name else ""): module
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module)
    }


def _suffix_of(key: str, names: Mapping[str, object], suffix: str) -> str | None:
    """The module name in ``names`` such that ``key`` is ``<name>.<suffix>``, else None."""
    if key == suffix:
        return "" if "" in names else None
    if key.endswith("." + suffix):
        name = key[: -len(suffix) - 1]
        return name if name in names else None
    return None


def _full_state(
    model: nn.Module, plain: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's own state-dict keys filled from ``plain`` (masks kept), checked key by key."""
    full = {}
    expected = set()
    for key, current in model.state_dict().items():
        if _suffix_of(key, masks, _MASK) is not None:
            full[key] = current  # masks are not part of the weights being loaded
            continue
        name = _suffix_of(key, masks, _ORIGINAL)
        source = key if name is None else (f"{name}.weight" if name else "weight")
        expected.add(source)
        if source not in plain:
            raise PrunekitError(f"the state to load has no entry '{source}' (the model has one)")
        value = plain[source]
        if tuple(value.shape) != tuple(current.shape):
            raise PrunekitError(
                f"'{source}' has shape {tuple(value.shape)} in the state, {tuple(current.shape)} in the model"
            )
        full[key] = value
    extra = sorted(set(plain) - expected)
    if extra:
        raise PrunekitError(f"the state to load has entries the model lacks: {extra[:5]}")
    return full


def _plain(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a raw state dict of a masked model into plain keys (original * mask); plain input passes."""
    out = {}
    for key, value in state.items():
        if key == _MASK or key.endswith("." + _MASK):
            continue
        if key == _ORIGINAL or key.endswith("." + _ORIGINAL):
            prefix = key[: -len(_ORIGINAL)]
            mask = state.get(prefix + _MASK)
            value = value if mask is None else torch.where(mask.to(torch.bool), value, 0.0)
            key = prefix + "weight"
        elif ".parametrizations." in f".{key}":
            raise PrunekitError(
                f"cannot rewind '{key}': only prunekit masks are supported as parametrizations"
            )
        out[key] = value.detach().to("cpu", copy=True)
    return out


def _sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / max(total, 1)


__all__ = ["Ticket", "capture_state", "find_ticket", "load_plain_state"]
