"""Scale: Wanda and SparseGPT streamed from disk on a Llama-3.2-3B-shaped (or 8B-shaped) bfloat16 checkpoint.

Issue 17's memory and time benchmark. The model is built from Llama-3.2-3B's config (hidden 3072, FFN 8192,
28 layers, 24 heads with 8 KV heads, vocabulary 128256, tied embeddings; ``--shape 8b``: Llama-3.1-8B's,
hidden 4096, FFN 14336, 32 layers, untied) with seeded random weights (normal, std 0.02; norms 1), written
as bfloat16 safetensors one block per shard -- never held whole in memory -- with a small byte-level BPE
tokenizer trained on the calibration text (so ``prunekit llm prune`` runs on it as on any checkpoint).
Random weights: the point is memory and time, not quality.

Each method runs ``prunekit llm prune --no-eval`` in its own process (its peak RSS is its own), at 50%
unstructured with ``--calib-samples`` windows of ``--seqlen`` tokens; the job times one dense forward pass
over the same calibration tokens block by block in the same run, interleaved with the pruning (the
baseline of the ratio). Then a fresh process loads the output with plain
``AutoModelForCausalLM.from_pretrained`` and checks its dtype and that exactly half of every row of a few
layers is zero.

    python benchmarks/bench_llm_scale.py                         # 3B, 16 x 512 tokens: about 1.5 h on 2 cores
    python benchmarks/bench_llm_scale.py --layers 2 --calib-samples 2 --seqlen 64   # smoke run, 2 minutes
    python benchmarks/bench_llm_scale.py --shape 8b --methods wanda                  # 16 GB on disk

Targets (issue 17): peak RSS <= 2.5 GB at 3B (<= 5 GB at 8B); the output loads with from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
TARGET_RSS_MB = {"3b": 2.5 * 1024, "8b": 5 * 1024}
REPORTED = (
    "peak_rss_mb",
    "peak_gpu_mb",
    "prune_seconds",
    "dense_forward_seconds",
    "prune_over_forward",
    "prune_over_blocks_forward",
    "sparsity_pruned_layers",
)


def _tokenizer(directory: Path) -> None:
    """A 1000-token byte-level BPE trained on the calibration text (ids far below the vocabulary)."""
    import tokenizers
    import transformers

    from prunekit.llm.text import pydoc_topics_split

    calib, _ = pydoc_topics_split()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([calib], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(directory))


def _random(shape: tuple[int, ...], generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """bfloat16 normal values, drawn 16M at a time in float32 (no full-size float32 copy)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        part.copy_(torch.randn(part.numel(), generator=generator) * std)
    return out


def build(directory: Path, shape: str, layers: int | None) -> float:
    """Write the random checkpoint, one shard per block; returns seconds taken."""
    import transformers

    from prunekit.llm.checkpoint import ShardWriter
    from prunekit.llm.stream import skeleton

    begin = time.perf_counter()
    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(
        **fields,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config.save_pretrained(str(partial))
    model = skeleton(partial, torch.bfloat16)  # names and shapes only: every parameter on meta
    count = config.num_hidden_layers
    writer = ShardWriter(partial, count + 1)
    generator = torch.Generator().manual_seed(0)
    groups: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, param in model.named_parameters():  # tied parameters once
        index = int(name.split(".")[2]) if name.startswith("model.layers.") else count
        groups.setdefault(index, {})[name] = tuple(param.shape)
    for index in range(count + 1):
        tensors = {
            name: torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else _random(s, generator)
            for name, s in groups[index].items()
        }
        writer.write(index, tensors)
        del tensors
    writer.write_index()
    _tokenizer(partial)
    os.replace(partial, directory)
    return time.perf_counter() - begin


def prune(model: Path, method: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "prunekit", "llm", "prune", "--model", str(model), "--method", method,
        "--sparsity", "0.5", "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
        "--threads", str(args.threads), "--no-eval", "--quiet", "--out", str(out), "--device", args.device,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def check_loads(out: Path) -> dict:
    """In a fresh process: plain from_pretrained, its dtype, whether three layers are exactly half zero, and
    whether every row of them is (Wanda compares per output row; SparseGPT per layer and column block)."""
    code = (
        "import json, sys, torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "ls = m.model.layers\n"
        "picked = [ls[0].self_attn.q_proj, ls[len(ls) // 2].mlp.down_proj, ls[-1].mlp.up_proj]\n"
        "half = all(int((w.weight == 0).sum()) * 2 == w.weight.numel() for w in picked)\n"
        "rows = all(bool(((w.weight == 0).sum(1) == w.weight.shape[1] // 2).all()) for w in picked)\n"
        "print(json.dumps({'dtype': str(m.dtype), 'half_zero': half, 'half_of_each_row_zero': rows}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", type=Path, default=Path("bench-llm-scale"), help="where the models go")
    parser.add_argument("--keep", action="store_true", help="keep the pruned outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    from prunekit.runtime.cpu import features

    print(f"CPU: {features().describe()}; {args.threads} threads; device {args.device}")
    name = f"llama-{args.shape}" + (f"-{args.layers}l" if args.layers else "")
    model = args.dir / name
    if not (model / "model.safetensors.index.json").is_file():
        seconds = build(model, args.shape, args.layers)
        print(f"wrote {model} in {seconds:.0f} s")
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    tokens = f"{args.calib_samples} x {args.seqlen} calibration tokens"
    print(f"{name}: bfloat16, {size / 1e9:.2f} GB on disk; {tokens}")
    rows = []
    for method in args.methods:
        out = args.dir / f"{name}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        m = prune(model, method, out, args)
        loaded = check_loads(out)
        row = {
            "model": name,
            "method": method,
            "dtype": m["dtype"],
            "disk_gb": size / 1e9,
            "out_disk_gb": m["size"]["file_bytes"] / 1e9,
            "peak_rss_mb": m["peak_rss_mb"],
            "prune_seconds": m["prune_seconds"],
            "dense_forward_seconds": m["dense_forward_seconds"],
            "prune_over_forward": m["prune_over_forward"],
            "prune_over_blocks_forward": m["prune_over_blocks_forward"],
            "sparsity": m["sparsity_pruned_layers"],
            "loaded_dtype": loaded["dtype"],
            "half_zero": loaded["half_zero"],
            "half_of_each_row_zero": loaded["half_of_each_row_zero"],
        }
        rows.append(row)
        target = TARGET_RSS_MB[args.shape]
        print(
            f"{method:<10} peak RSS {row['peak_rss_mb']:6.0f} MB (target <= {target:.0f}: "
            f"{'met' if row['peak_rss_mb'] <= target else 'MISSED'})  prune {row['prune_seconds']:7.0f} s  "
            f"dense forward {row['dense_forward_seconds']:6.0f} s  ratio {row['prune_over_forward']:.2f}x "
            f"(blocks only {row['prune_over_blocks_forward']:.2f}x)  sparsity {row['sparsity']:.4f}  "
            f"from_pretrained: {row['loaded_dtype']}, three layers half zero: {row['half_zero']} "
            f"(every row: {row['half_of_each_row_zero']})",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
