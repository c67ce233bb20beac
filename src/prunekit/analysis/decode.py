"""Generation speed of causal language models: greedy decoding with the KV cache at batch 1, each token
timed, several models interleaved so that a busy machine slows them alike (docs/measuring.md).

A *decoder* is anything with ``decode(prompt_ids, new_tokens) -> (tokens, seconds per generated token)``:
:class:`TorchDecoder` wraps a Hugging Face model (any ``nn.Module`` taking ``input_ids``, ``past_key_values``
and ``use_cache``), and other engines (llama.cpp in :mod:`prunekit.jobs.llm_bench`) supply their own.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class Decoder(Protocol):
    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]: ...


@dataclass
class TorchDecoder:
    """Greedy decoding of a Hugging Face causal LM: one prompt step, then one token per step with the cache
    (the prompt step is not timed)."""

    model: nn.Module

    @torch.inference_mode()
    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        # transformers 5 names the KV cache ``cache``; earlier versions ``past_key_values``
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        ids = torch.tensor([prompt], dtype=torch.long)
        out = self.model(input_ids=ids, use_cache=True)
        past, tokens, times = out[key], [], []
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = self.model(input_ids=token, use_cache=True, **{key: past})
            past = out[key]
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
            tokens.append(int(token))
        return tokens, times


def interleaved(
    decoders: Mapping[str, Decoder], prompt: list[int], new_tokens: int, rounds: int = 3
) -> dict[str, dict[str, Any]]:
    """Decode with every decoder ``rounds`` times, the order rotating each round (after one untimed warm-up
    generation each); per decoder the median milliseconds per token over all rounds, tokens/s, and the tokens
    of the first round."""
    names = list(decoders)
    tokens: dict[str, list[int]] = {}
    for name in names:  # warm-up: JIT compilation, allocator, caches
        tokens[name] = decoders[name].decode(prompt, new_tokens)[0]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name] += decoders[name].decode(prompt, new_tokens)[1]
    out = {}
    for name in names:
        ms = statistics.median(samples[name]) * 1e3 if samples[name] else float("nan")
        out[name] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "tokens": tokens[name]}
    return out


def agreement(tokens: list[int], reference: list[int]) -> dict[str, Any]:
    """How far two greedy generations agree: identical, the length of the common prefix, equal positions."""
    prefix = next(
        (i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference))
    )
    same = sum(a == b for a, b in zip(tokens, reference))
    return {"identical": tokens == reference, "common_prefix": prefix, "same_positions": same}
