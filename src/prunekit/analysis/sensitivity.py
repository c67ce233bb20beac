"""Per-layer sensitivity analysis: prune one layer alone at a grid of sparsities, without fine-tuning, and
measure how much a validation metric gets worse.

This is the analysis of Han et al. ("Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015, Fig. 6) and of Distiller's ``perform_sensitivity_analysis`` (Zmora et al. 2019):
each targeted layer is pruned by itself (every other layer as it is) to each sparsity of the grid with a
weight criterion (magnitude by default, anything registered in :mod:`prunekit.criteria` that needs no
training), the metric is measured, and the layer is restored bit for bit. The curves feed
:func:`prunekit.allocate.sensitivity.sensitivity_allocation`.

Masks come from :func:`prunekit.select.unstructured_masks` (per layer, exactly ``round(s * n)`` weights,
already-pruned weights counted), so "sparsity 0.8" here is the sparsity a prune stage would give the layer.
A metric is any ``fn(model, batches) -> float`` with a direction (:class:`Metric`): accuracy and
cross-entropy loss are built in; perplexity plugs in the same way. The drop is always "how much worse":
``baseline - value`` for higher-is-better metrics, ``value - baseline`` otherwise.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.criteria.base import Batch, LossFn, make_criterion
from prunekit.errors import PrunekitError, unknown_name
from prunekit.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from prunekit.masking import get_masks, weight_parameter
from prunekit.select import unstructured_masks
from prunekit.spec import Unstructured, check_sparsity
from prunekit.targets import Targets, resolve

log = logging.getLogger(__name__)
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Metric:
    """A validation metric: ``fn(model, batches)`` in eval mode, and which direction is better."""

    name: str
    fn: Callable[[nn.Module, Sequence[Batch]], float]
    higher_is_better: bool


@torch.inference_mode()
def accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Fraction of samples whose arg-max logit is the label (an exact ratio of counts)."""
    right = total = 0
    for inputs, targets in batches:
        right += int((model(inputs).argmax(dim=1) == targets).sum())
        total += len(targets)
    return right / total


@torch.inference_mode()
def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean cross-entropy per sample (float64 accumulation)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        total += float(nn.functional.cross_entropy(model(inputs), targets, reduction="sum").double())
        count += len(targets)
    return total / count


METRICS = {"accuracy": Metric("accuracy", accuracy, True), "loss": Metric("loss", mean_loss, False)}


