"""check_recipe: the model is checked against the data and every stage against the model before any stage
runs (stage order around quantize and structured, int8 starting artifacts, quantize layer globs,
prune targets and AGP schedules), so a recipe that cannot work fails at once and leaves no output."""

from __future__ import annotations

from prunekit.data.arrays import check_model_fits
from prunekit.errors import PrunekitError
from prunekit.jobs.recipe import PruneStage, QuantizeStage
from prunekit.jobs.stages.prune import make_sparsifier
from prunekit.jobs.stages.train import check_distill_features
from prunekit.jobs.state import RunState
from prunekit.quant.ptq import choose_layers, int8_plan


def check_recipe(state: RunState) -> None:
    """Check the model against the data and every prune stage against the model before any stage runs,
    so a recipe that cannot work fails in a second, not after the dense training, and leaves no output
    behind."""
    check_model_fits(state.model, state.data, f"recipe {state.recipe.name}")
    check_distill_features(state)
    kinds = [stage.type for stage in state.recipe.stages]

    if int8_plan(state.model) is not None:  # model.artifact is an int8 artifact
        bad = [(i, k) for i, k in enumerate(kinds) if k not in ("evaluate", "export")]
        if bad:
            raise PrunekitError(
                f"recipe {state.recipe.name}: stages[{bad[0][0]}]: a {bad[0][1]} stage cannot run on the "
                "int8 model the recipe starts from (model.artifact); only evaluate and export stages can"
            )
    if "quantize" in kinds:
        first = kinds.index("quantize")
        after = [(i, k) for i, k in enumerate(kinds) if i > first and k not in ("evaluate", "export")]
        if after:
            raise PrunekitError(
                f"recipe {state.recipe.name}: stages[{after[0][0]}]: a {after[0][1]} stage cannot follow "
                f"the quantize stage (stages[{first}]); after it the model is int8 and only evaluate "
                "and export stages may follow"
            )
    if "structured" in kinds and "prune" in kinds[: kinds.index("structured")]:
        raise PrunekitError(
            f"recipe {state.recipe.name}: stages[{kinds.index('structured')}]: a structured stage must "
            "come before any prune stage (it removes whole units; earlier masks would not follow)"
        )
    for i, stage in enumerate(state.recipe.stages):
        if isinstance(stage, QuantizeStage):  # a glob that matches nothing fails now, not after training
            try:
                choose_layers(
                    state.model, include=stage.include, exclude=stage.exclude, classifier=stage.classifier
                )
            except PrunekitError as exc:
                raise PrunekitError(f"recipe {state.recipe.name}: stages[{i}]: {exc}") from None
        if stage.type not in ("train", "finetune", "evaluate", "export", "prune"):
            break  # a stage that may change the architecture: later ones are checked when they run
        if not isinstance(stage, PruneStage):
            continue
        try:
            make_sparsifier(state, stage)
            if stage.schedule.type == "agp":
                steps = stage.finetune.epochs * len(state.loader("train", shuffle=True))
                if stage.schedule.end >= steps:
                    raise PrunekitError(
                        f"schedule agp: end={stage.schedule.end} is never reached: the fine-tuning runs "
                        f"{steps} optimizer steps (finetune.epochs={stage.finetune.epochs}), so the last "
                        f"pruning step must be at most {steps - 1}"
                    )
        except PrunekitError as exc:
            raise PrunekitError(f"recipe {state.recipe.name}: stages[{i}]: {exc}") from None
