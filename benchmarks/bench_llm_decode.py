"""Decode speed of a pruned SmolLM2-135M on this CPU: greedy generation with the KV cache, batch 1, a prompt
of 64 tokens of real text and 128 new tokens, every variant interleaved in one process (docs/measuring.md).

Baselines (the dense model): torch float32, torch bfloat16 (where the CPU has AVX-512 BF16), torch dynamic
INT8 (every nn.Linear, lm_head included), llama.cpp on the packaged Q4_1 GGUF (when llama-cpp-python is
installed), and prunekit's dense batch-1 kernel (the dense model compiled: what the runtime gives without
sparsity). Pruned models (``--pruned NAME=DIR`` from ``prunekit llm prune``; by default magnitude-pruned here
to 2:4, 8x1 blocks at 70% and unstructured 70%), each compiled twice: float32 values (lm_head float32)
and int8 values (weight-only, per-row scales, lm_head int8 too).

Printed per thread count: ms/token (median), tokens/s, the ratios to torch f32, torch INT8 and llama.cpp,
the bytes one token streams (every weight once: the bound of decoding a model larger than the caches), the
tokens/s those bytes allow at the measured bandwidth, and whether the tokens equal the uncompiled pruned
model's (float32: they must).

    python benchmarks/bench_llm_decode.py
    python benchmarks/bench_llm_decode.py --pruned sgpt24=out/sgpt-24 --pruned b8=out/sgpt-b8-70 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from prunekit import runtime
from prunekit.analysis.decode import TorchDecoder, agreement, interleaved
from prunekit.llm.load import load_causal_lm, packaged_smollm2
from prunekit.llm.prune import LLMPruneConfig, prune_llm
from prunekit.llm.text import pydoc_topics_split, tokenize
from prunekit.runtime.coldcache import Flush
from prunekit.runtime.cpu import features
from prunekit.runtime.gemv import GemvLinear
from prunekit.spec import NM, Block, Unstructured

DEFAULT_PRUNED = {
    "2:4": NM(2, 4),
    "block8x1 70%": Block((8, 1), 0.7),
    "unstructured 70%": Unstructured(0.7),
}


def streamed_bytes(model: nn.Module) -> int:
    """Bytes one decode step reads: every Linear's weight in its layout, and one embedding row."""
    total = 0
    for module in model.modules():
        if isinstance(module, GemvLinear):
            total += module.packed.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    embed = model.get_input_embeddings().weight
    return total + embed.shape[1] * embed.element_size()


