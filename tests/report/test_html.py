"""report.md and report.html: the numbers in their tables parse back to the metrics.json values, the HTML is
self-contained (no external URL, charts embedded), and headless Chromium renders the verdict and the tables.

The metrics fixture is the real metrics.json of `prunekit demo` (tests/fixtures/demo_metrics.json).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.report import write_report
from prunekit.report.html import markdown_to_html, with_figures, write_reports
from prunekit.report.markdown import verdict
from prunekit.report.plots import Figure, llm_figures, run_figures

FIXTURE = Path(__file__).parents[1] / "fixtures" / "demo_metrics.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def written(metrics, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_reports(out, write_report(metrics), run_figures(metrics))
    return out


# -------------------------------------------------------------------------------------------- parsing helpers


def md_tables(text: str) -> dict[str, list[list[list[str]]]]:
    """Tables of a Markdown text by the ``## `` section they are in: section -> [table -> rows -> cells]."""
    out: dict[str, list] = {}
    section, table = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            section, table = line[3:], None
        elif line.startswith("|"):
            if table is None:
                table = []
                out.setdefault(section, []).append(table)
            if not re.fullmatch(r"\|(---\|)+", line):
                table.append([c.strip() for c in line.strip("|").split(" | ")])
        else:
            table = None
    return out


class _DomTables(HTMLParser):
    """The text of a rendered page and its tables as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script"):
            self._skip += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def table_by_header(tables, first_cells: list[str]) -> list[list[str]]:
    (found,) = [t for t in tables if t and t[0][: len(first_cells)] == first_cells]
    return found


def pct(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def bytes_in(cell: str) -> int:
    """``696.1 KiB (712,840 B)`` -> 712840 (the first exact byte count in the cell)."""
    return int(re.search(r"\(([\d,]+) B\)", cell).group(1).replace(",", ""))


def labels_of(m: dict) -> list[str]:
    return [k for k, v in m.items() if isinstance(v, dict) and "per_class_recall" in v]


def check_summary(rows: list[list[str]], m: dict) -> None:
    """The Summary table's rows against metrics.json: accuracy, params, size, p50 and p99."""
    header, *body = rows
    assert [r[0] for r in body] == labels_of(m)
    for row in body:
        e, cell = m[row[0]], dict(zip(header, row))
        assert pct(cell["accuracy"]) == pytest.approx(e["accuracy"], abs=5e-5)
        assert int(cell["params"].replace(",", "")) == e["params"]
        assert int(cell["non-zero"].replace(",", "")) == e["nonzero_params"]
        assert bytes_in(cell["size"]) == e["size_bytes"]
        if e.get("compressed_size_bytes"):
            packed = re.search(r"compressed [\d.]+ KiB \(([\d,]+) B\)", cell["size"]).group(1)
            assert int(packed.replace(",", "")) == e["compressed_size_bytes"]
        assert float(cell["p50 ms"]) == pytest.approx(e["latency_ms"]["p50"], abs=5e-4)
        p99, _, noisy = cell["p99 ms"].partition(" ")  # "36.736 (noisy)": p99 over 3x p50
        assert float(p99) == pytest.approx(e["latency_ms"]["p99"], abs=5e-4)
        assert (noisy == "(noisy)") == (e["latency_ms"]["p99"] > 3 * e["latency_ms"]["p50"])


def check_per_class(rows: list[list[str]], m: dict) -> None:
    header, *body = rows
    labels = labels_of(m)
    assert header == ["class", "support", *labels] and len(body) == len(m["dense"]["per_class_recall"])
    for c, row in enumerate(body):
        assert int(row[0]) == c and int(row[1]) == m["dense"]["support"][c]
        for label, cell in zip(labels, row[2:]):
            assert pct(cell) == pytest.approx(m[label]["per_class_recall"][c], abs=5e-5)


def check_size(rows: list[list[str]], m: dict) -> None:
    header, *body = rows
    for row in body:
        e, cell = m[row[0]], dict(zip(header, row))
        assert int(cell["artifact B"].replace(",", "")) == e["size_bytes"]
        parts = e.get("compressed_parts")
        if parts:
            assert int(cell["compressed B"].replace(",", "")) == e["compressed_size_bytes"]
            assert int(cell["values B"].replace(",", "")) == parts["value_bytes"]
            assert int(cell["index B"].split()[0].replace(",", "")) == parts["index_bytes"]
            assert int(cell["header+alignment B"].replace(",", "")) == parts["file_overhead_bytes"]


# ---------------------------------------------------------------------------------------------------- tests


def test_report_md_tables_parse_back_to_the_metrics(written, metrics):
    tables = md_tables((written / "report.md").read_text())
    check_summary(tables["Summary (test set)"][0], metrics)
    check_per_class(tables["Per-class recall (test set)"][0], metrics)
    check_size(tables["Size on disk"][0], metrics)
    agreement = tables["Prediction agreement"][0]
    clean = dict(zip(agreement[0], agreement[1]))
    a = metrics["pruned"]["agreement"]["clean"]
    assert clean["pruned agrees"] == f"{100 * a['agreement']:.2f}% ({a['same']}/{a['samples']})"
    layers = tables[f"Per-layer sparsity ({labels_of(metrics)[-1]})"][0]
    rows = metrics[labels_of(metrics)[-1]]["layers"]
    assert [r[0] for r in layers[1:]] == [r["layer"] for r in rows]
    assert [pct(r[5]) for r in layers[1:]] == pytest.approx([r["sparsity"] for r in rows], abs=5e-5)


