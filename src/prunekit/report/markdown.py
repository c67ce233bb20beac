"""The Markdown report: dense vs pruned (and pruned vs INT8), per class, per round, per layer, and a plain
verdict.

The verdict says what did not improve as plainly as what did: unstructured zeros stored and computed
densely do not make a model smaller on disk or faster on CPU.
"""

from __future__ import annotations

from typing import Any

import yaml

from prunekit.report.c_export import c_section as c_export_section
from prunekit.report.sections import (
    FASTER_THRESHOLD,
    SLOWER_THRESHOLD,
    agreement_section,
    allocation_section,
    per_class_check_section,
    size_section,
)

# a pruned p50 must beat dense by more than this ratio before the report calls it faster


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _size(n: int | None) -> str:
    if n is None:
        return "not exported"
    return f"{n / 1024:.1f} KiB ({n:,} B)"


# p99 above this many times p50: the timing shared the CPU with something else, so the tail is noise
NOISY_P99_RATIO = 3.0
KERNELS = {  # what the "chosen" column of the sparse runtime's decisions means (prunekit.runtime.layers)
    "dense": "the layer's own dense PyTorch kernel (no sparse kernel measured faster)",
    "rows": "one CSR row per output, the input gathered per nonzero (batch 1, small batches)",
    "xt": "input transposed, each nonzero scales a contiguous row (im2col convolutions, batches)",
    "xt/b": "xt with the input's columns in tiles of that many (cache blocking)",
    "xt-nchw": "xt image by image, no permuted copies",
    "xt-chain": "two xt Linears around an activation, the activations kept transposed in between",
    "direct": "direct sparse convolution without im2col (Park et al. 2017)",
    "int8-gemm": "the exact int8 arithmetic as a float32 GEMM on integer values",
}


def _p99(latency: dict[str, float]) -> str:
    """The p99 cell, marked when the tail is over :data:`NOISY_P99_RATIO` times the median."""
    noisy = latency["p50"] > 0 and latency["p99"] / latency["p50"] > NOISY_P99_RATIO
    return f"{latency['p99']:.3f}" + (" (noisy)" if noisy else "")


def noisy_note(cells: list[str]) -> list[str]:
    """One line under a latency table that has a p99 marked noisy, saying what that means."""
    if not any(cell.endswith("(noisy)") for cell in cells):
        return []
    return [
        "",
        f"(noisy): p99 over {NOISY_P99_RATIO:g}x p50: some calls waited (another process on the CPU, "
        "the OS); the tail is not the model's. Compare p50s, or rerun on an idle machine.",
    ]


def kernel_legend(chosen: set[str]) -> list[str]:
    """The meaning of each kernel name a decisions table uses."""
    names = sorted({"xt/b" if c.startswith("xt/b") else c for c in chosen} & set(KERNELS))
    if not names:
        return []
    legend = "; ".join(f"`{n}{'N' if n == 'xt/b' else ''}`: {KERNELS[n]}" for n in names)
    return [f"Kernels: {legend}.", ""]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def verdict(dense: dict[str, Any], pruned: dict[str, Any]) -> list[str]:
    """Plain-language findings comparing two evaluated states."""
    out = []
    drop = dense["accuracy"] - pruned["accuracy"]
    out.append(
        f"Accuracy: {_pct(pruned['accuracy'])} pruned vs {_pct(dense['accuracy'])} dense "
        f"({'a drop' if drop > 0 else 'a gain'} of {abs(100 * drop):.2f} points)."
    )
    worst = max(
        (
            (i, (d or 0) - (p or 0))
            for i, (d, p) in enumerate(zip(dense["per_class_recall"], pruned["per_class_recall"]))
        ),
        key=lambda t: t[1],
    )
    out.append(
        f"Largest per-class recall loss: class {worst[0]}, {100 * worst[1]:.2f} points."
        if worst[1] > 0
        else "No class lost recall."
    )
    ratio = pruned["latency_ms"]["p50"] / dense["latency_ms"]["p50"]
    if ratio < FASTER_THRESHOLD:
        out.append(f"Latency: pruned is faster, p50 {ratio:.2f}x of dense.")
    elif ratio > SLOWER_THRESHOLD:
        out.append(f"Latency: pruned is **slower**, p50 {ratio:.2f}x of dense.")
    else:
        params = pruned.get("params", 0) / dense["params"] if dense.get("params") else None
        nonzero = (
            pruned.get("nonzero_params", 0) / dense["nonzero_params"] if dense.get("nonzero_params") else None
        )
        measured = (
            f"; it has {params:.3f}x of dense's parameters and {nonzero:.3f}x of its non-zero weights"
            if params is not None and nonzero is not None
            else ""
        )
        out.append(
            f"Latency: **pruning did not make inference faster** (p50 {ratio:.2f}x of dense; the report "
            f"counts only {FASTER_THRESHOLD:.2f}x or better as a speed-up){measured}."
        )
    compiled = pruned.get("compiled")
    if compiled and compiled.get("latency_ms"):
        ratio = compiled["latency_ms"]["p50"] / dense["latency_ms"]["p50"]
        word = "faster" if ratio < FASTER_THRESHOLD else "slower" if ratio > SLOWER_THRESHOLD else "no faster"
        out.append(
            f"Sparse runtime (`prunekit.runtime.compile`): p50 {ratio:.2f}x of dense ({word}); "
            f"{compiled['sparse_layers']} of {len(compiled['layers'])} layers measured faster on sparse "
            "kernels at batch 1, the rest kept dense kernels."
        )
    if dense.get("size_bytes") and pruned.get("compressed_size_bytes"):
        packed, kept = (pruned[k] / dense["size_bytes"] for k in ("compressed_size_bytes", "size_bytes"))
        out.append(
            f"Size on disk: the compressed artifact is {packed:.3f}x of dense (each tensor in its smallest "
            "encoding, index overhead included); the artifact kept for fine-tuning (dense weights plus the "
            f"exact mask) is {kept:.3f}x."
        )
    elif dense.get("size_bytes") and pruned.get("size_bytes"):
        size_ratio = pruned["size_bytes"] / dense["size_bytes"]
        if size_ratio >= 0.95:
            out.append(
                f"Size on disk: **not smaller** ({size_ratio:.3f}x of dense): this artifact stores weights "
                "densely (zeros included) plus a 1-bit-per-weight mask; a compressed encoding is needed "
                "to shrink it."
            )
        else:
            out.append(f"Size on disk: {size_ratio:.3f}x of dense.")
    return out


