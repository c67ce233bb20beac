"""The layer table of the batch-1 (decode) kernels: one Linear layer, one activation vector, one thread.

For each shape (the issue's 768->3072 and 3072->768; ``--smol`` adds SmolLM2-135M's layer shapes) and
sparsity, every layout runs interleaved with the baselines measured in the same run (docs/measuring.md):

    torch f32       F.linear(x (1, in), W): what an unpruned model runs
    torch bf16      the same in bfloat16 (where the CPU has AVX-512 BF16)
    torch int8      torch dynamic INT8 (quantized Linear, per-tensor activation scale)
    numba dense     prunekit's dense batch-1 kernel (gemv:dense): a dense GEMV at the machine's bandwidth
    csr rows        prunekit's earlier batch-1 sparse kernel (SparseLinear "rows")
    block8 / block4 / block16, nm2:4, csr4   the layouts of prunekit.runtime.gemv, in f32 / bf16 / int8
    block8 q8       int8 weights x int8 activations, exact int32 sums (VNNI where the CPU has it)

"hot": the same weight every call (it stays in L2/L3). "cold": the caches are flushed before every call
(a buffer twice the L3 read), so each call streams its weight from DRAM, as decoding a model larger than
the L3 does. Printed: microseconds (median), speed-up against torch f32 / numba dense / torch int8, bytes
per weight streamed, the GB/s that makes, and the bound of each layout: with the cold dense f32 GEMV at
the measured bandwidth, no layout streaming b bytes per weight can be more than 4/b times faster.

    python benchmarks/bench_llm_layers.py                  # both shapes, hot and cold, AVX-512 if present
    python benchmarks/bench_llm_layers.py --avx2           # the AVX2 paths (numba for Haswell, torch AVX2)
    python benchmarks/bench_llm_layers.py --smol --modes cold --rounds 9
"""

from __future__ import annotations

import argparse
import os
import sys

