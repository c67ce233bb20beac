"""Markdown sections of the audit checks: the per-class check, prediction agreement, size with the index
overhead of compressed artifacts. Each takes the ``metrics.json`` dict and returns lines (empty when the
metrics hold nothing for it), so the Markdown report and the HTML made from it show the same numbers.
"""

from __future__ import annotations

from typing import Any

import yaml

# a latency ratio counts as a speed-up below this, as a slow-down above the other (noise lies between)
FASTER_THRESHOLD = 0.90
SLOWER_THRESHOLD = 1.10


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def per_class_check_section(m: dict[str, Any]) -> list[str]:
    """Which classes lost more recall than the threshold, against the reference (the dense baseline)."""
    check = m.get("per_class_check")
    if not check or not check["labels"]:
        return []
    ref, t = check["reference"], check["threshold_points"]
    lines = ["## Per-class check", ""]
    for label, drops in check["labels"].items():
        if not drops:
            lines.append(f"- {label}: no class lost more than {t:g} points of recall against {ref}.")
            continue
        named = "; ".join(
            f"class {d['class']} {_pct(d['reference'])} -> {_pct(d['candidate'])} "
            f"(**-{d['points_lost']:.2f} points**"
            + (f", {d['support']} test inputs)" if "support" in d else ")")
            for d in drops
        )
        lines.append(f"- **Warning**: {label} lost more than {t:g} points of recall against {ref}: {named}.")
    return lines + [""]


def agreement_section(m: dict[str, Any]) -> list[str]:
    """Agreement with the reference model, clean and perturbed, and per true class on clean inputs."""
    labels = [k for k, v in m.items() if isinstance(v, dict) and isinstance(v.get("agreement"), dict)]
    if not labels:
        return []
    ref = m[labels[0]]["agreement"]["reference"]
    lines = ["## Prediction agreement", ""]
    lines += [
        f"The share of test inputs on which each model predicts the class {ref} predicts. Under a "
        'perturbation both see the same perturbed input; "keeps" is how often a model keeps its own clean '
        "prediction (Gaussian noise as a fraction of the inputs' std, shifts by one pixel with the edges "
        f"repeated; seed {m[labels[0]]['agreement']['seed']}).",
        "",
    ]
    conditions = ["clean", *m[labels[0]]["agreement"]["perturbed"]]
    header = ["input", f"{ref} keeps"] + [
        h for label in labels for h in (f"{label} agrees", f"{label} keeps")
    ]
    rows = []
    for cond in conditions:
        entries = [
            m[label]["agreement"]["clean"]
            if cond == "clean"
            else m[label]["agreement"]["perturbed"].get(cond)
            for label in labels
        ]
        first = entries[0] or {}
        row = [cond, "-" if cond == "clean" else _pct(first.get("reference_stable"))]
        for e in entries:
            if e is None:
                row += ["-", "-"]
                continue
            keeps = "-" if cond == "clean" else _pct(e["candidate_stable"])
            row += [f"{_pct(e['agreement'])} ({e['same']}/{e['samples']})", keeps]
        rows.append(row)
    lines += _table(header, rows) + ["", f"Agreement with {ref} per true class (clean test inputs):", ""]
    clean = {label: m[label]["agreement"]["clean"] for label in labels}
    support = clean[labels[0]]["support"]
    rows = [
        [c, support[c]] + [_pct(clean[label]["per_class"][c]) for label in labels]
        for c in range(len(support))
    ]
    return lines + _table(["class", "support", *labels], rows) + [""]


def size_section(m: dict[str, Any]) -> list[str]:
    """Bytes on disk of every exported model, and for compressed artifacts what the bytes are made of."""
    labels = [
        k for k, v in m.items() if isinstance(v, dict) and "per_class_recall" in v and v.get("size_bytes")
    ]
    if not labels:
        return []
    base = m[labels[0]]["size_bytes"]
    rows = []
    for label in labels:
        e = m[label]
        parts = e.get("compressed_parts")
        packed = e.get("compressed_size_bytes")
        row = [label, f"{e['size_bytes']:,}", f"{e['size_bytes'] / base:.3f}x"]
        if packed and parts:
            index = parts["index_bytes"]
            row += [
                f"{packed:,}",
                f"{packed / base:.3f}x",
                f"{parts['value_bytes']:,}",
                f"{index:,} ({index / packed:.1%} of the file)",
                f"{parts['scale_bytes']:,}",
                f"{parts['file_overhead_bytes']:,}",
            ]
        else:
            row += ["-"] * 6
        rows.append(row)
    header = ["model", "artifact B", f"vs {labels[0]}", "compressed B", f"vs {labels[0]}"]
    header += ["values B", "index B", "scales B", "header+alignment B"]
    return [
        "## Size on disk",
        "",
        *_table(header, rows),
        "",
        "The artifact keeps dense weights plus the exact mask (for fine-tuning); the compressed file stores "
        "each tensor in its smallest encoding; its index bytes (bitmask, CSR or N:M positions) are the price "
        "of the sparsity, counted in its size.",
        "",
    ]


