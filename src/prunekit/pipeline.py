"""Run a recipe: load data and model, run the stages in order, write metrics, artifacts and the report.

Outputs in ``out``: ``metrics.json``, ``report.md``, and ``<name>.safetensors`` per export stage. Every file
is written atomically. The same seed on the same machine gives the same masks and accuracy numbers
(latency is measured, so it varies).
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

from prunekit.analysis import compare_latency, count_params, evaluate, layer_table, prediction_agreement
from prunekit.artifact import load_artifact, save_artifact
from prunekit.data import Splits, load_splits
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, atomic_write_text
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
    return TrainConfig(**cfg.model_dump(exclude={"type"}))


class Run:
    """The state a recipe threads through its stages."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool) -> None:
        self.recipe, self.out, self.progress = recipe, out, progress
        seed_everything(recipe.seed)
        d = recipe.data
        self.data: Splits = load_splits(d.name, d.path, d.val_fraction, d.test_fraction, seed=recipe.seed)
        self.specs: dict[str, Spec] = {}  # before _model(): a model loaded from an artifact brings its specs
        self.structured_logs: list[dict] = []  # structured prune logs so far, replayed when reloading
        self.model, self.model_info = self._model()
        self.dense_layers: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.rounds: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []  # stages run so far (the recipe that produced a state)
        self.sizes: dict[str, int] = {}
        self.compressed_sizes: dict[str, int] = {}  # exports with compressed: true
        self.timed: dict[str, tuple[nn.Module, EvaluateStage]] = {}
        self.groups: dict[str, str] = {}  # comparison group of each pruned layer, for the report
        self.int8: dict[str, Any] | None = None  # what the quantize stage did (metrics["quantization"])
        self.masks: dict[str, torch.Tensor] | None = None  # the masks an int8 model was made from

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
        return self.data.loader(part, self.recipe.data.batch_size, shuffle=shuffle, seed=self.recipe.seed)

    def val_accuracy(self) -> float:
        return evaluate(self.model, self.loader("val"), self.data.num_classes)["accuracy"]

    # -- stages ----------------------------------------------------------------------------------------
    def train(self, stage: TrainStage | FinetuneStage) -> None:
        train(
            self.model,
            self.loader("train", shuffle=True),
            _train_cfg(stage),
            progress=self.progress,
            desc=stage.type,
        )

    def _sparsifier(self, stage: PruneStage) -> Sparsifier:
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
        )

    def check(self) -> None:
        """Check the model against the data and every prune stage against the model before any stage runs,
        so a recipe that cannot work fails in a second, not after the dense training, and leaves no output
        behind."""
        self._check_data()
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
                    steps = stage.finetune.epochs * len(self.loader("train"))
                    if stage.schedule.end >= steps:
                        raise PrunekitError(
                            f"schedule agp: end={stage.schedule.end} is never reached: the fine-tuning runs "
                            f"{steps} optimizer steps (finetune.epochs={stage.finetune.epochs}), so the last "
                            f"pruning step must be at most {steps - 1}"
                        )
            except PrunekitError as exc:
                raise PrunekitError(f"recipe {self.recipe.name}: stages[{i}]: {exc}") from None

    def _check_data(self) -> None:
        example = self.data.train[0][0].unsqueeze(0)
        was_training = self.model.training
        try:
            with torch.no_grad():
                logits = self.model.eval()(example)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PrunekitError(
                f"recipe {self.recipe.name}: the model does not take the data's samples of shape "
                f"{tuple(example.shape[1:])}: {first}"
            ) from None
        finally:
            self.model.train(was_training)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, self.data.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            n = self.data.num_classes
            raise PrunekitError(
                f"recipe {self.recipe.name}: the model must return one logit per class, shape "
                f"(batch, {n}) for the data's {n} classes; got {shape}"
            )

    def prune(self, stage: PruneStage) -> None:
        sparsifier = self._sparsifier(stage)
        targets, schedule = sparsifier.targets, sparsifier.schedule
        sparsifier.prepare()
        self.specs.update(sparsifier.layer_specs())
        self.groups.update({name: sparsifier.group for name in sparsifier.layers})
        calib = (
            self._calibration(stage.calibration_batches) if sparsifier.criterion.needs != "weights" else None
        )
        loss_fn = nn.CrossEntropyLoss()
        if not self.rounds:
            self._round()  # round 0, the starting point: validation accuracy before any pruning
        if stage.schedule.type == "agp":
            train(
                self.model,
                self.loader("train", shuffle=True),
                _train_cfg(stage.finetune),
                sparsifier=sparsifier,
                calibration=calib,
                progress=self.progress,
                desc="prune (agp)",
            )
            self._round()
        else:
            targets_seq = (
                [None] if isinstance(sparsifier.spec, NM) else schedule.rounds(sparsifier.spec.sparsity)
            )
            for i, sparsity in enumerate(targets_seq, start=1):
                sparsifier.prune(sparsity, batches=calib, loss_fn=loss_fn)
                if stage.finetune is not None:
                    train(
                        self.model,
                        self.loader("train", shuffle=True),
                        _train_cfg(stage.finetune),
                        sparsifier=sparsifier,
                        progress=self.progress,
                        desc=f"fine-tune round {i}/{len(targets_seq)}",
                    )
                self._round()
        self.dense_layers = left_dense(self.model, self.specs, targets)

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
            "val_accuracy": self.val_accuracy(),
        }
        self.rounds.append(entry)
        log.info(
            "round %d: targeted sparsity %.4f, val accuracy %.4f",
            index,
            entry["targeted_sparsity"],
            entry["val_accuracy"],
        )

    def evaluate(self, stage: EvaluateStage) -> None:
        result = evaluate(self.model, self.loader("test"), self.data.num_classes)
        if self.int8 is not None and self.int8["after"] is None:
            self.int8["after"] = stage.label  # the report compares it with the label before quantize
        # latency is timed later for all labels together (interleaved), on the model a user would deploy:
        # a squashed copy, without the mask parametrization's overhead
        self.timed[stage.label] = (squash(copy.deepcopy(self.model)).eval(), stage)
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
        if stage.qat is not None:
            prepare_qat(self.model, activations=stage.activations, calibration=calib, **select)
            train(
                self.model,
                self.loader("train", shuffle=True),
                _train_cfg(stage.qat),
                progress=self.progress,
                desc="quantization-aware fine-tuning",
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
        example = self.data.train[: min(2, len(self.data.train))][0]
        calibration = self._calibration(stage.calibration_batches)
        before = sum(p.numel() for p in self.model.parameters())
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
            train(
                self.model,
                self.loader("train", shuffle=True),
                _train_cfg(stage.finetune),
                progress=self.progress,
                desc="fine-tune (structured)",
            )

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

    def summary(self) -> dict[str, Any]:
        self.measure_latency()
        for label, entry in self.metrics.items():
            entry["size_bytes"] = self.sizes.get(label)
            entry["compressed_size_bytes"] = self.compressed_sizes.get(label)
        return {
            "recipe_name": self.recipe.name,
            **self.metrics,
            "rounds": self.rounds,
            "left_dense": self.dense_layers,
            **({"quantization": self.int8} if self.int8 is not None else {}),
            "recipe": to_dict(self.recipe),
            "environment": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "processor": platform.processor() or None,
                "threads": torch.get_num_threads(),
            },
        }


