"""2:4 on NVIDIA sparse tensor cores against dense, on a CUDA GPU: layers and decode.

Layers: torch ``F.linear`` with a dense fp16/bf16 weight against the same 2:4 weight as a
``SparseSemiStructuredTensor`` (``prunekit.runtime.cuda.SemiStructuredLinear``), for the issue's
768x3072 / 3072x768 and SmolLM2-135M's shapes, at batch (tokens) 1, 16 and 512, CUDA-synchronised, medians
of interleaved runs. Decode: a Llama with SmolLM2-135M's shapes (random weights, no download; or
``--model`` a local directory / GGUF), every decoder Linear 2:4 (magnitude), greedy decoding at batch 1
with the KV cache: dense fp16 against ``prunekit.runtime.compile(device="cuda")`` (which keeps the 2:4
layers semi-structured only where measured faster) and against every 2:4 layer forced semi-structured.

Without CUDA it prints why and exits 0, so it can stand in any benchmark run.

    python benchmarks/bench_llm_gpu.py [--dtype float16] [--new-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time

import torch
from torch import nn


def two_four(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4).clone()
    g.scatter_(1, g.abs().argsort(dim=1)[:, :2], 0.0)
    return g.reshape(w.shape)


def timed(fns: dict, rounds: int = 30, inner: int = 10) -> dict[str, float]:
    """Median microseconds per call, interleaved, synchronised."""
    for f in fns.values():
        f()
    torch.cuda.synchronize()
    samples = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            torch.cuda.synchronize()
            samples[n].append((time.perf_counter() - t0) / inner * 1e6)
    return {n: statistics.median(s) for n, s in samples.items()}


def layers(dtype: torch.dtype) -> None:
    from prunekit.runtime.cuda import SemiStructuredLinear, semi_structured_reason

    shapes = {
        "768->3072": (768, 3072),
        "3072->768": (3072, 768),
        "576->1536": (576, 1536),
        "1536->576": (1536, 576),
        "576->576": (576, 576),
        "576->192": (576, 192),
    }
    print(f"\n### layers, {dtype}: dense F.linear vs 2:4 semi-structured (us, median)")
    print("| shape in->out | tokens | dense us | 2:4 us | speed-up | note |")
    print("|---|---|---|---|---|---|")
    for label, (inn, out) in shapes.items():
        lin = nn.Linear(inn, out, bias=False).to("cuda", dtype)
        with torch.no_grad():
            lin.weight.copy_(two_four(lin.weight.float()).to(dtype))
        reason = semi_structured_reason(lin.weight, capability=torch.cuda.get_device_capability())
        for tokens in (1, 16, 512):
            x = torch.randn(tokens, inn, device="cuda", dtype=dtype)
            if reason is not None:
                print(f"| {label} | {tokens} | - | - | - | {reason} |")
                continue
            sparse = SemiStructuredLinear(lin)
            with torch.inference_mode():
                us = timed({"dense": lambda lin=lin, x=x: lin(x), "2:4": lambda s=sparse, x=x: s(x)})
                err = (sparse(x) - lin(x)).abs().max().item() / max(lin(x).abs().max().item(), 1e-30)
            ratio = us["dense"] / us["2:4"]
            print(
                f"| {label} | {tokens} | {us['dense']:.1f} | {us['2:4']:.1f} | {ratio:.2f}x "
                f"| rel. err {err:.1e} |"
            )


def smol(dtype: torch.dtype, model_path: str | None):
    if model_path:
        from prunekit.llm.load import load_causal_lm

        return load_causal_lm(model_path)[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def decode(dtype: torch.dtype, new_tokens: int, model_path: str | None) -> None:
    from prunekit import runtime
    from prunekit.analysis.decode import TorchDecoder
    from prunekit.runtime.cuda import SemiStructuredLinear, semi_structured_reason

    model = smol(dtype, model_path).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                m.weight.copy_(two_four(m.weight.float()))
    model = model.to("cuda", dtype)
    prompt = torch.randint(0, model.config.vocab_size, (64,)).tolist()
    compiled = runtime.compile(model, {"input_ids": torch.tensor([prompt[:1]])}, device="cuda")
    chosen = [d.chosen for d in runtime.report(compiled).layers]
    forced = runtime.compile(model, {"input_ids": torch.tensor([prompt[:1]])}, device="cuda", margin=0.0)
    for name, m in list(forced.named_modules()):
        if isinstance(m, nn.Linear) and semi_structured_reason(m.weight, capability=(8, 0)) is None:
            parent, _, child = name.rpartition(".")
            setattr(forced.get_submodule(parent), child, SemiStructuredLinear(m))

    class Cuda(TorchDecoder):
        def decode(self, prompt, n):
            ids = torch.tensor([prompt], device="cuda")
            key = (
                "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            )
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True)
                past, tok, times = out[key], out.logits[:, -1:].argmax(-1), []
                for _ in range(n - 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = self.model(input_ids=tok, use_cache=True, **{key: past})
                    past, tok = out[key], out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            return [], times

    variants = {
        "dense": Cuda(model),
        "compiled (2:4 where faster)": Cuda(compiled),
        "all 2:4 forced": Cuda(forced),
    }
    samples = {n: [] for n in variants}
    for d in variants.values():
        d.decode(prompt, 4)
    for _ in range(3):
        for n, d in variants.items():
            samples[n] += d.decode(prompt, new_tokens)[1]
    base = statistics.median(samples["dense"])
    print(
        f"\n### decode, {dtype}, batch 1, {new_tokens} tokens x 3 rounds "
        f"(compile chose 2:4 for {sum(c == '2:4-sparse' for c in chosen)} of {len(chosen)} layers)"
    )
    print("| variant | ms/token | tokens/s | vs dense |")
    print("|---|---|---|---|")
    for n, s in samples.items():
        ms = statistics.median(s) * 1e3
        print(f"| {n} | {ms:.2f} | {1e3 / ms:.1f} | {base * 1e3 / ms:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_llm_gpu: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to run"
        )
        return 0
    cap = torch.cuda.get_device_capability()
    print(f"GPU: {torch.cuda.get_device_name()} (compute {cap[0]}.{cap[1]}), torch {torch.__version__}")
    if cap < (8, 0):
        print("no sparse tensor cores before compute 8.0 (Ampere): nothing to compare")
        return 0
    dtype = getattr(torch, args.dtype)
    layers(dtype)
    decode(dtype, args.new_tokens, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