def int8_findings(m: dict[str, Any]) -> list[str]:
    """What INT8 cost and what it left float, from ``metrics["quantization"]`` and the two labels it names."""
    q = m["quantization"]
    before, after = m.get(q.get("before") or ""), m.get(q.get("after") or "")
    out = []
    if before and after:
        drop = before["accuracy"] - after["accuracy"]
        change = (
            f"{'a drop' if drop > 0 else 'a gain'} of {abs(100 * drop):.2f} points" if drop else "unchanged"
        )
        out.append(
            f"INT8 accuracy: {_pct(after['accuracy'])} {q['after']} (INT8) vs {_pct(before['accuracy'])} "
            f"{q['before']} (float32): {change}."
        )
        losses = [(d or 0) - (a or 0) for d, a in zip(before["per_class_recall"], after["per_class_recall"])]
        worst = max(range(len(losses)), key=losses.__getitem__)
        out.append(
            f"Largest per-class recall loss from INT8: class {worst}, {100 * losses[worst]:.2f} points."
            if losses[worst] > 0
            else "No class lost recall from INT8."
        )
        if before.get("size_bytes") and after.get("size_bytes"):
            out.append(
                f"INT8 size on disk: {after['size_bytes'] / before['size_bytes']:.3f}x of {q['before']}."
            )
        ratio = after["latency_ms"]["p50"] / before["latency_ms"]["p50"]
        out.append(
            f"INT8 latency: p50 {ratio:.2f}x of {q['before']}, measured on prunekit's reference int8 layers "
            "(exact integer products computed in float64): this checks the arithmetic, it is not the "
            "speed of an int8 kernel."
        )
    how = "fine-tuned with fake quantization (QAT), masks kept" if q.get("qat") else "post-training"
    acts = "calibrated once (max |x|)" if q["activations"] == "static" else "scaled per call"
    out.append(
        f"INT8 layers: {len(q['int8'])} ({how}; weights int8 per output channel, activations int8 per "
        f"tensor, {acts}); {len(q['folded'])} BatchNorms folded into their convolutions."
    )
    out += [f"Left float32: `{name}`: {why}." for name, why in q.get("left_float", {}).items()]
    return out


def layer_engine(kind: str, chosen: str) -> str:
    """Which engine ran a compiled layer, from its kind and the runtime's choice (a kernel name the
    runtime does not describe here is shown as it is)."""
    int8 = kind.startswith("Quantized")
    if chosen == "dense":
        return "prunekit int8 reference (torch, exact)" if int8 else "torch float32 (dense)"
    named = {
        "int8-gemm": "int8 dense GEMM (torch float32 BLAS, exact)",
        "direct": "float32 direct sparse conv (numba)",
        "xt-chain": "float32 sparse CSR chain (numba)",
    }
    if chosen in named:
        return named[chosen]
    if chosen.split("/")[0] in ("rows", "xt", "xt-nchw"):
        return f"{'int8' if int8 else 'float32'} sparse CSR {chosen} (numba)"
    return chosen