def make_metric(metric: str | Metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if metric not in METRICS:
        raise unknown_name("sensitivity metric", metric, METRICS)
    return METRICS[metric]


def check_grid(sparsities: Iterable[float]) -> tuple[float, ...]:
    """A strictly increasing tuple of sparsities in (0, 1)."""
    grid = tuple(check_sparsity(s, "grid sparsity") for s in sparsities)
    if not grid or grid[0] <= 0.0 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise PrunekitError(f"the sensitivity grid must be increasing sparsities in (0, 1), got {list(grid)}")
    return grid


@dataclass(frozen=True)
class LayerCurve:
    name: str
    params: int  # weights in the layer (the allocator's n_l)
    values: tuple[float, ...]  # the metric with this layer alone pruned to each grid sparsity


@dataclass(frozen=True)
class Sensitivity:
    """The result: per-layer metric values over the grid, and the unpruned baseline."""

    metric: str
    higher_is_better: bool
    criterion: str
    baseline: float
    sparsities: tuple[float, ...]
    layers: tuple[LayerCurve, ...]
    samples: int  # validation samples each value was measured on

    def drop(self, value: float) -> float:
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def drops(self, name: str) -> tuple[float, ...]:
        return tuple(self.drop(v) for v in self.layer(name).values)

    def layer(self, name: str) -> LayerCurve:
        for curve in self.layers:
            if curve.name == name:
                return curve
        raise PrunekitError(f"no sensitivity curve for layer '{name}'")

    def curves(self) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
        """``{layer: (sparsities, drops)}``, the allocator's input."""
        return {c.name: (self.sparsities, self.drops(c.name)) for c in self.layers}

    def params(self) -> dict[str, int]:
        return {c.name: c.params for c in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "criterion": self.criterion,
            "baseline": self.baseline,
            "samples": self.samples,
            "sparsities": list(self.sparsities),
            "layers": [
                {
                    "name": c.name,
                    "params": c.params,
                    "values": list(c.values),
                    "drops": list(self.drops(c.name)),
                }
                for c in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        try:
            layers = tuple(
                LayerCurve(d["name"], int(d["params"]), tuple(d["values"])) for d in data["layers"]
            )
            return cls(
                data["metric"],
                bool(data["higher_is_better"]),
                data["criterion"],
                float(data["baseline"]),
                tuple(data["sparsities"]),
                layers,
                int(data["samples"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PrunekitError(f"not a sensitivity result: {exc!r}") from None

    def to_csv(self) -> str:
        """One row per (layer, sparsity): ``layer,params,sparsity,value,drop``."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["layer", "params", "sparsity", self.metric, "drop"])
        for c in self.layers:
            for s, v in zip(self.sparsities, c.values):
                writer.writerow([c.name, c.params, repr(s), repr(v), repr(self.drop(v))])
        return buf.getvalue()

    def table(self) -> str:
        """A plain-text table: layers x sparsities, cells = drop (accuracy in points)."""
        scale, unit = (100.0, " (points)") if self.metric == "accuracy" else (1.0, "")
        width = max(len("layer"), *(len(c.name) for c in self.layers))
        head = f"{'layer':<{width}} {'params':>8} " + " ".join(f"{s:>6.0%}" for s in self.sparsities)
        lines = [
            f"{self.metric} drop{unit} when one layer alone is pruned ({self.criterion}); "
            f"baseline {self.baseline * scale:.2f} on {self.samples} samples",
            head,
        ]
        for c in self.layers:
            cells = " ".join(f"{self.drop(v) * scale:>6.2f}" for v in c.values)
            lines.append(f"{c.name:<{width}} {c.params:>8} {cells}")
        return "\n".join(lines)


def _take(batches: Iterable[Batch], limit: int | None) -> list[Batch]:
    out = []
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        inputs, targets = batch[0], batch[1]
        out.append((inputs, targets))
    if not out:
        raise PrunekitError("sensitivity analysis needs at least one validation batch")
    return out


def sensitivity_analysis(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    layers: Sequence[str] | None = None,
    targets: Targets | None = None,
    sparsities: Iterable[float] = DEFAULT_GRID,
    criterion: str = "magnitude",
    metric: str | Metric = "accuracy",
    max_batches: int | None = None,
    calibration: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> Sensitivity:
    """Measure each layer's curve; the model comes back exactly as it was (weights, masks, mode).

    ``layers`` (module names) or ``targets`` choose the layers (default: what a prune stage targets).
    ``batches`` are read once (the first ``max_batches``) and reused for every measurement. Criteria that
    need gradients or activations score from ``calibration`` batches (and ``loss_fn``), once, on the
    unpruned model; criteria that score during training (movement) cannot be used here.
    """
    grid = check_grid(sparsities)
    chosen = make_metric(metric)
    if layers is None:
        layers = list(resolve(model, Unstructured(0.5), targets))
    modules = {}
    for name in layers:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise PrunekitError(f"sensitivity analysis: the model has no module named '{name}'") from None
        if not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise PrunekitError(f"sensitivity analysis: module '{name}' has no weight to prune")
    crit = make_criterion(criterion, seed=seed)
    if crit.needs == "training":
        raise PrunekitError(
            f"criterion '{criterion}' scores weights while they train; sensitivity analysis prunes without "
            "training: use a weight or data criterion (magnitude, random, taylor, obd, wanda)"
        )
    if crit.needs in ("gradients", "activations"):
        if calibration is None:
            raise PrunekitError(f"criterion '{criterion}' needs calibration batches")
        crit.collect(model, modules, calibration, loss_fn)
    data = _take(batches, max_batches)
    samples = sum(len(t) for _, t in data)
    existing = get_masks(model)
    was_training = model.training
    model.eval()
    try:
        baseline = float(chosen.fn(model, data))
        curves = []
        for name, module in modules.items():
            curves.append(
                LayerCurve(
                    name,
                    module.weight.numel(),
                    _layer_curve(model, name, module, crit, grid, existing, chosen, data),
                )
            )
            log.info("sensitivity %s: %s", name, curves[-1].values)
    finally:
        model.train(was_training)
    return Sensitivity(
        chosen.name, chosen.higher_is_better, criterion, baseline, grid, tuple(curves), samples
    )


def _layer_curve(
    model: nn.Module,
    name: str,
    module: nn.Module,
    crit: Any,
    grid: tuple[float, ...],
    existing: Mapping[str, torch.Tensor],
    metric: Metric,
    data: Sequence[Batch],
) -> tuple[float, ...]:
    param = weight_parameter(module)
    saved = param.detach().clone()  # the stored tensor (the original, when masked): restored exactly
    scores = crit.scores(name, module).detach()
    prior = {name: existing[name]} if name in existing else {}
    values = []
    try:
        for s in grid:
            keep = unstructured_masks({name: scores}, s, "layer", prior)[name]
            with torch.no_grad():
                param.copy_(saved)
                param.masked_fill_(~keep.to(param.device).reshape(param.shape), 0.0)
            values.append(float(metric.fn(model, data)))
    finally:
        with torch.no_grad():
            param.copy_(saved)
    return tuple(values)


# ------------------------------------------------------------------------------------------------ outputs


def write_json(result: Sensitivity, path: str | Path) -> Path:
    return atomic_write_json(path, result.to_dict())


def write_csv(result: Sensitivity, path: str | Path) -> Path:
    return atomic_write_text(path, result.to_csv())


def heatmap_png(result: Sensitivity, allocation: Mapping[str, float] | None = None) -> bytes:
    """Layers x sparsities, colour = drop (accuracy in points), every cell annotated; with ``allocation``
    the chosen sparsity of each layer is added to its label. Uses matplotlib's Agg canvas directly (no
    pyplot, so no global figure state and no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, unit = (
        (100.0, "accuracy drop (points)")
        if result.metric == "accuracy"
        else (1.0, f"{result.metric} increase")
    )
    if result.metric != "accuracy" and result.higher_is_better:
        unit = f"{result.metric} drop"
    grid = [[result.drop(v) * scale for v in c.values] for c in result.layers]
    rows, cols = len(result.layers), len(result.sparsities)
    fig = Figure(figsize=(2.8 + 0.62 * cols, 1.4 + 0.34 * rows), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    top = max((max(r) for r in grid), default=1.0)
    image = ax.imshow(grid, cmap="Reds", vmin=0.0, vmax=top if top > 0 else 1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            dark = value > 0.6 * top
            ax.text(
                j,
                i,
                f"{value:.1f}" if scale == 100.0 else f"{value:.2g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(cols), [f"{s:.0%}" for s in result.sparsities], fontsize=8)
    labels = []
    for c in result.layers:
        label = f"{c.name} ({c.params:,})"
        if allocation is not None and c.name in allocation:
            label += f" -> {allocation[c.name]:.0%}"
        labels.append(label)
    ax.set_yticks(range(rows), labels, fontsize=8)
    ax.set_xlabel("sparsity of the one layer pruned")
    base = f"{result.baseline * scale:.2f}" if scale == 100.0 else f"{result.baseline:.4g}"
    ax.set_title(
        f"Sensitivity ({result.criterion}, no fine-tuning); baseline {result.metric} {base}", fontsize=9
    )
    fig.colorbar(image, ax=ax, label=unit, fraction=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_heatmap(
    result: Sensitivity, path: str | Path, allocation: Mapping[str, float] | None = None
) -> Path:
    return atomic_write_bytes(path, heatmap_png(result, allocation))
