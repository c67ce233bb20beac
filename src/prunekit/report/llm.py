"""The Markdown report of ``prunekit llm prune``: perplexity dense vs pruned, sparsity per layer, size, and
a plain verdict, from the job's ``metrics.json``."""

from __future__ import annotations

from typing import Any

from prunekit.report.sections import settings_section


def _pattern(p: dict[str, Any]) -> str:
    if p.get("type") == "nm":
        return f"N:M {p['n']}:{p['m']}"
    return f"unstructured {100 * p['sparsity']:.0f}%" if "sparsity" in p else str(p)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _ppl(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.3f}"


def _zeros(fraction: float | None) -> str:
    return "not measured" if fraction is None else f"{100 * fraction:.2f}%"


def verdict(m: dict[str, Any]) -> list[str]:
    out = []
    dense, pruned = m.get("ppl_dense"), m.get("ppl_pruned")
    if dense is not None and pruned is not None:
        change = pruned / dense
        word = "worse" if change > 1 else "better"
        out.append(
            f"Perplexity: {pruned:.3f} pruned vs {dense:.3f} dense ({change:.3f}x, {word}; lower is better), "
            f"{m['evaluation']['windows']} windows of {m['evaluation']['seqlen']} tokens."
        )
    else:
        out.append("Perplexity: not measured (--no-eval).")
    out.append(
        f"Sparsity: {100 * m['sparsity_pruned_layers']:.2f}% of the decoder blocks' linear weights are zero "
        f"({100 * m['sparsity_whole_model']:.2f}% of all {m['params']:,} parameters; embeddings and the LM "
        "head stay dense)."
    )
    size = m.get("size")
    if size:
        ratio = size["file_bytes"] / size["dense_tensor_bytes"]
        word = "smaller" if ratio < 0.99 else "not smaller"
        out.append(
            f"Size on disk: **{word}** ({size['file_bytes']:,} B, {ratio:.3f}x of the model's tensors stored "
            f"densely, {size['dense_tensor_bytes']:,} B)."
            + (
                " The checkpoint stores the zeros densely so that `from_pretrained` loads it unchanged; a "
                "compressed encoding (`prunekit compress`) shrinks it."
                if ratio >= 0.99
                else ""
            )
        )
    out.append(
        "Latency: **not measured** by `llm prune`, and not expected to improve as saved: the zeros are "
        "stored densely and run on dense kernels."
    )
    out.append(f"Pruning took {m['prune_seconds']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB.")
    return out


def llm_report(m: dict[str, Any]) -> str:
    lines = [f"# prunekit llm prune: {m['method']} {_pattern(m['pattern'])}", "", "## Verdict", ""]
    lines += [f"- {line}" for line in verdict(m)] + [""]
    lines += ["## Perplexity", ""]
    lines += _table(
        ["model", "perplexity", "zero weights (decoder linears)"],
        [
            ["dense", _ppl(m.get("ppl_dense")), _zeros(m.get("sparsity_dense_layers"))],
            ["pruned", _ppl(m.get("ppl_pruned")), f"{100 * m['sparsity_pruned_layers']:.2f}%"],
        ],
    )
    lines += ["", f"Text: {m['calibration']['text']}.", ""]
    layers = m.get("layer_sparsity") or {}
    if layers:
        lines += ["## Per-layer sparsity", ""]
        lines += _table(["layer", "sparsity"], [[name, f"{100 * s:.2f}%"] for name, s in layers.items()]) + [
            ""
        ]
    if m.get("owl"):
        targets = m.get("block_sparsity_targets") or []
        lines += ["## OWL block targets", ""]
        lines += _table(["block", "target sparsity"], [[i, f"{100 * t:.2f}%"] for i, t in enumerate(targets)])
        lines += [""]
    settings = {
        "model": m["model"],
        "model_type": m["model_type"],
        "method": m["method"],
        "pattern": m["pattern"],
        **m.get("config", {}),
        "calibration": m["calibration"],
        "threads": m.get("threads"),
    }
    lines += settings_section(settings, "Recipe (command settings)")
    if m.get("versions"):
        lines += ["## Environment", "", ", ".join(f"{k}: {v}" for k, v in m["versions"].items()), ""]
    return "\n".join(lines)
