"""The training stages of a recipe run: ``train`` / ``finetune``, :func:`fit` (every training of a run,
with checkpoints and log lines inside it) and the distillation teacher (prunekit.recovery.distill) any
training may distill from."""

from __future__ import annotations

import copy
from typing import Any

from prunekit.errors import PrunekitError, did_you_mean
from prunekit.jobs.checkpoint import checkpoint_run
from prunekit.jobs.recipe import TEACHER_STAGES, FinetuneStage, Optim, TrainStage
from prunekit.jobs.state import RunState
from prunekit.masking import squash
from prunekit.recovery import TrainConfig, train
from prunekit.recovery.distill import Distiller
from prunekit.sparsifier import Sparsifier


def train_config(cfg: Optim) -> TrainConfig:
    """A recipe's optimizer settings as the trainer's config."""
    return TrainConfig(**cfg.model_dump(exclude={"type", "distill"}))


def recovery_hooks(state: RunState, rounds: int, sparsifier: Sparsifier | None = None) -> dict[str, Any]:
    """``train()`` keywords: checkpoint every ``checkpoint.every_steps`` optimizer steps, log every epoch,
    and (first call after a resume) continue the interrupted training."""
    resume = None
    if state.pending is not None:
        resume, state.pending = state.pending.get("train"), None
    every = state.recipe.checkpoint.every_steps
    stage = state.stage_index

    def on_step(train_state) -> None:
        state.global_step += 1
        if every is not None and state.global_step % every == 0:
            checkpoint_run(state, stage, rounds, train_state, sparsifier)

    def on_epoch(epoch: int, loss: float) -> None:
        state.last_loss = loss
        # round: the index the round this training leads to gets in metrics["rounds"] (None: no pruning)
        upcoming = len(state.rounds) if sparsifier is not None else None
        state.runlog.write("epoch", stage=stage, round=upcoming, epoch=epoch, loss=loss)

    return {"resume": resume, "on_step": on_step, "on_epoch": on_epoch}


def fit(state: RunState, cfg: Optim, desc: str, **kwargs: Any) -> None:
    """Every training of a run: the model (DDP-wrapped under torchrun) on the shuffled training split with
    ``cfg``'s optimizer settings, distilling when ``cfg`` asks for it; ``kwargs`` go to train()."""
    with state.ctx.wrap(state.model) as model:
        train(
            model,
            state.loader("train", shuffle=True),
            train_config(cfg),
            progress=state.progress,
            desc=desc,
            distill=distiller(state, cfg),
            **kwargs,
        )


def train_stage(state: RunState, stage: TrainStage | FinetuneStage) -> None:
    fit(state, stage, stage.type, **recovery_hooks(state, 0))


# -- distillation (prunekit.recovery.distill) ------------------------------------------------------------
def _distill_cfg(stage: Any) -> Any:
    """The distill settings of a stage (its own, its fine-tuning's or its QAT's), or None."""
    return getattr(getattr(stage, "finetune", None) or getattr(stage, "qat", None) or stage, "distill", None)


def keep_teacher(state: RunState) -> None:
    """At the first prune / structured / quantize stage, copy the model as the teacher if any stage
    distills (frozen; masks squashed into the copy, so it shares no parametrization with the model)."""
    kinds = [s.type for s in state.recipe.stages]
    first = next((i for i, k in enumerate(kinds) if k in TEACHER_STAGES), None)
    wants = any(_distill_cfg(s) for s in state.recipe.stages)
    if state.teacher is None and wants and state.stage_index == first:
        state.teacher = squash(copy.deepcopy(state.model)).eval().requires_grad_(False)


def check_distill_features(state: RunState) -> None:
    """Feature-matching layer names must name modules of the model (structured pruning keeps names)."""
    names = {n for n, _ in state.model.named_modules() if n}
    for i, s in enumerate(state.recipe.stages):
        cfg = _distill_cfg(s)
        for name in cfg.features if cfg is not None else ():
            if name not in names:
                raise PrunekitError(
                    f"recipe {state.recipe.name}: stages[{i}]: distill feature '{name}': the model has no "
                    f"module of that name{did_you_mean(name, names)}"
                )


def distiller(state: RunState, cfg: Optim | None) -> Distiller | None:
    """The Distiller for a training config that asks for one (else None)."""
    if cfg is None or cfg.distill is None:
        return None
    if state.teacher is None:  # resumed past the stage that took it: checkpoints do not hold it
        raise PrunekitError(
            "distill: the teacher (the model before the first prune / structured / quantize stage) is "
            "not in the checkpoint this run resumed from; run the recipe again without --resume"
        )
    d = cfg.distill
    return Distiller(state.teacher, d.alpha, d.temperature, d.features, d.feature_weight)