def layer_changes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer shapes and weight counts before and after structured pruning, matched by layer name
    (rows of :func:`prunekit.analysis.layer_table`); ``removed_fraction`` is the share of weights gone."""
    kept = {r["layer"]: r for r in after}
    rows = []
    for r in before:
        a = kept.get(r["layer"])
        params_after = a["params"] if a else 0
        rows.append(
            {
                "layer": r["layer"],
                "type": r["type"],
                "shape_before": r["shape"],
                "shape_after": a["shape"] if a else None,
                "params_before": r["params"],
                "params_after": params_after,
                "removed_fraction": 1 - params_after / r["params"] if r["params"] else 0.0,
            }
        )
    return rows


def structured_verdict(m: dict[str, Any]) -> list[str]:
    """What a structured prune made smaller and faster, and what it did not, in plain words."""
    r = m["ratios"]
    lines = ["## Verdict", ""]
    ratio = r["latency_p50"]
    if ratio < FASTER_THRESHOLD:
        lines.append(f"- Latency: pruned is faster, p50 {ratio:.2f}x of dense ({1 / ratio:.2f}x speed-up).")
    elif ratio > SLOWER_THRESHOLD:
        lines.append(f"- Latency: pruned is **slower**, p50 {ratio:.2f}x of dense.")
    else:
        lines.append(
            f"- Latency: **not faster** (p50 {ratio:.2f}x of dense; only {FASTER_THRESHOLD:.2f}x or better "
            "counts as a speed-up)."
        )
    lines.append(
        f"- Compute: {r['macs']:.3f}x of the dense MACs, {r['params']:.3f}x of the parameters; the ideal "
        f"speed-up from MACs alone would be {1 / r['macs'] if r['macs'] else float('inf'):.2f}x."
    )
    size = m.get("size")
    if size:
        file_bytes, dense_bytes = size["pruned_file_bytes"], size["dense_bytes"]
        lines.append(
            f"- Size on disk: {file_bytes:,} B ({file_bytes / dense_bytes:.3f}x of the dense tensors' "
            f"{dense_bytes:,} B); structured pruning needs no index: the tensors are simply smaller."
        )
    lines.append(
        "- Accuracy: **not measured** (`prunekit structured` has no data); fine-tune and evaluate with a "
        "recipe's structured stage (`prunekit run`)."
    )
    return lines + [""]


def structured_layers_section(m: dict[str, Any]) -> list[str]:
    if not m.get("layers"):
        return []
    rows = [
        [
            r["layer"],
            r["type"],
            "x".join(map(str, r["shape_before"])),
            "removed" if r["shape_after"] is None else "x".join(map(str, r["shape_after"])),
            f"{r['params_before']:,}",
            f"{r['params_after']:,}",
            _pct(r["removed_fraction"]),
        ]
        for r in m["layers"]
    ]
    header = ["layer", "type", "shape before", "shape after", "weights before", "weights after", "removed"]
    return ["## Per-layer", "", *_table(header, rows), ""]


def settings_section(settings: dict[str, Any], title: str = "Settings") -> list[str]:
    """The settings a job ran with, as YAML (the counterpart of a run report's recipe)."""
    text = yaml.safe_dump(settings, sort_keys=False, default_flow_style=None).rstrip()  # short lists inline
    return [f"## {title}", "", "```yaml", text, "```", ""]


def allocation_heading(m: dict[str, Any], index: int) -> str:
    """The heading (without ``## ``) of the ``index``-th ``allocation: sensitivity`` entry; unique per
    entry, so its heat map (``plots.run_figures``) lands under its own table."""
    count = len(sensitivity_allocations(m))
    return "Sensitivity allocation" + (f" {index + 1} of {count}" if count > 1 else "")


def sensitivity_allocations(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``allocation: sensitivity`` entries of ``metrics["allocation"]`` (other allocations, such as
    ``erk``, record only their per-layer sparsities there)."""
    return [a for a in m.get("allocation") or [] if "sensitivity" in a]


def _points(x: float) -> str:
    return f"{100 * x:.2f}"


def _general(x: float) -> str:
    return f"{x:.4g}"


def allocation_section(m: dict[str, Any]) -> list[str]:
    """Per prune stage with ``allocation: sensitivity``: the measured drops (the heat map's numbers), the
    sparsity chosen per layer and its predicted drop, and whether the global target was met exactly."""
    lines: list[str] = []
    for i, a in enumerate(sensitivity_allocations(m)):
        sens = a["sensitivity"]
        accuracy = sens["metric"] == "accuracy"

        drop = _points if accuracy else _general

        unit = "points of accuracy" if accuracy else sens["metric"]
        baseline = _pct(sens["baseline"]) if accuracy else f"{sens['baseline']:.4g}"
        layers = a["layers"]
        params = {c["name"]: c["params"] for c in sens["layers"]}
        pruned = sum(v["pruned"] for v in layers.values())
        total = sum(params[n] for n in layers)
        met = "met exactly" if pruned == a["target_pruned"] else f"**missed** ({a['target_pruned']:,} wanted)"
        grid = [f"{s:.0%}" for s in sens["sparsities"]]
        rows = [
            [
                c["name"],
                f"{c['params']:,}",
                *(drop(d) for d in c["drops"]),
                _pct(layers[c["name"]]["sparsity"]),
                f"{layers[c['name']]['pruned']:,}",
                drop(layers[c["name"]]["predicted_drop"]),
            ]
            for c in sens["layers"]
            if c["name"] in layers
        ]
        header = ["layer", "weights", *(f"drop at {g}" for g in grid), "chosen", "pruned", "predicted drop"]
        lines += [
            f"## {allocation_heading(m, i)}",
            "",
            f"Each layer pruned alone ({sens['criterion']}, no fine-tuning) on {sens['samples']} validation "
            f"samples, baseline {sens['metric']} {baseline}; "
            f"drops in {unit}. Target {_pct(a['target'])} of these layers: {pruned:,} of {total:,} weights "
            f"pruned ({met}), predicted drop {drop(a['predicted_drop_total'])} in all (the sum over layers).",
            "",
            *_table(header, rows),
            "",
        ]
    return lines
