"""A small, dependable training loop for classifiers (dense training and post-pruning fine-tuning).

Masked layers stay pruned because their masks are parametrizations; when a :class:`Sparsifier` is given,
``sparsifier.step()`` runs after every optimizer step (AGP pruning, movement scores), with the
``calibration`` batches a data-driven criterion (taylor, obd, wanda) scores on. Bring your own loop
instead by calling ``sparsifier.step()`` yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.rng import rng_state, set_rng_state

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PrunekitError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.epochs < 0 or self.lr <= 0:
            raise PrunekitError(f"need epochs >= 0 and lr > 0, got epochs={self.epochs}, lr={self.lr}")


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    *,
    sparsifier=None,
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    distill=None,
    extra_optimizer: torch.optim.Optimizer | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    resume: Mapping[str, Any] | None = None,
    on_step: Callable[[Callable[[], dict[str, Any]]], None] | None = None,
) -> list[float]:
    """Train with cross-entropy and a cosine learning-rate decay; returns the mean loss of each epoch.

    ``distill``: a :class:`prunekit.recovery.distill.Distiller` whose loss (teacher soft targets + the
    task loss) replaces the cross-entropy. ``extra_optimizer`` steps parameters the model holds but the
    main optimizer must not (L0 gate logits, with their own Adam), and ``extra_loss()`` is added to every
    step's loss (the L0 density penalty).

    ``on_step(state)`` runs after every optimizer step; ``state()`` returns the loop's resumable state
    (optimizer and scheduler states, epoch, steps done in it, the RNG state the epoch's batch order was
    drawn from, the loss sums, the RNG states). ``resume=state`` continues exactly there: the epoch's
    order is drawn again from the same state and its consumed batches are skipped. In a torch.distributed
    run the loss is averaged over the ranks and batches go to the model's device.
    """
    if cfg.epochs == 0:
        return []
    own = {id(p) for g in (extra_optimizer.param_groups if extra_optimizer else []) for p in g["params"]}
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad and id(p) not in own], cfg)
    steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    losses: list[float] = [] if resume is None else list(resume["losses"])
    start_epoch, skip = (0, 0) if resume is None else (int(resume["epoch"]), int(resume["step"]))
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if extra_optimizer is not None and resume.get("extra_optimizer") is not None:
            extra_optimizer.load_state_dict(resume["extra_optimizer"])
    device = next(iter(model.parameters())).device
    rank, world = _rank_world()
    model.train()
    done = start_epoch * len(loader) + skip
    epoch, step, total, count, order_state = start_epoch, skip, 0.0, 0, None

    def state() -> dict[str, Any]:  # called by on_step within the step: reads the loop's current values
        sums = _sum_over_ranks([total, count], world)  # a collective: every rank calls it
        return {
            "epoch": epoch,
            "step": step,
            "order": order_state,
            "losses": list(losses),
            "total": sums[0],
            "count": int(sums[1]),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "extra_optimizer": None if extra_optimizer is None else extra_optimizer.state_dict(),
            "rng": rng_state(),
        }

    bar = tqdm(total=steps, initial=done, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            resumed = resume is not None and epoch == start_epoch
            if cfg.epochs > 1:
                bar.set_description(f"{desc} (epoch {epoch + 1}/{cfg.epochs})")
            order_state = resume["order"] if resumed else _order_state(loader)
            if resumed:
                _set_order_state(loader, order_state)
            if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler: the order is f(seed, epoch)
                loader.sampler.set_epoch(epoch)
            batches = iter(loader)
            total, count, step = 0.0, 0, 0
            if resumed:
                for _ in range(skip):
                    next(batches)
                set_rng_state(resume["rng"])
                total, count, step = (resume["total"], resume["count"], skip) if rank == 0 else (0.0, 0, skip)

            for inputs, targets in batches:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = (
                    loss_fn(model(inputs), targets)
                    if distill is None
                    else distill(model, inputs, targets, loss_fn)
                )
                if extra_optimizer is not None:
                    extra_optimizer.zero_grad(set_to_none=True)
                (loss if extra_loss is None else loss + extra_loss()).backward()
                optimizer.step()
                if extra_optimizer is not None:
                    extra_optimizer.step()
                scheduler.step()
                if sparsifier is not None:
                    sparsifier.step(calibration, loss_fn)
                total += float(loss.detach()) * len(targets)
                count += len(targets)
                step += 1
                bar.update(1)
                if on_step is not None:
                    on_step(state)
            total, count = _sum_over_ranks([total, count], world)
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    finally:
        bar.close()
        model.eval()
    return losses


def _rank_world() -> tuple[int, int]:

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return list(values)

    backend = dist.get_backend()
    t = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device="cuda" if backend == "nccl" else "cpu"
    )
    dist.all_reduce(t)
    return t.cpu().tolist()


def _order_state(loader: DataLoader) -> torch.Tensor:
    """The state the loader's next epoch order is drawn from: its own generator, else torch's global one."""
    return loader.generator.get_state() if loader.generator is not None else torch.get_rng_state()


def _set_order_state(loader: DataLoader, state: torch.Tensor) -> None:
    if loader.generator is not None:
        loader.generator.set_state(state)
    else:
        torch.set_rng_state(state)
