"""The prune stage of a recipe run: the stage's sparsifier, one-shot or iterative rounds with fine-tuning,
AGP during training, ``allocation: sensitivity`` (per-layer sparsities from sensitivity curves) and
criterion ``l0`` (gates learned during fine-tuning, then exact masks)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from torch import nn
from tqdm.auto import tqdm

from prunekit.allocate import AllocationMethod
from prunekit.allocate.sensitivity import sensitivity_allocation
from prunekit.analysis.metrics import evaluate
from prunekit.analysis.sensitivity import sensitivity_analysis, write_heatmap
from prunekit.analysis.sparsity import count_params, layer_table
from prunekit.errors import PrunekitError
from prunekit.jobs.checkpoint import checkpoint_run, masks_digest, restore_sparsifier
from prunekit.jobs.recipe import L0Cfg, PruneStage, SensitivityCfg
from prunekit.jobs.stages.train import fit, keep_teacher, recovery_hooks
from prunekit.jobs.state import RunState
from prunekit.masking import get_masks, weight_parameter
from prunekit.registry import ALLOCATIONS
from prunekit.sparsifier import Sparsifier
from prunekit.spec import NM, check_sparsity
from prunekit.targets import Targets, left_dense

log = logging.getLogger(__name__)


def make_sparsifier(
    state: RunState, stage: PruneStage, allocation: dict[str, float] | None = None
) -> Sparsifier:
    """The stage's sparsifier; constructing it checks targets, patterns and schedule on the model."""
    targets = Targets(
        tuple(stage.targets.types),
        tuple(stage.targets.include),
        tuple(stage.targets.exclude),
        stage.targets.prune_classifier,
    )
    return Sparsifier(
        state.model,
        stage.pattern,
        criterion=stage.criterion,
        group=stage.group,
        targets=targets,
        overrides=stage.overrides,
        schedule=stage.schedule.build(),
        seed=state.recipe.seed,
        allocation=allocation,
    )


def record_round(state: RunState) -> None:
    """Record the state after a pruning round; rounds are numbered from 0 across all prune stages."""
    index = len(state.rounds)
    counts = count_params(state.model)
    rows = [r for r in layer_table(state.model) if r["layer"] in state.specs]
    pruned = sum(r["params"] - r["nonzero"] for r in rows)
    targeted = sum(r["params"] for r in rows)
    val = (
        evaluate(state.model, state.loader("val"), state.data.num_classes)["accuracy"]
        if state.ctx.main
        else None
    )
    entry = {
        "round": index,
        "targeted_sparsity": pruned / targeted if targeted else 0.0,
        "model_sparsity": counts["sparsity"],
        "val_accuracy": val,  # rank 0 evaluates
    }
    if state.ctx.enabled:  # every rank computed its masks itself: prove they agree
        digests = state.ctx.gather_strings(masks_digest(get_masks(state.model)))
        if len(set(digests)) != 1:
            raise PrunekitError(f"round {index}: the ranks' masks differ (sha256 per rank: {digests})")
        entry["masks_sha256_per_rank"] = digests
    state.rounds.append(entry)
    now = time.perf_counter()
    state.runlog.write(
        "round",
        **{k: v for k, v in entry.items() if k != "masks_sha256_per_rank"},
        loss=state.last_loss,
        time_s=now - state.round_started,
    )
    state.round_started = now
    if state.ctx.main:
        log.info(
            "round %d: targeted sparsity %.4f, val accuracy %.4f", index, entry["targeted_sparsity"], val
        )
    state.ctx.barrier()


def sensitivity_allocation_of(state: RunState, stage: PruneStage) -> dict[str, float]:
    """``allocation: sensitivity``: per-layer curves on the validation split, then per-layer sparsities
    meeting the stage's sparsity exactly (prunekit.allocate.sensitivity); the curves and the choice go to
    ``metrics["allocation"]``, the heat map to ``sensitivity.png`` (``sensitivity-2.png``, ... for later
    stages). Layers already pruned by an earlier stage are not allocated less than they have."""
    probe = make_sparsifier(state, stage)  # the targeted layers and the criterion, nothing attached
    cfg = stage.sensitivity or SensitivityCfg()
    needs_data = probe.criterion.needs != "weights"
    result = sensitivity_analysis(
        state.model,
        state.loader("val"),
        layers=list(probe.layers),
        sparsities=cfg.grid,
        criterion=stage.criterion,
        metric=cfg.metric,
        max_batches=cfg.batches,
        calibration=state.calibration(stage.calibration_batches) if needs_data else None,
        loss_fn=nn.CrossEntropyLoss(),
        seed=state.recipe.seed,
    )
    masks = get_masks(state.model)
    already = {n: float((~m).sum()) / m.numel() for n, m in masks.items() if n in probe.layers}
    plan = sensitivity_allocation(
        result.curves(),
        result.params(),
        probe.spec.sparsity,
        max_sparsity=cfg.max_sparsity,
        min_sparsity=already,
    )
    earlier = sum("sensitivity" in a for a in state.allocations)  # heat maps of earlier stages
    name = "sensitivity.png" if not earlier else f"sensitivity-{earlier + 1}.png"
    if state.ctx.main:  # only rank 0 writes
        write_heatmap(result, state.out / name, plan.sparsity)
    state.allocations.append({**plan.to_dict(), "heatmap": name, "sensitivity": result.to_dict()})
    return plan.sparsity


