"""The typed state a recipe run threads through its stages (prunekit.jobs.stages), and how it starts.

Every stage is a plain function ``stage(state, stage_config)`` that reads and updates a :class:`RunState`;
each field below says who writes it. Everything a checkpoint must carry to resume a run is listed in
:data:`CHECKPOINTED` (prunekit.jobs.checkpoint saves and restores exactly those, plus the model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunekit.artifact import load_artifact
from prunekit.data import Splits, load_splits
from prunekit.data.sources import load_factory, load_hf_datasets, load_imagefolder
from prunekit.jobs.distributed import DistributedContext
from prunekit.jobs.recipe import DataSource, EvaluateStage, Recipe, Transforms
from prunekit.jobs.runlog import RunLog
from prunekit.models import build_model
from prunekit.models.sources import build as build_source
from prunekit.rng import seed_everything
from prunekit.spec import Spec


@dataclass
class RunState:
    """A recipe run: its inputs, the model as the stages change it, and what they measured."""

    # -- inputs ------------------------------------------------------------------------------------------
    recipe: Recipe
    out: Path
    progress: bool  # progress bars (rank 0 only)
    ctx: DistributedContext  # torch.distributed rank and world size (single process: rank 0 of 1)
    runlog: RunLog  # OUT/log.jsonl (and TensorBoard)
    data: Splits
    # -- the model ---------------------------------------------------------------------------------------
    model: nn.Module
    model_info: dict[str, Any] | None  # architecture name and arguments, for artifacts
    specs: dict[str, Spec] = field(default_factory=dict)  # pattern of every pruned layer (prune stages)
    structured_logs: list[dict] = field(default_factory=list)  # structured prune logs, replayed on reload
    initial_structured: int = 0  # how many of them came with the artifact the run started from
    teacher: nn.Module | None = None  # frozen copy for distillation (stages.train.keep_teacher)
    masks: dict[str, torch.Tensor] | None = None  # the masks an int8 model was made from (quantize)
    # -- what the stages recorded (metrics.json) ---------------------------------------------------------
    metrics: dict[str, Any] = field(default_factory=dict)  # per evaluated label (evaluate stages)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # one per pruning round, from 0
    done: list[dict[str, Any]] = field(default_factory=list)  # stages run so far (the recipe of a state)
    dense_layers: dict[str, str] = field(default_factory=dict)  # layers left dense, with the reason
    groups: dict[str, str] = field(default_factory=dict)  # comparison group of each pruned layer
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each export
    compressed_sizes: dict[str, int] = field(default_factory=dict)  # exports with compressed: true
    compressed_parts: dict[str, dict[str, int]] = field(default_factory=dict)  # values/index/scales/header
    timed: dict[str, tuple[nn.Module, EvaluateStage]] = field(default_factory=dict)  # timed at the end
    timed_structured: dict[str, int] = field(default_factory=dict)  # structured logs applied per label
    int8: dict[str, Any] | None = None  # what the quantize stage did (metrics["quantization"])
    allocations: list[dict[str, Any]] = field(default_factory=list)  # prune stages' allocation: sensitivity
    latency_allocation: dict[str, Any] | None = None  # a structured stage's allocation: latency
    # -- progress, checkpoints and resume ----------------------------------------------------------------
    stage_index: int = 0  # the stage running now
    global_step: int = 0  # optimizer steps in this run: checkpoint.every_steps counts them
    checkpoints: int = 0  # checkpoints written (or resumed from)
    pending: dict[str, Any] | None = None  # where inside a stage a resumed run continues
    last_loss: float | None = None  # the last training epoch's mean loss, for the round log
    resumed_elapsed: float = 0.0  # seconds the run had taken before the checkpoint it resumed from
    started: float = field(default_factory=time.perf_counter)
    round_started: float = field(default_factory=time.perf_counter)

    def loader(self, part: str, shuffle: bool = False) -> DataLoader:
        """A split's batches; the shuffled training split is this rank's shard under torchrun."""
        if shuffle and part == "train" and self.ctx.enabled:  # this rank's shard, order f(seed, epoch)
            return self.ctx.train_loader(self.data.train, self.recipe.data.batch_size, self.recipe.seed)
        return self.data.loader(part, self.recipe.data.batch_size, shuffle=shuffle, seed=self.recipe.seed)

    def calibration(self, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``batches`` training batches, unshuffled."""
        out = []
        for i, batch in enumerate(self.loader("train")):
            if i >= batches:
                break
            out.append(tuple(batch))
        return out

    def elapsed(self) -> float:
        return self.resumed_elapsed + time.perf_counter() - self.started


# the RunState fields a checkpoint carries as JSON (the model, teacher, timed models and specs go as
# tensors); a new piece of run state that a resumed run needs must be added here
CHECKPOINTED = (
    "rounds",
    "metrics",
    "done",
    "sizes",
    "compressed_sizes",
    "compressed_parts",
    "groups",
    "dense_layers",
    "structured_logs",
    "allocations",
    "latency_allocation",
    "timed_structured",
    "global_step",
    "last_loss",
)


def load_data(d: DataSource, seed: int) -> Splits:
    """The recipe's data: the built-in arrays, or the user's folders / loaders (prunekit.data.sources)."""
    if d.name is not None:
        return load_splits(d.name, d.path, d.val_fraction, d.test_fraction, seed=seed)
    transform = (d.transforms or Transforms()).build()
    workers = d.workers or 0
    if d.imagefolder is not None:
        return load_imagefolder(d.imagefolder, transform, d.val_fraction, d.test_fraction, seed, workers)
    if d.hf_datasets is not None:
        return load_hf_datasets(
            d.hf_datasets,
            transform,
            d.input_column,
            d.label_column or "label",
            d.val_fraction,
            d.test_fraction,
            seed,
            workers,
        )
    return load_factory(d.factory, d.args, d.num_classes)


def start_run(recipe: Recipe, out: Path, progress: bool, ctx: DistributedContext | None = None) -> RunState:
    """Seed every generator, load the data and the starting model: the state before the first stage."""
    ctx = ctx or DistributedContext()
    seed_everything(recipe.seed)
    data = load_data(recipe.data, recipe.seed)
    runlog = RunLog(out / "log.jsonl", enabled=False)  # replaced by the real log once OUT exists
    src = recipe.model
    if src.artifact is not None:
        model, info = load_artifact(src.artifact)
        logs = list(info.structured)  # keep replaying them in this run's exports
        return RunState(
            recipe=recipe,
            out=out,
            progress=progress,
            ctx=ctx,
            runlog=runlog,
            data=data,
            model=model,
            model_info=info.model,
            specs=dict(info.specs),
            structured_logs=logs,
            initial_structured=len(logs),
        )
    args = dict(src.args)
    if src.builtin is not None:
        if src.builtin == "resnet-digits":
            args.setdefault("in_channels", data.input_shape[0])
            args.setdefault("num_classes", data.num_classes)
        model = build_model(src.builtin, args)
        info = {"name": src.builtin, "args": args}
    else:
        what = str(getattr(src, src.kind))
        model, info = build_source(src.kind, what, args, weights=src.weights, task=src.task)
    return RunState(
        recipe=recipe,
        out=out,
        progress=progress,
        ctx=ctx,
        runlog=runlog,
        data=data,
        model=model,
        model_info=info,
    )
