"""The prune stage of a recipe run: the stage's sparsifier, one-shot or iterative rounds with fine-tuning,
AGP during training, ``allocation: sensitivity`` (per-layer sparsities from sensitivity curves) and
criterion ``l0`` (gates learned during fine-tuning, then exact masks)."""

from __future__ import annotations

import logging

from torch import nn
from tqdm.auto import tqdm

from prunekit.allocate.sensitivity import sensitivity_allocation
from prunekit.analysis.sensitivity import sensitivity_analysis, write_heatmap
from prunekit.jobs import checkpoint as ckpt
from prunekit.jobs.recipe import L0Cfg, PruneStage, SensitivityCfg
from prunekit.masking import get_masks
from prunekit.sparsifier import Sparsifier
from prunekit.spec import NM
from prunekit.targets import Targets, left_dense

log = logging.getLogger("prunekit.jobs.run")  # the run's messages keep the logger they always had


class PruneStages:
    """The prune stage of a :class:`prunekit.jobs.run.Run`."""

    def _sparsifier(self, stage: PruneStage, allocation: dict[str, float] | None = None) -> Sparsifier:
        """The stage's sparsifier; constructing it checks targets, patterns and schedule on the model."""
        targets = Targets(
            tuple(stage.targets.types),
            tuple(stage.targets.include),
            tuple(stage.targets.exclude),
            stage.targets.prune_classifier,
        )
        return Sparsifier(
            self.model,
            stage.pattern,
            criterion=stage.criterion,
            group=stage.group,
            targets=targets,
            overrides=stage.overrides,
            schedule=stage.schedule.build(),
            seed=self.recipe.seed,
            allocation=allocation,
        )

    def _sensitivity_allocation(self, stage: PruneStage) -> dict[str, float]:
        """``allocation: sensitivity``: per-layer curves on the validation split, then per-layer sparsities
        meeting the stage's sparsity exactly (prunekit.allocate.sensitivity); the curves and the choice go to
        ``metrics["allocation"]``, the heat map to ``sensitivity.png`` (``sensitivity-2.png``, ... for later
        stages). Layers already pruned by an earlier stage are not allocated less than they have."""

        probe = self._sparsifier(stage)  # the targeted layers and the criterion, nothing attached
        cfg = stage.sensitivity or SensitivityCfg()
        needs_data = probe.criterion.needs != "weights"
        result = sensitivity_analysis(
            self.model,
            self.loader("val"),
            layers=list(probe.layers),
            sparsities=cfg.grid,
            criterion=stage.criterion,
            metric=cfg.metric,
            max_batches=cfg.batches,
            calibration=self._calibration(stage.calibration_batches) if needs_data else None,
            loss_fn=nn.CrossEntropyLoss(),
            seed=self.recipe.seed,
        )
        masks = get_masks(self.model)
        already = {n: float((~m).sum()) / m.numel() for n, m in masks.items() if n in probe.layers}
        plan = sensitivity_allocation(
            result.curves(),
            result.params(),
            probe.spec.sparsity,
            max_sparsity=cfg.max_sparsity,
            min_sparsity=already,
        )
        name = "sensitivity.png" if not self.allocations else f"sensitivity-{len(self.allocations) + 1}.png"
        if self.ctx.main:  # only rank 0 writes
            write_heatmap(result, self.out / name, plan.sparsity)
        self.allocations.append({**plan.to_dict(), "heatmap": name, "sensitivity": result.to_dict()})
        return plan.sparsity

    def prune(self, stage: PruneStage) -> None:
        pending, self.pending = self.pending, None  # resuming inside this stage: rounds done, training
        if pending is not None and stage.allocation == "sensitivity":
            self.allocations.pop()  # this stage's, restored from the checkpoint: recomputed (same) below
        allocation = self._sensitivity_allocation(stage) if stage.allocation == "sensitivity" else None
        self._keep_teacher()
        sparsifier = self._sparsifier(stage, allocation)
        targets, schedule = sparsifier.targets, sparsifier.schedule
        if sparsifier.criterion.needs == "gates":  # L0: gate settings before prepare() attaches them
            self._configure_gates(stage, sparsifier)
        sparsifier.prepare()
        ckpt.restore_sparsifier(sparsifier, pending and pending.get("sparsifier"))
        first = pending["round"] + 1 if pending else 1  # the first round still to run
        pruned_first = pending is not None and pending.get("train") is not None  # it was pruned already
        if pruned_first:
            self.pending = {"train": pending["train"]}  # for _recovery
        self.specs.update(sparsifier.layer_specs())
        self.groups.update({name: sparsifier.group for name in sparsifier.layers})
        calib = (
            self._calibration(stage.calibration_batches) if sparsifier.criterion.needs != "weights" else None
        )
        loss_fn = nn.CrossEntropyLoss()
        if not self.rounds:
            self._round()  # round 0, the starting point: validation accuracy before any pruning
        if sparsifier.criterion.needs == "gates":
            self._learn_masks(stage, sparsifier)
        elif stage.schedule.type == "agp":
            self._fit(
                stage.finetune,
                "prune (agp)",
                sparsifier=sparsifier,
                calibration=calib,
                **self._recovery(0, sparsifier),
            )
            self._round()
        else:
            targets_seq = (
                [None] if isinstance(sparsifier.spec, NM) else schedule.rounds(sparsifier.spec.sparsity)
            )
            bar = tqdm(
                total=len(targets_seq),
                initial=first - 1,
                desc="rounds",
                unit="round",
                disable=not self.progress,
            )
            for i, sparsity in enumerate(targets_seq, start=1):
                if i < first:
                    continue  # done before the checkpoint this run resumed from
                if not (pruned_first and i == first):
                    sparsifier.prune(sparsity, batches=calib, loss_fn=loss_fn)
                if stage.finetune is not None:
                    self._fit(
                        stage.finetune,
                        f"fine-tune round {i}/{len(targets_seq)}",
                        sparsifier=sparsifier,
                        **self._recovery(i - 1, sparsifier),
                    )
                self._round()
                bar.update(1)
                if i < len(targets_seq):  # the last round is followed by the stage's checkpoint
                    self.checkpoint(self.stage_index, i, sparsifier=sparsifier)
            bar.close()
        self.dense_layers = left_dense(self.model, self.specs, targets)

    def _configure_gates(self, stage: PruneStage, sparsifier: Sparsifier) -> None:

        cfg = stage.l0 or L0Cfg()
        steps = stage.finetune.epochs * len(self.loader("train", shuffle=True))
        sparsifier.criterion.configure(
            sparsifier.specs,
            sparsifier.group,
            granularity=cfg.granularity,
            penalty=cfg.penalty,
            lr=cfg.lr,
            warmup=round(cfg.warmup * steps),
        )

    def _learn_masks(self, stage: PruneStage, sparsifier: Sparsifier) -> None:
        """Criterion 'l0': the gates train with the weights during the stage's fine-tuning (the density
        penalty added to the loss, the gates' own Adam), then become exact masks at the stage's sparsity.
        Not checkpointed inside that training (a resume reruns the stage)."""
        gates = sparsifier.criterion
        self._fit(
            stage.finetune,
            "prune (l0 gates)",
            sparsifier=sparsifier,
            extra_optimizer=gates.optimizer(),
            extra_loss=gates.penalty,
        )
        log.info("l0: expected density %.4f before the exact masks", gates.expected_density()["*"])
        gates.finish(self.model)
        self._round()
