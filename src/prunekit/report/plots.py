"""The report's charts as PNG bytes (matplotlib, Agg canvas, no pyplot global state).

Each chart names the report section it belongs under (``Figure.section``, a heading prefix), so the HTML
and Markdown writers can place it next to the table that holds the same numbers.
"""

from __future__ import annotations

import io
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from prunekit.analysis.sensitivity import Sensitivity, heatmap_png
from prunekit.report.sections import allocation_heading, sensitivity_allocations

MAX_BARS = 48  # more layers than this are averaged per block, one bar per block
LABEL_CHARS = 12  # bar-group labels wrap at spaces onto lines of at most this many characters


@dataclass(frozen=True)
class Figure:
    name: str  # file stem: report-<name>.png
    section: str  # heading prefix of the Markdown section it goes under
    title: str  # alt text and caption
    png: bytes


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure on the Agg canvas. matplotlib is imported here, when a chart is drawn: a job
    that imports this module (to write its report at the end) does not pay for it before then, in time or
    in the memory it measures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})  # no version stamp: stable bytes
    return buf.getvalue()


def sparsity_bars(
    names: list[str], sparsity: list[float], title: str, xlabel: str = "sparsity (% of weights that are zero)"
) -> bytes:
    """Horizontal bars, one per layer, sparsity in percent, top to bottom in the order given."""
    fig = _figure(figsize=(8, 1.2 + 0.28 * len(names)))
    ax = fig.add_subplot()
    y = list(range(len(names)))
    ax.barh(y, [100 * s for s in sparsity], color="#3b6ea8")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    for yi, s in zip(y, sparsity):
        ax.text(min(100 * s + 1, 88), yi, f"{100 * s:.1f}%", va="center", fontsize=7)
    return _png(fig)


