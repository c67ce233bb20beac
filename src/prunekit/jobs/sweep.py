"""Sparsity sweeps: accuracy, size and measured latency against sparsity, for several methods.

For each method and sparsity a copy of the model is pruned one-shot (optionally fine-tuned for a few
epochs with the masks kept), evaluated on the test split, saved compressed (``prunekit.compress``, index
overhead included) to a temporary directory for its size, and timed at batch 1 interleaved with the dense
model in its own pair (``compare_latency``; docs/measuring.md). The curves and the latency Pareto
front use that pair's ratio of medians: on a shared machine absolute times drift between pairs, the ratio
measured within one run does not (the absolute p50s are in the table too). Methods:

- any criterion that scores without training (``magnitude``, ``random``, ``wanda``, ``taylor``, ``obd``):
  unstructured masks at each sparsity of the grid, the criterion's own comparison group;
- ``N:M`` (e.g. ``2:4``): magnitude N:M, one point at its fixed sparsity 1 - N/M;
- ``channels``: structured removal of that fraction of the channels of every prunable group
  (``prunekit.structured``, L2 importance, kept counts rounded to ``round_to``) -- the only method here
  whose dense-kernel latency can fall.

Unstructured zeros do not make dense kernels faster; ``compile=True`` also times each model after
``prunekit.runtime.compile`` (sparse kernels where they measured faster). The Pareto front (highest
accuracy for its latency / size) is computed by :func:`pareto_front`.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from prunekit import runtime
from prunekit.analysis.latency import compare_latency
from prunekit.analysis.metrics import evaluate
from prunekit.analysis.sparsity import count_params
from prunekit.artifact import load_artifact, plain_state_dict
from prunekit.compress import save_compressed
from prunekit.compress.source import tensor_specs
from prunekit.criteria import CRITERIA
from prunekit.data import load_splits
from prunekit.data.arrays import check_array_source
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from prunekit.masking import squash
from prunekit.recovery import TrainConfig, train
from prunekit.sparsifier import Sparsifier
from prunekit.spec import NM, Unstructured, parse
from prunekit.structured import prune_model
from prunekit.targets import Targets

log = logging.getLogger(__name__)
DEFAULT_GRID = (0.5, 0.7, 0.8, 0.9, 0.95)
COLUMNS = (
    "method",
    "sparsity",
    "accuracy",
    "size_bytes",
    "dense_size_bytes",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_ratio",
    "compiled_p50_ms",
    "compiled_ratio",
    "params",
    "nonzero",
)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates, for ``(cost, value)`` pairs where lower cost and
    higher value (lower with ``higher_is_better=False``, e.g. perplexity) are better, ordered by cost. A
    point is dominated by one with cost <= and a value at least as good and at least one strictly better;
    of exact duplicates the first is kept."""
    if not higher_is_better:
        points = [(cost, -value) for cost, value in points]
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


@dataclass
class Point:
    method: str
    sparsity: float  # of the targeted weights (unstructured, N:M) or of the channels (channels)
    accuracy: float
    size_bytes: int  # the compressed file
    dense_size_bytes: int  # the same model saved dense (float32 safetensors)
    latency_p50_ms: float
    latency_p99_ms: float
    latency_ratio: float  # p50 against the dense model timed in the same pair
    compiled_p50_ms: float | None
    compiled_ratio: float | None
    params: int
    nonzero: int


@dataclass(frozen=True)
class Method:
    name: str  # as given: "magnitude", "2:4", "channels"
    kind: str  # "unstructured" | "nm" | "channels"

    def sparsities(self, grid: Sequence[float]) -> list[float]:
        if self.kind == "nm":
            return [parse(self.name).sparsity]
        return list(grid)


def parse_methods(text: str | Sequence[str]) -> list[Method]:
    """``"magnitude,random,wanda,2:4,channels"`` -> methods; unknown names are a one-line error."""

    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise PrunekitError("--methods: give at least one method, e.g. magnitude,random,wanda,2:4")
    out = []
    for name in names:
        if name == "channels":
            out.append(Method(name, "channels"))
        elif ":" in name:
            try:
                spec = parse(name)
            except PrunekitError as exc:
                raise PrunekitError(f"--methods {name}: {exc}") from None
            if not isinstance(spec, NM):
                raise PrunekitError(f"--methods {name}: only N:M patterns such as 2:4 are methods")
            out.append(Method(name, "nm"))
        else:
            if name not in CRITERIA.names() and name != "channels":
                allowed = [*CRITERIA.names(), "channels", "N:M (e.g. 2:4)"]
                raise PrunekitError(f"--methods: unknown method '{name}'; allowed: {', '.join(allowed)}")
            if CRITERIA.get(name).needs == "training":
                raise PrunekitError(f"--methods {name}: it scores weights while they train; not one-shot")
            out.append(Method(name, "unstructured"))
    return out


def check_grid(grid: Sequence[float]) -> list[float]:
    values = sorted(set(grid))
    if not values or any(isinstance(s, bool) or not 0 < s < 1 for s in values):
        raise PrunekitError(f"--grid: sparsities must be in (0, 1), got {list(grid)}")
    return values