def run_recipe(recipe: Recipe, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every stage and write ``metrics.json`` and ``report.md`` into ``out``; returns the metrics."""
    out = Path(out)
    _check_out(out)
    threads = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    try:
        return _run(recipe, out, progress)
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


def _run(recipe: Recipe, out: Path, progress: bool) -> dict[str, Any]:
    from prunekit.report import write_report

    started = time.perf_counter()
    state = Run(recipe, out, progress)
    state.check()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    handlers = {
        "train": state.train,
        "finetune": state.train,
        "prune": state.prune,
        "structured": state.structured,
        "quantize": state.quantize,
        "evaluate": state.evaluate,
        "export": state.export,
    }
    for stage in recipe.stages:
        log.info("stage %s", stage.type)
        handlers[stage.type](stage)
        if stage.type in ("train", "finetune", "prune", "structured", "quantize"):
            state.done.append(stage.model_dump(mode="json", exclude_none=True))
    metrics = state.summary()
    metrics["wall_time_s"] = time.perf_counter() - started
    # an int8 model has its masks squashed into weight_q: the digest is of the masks it was made from
    metrics["masks_sha256"] = _masks_digest(get_masks(state.model) if state.masks is None else state.masks)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", write_report(metrics))
    return metrics


def _masks_digest(masks: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].reshape(-1).numpy()).tobytes())
    return h.hexdigest()