def baselines_section(m: dict[str, Any], labels: list[str]) -> list[str]:
    """Every timed variant next to the dense engines a user would deploy instead (``baselines: true``),
    all from the one interleaved run, with each variant's ratio to the fastest dense one."""
    owners = [label for label in labels if m[label].get("baselines")]
    if not owners:
        return []
    first = labels[0]
    rows, dense_p50 = [], []
    for label in labels:
        e = m[label]
        rows.append(
            [label, "torch (eager)", e["latency_ms"]["p50"], e["latency_ms"]["p99"], e.get("size_bytes")]
        )
        if label in owners:
            dense_p50.append(e["latency_ms"]["p50"])
        c = e.get("compiled")
        if c and c.get("latency_ms"):
            rows.append(
                [
                    f"{label} (compiled)",
                    "prunekit runtime",
                    c["latency_ms"]["p50"],
                    c["latency_ms"]["p99"],
                    None,
                ]
            )
            if label in owners:
                dense_p50.append(c["latency_ms"]["p50"])
        for name, b in (e.get("baselines") or {}).items():
            if b.get("latency_ms"):
                rows.append(
                    [
                        f"{label} ({name})",
                        b["engine"],
                        b["latency_ms"]["p50"],
                        b["latency_ms"]["p99"],
                        b.get("size_bytes"),
                    ]
                )
                dense_p50.append(b["latency_ms"]["p50"])
    fastest = min(dense_p50)
    base = m[first]["latency_ms"]["p50"]
    table = [
        [
            r[0],
            r[1],
            f"{r[2]:.3f}",
            _p99({"p50": r[2], "p99": r[3]}),
            f"{r[2] / base:.2f}x",
            f"{r[2] / fastest:.2f}x",
            _size(r[4]),
        ]
        for r in rows
    ]
    lines = ["## Against the engines a user would deploy instead", ""]
    lines += _table(
        ["model", "engine", "p50 ms", "p99 ms", f"p50 vs {first}", "p50 vs fastest dense", "size"], table
    )
    lines += noisy_note([row[3] for row in table])
    lines += [
        "",
        "Dense baselines of the same float model: torch's own INT8 (x86 engine), onnxruntime float32 and "
        "onnxruntime's static INT8 (QDQ, per-channel weights), all timed in the same interleaved batch-1 run "
        "as prunekit's variants. They are speed references: their accuracy is not measured.",
    ]
    for label in owners:
        for name, b in m[label]["baselines"].items():
            if b.get("skipped"):
                lines.append(f"- {name} skipped: {b['skipped']}")
    return lines + [""]


def _runtime_section(m: dict[str, Any], labels: list[str]) -> list[str]:
    """Latency of the compiled twins next to every evaluated model, and what each compile decided."""
    compiled = [label for label in labels if m[label].get("compiled")]
    if not compiled:
        return []
    first = labels[0]
    rows = []
    for label in labels:
        e = m[label]
        rows.append([label, f"{e['latency_ms']['p50']:.3f}", _p99(e["latency_ms"])])
        rows[-1] += [f"{e['latency_p50_vs_first']:.2f}x", "-", "-"]
        c = e.get("compiled")
        if c:
            rows.append(
                [
                    f"{label} (compiled)",
                    f"{c['latency_ms']['p50']:.3f}",
                    _p99(c["latency_ms"]),
                    f"{c['latency_p50_vs_first']:.2f}x",
                    f"{c['sparse_layers']}/{len(c['layers'])}",
                    f"{c['same_predictions']}/{c['samples']} (max logit diff {c['max_abs_diff']:.1e})",
                ]
            )
    lines = ["## Sparse runtime", ""]
    lines += _table(
        ["model", "p50 ms", "p99 ms", f"p50 vs {first}", "layers on sparse kernels", "same predictions"], rows
    )
    lines += noisy_note([row[2] for row in rows])
    lines += [
        "",
        "`prunekit.runtime.compile` times every Linear/Conv2d layer at its real batch-1 input, sparse kernel "
        "against dense, and keeps a sparse kernel only where it measured faster; all rows above come from "
        "the same interleaved run.",
        "",
    ]
    chosen = {d["chosen"] for label in compiled for d in m[label]["compiled"]["layers"]}
    for label in compiled:
        rows = [
            [
                d["name"],
                "x".join(map(str, d["weight_shape"])),
                _pct(d["sparsity"]),
                "-" if d["dense_us"] is None else f"{d['dense_us']:.1f}",
                "-" if d["sparse_us"] is None else f"{d['sparse_us']:.1f}",
                d["chosen"],
                layer_engine(d["kind"], d["chosen"]),
            ]
            for d in m[label]["compiled"]["layers"]
        ]
        lines += [f"Decisions for {label}:", ""]
        head = ["layer", "weight", "sparsity", "dense us", "best sparse us", "chosen", "engine"]
        lines += _table(head, rows) + [""]
    return lines + kernel_legend(chosen)