def _prune(model, method: Method, sparsity: float, splits, batch_size, finetune_epochs, lr, round_to, seed):
    """A pruned copy of ``model`` (plain modules, zeros permanent) and its layer specs."""

    pruned = copy.deepcopy(model)
    loader = splits.loader("train", batch_size, shuffle=True, seed=seed)
    cfg = TrainConfig(epochs=finetune_epochs, lr=lr)
    if method.kind == "channels":
        example = splits.train[: min(2, len(splits.train))][0]
        prune_model(pruned, example, ratio=sparsity, importance="l2", round_to=round_to, seed=seed)
        train(pruned, loader, cfg, progress=False, desc="fine-tune")
        return pruned.eval(), {}
    spec = parse(method.name) if method.kind == "nm" else Unstructured(sparsity)
    criterion = "magnitude" if method.kind == "nm" else method.name
    targets = None
    if isinstance(spec, NM):  # layers whose input width is no multiple of M stay dense (the 1-channel stem)
        misfits = tuple(
            name
            for name, m in pruned.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.shape[1] % spec.m
        )
        if misfits:
            log.info(
                "%s: left dense (input width not a multiple of %d): %s", spec, spec.m, ", ".join(misfits)
            )
            targets = Targets(exclude=misfits)
    sparsifier = Sparsifier(pruned, spec, criterion=criterion, targets=targets, seed=seed)
    calib = [tuple(b) for b, _ in zip(splits.loader("train", batch_size, seed=seed), range(4))]
    sparsifier.prepare()
    sparsifier.prune(None if isinstance(spec, NM) else sparsity, batches=calib, loss_fn=nn.CrossEntropyLoss())
    train(pruned, loader, cfg, sparsifier=sparsifier, progress=False, desc="fine-tune")
    specs = sparsifier.layer_specs()
    return sparsifier.squash().eval(), specs


def _sizes(model: nn.Module, specs, workdir: Path) -> tuple[int, int]:

    state = {k: v.contiguous() for k, v in plain_state_dict(model).items()}
    compressed = workdir / "model.compressed.safetensors"
    save_compressed(state, compressed, specs=tensor_specs(specs, state))
    dense = workdir / "model.safetensors"
    save_file(state, str(dense))
    return compressed.stat().st_size, dense.stat().st_size