def measured_bandwidth() -> float:
    """GB/s of a cold dense float32 GEMV on a 64 MiB weight (prunekit's dense kernel, 1 thread)."""
    layer = nn.Linear(4096, 4096, bias=False)
    fast = GemvLinear(layer, "dense")
    flush, x, times = Flush(), torch.randn(1, 4096), []
    with torch.inference_mode():
        fast(x)
        for _ in range(15):
            flush()
            start = time.perf_counter()
            fast(x)
            times.append(time.perf_counter() - start)
    return 4096 * 4096 * 4 / min(times) / 1e9  # the least disturbed call: others share the machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="dense model (default: the packaged SmolLM2 GGUF)")
    ap.add_argument("--pruned", action="append", default=[], help="NAME=DIR of a pruned model (repeatable)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.05, help="compile: timing seconds per layer")
    ap.add_argument("--min-reps", type=int, default=3, help="compile: least timed calls per candidate")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--specs", default=",".join(DEFAULT_PRUNED), help="default pruned models to build")
    ap.add_argument("--values", default="float32,int8", help="compiled value types (comma list)")
    ap.add_argument("--hot", action="store_true", help="compile with cold=False (faster)")
    ap.add_argument("--no-prunekit-dense", action="store_true", help="skip compiling the dense model")
    args = ap.parse_args()

    from prunekit.jobs.llm_bench import LlamaCppDecoder, llama_cpp_available

    dense, tokenizer = load_causal_lm(args.model)
    gguf = args.model if args.model and args.model.endswith(".gguf") else None
    if args.model is None:
        gguf = str(packaged_smollm2())
    prompt = tokenize(tokenizer, pydoc_topics_split()[1])[: args.prompt_tokens].tolist()
    pruned: dict[str, nn.Module] = {}
    for item in args.pruned:
        name, _, path = item.partition("=")
        pruned[name] = load_causal_lm(path)[0]
    if not pruned:
        unknown = set(args.specs.split(",")) - set(DEFAULT_PRUNED)
        if unknown:
            raise SystemExit(f"--specs: unknown {sorted(unknown)}; allowed: {', '.join(DEFAULT_PRUNED)}")
        for name, spec in DEFAULT_PRUNED.items():
            if name not in args.specs.split(","):
                continue
            pruned[name] = copy.deepcopy(dense)
            prune_llm(pruned[name], None, LLMPruneConfig("magnitude", spec))
    f = features()
    bw = measured_bandwidth()
    print(f"CPU: {f.describe()}; torch {torch.__version__}; measured cold read bandwidth {bw:.1f} GB/s")
    print(
        f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, batch 1, greedy, {args.rounds} rounds\n"
    )
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        example = {"input_ids": torch.tensor([prompt[:1]])}
        decoders = {"torch f32 (dense)": TorchDecoder(dense)}
        sizes = {"torch f32 (dense)": streamed_bytes(dense)}
        if f.bf16:
            decoders["torch bf16 (dense)"] = TorchDecoder(copy.deepcopy(dense).to(torch.bfloat16))
            sizes["torch bf16 (dense)"] = sizes["torch f32 (dense)"] // 2
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8)
        decoders["torch int8 (dense)"] = TorchDecoder(q)
        sizes["torch int8 (dense)"] = sizes["torch f32 (dense)"] // 4
        if gguf and llama_cpp_available() and not args.no_llama_cpp:
            decoders["llama.cpp Q4_1 (dense)"] = LlamaCppDecoder(
                gguf, threads, len(prompt) + args.new_tokens + 8
            )
            sizes["llama.cpp Q4_1 (dense)"] = int(sizes["torch f32 (dense)"] * 0.625 / 4)  # 20 bytes / 32
        cold = False if args.hot else None
        if not args.no_prunekit_dense:
            compiled_dense = runtime.compile(
                dense, example, budget_s=args.budget, min_reps=args.min_reps, cold=cold
            )
            decoders["prunekit dense f32 (dense)"] = TorchDecoder(compiled_dense)
            sizes["prunekit dense f32 (dense)"] = streamed_bytes(compiled_dense)
        reference: dict[str, list[int]] = {}
        for name, model in pruned.items():
            reference[name] = TorchDecoder(model).decode(prompt, args.new_tokens)[0]
            for values in args.values.split(","):
                start = time.perf_counter()
                compiled = runtime.compile(
                    model, example, values=values, budget_s=args.budget, min_reps=args.min_reps, cold=cold
                )
                seconds = time.perf_counter() - start
                chosen: dict[str, int] = {}
                for d in runtime.report(compiled).layers:
                    chosen[d.chosen] = chosen.get(d.chosen, 0) + 1
                label = f"{name} {'f32' if values == 'float32' else 'int8'}"
                print(f"compiled {label} in {seconds:.0f} s ({threads} thread(s)): {chosen}")
                decoders[label] = TorchDecoder(compiled)
                sizes[label] = streamed_bytes(compiled)
        results = interleaved(decoders, prompt, args.new_tokens, args.rounds)
        base = results["torch f32 (dense)"]["ms_per_token"]
        int8 = results["torch int8 (dense)"]["ms_per_token"]
        cpp = results.get("llama.cpp Q4_1 (dense)", {}).get("ms_per_token")
        print(f"\n### {threads} thread(s)")
        print(
            "| variant | ms/token | tokens/s | vs torch f32 | vs torch int8 | vs llama.cpp | MB/token | "
            "bound tokens/s | tokens |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for label, r in results.items():
            ms = r["ms_per_token"]
            model_name = next((n for n in pruned if label.startswith(n + " ")), None)
            if model_name is not None:
                a = agreement(r["tokens"], reference[model_name])
                same = "identical" if a["identical"] else f"first {a['common_prefix']} equal"
            else:
                same = "-"
            mb = sizes[label] / 1e6
            vs_cpp = f"{cpp / ms:.2f}x" if cpp else "-"
            print(
                f"| {label} | {ms:.2f} | {1e3 / ms:.1f} | {base / ms:.2f}x | {int8 / ms:.2f}x | {vs_cpp} | "
                f"{mb:.0f} | {bw * 1e3 / mb:.0f} | {same} |"
            )
        print()


if __name__ == "__main__":
    main()
