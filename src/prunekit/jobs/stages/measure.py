"""The evaluate stage of a recipe run and what the summary measures: test accuracy, per-class recall and
layer tables per label, agreement with the first evaluated model, batch-1 latency of every label in one
interleaved run, and prunekit.runtime.compile twins with their decisions."""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch
from torch import nn

from prunekit import runtime
from prunekit.analysis import compare_latency, count_params, evaluate, layer_table, prediction_agreement
from prunekit.analysis.agreement import agreement_report
from prunekit.jobs.recipe import EvaluateStage, to_dict
from prunekit.masking import squash

_COMPILED = " (compiled)"  # latency label of an evaluated model's prunekit.runtime.compile twin


class MeasureStages:
    """The evaluate stage and latency measurement of a :class:`prunekit.jobs.run.Run`."""

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

        compiled = runtime.compile(model, (example,))
        decisions = runtime.report(compiled).layers
        self.metrics[label]["compiled"] = {
            "sparse_layers": sum(d.chosen != "dense" for d in decisions),
            "layers": [asdict(d) for d in decisions],
            **prediction_agreement(model, compiled, self.loader("test")),
        }
        return compiled