def _time(dense, model, example, runs, compile_too) -> dict[str, Any]:

    models = {"dense": dense, "pruned": model}
    if compile_too:
        models["compiled"] = runtime.compile(copy.deepcopy(model), (example,))
    # two calls per model per block: bursts of load on a shared machine hit every model alike
    return compare_latency(models, example, runs=runs, warmup=max(5, runs // 10), blocks=max(1, runs // 2))


def run_sweep(
    model: nn.Module,
    splits,
    methods: Sequence[Method],
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    finetune_epochs: int = 0,
    lr: float = 0.01,
    latency_runs: int = 100,
    compile: bool = False,  # noqa: A002 - mirrors prunekit.runtime.compile
    round_to: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    on_point: Callable[[Point], None] | None = None,
) -> dict[str, Any]:
    """Sweep ``methods`` over ``grid`` from ``model`` (left unchanged); returns a JSON-ready dict with
    ``points`` (the dense model first, as method ``dense`` at sparsity 0) and the Pareto fronts."""

    grid = check_grid(grid)
    if finetune_epochs < 0:
        raise PrunekitError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    dense = squash(copy.deepcopy(model)).eval()
    example = splits.test[0][0].unsqueeze(0)
    test = splits.loader("test", batch_size)
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="prunekit-sweep-") as tmp:
        jobs = [(Method("dense", "dense"), 0.0)] + [(m, s) for m in methods for s in m.sparsities(grid)]
        for method, sparsity in jobs:
            if method.kind == "dense":
                pruned, specs = copy.deepcopy(dense), {}
            else:
                pruned, specs = _prune(
                    model, method, sparsity, splits, batch_size, finetune_epochs, lr, round_to, seed
                )
            accuracy = evaluate(pruned, test, splits.num_classes)["accuracy"]
            size, dense_size = _sizes(pruned, specs, Path(tmp))
            stats = _time(dense, pruned, example, latency_runs, compile)
            counts = count_params(pruned)
            compiled = stats.get("compiled")
            point = Point(
                method.name,
                sparsity,
                accuracy,
                size,
                dense_size,
                stats["pruned"]["p50"],
                stats["pruned"]["p99"],
                stats["pruned"]["p50_ratio"],
                compiled["p50"] if compiled else None,
                compiled["p50_ratio"] if compiled else None,
                counts["params"],
                counts["nonzero_params"],
            )
            points.append(point)
            log.info("sweep %s @ %.3f: accuracy %.4f, %d bytes", method.name, sparsity, accuracy, size)
            if on_point:
                on_point(point)
    rows = [asdict(p) for p in points]
    return {
        "points": rows,
        "pareto": pareto_names({"points": rows}),
        "grid": grid,
        "finetune_epochs": finetune_epochs,
        "latency_runs": latency_runs,
        "threads": torch.get_num_threads(),
        "batch": 1,
    }


def _front(rows: Sequence[dict], cost: str, metric: str = "accuracy", higher: bool = True) -> list[int]:
    return pareto_front([(r[cost], r[metric]) for r in rows], higher)


def metric_of(result: dict[str, Any]) -> tuple[str, bool]:
    """The quality column of a sweep result and whether higher is better (classifier sweeps: accuracy)."""
    return result.get("metric", "accuracy"), result.get("higher_is_better", True)


def pareto_names(result: dict[str, Any]) -> dict[str, list[str]]:
    """``{"latency": [...], "size": [...]}``: the front's points as ``method@sparsity``."""
    rows = result["points"]
    metric, higher = metric_of(result)
    return {
        name: [rows[i]["method"] + f"@{rows[i]['sparsity']:g}" for i in _front(rows, cost, metric, higher)]
        for name, cost in (("latency", "latency_ratio"), ("size", "size_bytes"))
    }


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    columns = result.get("columns", COLUMNS)
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in result["points"]:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return buf.getvalue()


def plot_png(result: dict[str, Any]) -> bytes:
    """The quality metric (accuracy, or perplexity for language models) against sparsity, latency p50 and
    compressed size, one panel each, Pareto fronts marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["points"]
    metric, higher = metric_of(result)
    fig = Figure(figsize=(15, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    mib = max(r["size_bytes"] for r in rows) > 64 << 20  # language models: MiB, not hundreds of thousands
    unit, size_scale = ("MiB", 1 / (1 << 20)) if mib else ("KiB", 1 / 1024)
    panels = (
        ("sparsity", "sparsity", None),
        ("latency_ratio", "latency p50 / dense p50 (batch 1, interleaved pairs)", "latency_ratio"),
        ("size_bytes", f"compressed size ({unit})", "size_bytes"),
    )
    for ax, (key, label, front_key) in zip(axes, panels):
        scale = size_scale if key == "size_bytes" else 1.0
        for m in methods:
            mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["sparsity"])
            xs = [r[key] * scale for r in mine]
            ax.plot(xs, [r[metric] for r in mine], "o-", color=colors[m], label=m, ms=5)
        if front_key:
            idx = _front(rows, front_key, metric, higher)
            ax.step(
                [rows[i][key] * scale for i in idx],
                [rows[i][metric] for i in idx],
                where="post",
                color="black",
                lw=1,
                ls="--",
                label="Pareto front",
            )
            ax.scatter(
                [rows[i][key] * scale for i in idx],
                [rows[i][metric] for i in idx],
                s=110,
                facecolors="none",
                edgecolors="black",
                zorder=3,
            )
        ax.set_xlabel(label)
        ax.set_ylabel(result.get("metric_label", "test accuracy"))
        if metric == "perplexity":
            ax.set_yscale("log")  # pruned perplexities span orders of magnitude
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    epochs = result.get("finetune_epochs", 0)
    extra = f", {epochs} fine-tune epoch(s)" if epochs else ", one-shot"
    fig.suptitle(f"prunekit sweep ({result['threads']} thread(s){extra})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_sweep(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out``, each written atomically."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    png = plot_png(result)  # everything is computed before the first file is written
    return {
        "json": atomic_write_json(out / "sweep.json", result),
        "csv": atomic_write_text(out / "sweep.csv", to_csv(result)),
        "png": atomic_write_bytes(out / "sweep.png", png),
    }


def sweep_artifact(
    artifact: Path,
    out: Path,
    methods: str,
    grid: Sequence[float],
    *,
    data: str = "digits",
    data_path: Path | None = None,
    finetune_epochs: int = 0,
    lr: float = 0.01,
    latency_runs: int = 100,
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    round_to: int = 8,
    threads: int = 1,
    seed: int = 0,
    on_point: Callable[[Point], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """``prunekit analyze sweep``: a classifier artifact swept with ``methods`` over ``grid`` on ``threads``
    torch threads; writes sweep.png/.csv/.json into ``out``. Returns the result and the paths written."""
    check_array_source(data, data_path)
    if latency_runs < 1 or threads < 1:
        raise PrunekitError("--runs and --threads must be >= 1")
    chosen = parse_methods(methods)
    sparsities = check_grid(grid)
    if not artifact.is_file():
        raise PrunekitError(f"ARTIFACT {artifact}: no such file")
    model, _ = load_artifact(artifact, masked=False)
    splits = load_splits(data, data_path, seed=seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run_sweep(
            model,
            splits,
            chosen,
            sparsities,
            finetune_epochs=finetune_epochs,
            lr=lr,
            latency_runs=latency_runs,
            compile=compile,
            round_to=round_to,
            seed=seed,
            on_point=on_point,
        )
    finally:
        torch.set_num_threads(before)
    return result, write_sweep(result, out)
