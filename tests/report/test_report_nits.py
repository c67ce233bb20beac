"""What the report says where a reader could be misled: no "largest loss 0.00 points" when nothing was
lost, a zoomed y-axis said aloud, agreement labels that do not collide, kernel names explained, a noisy
p99 flagged. On the real demo metrics (tests/fixtures/demo_metrics.json) and small edits of them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prunekit.report.markdown import KERNELS, NOISY_P99_RATIO, verdict, write_report
from prunekit.report.plots import _grouped_figure, _short, run_figures, zoom_floor

FIXTURE = Path(__file__).parents[1] / "fixtures" / "demo_metrics.json"


@pytest.fixture
def demo() -> dict:
    return json.loads(FIXTURE.read_text())


def _state(recall: list[float]) -> dict:
    return {"accuracy": 0.9, "per_class_recall": recall, "latency_ms": {"p50": 1.0, "p99": 1.0}}


def test_no_loss_sentence_when_no_class_lost_recall():
    same = verdict(_state([0.9, 1.0]), _state([0.95, 1.0]))
    assert "No class lost recall." in same and not any("Largest" in line for line in same)
    lost = verdict(_state([0.9, 1.0]), _state([0.95, 0.95]))
    assert "Largest per-class recall loss: class 1, 5.00 points." in lost


def _summary_rows(text: str) -> list[str]:
    section = text.split("## Summary (test set)")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "accuracy" not in line]


def test_a_p99_over_three_times_p50_is_flagged_noisy(demo):
    text = write_report(demo)
    for row in _summary_rows(text):
        label = row.split(" | ")[0].removeprefix("| ")
        lat = demo[label]["latency_ms"]
        assert row.endswith("(noisy) |") == (lat["p99"] / lat["p50"] > NOISY_P99_RATIO), row
    assert "(noisy)" in text and text.count("(noisy): p99 over 3x p50") == 2  # summary and runtime tables
    quiet = copy.deepcopy(demo)
    for entry in [v for v in quiet.values() if isinstance(v, dict) and "latency_ms" in v]:
        for e in (entry, entry.get("compiled") or {}):
            if e.get("latency_ms"):
                e["latency_ms"]["p99"] = 2.9 * e["latency_ms"]["p50"]
    assert "noisy" not in write_report(quiet)


def test_every_kernel_name_in_the_decisions_is_explained(demo):
    text = write_report(demo)
    chosen = set()  # the "chosen" column of every decisions table
    for table in re.findall(r"^\| layer \| weight .*?\n\n", text, re.M | re.S):
        header, _, *rows = table.strip().splitlines()
        column = [c.strip() for c in header.strip("|").split("|")].index("chosen")
        chosen |= {[c.strip() for c in row.strip("|").split("|")][column] for row in rows}
    used = {d["chosen"] for label in ("pruned", "pruned-int8") for d in demo[label]["compiled"]["layers"]}
    assert used <= chosen  # the decisions tables show them
    (legend,) = [line for line in text.splitlines() if line.startswith("Kernels: ")]
    explained = set(re.findall(r"`([\w/-]+)`: ", legend))
    assert explained == {"xt/bN" if u.startswith("xt/b") else u for u in used}
    assert all(KERNELS[name.removesuffix("N")] in legend for name in explained)


@given(st.lists(st.floats(0, 100), min_size=1, max_size=30))
def test_a_zoomed_axis_starts_below_every_bar_at_a_round_number(values):
    floor = zoom_floor(values)
    assert floor == 0 or (floor <= min(values) - 1 and floor % 5 == 0 and floor >= 20)


def test_a_zoomed_per_class_chart_says_so_in_its_caption(demo):
    figures = {f.name: f for f in run_figures(demo)}
    lowest = min(100 * r for k in ("dense", "pruned", "pruned-int8") for r in demo[k]["per_class_recall"])
    floor = zoom_floor([lowest, 100.0])
    assert floor > 0  # the demo's recalls are all high: the chart zooms
    assert figures["per-class-recall"].title.endswith(
        f"(y-axis starts at {floor:.0f}%, not 0: bars exaggerate differences)"
    )
    low = copy.deepcopy(demo)
    low["pruned"]["per_class_recall"][0] = 0.1
    assert "y-axis" not in {f.name: f for f in run_figures(low)}["per-class-recall"].title


def _gaps(fig) -> list[tuple[str, str, float]]:
    """Horizontal pixels between neighbouring x tick labels, as drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [
        (t.get_text(), t.get_window_extent(renderer)) for t in fig.axes[0].get_xticklabels() if t.get_text()
    ]
    return [(a, b, bb.x0 - ba.x1) for (a, ba), (b, bb) in zip(boxes, boxes[1:])]


@pytest.mark.parametrize("extra", [0, 6])
def test_agreement_labels_do_not_run_together(demo, extra):
    """The demo's conditions (and six long extra ones), with the series names the agreement chart uses: at
    least 10 pixels (0.1 in) between neighbouring labels."""
    conditions = ["clean", *demo["pruned"]["agreement"]["perturbed"]]
    groups = [_short(c) for c in conditions] + [f"shift right {i} down {i}" for i in range(extra)]
    series = {f"{x} agrees with dense": [90.0] * len(groups) for x in ("pruned", "pruned-int8")}
    series["dense keeps its prediction"] = [None] + [95.0] * (len(groups) - 1)
    fig = _grouped_figure(groups, series, "% of test inputs", "Prediction agreement", 0.0)
    assert [g for g in _gaps(fig) if g[2] < 10] == []