def test_report_md_links_the_charts_written_next_to_it(written):
    text = (written / "report.md").read_text()
    links = re.findall(r"!\[[^\]]+\]\((report-[\w-]+\.png)\)", text)
    assert sorted(links) == sorted(p.name for p in written.glob("report-*.png"))
    charts = {"layer-sparsity", "per-class-recall", "latency", "agreement"}
    assert set(links) == {f"report-{name}.png" for name in charts}
    for name in links:
        assert (written / name).read_bytes().startswith(PNG_MAGIC)
    section = text.split("## Per-class recall")[1].split("\n## ")[0]
    assert "report-per-class-recall.png" in section  # each chart sits in the section of its numbers
    assert "report-agreement.png" in text.split("## Prediction agreement")[1].split("\n## ")[0]


def test_report_html_is_self_contained(written):
    page = (written / "report.html").read_text()
    assert not re.search(r"https?://", page), "no external URL: the page must open offline"
    assert "<link" not in page and "<script" not in page and "<style>" in page
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    files = {p.read_bytes() for p in written.glob("report-*.png")}
    assert len(embedded) == 4 and {base64.b64decode(e) for e in embedded} == files
    assert 'src="report-' not in page


def test_raw_html_in_the_markdown_is_escaped_not_passed_through():
    page = markdown_to_html("# t\n\n| layer |\n|---|\n| <script>alert(1)</script> |\n\n<b>x</b> `<lambda>`\n")
    assert "<script>" not in page.split("</style>")[1] and "&lt;script&gt;" in page
    assert "<b>x</b>" not in page and "&lt;lambda&gt;" in page


def test_figures_go_to_their_section_or_to_a_charts_section():
    figs = [Figure("a", "Two", "chart a", PNG_MAGIC), Figure("b", "Nowhere", "chart b", PNG_MAGIC)]
    text = with_figures("# T\n\n## One\n\nx\n\n## Two words\n\n| a |\n|---|\n| 1 |\n\n## Three\n\nz\n", figs)
    two = text.split("## Two words")[1].split("## Three")[0]
    assert "![chart a](report-a.png)" in two and "| 1 |" in two.split("![chart a]")[0]
    assert text.rstrip().endswith("## Charts\n\n![chart b](report-b.png)")


def test_llm_report_shows_perplexity_sparsity_and_size(tmp_path):
    from prunekit.report.llm import llm_report

    layers = {
        f"model.layers.{b}.mlp.{p}": 0.5 for b in range(30) for p in ("gate_proj", "up_proj", "down_proj")
    }
    m = {
        "model": "tiny",
        "model_type": "llama",
        "method": "wanda",
        "pattern": {"type": "nm", "n": 2, "m": 4},
        "config": {"method": "wanda", "owl": False},
        "calibration": {"text": "calibration: a; evaluation: b", "samples": 4, "seqlen": 32, "seed": 0},
        "evaluation": {"windows": 7, "seqlen": 32},
        "ppl_dense": 12.3456,
        "ppl_pruned": 15.4321,
        "prune_seconds": 1.5,
        "peak_rss_mb": 300.0,
        "sparsity_dense_layers": 0.0125,
        "sparsity_pruned_layers": 0.5,
        "sparsity_whole_model": 0.4,
        "params": 1000,
        "layer_sparsity": layers,
        "size": {"file_bytes": 4100, "dense_tensor_bytes": 4000},
        "versions": {"prunekit": "0", "torch": torch.__version__},
    }
    (figure,) = llm_figures(m)
    assert "30 blocks" in figure.title  # 90 layers are averaged per block
    write_reports(tmp_path, llm_report(m), [figure])
    text = (tmp_path / "report.md").read_text()
    rows = md_tables(text)["Perplexity"][0]
    assert rows[1] == ["dense", "12.346", "1.25%"] and rows[2] == ["pruned", "15.432", "50.00%"]
    assert "1.250x, worse" in text and "**not smaller** (4,100 B, 1.025x" in text and "N:M 2:4" in text
    smaller = llm_report({**m, "size": {"file_bytes": 2100, "dense_tensor_bytes": 4000}})
    assert "**smaller** (2,100 B, 0.525x" in smaller and "stores the zeros densely" not in smaller
    old = llm_report({k: v for k, v in m.items() if k != "sparsity_dense_layers"})  # an older metrics.json
    assert md_tables(old)["Perplexity"][0][1] == ["dense", "12.346", "not measured"]
    assert len(md_tables(text)["Per-layer sparsity"][0]) == 1 + len(layers)
    assert not re.search(r"https?://", (tmp_path / "report.html").read_text())