AVX2_ENV = {
    "PRUNEKIT_CPU_FEATURES": "avx2,fma",
    "NUMBA_CPU_NAME": "haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def _reexec_for_avx2() -> None:
    """numba and torch read their target at import: set it, then start this script again."""
    if all(os.environ.get(k) == v for k, v in AVX2_ENV.items()):
        return
    os.environ.update(AVX2_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


if "--avx2" in sys.argv:
    _reexec_for_avx2()

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from prunekit.runtime.coldcache import Flush  # noqa: E402
from prunekit.runtime.cpu import features  # noqa: E402
from prunekit.runtime.gemv import GemvLinear  # noqa: E402
from prunekit.runtime.layers import SparseLinear  # noqa: E402

ISSUE_SHAPES = {"768->3072": (768, 3072), "3072->768": (3072, 768)}
SMOL_SHAPES = {
    "576->576 (q,o)": (576, 576),
    "576->192 (k,v)": (576, 192),
    "576->1536 (gate,up)": (576, 1536),
    "1536->576 (down)": (1536, 576),
    "576->49152 (lm_head)": (576, 49152),
}


def weights(inn: int, out: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g) / inn**0.5


def block_pruned(w: torch.Tensor, rows: int, sparsity: float) -> torch.Tensor:
    """Keep the (1 - s) rows x 1 blocks of largest L2 norm."""
    out, inn = w.shape
    norms = w.reshape(out // rows, rows, inn).pow(2).sum(1)
    k = int(round(norms.numel() * (1 - sparsity)))
    keep = torch.zeros(norms.numel(), dtype=torch.bool)
    keep[norms.flatten().topk(k).indices] = True
    return w * keep.reshape(out // rows, inn).repeat_interleave(rows, 0)


def unstructured(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(w.numel() * sparsity))
    cut = w.abs().flatten().kthvalue(k).values if k else -1.0
    return w * (w.abs() > cut)


def two_four(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4).clone()
    g.scatter_(1, g.abs().argsort(dim=1)[:, :2], 0.0)
    return g.reshape(w.shape)


def linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data.copy_(w)
    return layer


def candidates(w_dense: torch.Tensor, sparsity: float, with_bf16: bool) -> dict:
    """name -> (callable(x), bytes per weight, family); the dense baselines on the unpruned weight."""
    dense = linear(w_dense)
    out: dict = {}
    out["torch f32"] = (dense, 4.0, "base")
    if with_bf16:
        out["torch bf16"] = (linear(w_dense).to(torch.bfloat16), 2.0, "base-bf16")
    out["torch int8"] = (
        torch.ao.quantization.quantize_dynamic(nn.Sequential(linear(w_dense)), {nn.Linear}),
        1.0,
        "base",
    )
    out["numba dense f32"] = (GemvLinear(dense, "dense"), 4.0, "base")
    blocky = linear(block_pruned(w_dense, 8, sparsity))
    for values in ("float32", "bfloat16", "int8"):
        g = GemvLinear(blocky, "block8", values)
        out[f"block8 {values}"] = (g, g.packed.bytes_per_weight, "sparse")
    q8 = GemvLinear(blocky, "block8", "int8", "int8")
    out["block8 int8 q8" + (" vnni" if q8.packed.layout == "block-vnni" else "")] = (
        q8,
        q8.packed.bytes_per_weight,
        "sparse",
    )
    for rows in (4, 16):
        g = GemvLinear(linear(block_pruned(w_dense, rows, sparsity)), f"block{rows}")
        out[f"block{rows} float32"] = (g, g.packed.bytes_per_weight, "sparse")
    loose = linear(unstructured(w_dense, sparsity))
    for values in ("float32", "int8"):
        g = GemvLinear(loose, "csr4", values)
        out[f"csr4 {values}"] = (g, g.packed.bytes_per_weight, "sparse")
    rows_kernel = SparseLinear(loose, "rows")
    out["csr rows (earlier kernel)"] = (rows_kernel, (rows_kernel.sparse.nbytes) / w_dense.numel(), "sparse")
    return out


def head_candidates(w_dense: torch.Tensor, with_bf16: bool) -> dict:
    """The (unpruned) lm_head: the dense baselines and prunekit's dense kernel in each value type."""
    dense = linear(w_dense)
    out = {"torch f32": (dense, 4.0, "base")}
    if with_bf16:
        out["torch bf16"] = (linear(w_dense).to(torch.bfloat16), 2.0, "base-bf16")
    out["torch int8"] = (
        torch.ao.quantization.quantize_dynamic(nn.Sequential(linear(w_dense)), {nn.Linear}),
        1.0,
        "base",
    )
    for values in ("float32", "bfloat16", "int8"):
        g = GemvLinear(dense, "dense", values)
        out["numba dense f32" if values == "float32" else f"numba dense {values}"] = (
            g,
            g.packed.bytes_per_weight,
            "base",
        )
    return out


def nm_candidates(w_dense: torch.Tensor) -> dict:
    nm = linear(two_four(w_dense))
    out = {}
    for values in ("float32", "bfloat16", "int8"):
        g = GemvLinear(nm, "nm2:4", values)
        out[f"2:4 {values}"] = (g, g.packed.bytes_per_weight, "sparse")
    return out


def time_all(fns: dict, x: torch.Tensor, rounds: int, cold: bool, flush: Flush) -> dict[str, float]:
    """Median microseconds per call; every round calls each layer ``inner`` times in a rotating order."""
    names = list(fns)
    calls = {
        n: (lambda m=fns[n][0], xx=(x.to(torch.bfloat16) if fns[n][2] == "base-bf16" else x): m(xx))
        for n in names
    }
    with torch.inference_mode():
        for n in names:
            calls[n]()
            calls[n]()
        samples = {n: [] for n in names}
        inner = 3 if cold else 20
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                for _ in range(inner):
                    if cold:
                        flush()
                    t0 = time.perf_counter_ns()
                    calls[n]()
                    samples[n].append((time.perf_counter_ns() - t0) / 1e3)
    return {n: statistics.median(s) for n, s in samples.items()}


def bandwidth(flush: Flush) -> float:
    """GB/s of the cold dense numba GEMV on a 64 MiB weight (the DRAM read rate a kernel reaches)."""
    w = weights(4096, 4096)
    g = GemvLinear(linear(w), "dense")
    x = torch.randn(1, 4096)
    best = []
    with torch.inference_mode():
        g(x)
        for _ in range(15):
            flush()
            t0 = time.perf_counter()
            g(x)
            best.append(time.perf_counter() - t0)
    return w.numel() * 4 / min(best) / 1e9  # the least disturbed call: others share the machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avx2", action="store_true", help="the AVX2 paths (re-executes with their targets)")
    ap.add_argument("--smol", action="store_true", help="also SmolLM2-135M's layer shapes (cold, 70%%)")
    ap.add_argument("--sparsities", default="0.7,0.9")
    ap.add_argument("--modes", default="hot,cold")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    f = features()
    print(
        f"CPU: {f.describe()}; torch {torch.__version__}, 1 thread"
        + (" (AVX2 paths forced)" if args.avx2 else "")
    )
    flush = Flush()
    bw = bandwidth(flush)
    print(f"measured cold read bandwidth (dense numba GEMV, 64 MiB weight): {bw:.1f} GB/s\n")
    shapes = dict(ISSUE_SHAPES)
    if args.smol:
        shapes.update(SMOL_SHAPES)
    with_bf16 = f.bf16
    for label, (inn, out) in shapes.items():
        w = weights(inn, out)
        x = torch.randn(1, inn)
        sparsities = [float(s) for s in args.sparsities.split(",")] if label in ISSUE_SHAPES else [0.7]
        for mode in args.modes.split(","):
            cold = mode == "cold"
            nm_done = False
            for s in sparsities:
                fns = head_candidates(w, with_bf16) if "lm_head" in label else candidates(w, s, with_bf16)
                if not nm_done and "lm_head" not in label:
                    fns.update(nm_candidates(w))
                    nm_done = True
                us = time_all(fns, x, args.rounds, cold, flush)
                base, numba_dense, int8 = us["torch f32"], us["numba dense f32"], us["torch int8"]
                print(f"### {label}, {mode}, {s:.0%} (2:4 rows: 50%)")
                print(
                    "| layer | us | vs torch f32 | vs numba dense | vs torch int8 | bytes/weight | GB/s "
                    "| bound vs numba dense (4/b) |"
                )
                print("|---|---|---|---|---|---|---|---|")
                for name, (_, bpw, _) in fns.items():
                    gbs = bpw * inn * out / us[name] / 1e3
                    t = us[name]
                    print(
                        f"| {name} | {t:.1f} | {base / t:.2f}x | {numba_dense / t:.2f}x | {int8 / t:.2f}x "
                        f"| {bpw:.3f} | {gbs:.1f} | {4 / bpw:.2f}x |"
                    )
                print()


if __name__ == "__main__":
    main()
