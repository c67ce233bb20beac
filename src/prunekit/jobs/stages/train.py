"""The training stages of a recipe run: train / finetune, the ``train()`` keywords that checkpoint and log
inside every training of the run, and the distillation teacher (prunekit.recovery.distill) that any
training may distill from; ``_train_cfg`` turns a recipe's optimizer settings into a TrainConfig."""

from __future__ import annotations

import copy
from typing import Any

from prunekit.errors import PrunekitError, did_you_mean
from prunekit.jobs.recipe import TEACHER_STAGES, FinetuneStage, Optim, TrainStage
from prunekit.masking import squash
from prunekit.recovery import TrainConfig, train
from prunekit.recovery.distill import Distiller
from prunekit.sparsifier import Sparsifier


def _train_cfg(cfg: Optim) -> TrainConfig:
    return TrainConfig(**cfg.model_dump(exclude={"type", "distill"}))


class TrainStages:
    """Train / finetune stages, recovery keywords and the distillation teacher of a Run."""

    def _recovery(self, rounds: int, sparsifier: Sparsifier | None = None) -> dict[str, Any]:
        """``train()`` keywords: checkpoint every ``checkpoint.every_steps`` optimizer steps, log every
        epoch, and (first call after a resume) continue the interrupted training."""
        resume = None
        if self.pending is not None:
            resume, self.pending = self.pending.get("train"), None
        every = self.recipe.checkpoint.every_steps
        stage = self.stage_index

        def on_step(state) -> None:
            self.global_step += 1
            if every is not None and self.global_step % every == 0:
                self.checkpoint(stage, rounds, state, sparsifier)

        def on_epoch(epoch: int, loss: float) -> None:
            self.last_loss = loss
            # round: the index the round this training leads to gets in metrics["rounds"] (None: no pruning)
            upcoming = len(self.rounds) if sparsifier is not None else None
            self.runlog.write("epoch", stage=stage, round=upcoming, epoch=epoch, loss=loss)

        return {"resume": resume, "on_step": on_step, "on_epoch": on_epoch}

    def _fit(self, cfg: Optim, desc: str, **kwargs: Any) -> None:
        """Every training of a run: the model (DDP-wrapped under torchrun) on the shuffled training split
        with ``cfg``'s optimizer settings, distilling when ``cfg`` asks for it; ``kwargs`` go to train()."""
        with self.ctx.wrap(self.model) as model:
            train(
                model,
                self.loader("train", shuffle=True),
                _train_cfg(cfg),
                progress=self.progress,
                desc=desc,
                distill=self._distill(cfg),
                **kwargs,
            )

    def train(self, stage: TrainStage | FinetuneStage) -> None:
        self._fit(stage, stage.type, **self._recovery(0))

    # -- distillation (prunekit.recovery.distill) --------------------------------------------------------
    def _keep_teacher(self) -> None:
        """At the first prune / structured / quantize stage, copy the model as the teacher if any stage
        distills (frozen; masks squashed into the copy, so it shares no parametrization with the model)."""

        kinds = [s.type for s in self.recipe.stages]
        first = next((i for i, k in enumerate(kinds) if k in TEACHER_STAGES), None)
        wants = any(
            getattr(getattr(s, "finetune", None) or getattr(s, "qat", None) or s, "distill", None)
            for s in self.recipe.stages
        )
        if self.teacher is None and wants and self.stage_index == first:
            self.teacher = squash(copy.deepcopy(self.model)).eval().requires_grad_(False)

    def _check_distill_features(self) -> None:
        """Feature-matching layer names must name modules of the model (structured pruning keeps names)."""

        names = {n for n, _ in self.model.named_modules() if n}
        for i, s in enumerate(self.recipe.stages):
            cfg = getattr(getattr(s, "finetune", None) or getattr(s, "qat", None) or s, "distill", None)
            for name in cfg.features if cfg is not None else ():
                if name not in names:
                    raise PrunekitError(
                        f"recipe {self.recipe.name}: stages[{i}]: distill feature '{name}': the model has no "
                        f"module of that name{did_you_mean(name, names)}"
                    )

    def _distill(self, cfg: Optim | None):
        """The Distiller for a training config that asks for one (else None)."""
        if cfg is None or cfg.distill is None:
            return None

        if self.teacher is None:  # resumed past the stage that took it: checkpoints do not hold it
            raise PrunekitError(
                "distill: the teacher (the model before the first prune / structured / quantize stage) is "
                "not in the checkpoint this run resumed from; run the recipe again without --resume"
            )
        d = cfg.distill
        return Distiller(self.teacher, d.alpha, d.temperature, d.features, d.feature_weight)
