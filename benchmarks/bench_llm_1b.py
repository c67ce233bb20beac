"""Scale check: Wanda and SparseGPT end to end on a ~1.1 B-parameter Llama-style model on this machine.

The model is built from a config with seeded random weights (TinyLlama's shape: hidden 2048, FFN 5632,
22 layers, 32 heads with 4 KV heads, vocabulary 32000; float32, 4.4 GB), so nothing is downloaded. The
calibration windows are random token ids: the point is time and memory, not quality. Each method runs in
its own process, which builds the model and prunes it at 50% unstructured; reported: build and prune
seconds, peak RSS of the process and peak RSS sampled while pruning, and the model's own size.

    python benchmarks/bench_llm_1b.py                           # 8 windows x 512 tokens, about 15 minutes
    python benchmarks/bench_llm_1b.py --calib-samples 2 --seqlen 128 --layers 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(method: str, samples: int, seqlen: int, layers: int, threads: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit.analysis.memory import RssSampler, peak_rss_mb
    from prunekit.llm import LLMPruneConfig, prune_llm
    from prunekit.spec import Unstructured

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    build = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    rss_built = peak_rss_mb()
    calib = torch.randint(0, config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    begin = time.perf_counter()
    with RssSampler() as sampler:
        prune_llm(model, calib, LLMPruneConfig(method, Unstructured(0.5)))
    row = {
        "method": method,
        "params": params,
        "model_mb": params * 4 / 2**20,
        "build_seconds": build,
        "prune_seconds": time.perf_counter() - begin,
        "peak_rss_after_build_mb": rss_built,
        "peak_rss_while_pruning_mb": sampler.peak_mb,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calib_samples, args.seqlen, args.layers, args.threads)
        return
    print(
        f"Llama-style {args.layers} layers, {args.calib_samples} x {args.seqlen} tokens, "
        f"{args.threads} threads"
    )
    for method in args.methods:
        cmd = [
            sys.executable, __file__, "--child", method, "--calib-samples", str(args.calib_samples),
            "--seqlen", str(args.seqlen), "--layers", str(args.layers), "--threads", str(args.threads),
        ]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{r['method']:<10} {r['params'] / 1e9:.2f} B params ({r['model_mb']:.0f} MB)  "
            f"build {r['build_seconds']:.0f} s  prune {r['prune_seconds']:.0f} s  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (after build {r['peak_rss_after_build_mb']:.0f}, "
            f"while pruning {r['peak_rss_while_pruning_mb']:.0f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
