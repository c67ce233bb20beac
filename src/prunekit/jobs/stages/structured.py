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
from prunekit.masking import get_masks
from prunekit.structured import prune_model

log = logging.getLogger("prunekit.jobs.run")  # the run's messages keep the logger they always had


class StructuredStages:
    """The structured stage of a :class:`prunekit.jobs.run.Run`."""

    def structured(self, stage: StructuredStage) -> None:
        """Physically shrink the model; the prune log goes into every later export."""

        if get_masks(self.model):
            raise PrunekitError(
                "a structured stage must come before unstructured prune stages (masks present)"
            )
        self._keep_teacher()
        example = self.data.train[: min(2, len(self.data.train))][0]
        calibration = self._calibration(stage.calibration_batches)
        before = sum(p.numel() for p in self.model.parameters())
        if stage.allocation == "latency":
            result = self._structured_for_latency(stage, example, calibration)
        else:
            result = prune_model(
                self.model,
                example,
                ratio=stage.ratio,
                importance=stage.importance,
                ignore=stage.ignore,
                round_to=stage.round_to,
                verify=True,
                calibration=calibration,
                loss_fn=nn.functional.cross_entropy,
            )
        self.structured_logs.append(result.plan)
        log.info(
            "structured: %d -> %d parameters (verified, max abs diff %.2g)",
            before,
            result.params_after,
            result.max_abs_diff,
        )
        if stage.finetune is not None:
            self._fit(
                stage.finetune,
                "fine-tune (structured)",
            )

    def _structured_for_latency(self, stage: StructuredStage, example, calibration):
        """Per-group ratios meeting ``target_latency`` at batch 1 (the latency the evaluate stages time),
        predicted loss = validation cross-entropy increase with one group pruned alone; the tables, the
        choice and the predicted and measured latency go to ``metrics["latency_allocation"]``."""

        val = self.loader("val")

        @torch.inference_mode()
        def val_loss(model: nn.Module) -> float:
            model.eval()
            total = sum(float(nn.functional.cross_entropy(model(x), y, reduction="sum")) for x, y in val)
            return total / len(self.data.val)

        result, report = prune_for_latency(
            self.model,
            example,
            stage.target_latency,
            self.data.test[0][0].unsqueeze(0),
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
        self.latency_allocation = report
        log.info(
            "latency allocation: target %.3f ms, predicted %.3f ms, measured %.3f ms (dense %.3f ms)",
            report["budget_ms"],
            report["predicted_ms"],
            report["measured_ms"],
            report["dense_ms"],
        )
        return result