def write_report(m: dict[str, Any]) -> str:
    lines = [f"# prunekit report: {m.get('recipe_name', 'run')}", ""]
    labels = [k for k, v in m.items() if isinstance(v, dict) and "accuracy" in v]
    dense, pruned = m.get("dense"), m.get("pruned")
    if dense and pruned:
        lines += ["## Verdict", ""] + [f"- {line}" for line in verdict(dense, pruned)] + [""]
    lines += per_class_check_section(m)
    if m.get("quantization"):
        lines += ["## INT8", ""] + [f"- {line}" for line in int8_findings(m)] + [""]
    if labels:
        lines += ["## Summary (test set)", ""]
        rows = []
        for label in labels:
            e = m[label]
            rows.append(
                [
                    label,
                    _pct(e["accuracy"]),
                    f"{e['params']:,}",
                    f"{e['nonzero_params']:,}",
                    _pct(e["sparsity"]),
                    _size(e.get("size_bytes"))
                    + (
                        f"; compressed {_size(e['compressed_size_bytes'])}"
                        if e.get("compressed_size_bytes")
                        else ""
                    ),
                    f"{e['latency_ms']['p50']:.3f}",
                    _p99(e["latency_ms"]),
                ]
            )
        lines += _table(
            ["model", "accuracy", "params", "non-zero", "sparsity", "size", "p50 ms", "p99 ms"], rows
        )
        lines += noisy_note([row[-1] for row in rows])
        first = m[labels[0]]
        lines += [
            "",
            f"Latency: batch 1, wall clock, {first['latency_runs']} timed runs per model after warm-up, "
            f"{first['threads']} thread(s), all models timed in one interleaved run, on the squashed model "
            "(no mask overhead).",
            "",
        ]
        lines += ["## Per-class recall (test set)", ""]
        n = len(first["per_class_recall"])
        rows = [
            [c, first["support"][c]] + [_pct(m[label]["per_class_recall"][c]) for label in labels]
            for c in range(n)
        ]
        lines += _table(["class", "support", *labels], rows) + [""]
    lines += agreement_section(m) + size_section(m)
    lines += _runtime_section(m, labels)
    lines += baselines_section(m, labels)
    lines += c_export_section(m)  # prunekit.report.c_export: flash/RAM of the C export
    if m.get("rounds"):
        lines += ["## Pruning rounds", ""]
        rows = [
            [r["round"], _pct(r["targeted_sparsity"]), _pct(r["model_sparsity"]), _pct(r["val_accuracy"])]
            for r in m["rounds"]
        ]
        lines += _table(
            ["round", "sparsity of pruned layers", "whole-model sparsity", "val accuracy"], rows
        ) + [""]
    last = m[labels[-1]] if labels else None
    if last:
        lines += ["## Per-layer sparsity" + (f" ({labels[-1]})" if labels else ""), ""]
        rows = [
            [
                r["layer"],
                r["type"],
                "x".join(map(str, r["shape"])),
                f"{r['params']:,}",
                f"{r['nonzero']:,}",
                _pct(r["sparsity"]),
                r["pattern"],
            ]
            for r in last["layers"]
        ]
        lines += _table(["layer", "type", "shape", "params", "non-zero", "sparsity", "pattern"], rows) + [""]
    lines += allocation_section(m)  # allocation: sensitivity -- the curves and the per-layer choice
    if m.get("left_dense"):
        lines += ["## Layers left dense", ""] + [f"- `{k}`: {v}" for k, v in m["left_dense"].items()] + [""]
    if m.get("recipe"):
        lines += [
            "## Recipe",
            "",
            "```yaml",
            yaml.safe_dump(m["recipe"], sort_keys=False).rstrip(),
            "```",
            "",
        ]
    env = m.get("environment")
    if env:
        lines += ["## Environment", "", ", ".join(f"{k}: {v}" for k, v in env.items() if v is not None), ""]
    return "\n".join(lines)
