"""A small, dependable training loop for classifiers (dense training and post-pruning fine-tuning).

Masked layers stay pruned because their masks are parametrizations; when a :class:`Sparsifier` is given,
``sparsifier.step()`` runs after every optimizer step (AGP pruning, movement scores), with the
``calibration`` batches a data-driven criterion (taylor, obd, wanda) scores on. Bring your own loop
instead by calling ``sparsifier.step()`` yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError

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
) -> list[float]:
    """Train with cross-entropy and a cosine learning-rate decay; returns the mean loss of each epoch."""
    if cfg.epochs == 0:
        return []
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if sparsifier is not None:
                    sparsifier.step(calibration, loss_fn)
                total += float(loss.detach()) * len(targets)
                count += len(targets)
                bar.update(1)
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    finally:
        bar.close()
        model.eval()
    return losses
