"""The evaluate stage of a recipe run and what the summary measures: test accuracy, per-class recall and
layer tables per label, agreement with the first evaluated model, batch-1 latency of every label in one
interleaved run, prunekit.runtime.compile twins with their decisions, and (``baselines: true``) the dense
engines a user would deploy instead (prunekit.export.engines), timed in that same run."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict

import torch
from torch import nn

from prunekit import runtime
from prunekit.analysis import compare_latency, count_params, evaluate, layer_table, prediction_agreement
from prunekit.analysis.agreement import agreement_report
from prunekit.export.engines import dense_baselines
from prunekit.jobs.recipe import EvaluateStage, to_dict
from prunekit.jobs.state import RunState
from prunekit.masking import squash

COMPILED = " (compiled)"  # latency label of an evaluated model's prunekit.runtime.compile twin


def evaluate_stage(state: RunState, stage: EvaluateStage) -> None:
    result = evaluate(state.model, state.loader("test"), state.data.num_classes)
    if state.int8 is not None and state.int8["after"] is None:
        state.int8["after"] = stage.label  # the report compares it with the label before quantize
    # latency is timed later for all labels together (interleaved), on the model a user would deploy:
    # a squashed copy, without the mask parametrization's overhead
    state.timed[stage.label] = (squash(copy.deepcopy(state.model)).eval(), stage)
    state.timed_structured[stage.label] = len(state.structured_logs)
    layers = layer_table(state.model, state.specs)
    for row in layers:
        if row["layer"] in state.groups:
            row["pattern"] += f" ({state.groups[row['layer']]})"
    state.metrics[stage.label] = {
        "accuracy": result["accuracy"],
        "per_class_recall": result["per_class_recall"],
        "support": result["support"],
        **count_params(state.model),
        "size_bytes": None,
        "latency_ms": None,
        "layers": layers,
        "recipe": {
            "seed": state.recipe.seed,
            "model": to_dict(state.recipe)["model"],
            "data": to_dict(state.recipe)["data"],
            "stages": list(state.done),
        },
    }
    first = next(iter(state.timed))
    if first != stage.label:  # a regression check against the first evaluated model (dense)
        state.metrics[stage.label]["agreement"] = {
            "reference": first,
            **agreement_report(
                state.timed[first][0],
                state.timed[stage.label][0],
                state.loader("test"),
                state.data.num_classes,
                seed=state.recipe.seed,
            ),
        }


def measure_latency(state: RunState) -> None:
    """Batch-1 latency of every evaluated state (and of its compiled twin where the evaluate stage asks
    for one), measured in one interleaved run (docs/measuring.md)."""
    if not state.timed:
        return
    example = state.data.inputs("test", 1)
    stages = [stage for _, stage in state.timed.values()]
    models = {label: model for label, (model, _) in state.timed.items()}
    for label, (model, stage) in state.timed.items():
        if stage.compile:
            models[label + COMPILED] = _compiled(state, label, model, example)
    with tempfile.TemporaryDirectory(prefix="prunekit-baselines-") as workdir:
        owners = {}  # timed name -> (label, baseline) of every engine baseline
        for label, (model, stage) in state.timed.items():
            if stage.baselines:
                calibration = [x for x, _ in state.calibration(4)]
                found = dense_baselines(model, example, calibration, workdir)
                state.metrics[label]["baselines"] = {}
                for b in found:
                    state.metrics[label]["baselines"][b.name] = {
                        "engine": b.engine,
                        "skipped": b.skipped or None,
                        "size_bytes": b.size_bytes,
                    }
                    if b.model is not None:
                        models[f"{label} ({b.name})"] = b.model
                        owners[f"{label} ({b.name})"] = (label, b.name)
        stats = compare_latency(
            models,
            example,
            runs=max(s.latency_runs for s in stages),
            warmup=max(s.latency_warmup for s in stages),
        )
    for name, entry in stats.items():
        if name in owners:
            label, baseline = owners[name]
            target = state.metrics[label]["baselines"][baseline]
            target["latency_ms"] = {k: entry[k] for k in ("p50", "p99", "mean")}
            target["latency_p50_vs_first"] = entry["p50_ratio"]
            continue
        label = name.removesuffix(COMPILED)
        target = state.metrics[label]["compiled"] if name != label else state.metrics[label]
        target["latency_ms"] = {k: entry[k] for k in ("p50", "p99", "mean")}
        target["latency_p50_vs_first"] = entry["p50_ratio"]
        target["latency_runs"] = entry["runs"]
        target["threads"] = entry["threads"]


def _compiled(state: RunState, label: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``prunekit.runtime.compile`` of an evaluated model, with its decisions and a check that it
    predicts what the uncompiled model predicts on the whole test set."""

    compiled = runtime.compile(model, (example,))
    decisions = runtime.report(compiled).layers
    state.metrics[label]["compiled"] = {
        "sparse_layers": sum(d.chosen != "dense" for d in decisions),
        "layers": [asdict(d) for d in decisions],
        **prediction_agreement(model, compiled, state.loader("test")),
    }
    return compiled
