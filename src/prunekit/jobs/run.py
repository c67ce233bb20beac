"""Run a recipe: load data and model, run the stages in order, write metrics, artifacts and the report.

Outputs in ``out``: ``metrics.json``, ``report.md`` and ``report.html`` (with ``report-*.png`` charts),
and ``<name>.safetensors`` per export stage. Every file is written atomically. The same seed on the same
machine gives the same masks and accuracy numbers (latency is measured, so it varies).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.analysis import count_params, evaluate, layer_table
from prunekit.analysis.perclass import DEFAULT_THRESHOLD_POINTS, check_metrics, evaluated_labels
from prunekit.artifact import load_artifact
from prunekit.data import Splits, load_splits
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.jobs import checkpoint as ckpt
from prunekit.jobs.distributed import Context, session
from prunekit.jobs.recipe import EvaluateStage, Recipe, to_dict
from prunekit.jobs.runlog import RunLog, check_tensorboard
from prunekit.jobs.stages.checks import RecipeChecks
from prunekit.jobs.stages.measure import _COMPILED as _COMPILED  # re-exported: prunekit.jobs.run._COMPILED
from prunekit.jobs.stages.measure import MeasureStages
from prunekit.jobs.stages.output import OutputStages
from prunekit.jobs.stages.prune import PruneStages
from prunekit.jobs.stages.structured import StructuredStages
from prunekit.jobs.stages.train import TrainStages
from prunekit.jobs.stages.train import _train_cfg as _train_cfg  # re-exported: prunekit.jobs.run._train_cfg
from prunekit.masking import get_masks
from prunekit.models import build_model
from prunekit.report import write_report
from prunekit.report.html import write_reports
from prunekit.report.plots import run_figures
from prunekit.rng import seed_everything
from prunekit.spec import Spec

log = logging.getLogger(__name__)


class Run(TrainStages, PruneStages, StructuredStages, MeasureStages, OutputStages, RecipeChecks):
    """The state a recipe threads through its stages; the stages themselves are in prunekit.jobs.stages."""

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        progress: bool,
        ctx: Context | None = None,
        runlog: RunLog | None = None,
    ) -> None:
        self.recipe, self.out, self.progress = recipe, out, progress
        self.ctx = ctx or Context()  # torch.distributed rank and world (prunekit.jobs.distributed)
        self.runlog = runlog or RunLog(out / "log.jsonl", enabled=False)
        seed_everything(recipe.seed)
        d = recipe.data
        self.data: Splits = load_splits(d.name, d.path, d.val_fraction, d.test_fraction, seed=recipe.seed)
        self.specs: dict[str, Spec] = {}  # before _model(): a model loaded from an artifact brings its specs
        self.structured_logs: list[dict] = []  # structured prune logs so far, replayed when reloading
        self.model, self.model_info = self._model()
        self.initial_structured = len(self.structured_logs)  # from the artifact the run starts from
        self.dense_layers: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.rounds: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []  # stages run so far (the recipe that produced a state)
        self.sizes: dict[str, int] = {}
        self.compressed_sizes: dict[str, int] = {}  # exports with compressed: true
        self.compressed_parts: dict[str, dict[str, int]] = {}  # their bytes: values, index, scales, header
        self.timed: dict[str, tuple[nn.Module, EvaluateStage]] = {}
        self.timed_structured: dict[str, int] = {}  # structured logs applied when each label was timed
        self.groups: dict[str, str] = {}  # comparison group of each pruned layer, for the report
        self.int8: dict[str, Any] | None = None  # what the quantize stage did (metrics["quantization"])
        self.masks: dict[str, torch.Tensor] | None = None  # the masks an int8 model was made from
        # checkpoint and resume (prunekit.jobs.checkpoint)
        self.stage_index = 0
        self.global_step = 0  # optimizer steps in this run's training: checkpoint.every_steps counts them
        self.checkpoints = 0  # checkpoints written (or resumed from)
        self.pending: dict[str, Any] | None = None  # where inside a stage a resumed run continues
        self.started = time.perf_counter()
        self.resumed_elapsed = 0.0  # seconds the run had taken before the checkpoint it resumed from
        self.last_loss: float | None = None  # the last training epoch's mean loss, for the round log
        self.round_started = time.perf_counter()
        self.latency_allocation: dict[str, Any] | None = None  # a structured stage's allocation: latency
        self.allocations: list[dict[str, Any]] = []  # prune stages' allocation: sensitivity, in order
        self.teacher: nn.Module | None = None  # frozen copy for distillation, taken by _keep_teacher

    def _model(self) -> tuple[nn.Module, dict[str, Any] | None]:
        src = self.recipe.model
        if src.artifact is not None:
            model, info = load_artifact(src.artifact)
            self.specs = dict(info.specs)
            self.structured_logs = list(info.structured)  # keep replaying them in this run's exports
            return model, info.model

        args = dict(src.args)
        if src.builtin == "resnet-digits":
            args.setdefault("in_channels", self.data.input_shape[0])
            args.setdefault("num_classes", self.data.num_classes)
        return build_model(src.builtin, args), {"name": src.builtin, "args": args}

    def loader(self, part: str, shuffle: bool = False):
        if shuffle and part == "train" and self.ctx.enabled:  # this rank's shard, order f(seed, epoch)
            return self.ctx.train_loader(self.data.train, self.recipe.data.batch_size, self.recipe.seed)
        return self.data.loader(part, self.recipe.data.batch_size, shuffle=shuffle, seed=self.recipe.seed)

    def val_accuracy(self) -> float:
        return evaluate(self.model, self.loader("val"), self.data.num_classes)["accuracy"]

    def elapsed(self) -> float:
        return self.resumed_elapsed + time.perf_counter() - self.started

    def checkpoint(self, stage: int, rounds: int = 0, train_state=None, sparsifier=None) -> None:
        """Checkpoint at ``stage`` (the next stage to run, or the one running with ``rounds`` done); none
        once a quantize stage ran (an int8 model is rebuilt by rerunning that stage)."""
        if self.recipe.checkpoint.enabled and self.int8 is None:
            ckpt.save_run(self, {"stage": stage, "round": rounds}, train_state, sparsifier)

    def _calibration(self, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i, batch in enumerate(self.loader("train")):
            if i >= batches:
                break
            out.append(tuple(batch))
        return out

    def _round(self) -> None:
        """Record the state after a pruning round; rounds are numbered from 0 across all prune stages."""
        index = len(self.rounds)
        counts = count_params(self.model)
        rows = [r for r in layer_table(self.model) if r["layer"] in self.specs]
        pruned = sum(r["params"] - r["nonzero"] for r in rows)
        targeted = sum(r["params"] for r in rows)
        entry = {
            "round": index,
            "targeted_sparsity": pruned / targeted if targeted else 0.0,
            "model_sparsity": counts["sparsity"],
            "val_accuracy": self.val_accuracy() if self.ctx.main else None,  # rank 0 evaluates
        }
        if self.ctx.enabled:  # every rank computed its masks itself: prove they agree
            digests = self.ctx.gather_strings(_masks_digest(get_masks(self.model)))
            if len(set(digests)) != 1:
                raise PrunekitError(f"round {index}: the ranks' masks differ (sha256 per rank: {digests})")
            entry["masks_sha256_per_rank"] = digests
        self.rounds.append(entry)
        now = time.perf_counter()
        self.runlog.write(
            "round",
            **{k: v for k, v in entry.items() if k != "masks_sha256_per_rank"},
            loss=self.last_loss,
            time_s=now - self.round_started,
        )
        self.round_started = now
        if self.ctx.main:
            log.info(
                "round %d: targeted sparsity %.4f, val accuracy %.4f",
                index,
                entry["targeted_sparsity"],
                entry["val_accuracy"],
            )
        self.ctx.barrier()

    def summary(self) -> dict[str, Any]:
        self.measure_latency()
        for label, entry in self.metrics.items():
            entry["size_bytes"] = self.sizes.get(label)
            entry["compressed_size_bytes"] = self.compressed_sizes.get(label)
            if label in self.compressed_parts:
                entry["compressed_parts"] = self.compressed_parts[label]
        return {
            "recipe_name": self.recipe.name,
            **self.metrics,
            "rounds": self.rounds,
            "left_dense": self.dense_layers,
            **({"quantization": self.int8} if self.int8 is not None else {}),
            **({"latency_allocation": self.latency_allocation} if self.latency_allocation else {}),
            **({"allocation": self.allocations} if self.allocations else {}),
            "recipe": to_dict(self.recipe),
            "environment": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "processor": platform.processor() or None,
                "threads": torch.get_num_threads(),
            },
        }


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    progress: bool = True,
    class_drop: float = DEFAULT_THRESHOLD_POINTS,
    resume: bool = False,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Run every stage and write ``metrics.json``, ``report.md`` and ``report.html`` into ``out``; returns
    the metrics. ``class_drop``: recall points a class may lose against the first evaluated model before
    ``metrics["per_class_check"]`` names it.

    ``out/log.jsonl`` logs every round and epoch (and ``tensorboard``, a directory, gets them as
    TensorBoard scalars); ``out/checkpoint/`` holds the last two checkpoints, and ``resume=True``
    continues from the newest one (the recipe must be the one it was written with). Under torchrun the
    run is distributed (prunekit.jobs.distributed); only rank 0 writes, and every rank returns its metrics."""
    if not class_drop >= 0:
        raise PrunekitError(f"--class-drop must be >= 0 recall points, got {class_drop}")
    out = Path(out)
    _check_out(out)
    threads = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)

    try:
        with session() as ctx:
            return _run(
                recipe, out, progress, class_drop=class_drop, resume=resume, tensorboard=tensorboard, ctx=ctx
            )
    finally:
        torch.set_num_threads(threads)