def zoom_floor(values: list[float | None]) -> float:
    """Where a percentage axis starts: 0, unless every value sits high enough that bars from 0 would hide
    a few points' difference; then a round number (a multiple of 5) below the smallest value. A chart that
    does not start at 0 says so in its title (:func:`zoom_note`)."""
    shown = [v for v in values if v is not None]
    if not shown or min(shown) < 0:
        return 0.0
    low, high = min(shown), max(shown)
    floor = 5.0 * ((low - 0.15 * max(high - low, 1.0) - 1) // 5)
    return floor if floor >= 20 else 0.0  # a zoom that saves little: start at 0


def zoom_note(floor: float) -> str:
    return f" (y-axis starts at {floor:.0f}%, not 0: bars exaggerate differences)" if floor > 0 else ""


def _grouped_figure(
    groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str, floor: float = 0.0
) -> Any:
    """Vertical bars: one group per entry of ``groups``, one bar per series inside it (None: no bar). Long
    labels wrap onto lines of at most :data:`LABEL_CHARS` characters and the figure widens with the groups,
    so tick labels never run into each other."""
    labels = [textwrap.fill(g, LABEL_CHARS, break_long_words=False) for g in groups]
    longest = max((len(line) for g in labels for line in g.splitlines()), default=1)
    lines = max((g.count("\n") + 1 for g in labels), default=1)
    # about 0.075 in per character at font size 8, plus a gap; 3 in for the axis and the legend
    fig = _figure(figsize=(max(8.0, (0.075 * longest + 0.25) * len(groups) + 3), 3.4 + 0.15 * lines))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        kept = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.bar([x for x, _ in kept], [v for _, v in kept], width=width, label=label)
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    shown = [v for values in series.values() for v in values if v is not None]
    if shown and min(shown) >= 0:
        high = max(shown)
        ax.set_ylim(floor, high + 0.05 * max(high - min(shown), 1.0))
    ax.set_ylabel(ylabel)
    ax.set_title(title + zoom_note(floor), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def grouped_bars(
    groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str, floor: float = 0.0
) -> bytes:
    """:func:`_grouped_figure` as PNG bytes; ``floor``: where the y-axis starts (:func:`zoom_floor`)."""
    return _png(_grouped_figure(groups, series, ylabel, title, floor))


def latency_bars(rows: dict[str, tuple[float, float]], title: str) -> bytes:
    """p50 bars with the p99 drawn as a tick above each, one row per model, in milliseconds."""
    fig = _figure(figsize=(8, 1.4 + 0.4 * len(rows)))
    ax = fig.add_subplot()
    names = list(rows)
    y = list(range(len(names)))
    ax.barh(y, [rows[n][0] for n in names], color="#5a9e6f", label="p50")
    ax.scatter([rows[n][1] for n in names], y, marker="|", s=300, color="#b03a2e", label="p99", zorder=3)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms (batch 1)")
    ax.set_xlim(0, 1.1 * max(max(v) for v in rows.values()))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def per_block(names: list[str], values: list[float]) -> tuple[list[str], list[float]]:
    """Mean of ``values`` per decoder block (the first ``.<number>.`` in each name); names without one
    keep their own bar. Keeps the chart readable for a model with hundreds of layers."""
    groups: dict[str, list[float]] = {}
    for name, value in zip(names, values):
        match = re.search(r"^(.*?\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else name, []).append(value)
    return list(groups), [sum(v) / len(v) for v in groups.values()]


def _layer_chart(names: list[str], sparsity: list[float], section: str, what: str, **kwargs) -> Figure:
    title = f"Per-layer sparsity ({what})"
    if len(names) > MAX_BARS:
        names, sparsity = per_block(names, sparsity)
        title = f"Per-block mean sparsity ({what}; {len(names)} blocks)"
    return Figure("layer-sparsity", section, title, sparsity_bars(names, sparsity, title, **kwargs))


def run_figures(m: dict[str, Any]) -> list[Figure]:
    """Charts of a ``prunekit run``/``demo`` metrics.json: per-layer sparsity of the last evaluated model,
    per-class recall of every evaluated model, latency p50/p99 of every model timed (compiled included)."""
    labels = [k for k, v in m.items() if isinstance(v, dict) and "per_class_recall" in v]
    if not labels:
        return []
    out = []
    last = m[labels[-1]]
    if last.get("layers"):
        rows = last["layers"]
        out.append(
            _layer_chart(
                [r["layer"] for r in rows], [r["sparsity"] for r in rows], "Per-layer sparsity", labels[-1]
            )
        )
    classes = [str(c) for c in range(len(m[labels[0]]["per_class_recall"]))]
    series = {
        label: [None if r is None else 100 * r for r in m[label]["per_class_recall"]] for label in labels
    }
    floor = zoom_floor([v for values in series.values() for v in values])
    png = grouped_bars(classes, series, "recall (%)", "Per-class recall (test set)", floor)
    caption = "Per-class recall of every evaluated model" + zoom_note(floor)
    out.append(Figure("per-class-recall", "Per-class recall", caption, png))
    agreed = [label for label in labels if isinstance(m[label].get("agreement"), dict)]
    if agreed:
        out.append(_agreement_chart(m, agreed))
    timed = {}
    for label in labels:
        e = m[label]
        if e.get("latency_ms"):
            timed[label] = (e["latency_ms"]["p50"], e["latency_ms"]["p99"])
        compiled = e.get("compiled") or {}
        if compiled.get("latency_ms"):
            timed[f"{label} (compiled)"] = (compiled["latency_ms"]["p50"], compiled["latency_ms"]["p99"])
    if timed:
        png = latency_bars(timed, "Latency p50 (bar) and p99 (tick), batch 1")
        out.append(Figure("latency", "Summary", "Latency p50 and p99 of every model timed", png))
    return out + _sensitivity_charts(m)


def _sensitivity_charts(m: dict[str, Any]) -> list[Figure]:
    """The heat map of every ``allocation: sensitivity`` stage, drawn again from the curves in the metrics
    (the run also writes it as ``sensitivity.png``), with the chosen sparsities on the layer labels."""
    out = []
    for i, a in enumerate(sensitivity_allocations(m)):
        chosen = {name: v["sparsity"] for name, v in a["layers"].items()}
        png = heatmap_png(Sensitivity.from_dict(a["sensitivity"]), chosen)
        heading = allocation_heading(m, i)
        name = "sensitivity" if i == 0 else f"sensitivity-{i + 1}"
        out.append(Figure(name, heading, f"{heading}: drop per layer and sparsity, chosen sparsity", png))
    return out


def _agreement_chart(m: dict[str, Any], agreed: list[str]) -> Figure:
    """Each model's agreement with the reference per input condition, and how often the reference keeps
    its own clean prediction (a fragile task rather than a fragile compressed model)."""
    first = m[agreed[0]]["agreement"]
    conditions = ["clean", *first["perturbed"]]

    def share(label: str, cond: str) -> float | None:
        a = m[label]["agreement"]
        e = a["clean"] if cond == "clean" else a["perturbed"].get(cond)
        return None if e is None else 100 * e["agreement"]

    series = {f"{x} agrees with {first['reference']}": [share(x, c) for c in conditions] for x in agreed}
    series[f"{first['reference']} keeps its prediction"] = [None] + [
        100 * first["perturbed"][c]["reference_stable"] for c in conditions[1:]
    ]
    names = [_short(c) for c in conditions]
    floor = zoom_floor([v for values in series.values() for v in values])
    png = grouped_bars(names, series, "% of test inputs", "Prediction agreement, clean and perturbed", floor)
    return Figure(
        "agreement", "Prediction agreement", "Agreement under perturbations" + zoom_note(floor), png
    )


def _short(condition: str) -> str:
    """``noise 0.05 std`` -> ``noise 0.05``, ``shift dx=+1 dy=+0`` -> ``right 1`` (axis labels that fit)."""
    shift = re.fullmatch(r"shift dx=([+-]\d+) dy=([+-]\d+)", condition)
    if not shift:
        return condition.removesuffix(" std")
    dx, dy = int(shift.group(1)), int(shift.group(2))
    words = [f"{'right' if dx > 0 else 'left'} {abs(dx)}"] if dx else []
    return " ".join(words + ([f"{'down' if dy > 0 else 'up'} {abs(dy)}"] if dy else []))


def structured_figures(m: dict[str, Any]) -> list[Figure]:
    """Charts of a ``prunekit structured`` metrics.json: fraction of each layer's weights removed, and
    latency dense vs pruned."""
    out = []
    if m.get("layers"):
        rows = m["layers"]
        out.append(
            _layer_chart(
                [r["layer"] for r in rows],
                [r["removed_fraction"] for r in rows],
                "Per-layer",
                "fraction of weights removed",
                xlabel="% of the layer's weights removed",
            )
        )
    timed = {k: (m[k]["latency_ms"]["p50"], m[k]["latency_ms"]["p99"]) for k in ("dense", "pruned")}
    png = latency_bars(timed, "Latency p50 (bar) and p99 (tick), batch 1")
    out.append(Figure("latency", "Verdict", "Latency dense vs pruned", png))  # next to the measured table
    return out


def llm_figures(m: dict[str, Any]) -> list[Figure]:
    """Charts of a ``prunekit llm prune`` metrics.json: per-layer (or per-block) sparsity."""
    layers = m.get("layer_sparsity") or {}
    if not layers:
        return []
    return [_layer_chart(list(layers), list(layers.values()), "Per-layer sparsity", "decoder linear layers")]
