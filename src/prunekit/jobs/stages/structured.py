"""The structured stage of a recipe run: the model physically shrunk (prunekit.structured), by ratio or,
with ``allocation: latency``, by per-group ratios meeting a batch-1 latency target
(prunekit.allocate.latency); optional fine-tuning afterwards."""

from __future__ import annotations

import logging

import torch
from torch import nn

from prunekit.allocate.latency import prune_for_latency
from prunekit.errors import PrunekitError
from prunekit.jobs.recipe import StructuredStage
from prunekit.jobs.stages.train import fit, keep_teacher
from prunekit.jobs.state import RunState
from prunekit.masking import get_masks
from prunekit.structured import prune_model

log = logging.getLogger(__name__)


def structured_stage(state: RunState, stage: StructuredStage) -> None:
    """Physically shrink the model; the prune log goes into every later export."""

    if get_masks(state.model):
        raise PrunekitError("a structured stage must come before unstructured prune stages (masks present)")
    keep_teacher(state)
    example = state.data.inputs("train", 2)
    calibration = state.calibration(stage.calibration_batches)
    before = sum(p.numel() for p in state.model.parameters())
    if stage.allocation == "latency":
        result = _structured_for_latency(state, stage, example, calibration)
    else:
        result = prune_model(
            state.model,
            example,
            ratio=stage.ratio,
            importance=stage.importance,
            ignore=stage.ignore,
            round_to=stage.round_to,
            verify=True,
            calibration=calibration,
            loss_fn=nn.functional.cross_entropy,
        )
    state.structured_logs.append(result.plan)
    log.info(
        "structured: %d -> %d parameters (verified, max abs diff %.2g)",
        before,
        result.params_after,
        result.max_abs_diff,
    )
    if stage.finetune is not None:
        fit(state, stage.finetune, "fine-tune (structured)")


def _structured_for_latency(state: RunState, stage: StructuredStage, example, calibration):
    """Per-group ratios meeting ``target_latency`` at batch 1 (the latency the evaluate stages time),
    predicted loss = validation cross-entropy increase with one group pruned alone; the tables, the
    choice and the predicted and measured latency go to ``metrics["latency_allocation"]``."""

    val = state.loader("val")

    @torch.inference_mode()
    def val_loss(model: nn.Module) -> float:
        model.eval()
        total, count = 0.0, 0
        for x, y in val:  # counted as read: a user's own loader may drop or repeat samples
            total += float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
            count += len(y)
        return total / max(count, 1)

    result, report = prune_for_latency(
        state.model,
        example,
        stage.target_latency,
        state.data.inputs("test", 1),
        grid=stage.latency_grid,
        loss=val_loss,
        runs=stage.latency_runs,
        passes=stage.latency_passes,
        importance=stage.importance,
        ignore=stage.ignore,
        round_to=stage.round_to,
        calibration=calibration,
        loss_fn=nn.functional.cross_entropy,
    )
    report["predicted_loss_kind"] = "validation cross-entropy increase, each group pruned alone"
    state.latency_allocation = report
    log.info(
        "latency allocation: target %.3f ms, predicted %.3f ms, measured %.3f ms (dense %.3f ms)",
        report["budget_ms"],
        report["predicted_ms"],
        report["measured_ms"],
        report["dense_ms"],
    )
    return result
