"""The ``prunekit structured`` job: prune a model structurally and measure it against the original.

Writes ``OUT/metrics.json`` (params, MACs, batch-1 latency p50/p99 before and after, measured in one
interleaved run), ``OUT/prune_log.json`` + ``OUT/model.safetensors`` (replay with
``prunekit.structured.load``), ``OUT/report.md`` and ``OUT/report.html`` (with ``report-*.png``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.analysis.latency import compare_latency
from prunekit.analysis.macs import count_macs
from prunekit.analysis.sparsity import layer_table
from prunekit.artifact import load_artifact
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.jobs.steps import Steps
from prunekit.limits import check_input
from prunekit.models import MODELS, build_model
from prunekit.registry import resolve_reference
from prunekit.report.html import write_reports
from prunekit.report.plots import structured_figures
from prunekit.report.sections import (
    layer_changes,
    settings_section,
    structured_layers_section,
    structured_verdict,
)
from prunekit.structured.core import prune_model
from prunekit.structured.storage import save


def load_model_spec(spec: str, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, torch.Tensor]:
    """``resnet-digits`` (a built-in), ``path/to/artifact.safetensors``, or ``package.module:factory``."""

    if spec in MODELS:
        model = build_model(spec)
        default = (1, 1, 8, 8)
    elif spec.endswith(".safetensors"):
        model, _ = load_artifact(spec, masked=False)
        default = (1, 1, 8, 8) if isinstance(model, MODELS.get("resnet-digits")) else None
    elif ":" in spec:
        factory = resolve_reference(spec, "--model")  # from the working directory, as Python imports
        if not callable(factory):
            raise PrunekitError(
                f"--model {spec}: {type(factory).__name__} is not a function that builds a model"
            )
        model = factory()
        if not isinstance(model, nn.Module):
            raise PrunekitError(
                f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module"
            )
        default = None
    else:
        raise PrunekitError(
            f"--model {spec!r}: give a built-in model ({', '.join(MODELS.names())}), a .safetensors "
            "artifact, "
            "or a factory as package.module:function"
        )
    shape = input_shape or default
    if shape is None:
        raise PrunekitError("--input-shape is needed for this model, e.g. --input-shape 1,3,224,224")
    check_input(model, shape)  # before the example is allocated
    return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(0))


def run_structured(
    model: nn.Module,
    example: torch.Tensor,
    out: str | Path,
    *,
    ratio: float,
    importance: str,
    round_to: int,
    runs: int = 200,
    model_name: str = "",
    prune_norm_coupled: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    out = Path(out)
    steps = Steps(["prune and verify", "time dense and pruned", "save"], "structured", progress)
    dense = copy.deepcopy(model).eval()
    dense_macs = count_macs(dense, example)["total"]
    with steps("prune and verify"):
        result = prune_model(
            model,
            example,
            ratio=ratio,
            importance=importance,
            round_to=round_to,
            verify=True,
            prune_norm_coupled=prune_norm_coupled,
        )
    pruned_macs = count_macs(model, example)["total"]
    with steps("time dense and pruned"):
        latency = compare_latency({"dense": dense, "pruned": model}, example, runs=runs, warmup=20)
    with steps("save"):
        save(model, result.plan, out)
    # the dense model's tensor bytes (shared storage once, as save_model stores tied weights once)
    dense_bytes = sum(
        t.numel() * t.element_size()
        for t in {t.data_ptr(): t for t in dense.state_dict().values() if t.numel()}.values()
    )
    metrics = {
        "model": model_name,
        "ratio": ratio,
        "importance": importance,
        "round_to": round_to,
        "input_shape": list(example.shape),
        "verified_max_abs_diff": result.max_abs_diff,
        "prune_norm_coupled": prune_norm_coupled,
        "approximate": sorted(set(result.approximate.values())),
        "dense": {
            "params": result.params_before,
            "macs": dense_macs,
            "latency_ms": {k: latency["dense"][k] for k in ("p50", "p99")},
        },
        "pruned": {
            "params": result.params_after,
            "macs": pruned_macs,
            "latency_ms": {k: latency["pruned"][k] for k in ("p50", "p99")},
        },
        "ratios": {
            "params": result.params_after / result.params_before,
            "macs": pruned_macs / max(dense_macs, 1),
            "latency_p50": latency["pruned"]["p50"] / latency["dense"]["p50"],
        },
        "threads": torch.get_num_threads(),
        "latency_runs": latency["dense"]["runs"],
        "groups": result.summary(),
        "layers": layer_changes(layer_table(dense), layer_table(model)),
        "size": {"dense_bytes": dense_bytes, "pruned_file_bytes": (out / "model.safetensors").stat().st_size},
    }
    atomic_write_json(out / "metrics.json", metrics)
    write_reports(out, _report(metrics), structured_figures(metrics))  # report.md, report.html, PNGs
    return metrics


def _checked(m: dict[str, Any]) -> str:
    diff = m["verified_max_abs_diff"]
    if m.get("approximate"):
        return (
            f"Widths that norms normalise over were pruned too ({'; '.join(m['approximate'])}): the outputs "
            f"differ from the original with the removed units zeroed by up to {diff:.2g}; fine-tune or "
            "distill to recover."
        )
    return (
        "The pruned model was checked against the original with the removed units zeroed "
        f"(max abs difference {diff:.2g})."
    )


def _report(m: dict[str, Any]) -> str:
    r = m["ratios"]
    speedup = 1 / r["latency_p50"]
    ideal = 1 / r["macs"] if r["macs"] else float("inf")
    lines = [
        f"# prunekit structured: {m['model'] or 'model'}",
        "",
        f"Removed {m['ratio']:.0%} of the units of every prunable group ({m['importance']} importance, kept "
        f"counts rounded to multiples of {m['round_to']}). " + _checked(m),
        "",
        "| | params | MACs | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for label in ("dense", "pruned"):
        e = m[label]
        lines.append(
            f"| {label} | {e['params']:,} | {e['macs']:,} | {e['latency_ms']['p50']:.3f} | "
            f"{e['latency_ms']['p99']:.3f} |"
        )
    lines += [
        "",
        f"Measured speed-up {speedup:.2f}x (p50, batch 1, {m['threads']} thread(s), "
        f"{m['latency_runs']} runs each, "
        f"interleaved) against an ideal of {ideal:.2f}x from the MACs.",
        "",
        "## Groups",
        "",
        "| group | seed | units | removed | why not pruned |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {g['group']} | `{g['seed']}` | {g['units']} | {g['removed']} | {g['blocked']} |"
        for g in m["groups"]
    ]

    lines[2:2] = structured_verdict(m)
    lines += ["", *structured_layers_section(m)]
    keys = ("model", "ratio", "importance", "round_to", "input_shape", "threads", "latency_runs")
    lines += settings_section({k: m[k] for k in keys if k in m})
    return "\n".join(lines) + "\n"
