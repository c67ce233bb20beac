"""Run a recipe: load data and model, run the stages in order, write metrics, artifacts and the report.

Outputs in ``out``: ``metrics.json``, ``report.md`` and ``report.html`` (with ``report-*.png`` charts),
and ``<name>.safetensors`` per export stage. Every file is written atomically. The same seed on the same
machine gives the same masks and accuracy numbers (latency is measured, so it varies).
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.analysis.perclass import DEFAULT_THRESHOLD_POINTS, check_metrics, evaluated_labels
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.jobs import checkpoint as ckpt
from prunekit.jobs import rundir
from prunekit.jobs.distributed import DistributedContext, session
from prunekit.jobs.recipe import Recipe, to_dict
from prunekit.jobs.runlog import RunLog, check_tensorboard
from prunekit.jobs.stages.checks import check_recipe
from prunekit.jobs.stages.measure import evaluate_stage, measure_latency
from prunekit.jobs.stages.output import export_stage, quantize_stage
from prunekit.jobs.stages.prune import prune_stage
from prunekit.jobs.stages.structured import structured_stage
from prunekit.jobs.stages.train import train_stage
from prunekit.jobs.state import RunState, start_run
from prunekit.masking import get_masks
from prunekit.report import write_report
from prunekit.report.html import write_reports
from prunekit.report.plots import run_figures
from prunekit.store import refuse_inside_store

log = logging.getLogger(__name__)

# every stage type of a recipe and the function that runs it (prunekit.jobs.stages)
STAGES = {
    "train": train_stage,
    "finetune": train_stage,
    "prune": prune_stage,
    "structured": structured_stage,
    "quantize": quantize_stage,
    "evaluate": evaluate_stage,
    "export": export_stage,
}


def summary(state: RunState) -> dict[str, Any]:
    """metrics.json: every evaluated label (latency measured now, all labels interleaved), the rounds, the
    allocations, the recipe and the environment."""
    measure_latency(state)
    for label, entry in state.metrics.items():
        entry["size_bytes"] = state.sizes.get(label)
        entry["compressed_size_bytes"] = state.compressed_sizes.get(label)
        if label in state.compressed_parts:
            entry["compressed_parts"] = state.compressed_parts[label]
    return {
        "recipe_name": state.recipe.name,
        **state.metrics,
        "rounds": state.rounds,
        "left_dense": state.dense_layers,
        **({"quantization": state.int8} if state.int8 is not None else {}),
        **({"latency_allocation": state.latency_allocation} if state.latency_allocation else {}),
        **({"allocation": state.allocations} if state.allocations else {}),
        "recipe": to_dict(state.recipe),
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
    force: bool = False,
) -> dict[str, Any]:
    """Run every stage and write ``metrics.json``, ``report.md`` and ``report.html`` into ``out``; returns
    the metrics. ``class_drop``: recall points a class may lose against the first evaluated model before
    ``metrics["per_class_check"]`` names it.

    ``out/log.jsonl`` logs every round and epoch (and ``tensorboard``, a directory, gets them as
    TensorBoard scalars); ``out/checkpoint/`` holds the last two checkpoints, and ``resume=True``
    continues from the newest one (the recipe must be the one it was written with). An ``out`` holding
    another run's files needs ``resume`` or ``force`` (which deletes them first): prunekit.jobs.rundir.
    Under torchrun the run is distributed (prunekit.jobs.distributed); only rank 0 writes, and every rank
    returns its metrics."""
    if not class_drop >= 0:
        raise PrunekitError(f"--class-drop must be >= 0 recall points, got {class_drop}")
    out = Path(out)
    _check_out(out)
    refuse_inside_store(out)
    rundir.check_inputs(recipe, out)
    threads = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)

    try:
        with session() as ctx:
            return _run(
                recipe,
                out,
                progress,
                class_drop=class_drop,
                resume=resume,
                tensorboard=tensorboard,
                ctx=ctx,
                force=force,
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
    ctx: DistributedContext | None = None,
    force: bool = False,
) -> dict[str, Any]:
    ctx = ctx or DistributedContext()
    if tensorboard is not None:
        check_tensorboard()
    earlier = rundir.check_owner(out, recipe, resume, force)  # another run's files: refused unless asked
    saved = ckpt.load_latest(out) if resume else None  # before any work: a bad --resume fails at once
    if saved is not None:
        ckpt.check_resumable(saved[0], saved[1], to_dict(recipe), ctx.world_size)
    ctx.barrier()  # every rank has looked at the directory before rank 0 changes it
    state = start_run(recipe, out, progress and ctx.main, ctx)
    check_recipe(state)
    try:
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    start = 0
    if saved is None and ctx.main:
        if earlier is not None:  # --force: the earlier run's files go before any of this run's appear
            deleted = rundir.clear(out, earlier)
            log.info("--force: deleted %d files of the earlier run in %s", len(deleted), out)
        ckpt.clear(out)
    if ctx.main and (saved is None or not (out / rundir.RUN_FILE).exists()):
        rundir.mark(out, recipe)
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
                STAGES[stage.type](state, stage)
            ctx.barrier()
        else:
            STAGES[stage.type](state, stage)
        if stage.type in ("train", "finetune", "prune", "structured", "quantize"):
            state.done.append(stage.model_dump(mode="json", exclude_none=True))
        state.runlog.write("stage", stage=index, type=stage.type, elapsed_s=state.elapsed())
        bar.update(1)
        if stage.type in ("train", "finetune", "prune", "structured"):
            ckpt.checkpoint_run(state, index + 1)
    bar.close()
    if not ctx.main:
        state.runlog.close()
        return ctx.broadcast_json(None)  # rank 0's metrics
    metrics = summary(state)
    metrics["wall_time_s"] = state.elapsed()
    # an int8 model has its masks squashed into weight_q: the digest is of the masks it was made from
    metrics["masks_sha256"] = ckpt.masks_digest(
        get_masks(state.model) if state.masks is None else state.masks
    )
    if evaluated_labels(metrics):
        metrics["per_class_check"] = check_metrics(metrics, class_drop)
    atomic_write_json(out / "metrics.json", metrics)
    write_reports(out, write_report(metrics), run_figures(metrics))  # report.md, report.html, PNGs
    state.runlog.write("done", wall_time_s=metrics["wall_time_s"], masks_sha256=metrics["masks_sha256"])
    state.runlog.close()
    return ctx.broadcast_json(metrics)