def shape_allocation_of(state: RunState, stage: PruneStage, entry: AllocationMethod) -> dict[str, float]:
    """An allocation computed from the targeted layers' weight shapes (``erk``, or a user's registered one):
    ``entry.fn(shapes, target)``, checked to give every targeted layer a sparsity in [0, 1); recorded in
    ``metrics["allocation"]``."""
    probe = make_sparsifier(state, stage)  # the targeted layers, nothing attached
    shapes = {name: tuple(weight_parameter(m).shape) for name, m in probe.layers.items()}
    chosen = entry.fn(shapes, probe.spec.sparsity)
    if not isinstance(chosen, Mapping) or set(chosen) != set(shapes):
        raise PrunekitError(
            f"allocation '{stage.allocation}' must return a sparsity for each targeted layer "
            f"({', '.join(sorted(shapes))})"
        )
    for name, value in chosen.items():
        check_sparsity(value, f"allocation '{stage.allocation}', layer {name}")
    sparsity = {name: float(chosen[name]) for name in shapes}
    state.allocations.append(
        {
            "method": stage.allocation,
            "target": probe.spec.sparsity,
            "layers": {n: {"sparsity": s} for n, s in sparsity.items()},
        }
    )
    return sparsity


def stage_allocation(state: RunState, stage: PruneStage) -> dict[str, float] | None:
    """Per-layer sparsities from the stage's allocation (prunekit.registry.ALLOCATIONS); None: uniform."""
    entry = ALLOCATIONS.get(stage.allocation)
    if stage.allocation == "uniform":
        return None
    if entry.inputs == "sensitivity-curves":
        return sensitivity_allocation_of(state, stage)
    if entry.inputs == "shapes":
        return shape_allocation_of(state, stage, entry)
    raise PrunekitError(f"allocation '{stage.allocation}' needs {entry.inputs}, which a prune stage has not")


def prune_stage(state: RunState, stage: PruneStage) -> None:
    pending, state.pending = state.pending, None  # resuming inside this stage: rounds done, training
    if pending is not None and stage.allocation != "uniform":
        state.allocations.pop()  # this stage's, restored from the checkpoint: recomputed (same) below
    allocation = stage_allocation(state, stage)
    keep_teacher(state)
    sparsifier = make_sparsifier(state, stage, allocation)
    targets, schedule = sparsifier.targets, sparsifier.schedule
    if sparsifier.criterion.needs == "gates":  # L0: gate settings before prepare() attaches them
        _configure_gates(state, stage, sparsifier)
    sparsifier.prepare()
    restore_sparsifier(sparsifier, pending and pending.get("sparsifier"))
    first = pending["round"] + 1 if pending else 1  # the first round still to run
    pruned_first = pending is not None and pending.get("train") is not None  # it was pruned already
    if pruned_first:
        state.pending = {"train": pending["train"]}  # for recovery_hooks
    state.specs.update(sparsifier.layer_specs())
    state.groups.update({name: sparsifier.group for name in sparsifier.layers})
    calib = state.calibration(stage.calibration_batches) if sparsifier.criterion.needs != "weights" else None
    loss_fn = nn.CrossEntropyLoss()
    if not state.rounds:
        record_round(state)  # round 0, the starting point: validation accuracy before any pruning
    if sparsifier.criterion.needs == "gates":
        _learn_masks(state, stage, sparsifier)
    elif stage.schedule.type == "agp":
        hooks = recovery_hooks(state, 0, sparsifier)
        fit(state, stage.finetune, "prune (agp)", sparsifier=sparsifier, calibration=calib, **hooks)
        record_round(state)
    else:
        targets_seq = [None] if isinstance(sparsifier.spec, NM) else schedule.rounds(sparsifier.spec.sparsity)
        bar = tqdm(
            total=len(targets_seq), initial=first - 1, desc="rounds", unit="round", disable=not state.progress
        )
        for i, sparsity in enumerate(targets_seq, start=1):
            if i < first:
                continue  # done before the checkpoint this run resumed from
            if not (pruned_first and i == first):
                sparsifier.prune(sparsity, batches=calib, loss_fn=loss_fn)
            if stage.finetune is not None:
                hooks = recovery_hooks(state, i - 1, sparsifier)
                desc = f"fine-tune round {i}/{len(targets_seq)}"
                fit(state, stage.finetune, desc, sparsifier=sparsifier, **hooks)
            record_round(state)
            bar.update(1)
            if i < len(targets_seq):  # the last round is followed by the stage's checkpoint
                checkpoint_run(state, state.stage_index, i, sparsifier=sparsifier)
        bar.close()
    state.dense_layers = left_dense(state.model, state.specs, targets, skipped=sparsifier.skipped)


def _configure_gates(state: RunState, stage: PruneStage, sparsifier: Sparsifier) -> None:
    cfg = stage.l0 or L0Cfg()
    steps = stage.finetune.epochs * len(state.loader("train", shuffle=True))
    sparsifier.criterion.configure(
        sparsifier.specs,
        sparsifier.group,
        granularity=cfg.granularity,
        penalty=cfg.penalty,
        lr=cfg.lr,
        warmup=round(cfg.warmup * steps),
    )


def _learn_masks(state: RunState, stage: PruneStage, sparsifier: Sparsifier) -> None:
    """Criterion 'l0': the gates train with the weights during the stage's fine-tuning (the density
    penalty added to the loss, the gates' own Adam), then become exact masks at the stage's sparsity.
    Not checkpointed inside that training (a resume reruns the stage)."""
    gates = sparsifier.criterion
    fit(
        state,
        stage.finetune,
        "prune (l0 gates)",
        sparsifier=sparsifier,
        extra_optimizer=gates.optimizer(),
        extra_loss=gates.penalty,
    )
    log.info("l0: expected density %.4f before the exact masks", gates.expected_density()["*"])
    gates.finish(state.model)
    record_round(state)