def test_structured_job_writes_both_reports_with_its_numbers(tmp_path):
    from prunekit.jobs.structured import run_structured

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    m = run_structured(model, torch.randn(1, 8), tmp_path, ratio=0.5, importance="l2", round_to=1, runs=3)
    text = (tmp_path / "report.md").read_text()
    tables = md_tables(text)
    layers = {r[0]: r for r in tables["Per-layer"][0][1:]}
    for row in m["layers"]:
        cells = layers[row["layer"]]
        assert int(cells[4].replace(",", "")) == row["params_before"]
        assert int(cells[5].replace(",", "")) == row["params_after"]
        assert pct(cells[6]) == pytest.approx(row["removed_fraction"], abs=5e-5)
    assert m["layers"][1]["shape_after"] == [16, 16] and m["layers"][1]["removed_fraction"] == 0.75
    assert "## Verdict" in text and "Accuracy: **not measured**" in text and "ratio: 0.5" in text
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and not re.search(r"https?://", page)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install chromium)")
def test_chromium_renders_the_verdict_and_the_tables(written, metrics, tmp_path):
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom"]
        + [(written / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    page = _DomTables()
    page.feed(dom)
    text = re.sub(r"\s+", " ", "".join(page.text))
    for line in verdict(metrics["dense"], metrics["pruned"]):
        plain = re.sub(r"\s+", " ", line.replace("**", "").replace("`", ""))
        assert plain in text, plain
    assert "Warning: pruned lost more than 2 points of recall against dense: class 6" in text
    check_summary(table_by_header(page.tables, ["model", "accuracy", "params"]), metrics)
    check_per_class(table_by_header(page.tables, ["class", "support", "dense"]), metrics)
    check_size(table_by_header(page.tables, ["model", "artifact B"]), metrics)
    runtime = table_by_header(page.tables, ["model", "p50 ms", "p99 ms"])
    compiled = {r[0]: r for r in runtime[1:]}["pruned (compiled)"]
    assert float(compiled[1]) == pytest.approx(metrics["pruned"]["compiled"]["latency_ms"]["p50"], abs=5e-4)


def test_per_block_means_and_short_labels():
    from prunekit.report.plots import _short, per_block

    names, values = per_block(["m.0.q", "m.0.k", "m.1.q", "head"], [0.2, 0.4, 0.6, 0.0])
    assert names == ["m.0", "m.1", "head"] and values == pytest.approx([0.3, 0.6, 0.0])
    assert [_short(c) for c in ["clean", "noise 0.1 std", "shift dx=-1 dy=+0", "shift dx=+0 dy=+1"]] == [
        "clean",
        "noise 0.1",
        "left 1",
        "down 1",
    ]


def test_charts_are_the_same_bytes_for_the_same_numbers():
    from prunekit.report.plots import latency_bars

    first, second = (latency_bars({"dense": (2.0, 3.0), "pruned": (1.5, 2.5)}, "t") for _ in range(2))
    assert first == second and first.startswith(PNG_MAGIC)  # no timestamp or version in the PNG


def test_a_sensitivity_allocation_shows_its_table_and_heat_map(metrics, tmp_path):
    from prunekit.allocate.sensitivity import sensitivity_allocation
    from prunekit.analysis.sensitivity import LayerCurve, Sensitivity, heatmap_png

    grid = (0.5, 0.8, 0.9)
    sens = Sensitivity(
        "accuracy",
        True,
        "magnitude",
        0.9,
        grid,
        (LayerCurve("conv", 300, (0.88, 0.8, 0.5)), LayerCurve("fc", 1000, (0.9, 0.89, 0.87))),
        256,
    )
    plan = sensitivity_allocation(sens.curves(), sens.params(), 0.7)
    m = {
        **metrics,
        "allocation": [{**plan.to_dict(), "heatmap": "sensitivity.png", "sensitivity": sens.to_dict()}],
    }
    write_reports(tmp_path, write_report(m), run_figures(m))
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Sensitivity allocation")[1].split("\n## ")[0]
    (rows,) = md_tables(text)["Sensitivity allocation"]
    assert rows[0] == ["layer", "weights", "drop at 50%", "drop at 80%", "drop at 90%", "chosen", "pruned",
                       "predicted drop"]  # fmt: skip
    for row, curve in zip(rows[1:], sens.layers, strict=True):
        assert row[0] == curve.name and int(row[1].replace(",", "")) == curve.params
        assert [float(c) for c in row[2:5]] == pytest.approx(
            [100 * d for d in sens.drops(curve.name)], abs=5e-3
        )
        assert pct(row[5]) == pytest.approx(plan.sparsity[curve.name], abs=5e-5)
        assert int(row[6].replace(",", "")) == plan.pruned[curve.name]
    assert sum(plan.pruned.values()) == plan.target_pruned == round(0.7 * 1300)
    assert f"{plan.target_pruned:,} of 1,300 weights pruned (met exactly)" in section
    assert "![" in section and "(report-sensitivity.png)" in section  # the heat map under its table
    png = (tmp_path / "report-sensitivity.png").read_bytes()
    assert png == heatmap_png(sens, plan.sparsity)
    page = (tmp_path / "report.html").read_text()
    assert base64.b64encode(png).decode() in page.split("Sensitivity allocation</h2>")[1]
