"""Size on disk of the compressed format against the float32 dense safetensors file of the same model.

Issue 5's target: a 90%-sparse model with int8 values at least 15x smaller on disk than its float32 dense
file. The model is BERT-base's encoder weight shapes (12 layers of 4x 768x768 attention projections and
768x3072 / 3072x768 FFN matrices, plus their biases and LayerNorms, which stay dense), seeded random
weights; each weight matrix has exactly the stated fraction of its entries zeroed (smallest magnitudes).
Both files are written in the same run; sizes are exact byte counts (no timing, so no noise).

The bound for unstructured sparsity s with a bitmask and b-bit values is 32 / (1 + (1 - s) * b) per weight
(17.8x at s = 0.9, b = 8): the mask costs one bit per weight whatever the sparsity. Biases, norms, scales
and the file headers come on top and are shown.

    python benchmarks/bench_format.py                   # sparsities 0.5 0.7 0.9 0.95, every value dtype
    python benchmarks/bench_format.py --layers 2        # quicker
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from prunekit.compress import save_compressed
from prunekit.compress.inspect import inspect_compressed


def bert_like(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.q", "attention.k", "attention.v", "attention.o"):
            state[p + name + ".weight"] = torch.randn(768, 768, generator=g) * 0.02
            state[p + name + ".bias"] = torch.randn(768, generator=g) * 0.02
        state[p + "ffn.up.weight"] = torch.randn(3072, 768, generator=g) * 0.02
        state[p + "ffn.up.bias"] = torch.randn(3072, generator=g) * 0.02
        state[p + "ffn.down.weight"] = torch.randn(768, 3072, generator=g) * 0.02
        state[p + "ffn.down.bias"] = torch.randn(768, generator=g) * 0.02
        for ln in ("ln1", "ln2"):
            state[p + ln + ".weight"] = torch.ones(768)
            state[p + ln + ".bias"] = torch.zeros(768)
    return state


def sparsify(state: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in state.items():
        if w.dim() == 2:
            k = round(sparsity * w.numel())
            drop = w.abs().reshape(-1).argsort(stable=True)[:k]
            w = w.clone().reshape(-1).index_fill_(0, drop, 0.0).reshape(w.shape)
        out[name] = w
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    args = parser.parse_args()
    dense = bert_like(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.safetensors"
        save_file(dense, str(dense_path))
        base = dense_path.stat().st_size
        print(f"BERT-base-shaped weights, {args.layers} layers: float32 dense file {base:,} bytes")
        print(
            f"{'sparsity':>8} {'values':>8} {'file bytes':>12} {'ratio':>7} {'bound':>7} {'of bound':>8} "
            f"{'index B':>11} {'scales B':>9} {'dense parts B':>13} {'encodings':<24}"
        )
        for s in args.sparsities:
            sparse = sparsify(dense, s)
            for dtype, bits in (("float32", 32), ("float16", 16), ("int8", 8)):
                path = Path(tmp) / f"c_{s}_{dtype}.safetensors"
                save_compressed(sparse, path, value_dtype=dtype)
                rows, totals = inspect_compressed(path)
                size = totals["file_bytes"]
                bound = 32 / (1 + (1 - s) * bits)  # weights only, bitmask
                kinds = sorted({r["encoding"] for r in rows if len(r["shape"]) == 2})
                small = sum(r["bytes"] for r in rows if len(r["shape"]) == 1)
                print(
                    f"{s:>8.2f} {dtype:>8} {size:>12,} {base / size:>6.2f}x {bound:>6.2f}x "
                    f"{base / size / bound:>7.1%} {totals['index_bytes']:>11,} {totals['scale_bytes']:>9,} "
                    f"{small:>13,} {','.join(kinds):<24}"
                )


if __name__ == "__main__":
    main()
