"""Run a recipe: load data and model, run the stages in order, write metrics, artifacts and the report.

Outputs in ``out``: ``metrics.json``, ``report.md`` and ``report.html`` (with ``report-*.png`` charts),
and ``<name>.safetensors`` per export stage. Every file is written atomically. The same seed on the same
machine gives the same masks and accuracy numbers (latency is measured, so it varies).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit import checkpoint as ckpt
from prunekit.analysis import compare_latency, count_params, evaluate, layer_table, prediction_agreement
from prunekit.analysis.perclass import DEFAULT_THRESHOLD_POINTS, check_metrics, evaluated_labels
from prunekit.artifact import load_artifact, save_artifact
from prunekit.data import Splits, load_splits
from prunekit.distributed import Context
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.masking import get_masks, squash
from prunekit.recipe import (
    EvaluateStage,
    ExportStage,
    FinetuneStage,
    Optim,
    PruneStage,
    QuantizeStage,
    Recipe,
    StructuredStage,
    TrainStage,
    to_dict,
)
from prunekit.recovery import TrainConfig, train
from prunekit.runlog import RunLog
from prunekit.sparsifier import Sparsifier
from prunekit.spec import NM, Spec
from prunekit.targets import Targets, left_dense

log = logging.getLogger(__name__)
_COMPILED = " (compiled)"  # latency label of an evaluated model's prunekit.runtime.compile twin


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_cfg(cfg: Optim) -> TrainConfig:
    return TrainConfig(**cfg.model_dump(exclude={"type", "distill"}))


class Run:
    """The state a recipe threads through its stages."""

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        progress: bool,
        ctx: Context | None = None,
        runlog: RunLog | None = None,
    ) -> None:
        self.recipe, self.out, self.progress = recipe, out, progress
        self.ctx = ctx or Context()  # torch.distributed rank and world (prunekit.distributed)
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
        # checkpoint and resume (prunekit.checkpoint)
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
        from prunekit.models import build_model

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

    # -- stages ----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.resumed_elapsed + time.perf_counter() - self.started

    def checkpoint(self, stage: int, rounds: int = 0, train_state=None, sparsifier=None) -> None:
        """Checkpoint at ``stage`` (the next stage to run, or the one running with ``rounds`` done); none
        once a quantize stage ran (an int8 model is rebuilt by rerunning that stage)."""
        if self.recipe.checkpoint.enabled and self.int8 is None:
            ckpt.save_run(self, {"stage": stage, "round": rounds}, train_state, sparsifier)

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

    def train(self, stage: TrainStage | FinetuneStage) -> None:
        with self.ctx.wrap(self.model) as model:
            train(
                model,
                self.loader("train", shuffle=True),
                _train_cfg(stage),
                progress=self.progress,
                desc=stage.type,
                distill=self._distill(stage),
                **self._recovery(0),
            )

    # -- distillation (prunekit.recovery.distill) --------------------------------------------------------
    def _keep_teacher(self) -> None:
        """At the first prune / structured / quantize stage, copy the model as the teacher if any stage
        distills (frozen; masks squashed into the copy, so it shares no parametrization with the model)."""
        from prunekit.recipe import TEACHER_STAGES

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
        from prunekit.errors import did_you_mean

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
        from prunekit.recovery.distill import Distiller

        if self.teacher is None:  # resumed past the stage that took it: checkpoints do not hold it
            raise PrunekitError(
                "distill: the teacher (the model before the first prune / structured / quantize stage) is "
                "not in the checkpoint this run resumed from; run the recipe again without --resume"
            )
        d = cfg.distill
        return Distiller(self.teacher, d.alpha, d.temperature, d.features, d.feature_weight)

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
        meeting the stage's sparsity exactly (prunekit.allocate); the curves and the choice go to
        ``metrics["allocation"]``, the heat map to ``sensitivity.png`` (``sensitivity-2.png``, ... for later
        stages). Layers already pruned by an earlier stage are not allocated less than they have."""
        from prunekit.allocate import sensitivity_allocation
        from prunekit.analysis.sensitivity import sensitivity_analysis, write_heatmap
        from prunekit.recipe import SensitivityCfg

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

    def check(self) -> None:
        """Check the model against the data and every prune stage against the model before any stage runs,
        so a recipe that cannot work fails in a second, not after the dense training, and leaves no output
        behind."""
        self._check_data()
        self._check_distill_features()
        kinds = [stage.type for stage in self.recipe.stages]
        from prunekit.ptq import int8_plan

        if int8_plan(self.model) is not None:  # model.artifact is an int8 artifact
            bad = [(i, k) for i, k in enumerate(kinds) if k not in ("evaluate", "export")]
            if bad:
                raise PrunekitError(
                    f"recipe {self.recipe.name}: stages[{bad[0][0]}]: a {bad[0][1]} stage cannot run on the "
                    "int8 model the recipe starts from (model.artifact); only evaluate and export stages can"
                )
        if "quantize" in kinds:
            first = kinds.index("quantize")
            after = [(i, k) for i, k in enumerate(kinds) if i > first and k not in ("evaluate", "export")]
            if after:
                raise PrunekitError(
                    f"recipe {self.recipe.name}: stages[{after[0][0]}]: a {after[0][1]} stage cannot follow "
                    f"the quantize stage (stages[{first}]); after it the model is int8 and only evaluate "
                    "and export stages may follow"
                )
        if "structured" in kinds and "prune" in kinds[: kinds.index("structured")]:
            raise PrunekitError(
                f"recipe {self.recipe.name}: stages[{kinds.index('structured')}]: a structured stage must "
                "come before any prune stage (it removes whole units; earlier masks would not follow)"
            )
        for i, stage in enumerate(self.recipe.stages):
            if isinstance(stage, QuantizeStage):  # a glob that matches nothing fails now, not after training
                from prunekit.ptq import choose_layers

                try:
                    choose_layers(
                        self.model, include=stage.include, exclude=stage.exclude, classifier=stage.classifier
                    )
                except PrunekitError as exc:
                    raise PrunekitError(f"recipe {self.recipe.name}: stages[{i}]: {exc}") from None
            if stage.type not in ("train", "finetune", "evaluate", "export", "prune"):
                break  # a stage that may change the architecture: later ones are checked when they run
            if not isinstance(stage, PruneStage):
                continue
            try:
                self._sparsifier(stage)
                if stage.schedule.type == "agp":
                    steps = stage.finetune.epochs * len(self.loader("train", shuffle=True))
                    if stage.schedule.end >= steps:
                        raise PrunekitError(
                            f"schedule agp: end={stage.schedule.end} is never reached: the fine-tuning runs "
                            f"{steps} optimizer steps (finetune.epochs={stage.finetune.epochs}), so the last "
                            f"pruning step must be at most {steps - 1}"
                        )
            except PrunekitError as exc:
                raise PrunekitError(f"recipe {self.recipe.name}: stages[{i}]: {exc}") from None

    def _check_data(self) -> None:
        from prunekit.data.arrays import check_model_fits

        check_model_fits(self.model, self.data, f"recipe {self.recipe.name}")

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
            with self.ctx.wrap(self.model) as model:
                train(
                    model,
                    self.loader("train", shuffle=True),
                    _train_cfg(stage.finetune),
                    sparsifier=sparsifier,
                    calibration=calib,
                    progress=self.progress,
                    desc="prune (agp)",
                    distill=self._distill(stage.finetune),
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
                    with self.ctx.wrap(self.model) as model:
                        train(
                            model,
                            self.loader("train", shuffle=True),
                            _train_cfg(stage.finetune),
                            sparsifier=sparsifier,
                            progress=self.progress,
                            desc=f"fine-tune round {i}/{len(targets_seq)}",
                            distill=self._distill(stage.finetune),
                            **self._recovery(i - 1, sparsifier),
                        )
                self._round()
                bar.update(1)
                if i < len(targets_seq):  # the last round is followed by the stage's checkpoint
                    self.checkpoint(self.stage_index, i, sparsifier=sparsifier)
            bar.close()
        self.dense_layers = left_dense(self.model, self.specs, targets)

    def _configure_gates(self, stage: PruneStage, sparsifier: Sparsifier) -> None:
        from prunekit.recipe import L0Cfg

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
        with self.ctx.wrap(self.model) as model:
            train(
                model,
                self.loader("train", shuffle=True),
                _train_cfg(stage.finetune),
                sparsifier=sparsifier,
                progress=self.progress,
                desc="prune (l0 gates)",
                distill=self._distill(stage.finetune),
                extra_optimizer=gates.optimizer(),
                extra_loss=gates.penalty,
            )
        log.info("l0: expected density %.4f before the exact masks", gates.expected_density()["*"])
        gates.finish(self.model)
        self._round()

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

    def evaluate(self, stage: EvaluateStage) -> None:
        result = evaluate(self.model, self.loader("test"), self.data.num_classes)
        if self.int8 is not None and self.int8["after"] is None:
            self.int8["after"] = stage.label  # the report compares it with the label before quantize
        # latency is timed later for all labels together (interleaved), on the model a user would deploy:
        # a squashed copy, without the mask parametrization's overhead
        self.timed[stage.label] = (squash(copy.deepcopy(self.model)).eval(), stage)
        self.timed_structured[stage.label] = len(self.structured_logs)
        layers = layer_table(self.model, self.specs)
        for row in layers:
            if row["layer"] in self.groups:
                row["pattern"] += f" ({self.groups[row['layer']]})"
        self.metrics[stage.label] = {
            "accuracy": result["accuracy"],
            "per_class_recall": result["per_class_recall"],
            "support": result["support"],
            **count_params(self.model),
            "size_bytes": None,
            "latency_ms": None,
            "layers": layers,
            "recipe": {
                "seed": self.recipe.seed,
                "model": to_dict(self.recipe)["model"],
                "data": to_dict(self.recipe)["data"],
                "stages": list(self.done),
            },
        }
        first = next(iter(self.timed))
        if first != stage.label:  # a regression check against the first evaluated model (dense)
            from prunekit.analysis.agreement import agreement_report

            self.metrics[stage.label]["agreement"] = {
                "reference": first,
                **agreement_report(
                    self.timed[first][0],
                    self.timed[stage.label][0],
                    self.loader("test"),
                    self.data.num_classes,
                    seed=self.recipe.seed,
                ),
            }

    def measure_latency(self) -> None:
        """Batch-1 latency of every evaluated state (and of its compiled twin where the evaluate stage asks
        for one), measured in one interleaved run (MEASURING.md)."""
        if not self.timed:
            return
        example = self.data.test[0][0].unsqueeze(0)
        stages = [stage for _, stage in self.timed.values()]
        models = {label: model for label, (model, _) in self.timed.items()}
        for label, (model, stage) in self.timed.items():
            if stage.compile:
                models[label + _COMPILED] = self._compiled(label, model, example)
        stats = compare_latency(
            models,
            example,
            runs=max(s.latency_runs for s in stages),
            warmup=max(s.latency_warmup for s in stages),
        )
        for name, entry in stats.items():
            label = name.removesuffix(_COMPILED)
            target = self.metrics[label]["compiled"] if name != label else self.metrics[label]
            target["latency_ms"] = {k: entry[k] for k in ("p50", "p99", "mean")}
            target["latency_p50_vs_first"] = entry["p50_ratio"]
            target["latency_runs"] = entry["runs"]
            target["threads"] = entry["threads"]

    def _compiled(self, label: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
        """``prunekit.runtime.compile`` of an evaluated model, with its decisions and a check that it
        predicts what the uncompiled model predicts on the whole test set."""
        from dataclasses import asdict

        from prunekit import runtime

        compiled = runtime.compile(model, (example,))
        decisions = runtime.report(compiled).layers
        self.metrics[label]["compiled"] = {
            "sparse_layers": sum(d.chosen != "dense" for d in decisions),
            "layers": [asdict(d) for d in decisions],
            **prediction_agreement(model, compiled, self.loader("test")),
        }
        return compiled

    def quantize(self, stage: QuantizeStage) -> None:
        """INT8 conversion (after fake-quant fine-tuning when ``qat`` is given); the masks are squashed
        into the int8 weights, so later evaluate stages measure the int8 model."""
        from prunekit.ptq import quantize
        from prunekit.qat import convert_qat, prepare_qat

        select = {"include": stage.include, "exclude": stage.exclude, "classifier": stage.classifier}
        calib = self._calibration(stage.calibration_batches) if stage.activations == "static" else None
        example = self.data.train[: min(2, len(self.data.train))][0]  # the int8 model is test-run on it
        self.masks = get_masks(self.model)
        before = list(self.metrics)[-1] if self.metrics else None
        self._keep_teacher()
        if stage.qat is not None:
            prepare_qat(self.model, activations=stage.activations, calibration=calib, **select)
            with self.ctx.wrap(self.model) as model:
                train(
                    model,
                    self.loader("train", shuffle=True),
                    _train_cfg(stage.qat),
                    progress=self.progress,
                    desc="quantization-aware fine-tuning",
                    distill=self._distill(stage.qat),
                )
            result = convert_qat(self.model, example=example)
        else:
            result = quantize(
                self.model, activations=stage.activations, calibration=calib, example=example, **select
            )
        self.model = result.model
        self.int8 = {"before": before, "after": None, "qat": stage.qat is not None, **result.summary()}

    def structured(self, stage: StructuredStage) -> None:
        """Physically shrink the model; the prune log goes into every later export."""
        from prunekit.masking import get_masks
        from prunekit.structured import prune_model

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
            with self.ctx.wrap(self.model) as model:
                train(
                    model,
                    self.loader("train", shuffle=True),
                    _train_cfg(stage.finetune),
                    progress=self.progress,
                    desc="fine-tune (structured)",
                    distill=self._distill(stage.finetune),
                )

    def _structured_for_latency(self, stage: StructuredStage, example, calibration):
        """Per-group ratios meeting ``target_latency`` at batch 1 (the latency the evaluate stages time),
        predicted loss = validation cross-entropy increase with one group pruned alone; the tables, the
        choice and the predicted and measured latency go to ``metrics["latency_allocation"]``."""
        from prunekit.structured.latency import prune_for_latency

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

    def export(self, stage: ExportStage) -> None:
        path = self.out / f"{stage.name}.safetensors"
        extra = {"recipe": self.recipe.name, "stages": list(self.done)}
        self.sizes[stage.name] = save_artifact(
            path,
            self.model,
            model_info=self.model_info,
            specs=self.specs,
            extra=extra,
            structured=self.structured_logs,
        )
        if stage.compressed:
            from prunekit.artifact import plain_state_dict
            from prunekit.compress import save_compressed
            from prunekit.compress.source import tensor_specs
            from prunekit.ptq import int8_plan

            target = self.out / f"{stage.name}.compressed.safetensors"
            state = plain_state_dict(self.model)
            extra = {**extra, "model": self.model_info, "structured": self.structured_logs}
            if int8_plan(self.model):
                extra["int8"] = int8_plan(self.model)  # which layers to rebuild as int8 ones
            save_compressed(state, target, specs=tensor_specs(self.specs, state), extra=extra)
            self.compressed_sizes[stage.name] = target.stat().st_size
            from prunekit.compress.inspect import inspect_compressed

            totals = inspect_compressed(target)[1]
            parts = ("value_bytes", "index_bytes", "scale_bytes", "file_overhead_bytes", "dense_bytes")
            self.compressed_parts[stage.name] = {k: totals[k] for k in parts}
        if stage.c:  # OUT/<name>-c/: the INT8 model as C99 (prunekit.export.c), budgets in metrics[name]
            from prunekit.export.c.stage import export_c_stage

            export_c_stage(self, stage)

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
    run is distributed (prunekit.distributed); only rank 0 writes, and every rank returns its metrics."""
    if not class_drop >= 0:
        raise PrunekitError(f"--class-drop must be >= 0 recall points, got {class_drop}")
    out = Path(out)
    _check_out(out)
    threads = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    from prunekit.distributed import session

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
    from prunekit.report import write_report
    from prunekit.report.html import write_reports
    from prunekit.report.plots import run_figures

    ctx = ctx or Context()
    if tensorboard is not None:
        from prunekit.runlog import check_tensorboard

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
    import hashlib

    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].reshape(-1).numpy()).tobytes())
    return h.hexdigest()