def _check_out(out: Path) -> None:
    """Refuse an output directory that cannot be created, before any work is done."""
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out} exists and is not a directory")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PrunekitError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrunekitError(f"--out {out}: {existing} is not writable")


def _run(
    recipe: Recipe,
    out: Path,
    progress: bool,
    class_drop: float = DEFAULT_THRESHOLD_POINTS,
    resume: bool = False,
    tensorboard: str | Path | None = None,
    ctx: Context | None = None,
) -> dict[str, Any]:

    ctx = ctx or Context()
    if tensorboard is not None:
        check_tensorboard()
    saved = ckpt.load_latest(out) if resume else None  # before any work: a bad --resume fails at once
    if saved is not None:
        ckpt.check_resumable(saved[0], saved[1], to_dict(recipe), ctx.world_size)
    state = Run(recipe, out, progress and ctx.main, ctx=ctx)
    state.check()
    try:
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    start = 0
    if saved is None and ctx.main:
        ckpt.clear(out)
    if saved is not None:
        position = ckpt.restore_run(state, saved[0])
        start = position["stage"]
        if position["round"] or position["train"] is not None:
            state.pending = position
        log_at = tuple(saved[0]["log"])
    state.runlog = RunLog(
        out / "log.jsonl",
        enabled=ctx.main,
        tensorboard=Path(tensorboard) if tensorboard is not None else None,
        resume_at=log_at if saved is not None else None,
    )
    if saved is not None:
        state.runlog.write("resume", checkpoint=state.checkpoints, stage=start, path=str(saved[1]))
        log.info("resuming from %s (checkpoint %d, stage %d)", saved[1], state.checkpoints, start)
    handlers = {
        "train": state.train,
        "finetune": state.train,
        "prune": state.prune,
        "structured": state.structured,
        "quantize": state.quantize,
        "evaluate": state.evaluate,
        "export": state.export,
    }
    bar = tqdm(
        total=len(recipe.stages), initial=start, desc="stages", unit="stage", disable=not state.progress
    )
    for index, stage in enumerate(recipe.stages):
        if index < start:
            continue  # done before the checkpoint
        state.stage_index = index
        log.info("stage %s", stage.type)
        if stage.type in ("evaluate", "export") and ctx.enabled:
            if ctx.main:  # evaluation, latency and files are rank 0's; the others wait
                handlers[stage.type](stage)
            ctx.barrier()
        else:
            handlers[stage.type](stage)
        if stage.type in ("train", "finetune", "prune", "structured", "quantize"):
            state.done.append(stage.model_dump(mode="json", exclude_none=True))
        state.runlog.write("stage", stage=index, type=stage.type, elapsed_s=state.elapsed())
        bar.update(1)
        if stage.type in ("train", "finetune", "prune", "structured"):
            state.checkpoint(index + 1)
    bar.close()
    if not ctx.main:
        state.runlog.close()
        return ctx.broadcast_json(None)  # rank 0's metrics
    metrics = state.summary()
    metrics["wall_time_s"] = state.elapsed()
    # an int8 model has its masks squashed into weight_q: the digest is of the masks it was made from
    metrics["masks_sha256"] = _masks_digest(get_masks(state.model) if state.masks is None else state.masks)
    if evaluated_labels(metrics):
        metrics["per_class_check"] = check_metrics(metrics, class_drop)
    atomic_write_json(out / "metrics.json", metrics)
    write_reports(out, write_report(metrics), run_figures(metrics))  # report.md, report.html, PNGs
    state.runlog.write("done", wall_time_s=metrics["wall_time_s"], masks_sha256=metrics["masks_sha256"])
    state.runlog.close()
    return ctx.broadcast_json(metrics)


def _masks_digest(masks: dict[str, torch.Tensor]) -> str:

    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].reshape(-1).numpy()).tobytes())
    return h.hexdigest()
