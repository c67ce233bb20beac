"""prunekit.runtime on this CPU: sparse float32 and int8 Linear layers against dense float32 (torch F.linear)
and torch's dynamic INT8, all measured in the same run, interleaved, ratio of medians.

    python benchmarks/bench_runtime.py              # 1 and 2 threads, full table (a few minutes)
    python benchmarks/bench_runtime.py --quick      # fewer repetitions

Each row prints the speedup of the best sparse kernel, its bounds (1/(1-s) FLOPs; bytes: dense streams 4 B
per weight, sparse streams value + index per nonzero), what ``prunekit.runtime.compile`` chose for that
layer and input, and the speedup of the compiled layer (dense when no sparse kernel was measured faster).
Losing cases are printed too. Timing on a shared machine is noisy: only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import warnings

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's pool size; threads are set per table below
    os.environ.setdefault(var, "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import prunekit.runtime as rt  # noqa: E402
from prunekit.quant.layers import QuantizedLinear  # noqa: E402
from prunekit.runtime.compiler import _candidates  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (4096, 4096)]  # (out, in)


def interleaved(fns: dict, x: torch.Tensor, budget_s: float, min_reps: int = 15, max_reps: int = 400) -> dict:
    """Median microseconds of each ``fn(x)``, interleaved (each round in a shuffled order) after a warm-up."""
    with torch.inference_mode():
        for fn in fns.values():
            fn(x), fn(x)
        t0 = time.perf_counter()
        for fn in fns.values():
            fn(x)
        reps = int(min(max_reps, max(min_reps, budget_s / max(time.perf_counter() - t0, 1e-9))))
        samples = {name: [] for name in fns}
        order, rng = list(fns), random.Random(0)
        for _ in range(reps):
            rng.shuffle(order)  # a fixed order would hand whoever runs second the first one's warm caches
            for name in order:
                t = time.perf_counter_ns()
                fns[name](x)
                samples[name].append((time.perf_counter_ns() - t) / 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def table_line(cols: list[tuple[str, int, str]], values: dict | None = None) -> str:
    """One fixed-width line: the headers when ``values`` is None."""
    if values is None:
        return " ".join(f"{h:>{w}}" for h, w, _ in cols)
    return " ".join(f"{format(values[h], f):>{w}}" for h, w, f in cols)


def pruned_linear(out: int, inn: int, sparsity: float, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inn, out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, inn, generator=g) * 0.02)
        layer.weight[torch.rand(out, inn, generator=g) < sparsity] = 0
    return layer


def bytes_ratio(layer: nn.Module) -> float:
    """Dense float32 weight bytes over the sparse value + index bytes actually stored."""
    return (layer.out_features * layer.in_features * 4) / max(1, layer.sparse.nbytes)


def best_sparse(module: nn.Module, x: torch.Tensor, decision) -> tuple[str, nn.Module]:
    """The fastest sparse candidate of compile's measurement (even when it lost to dense)."""
    sparse = {k: v for k, v in decision.candidates.items() if k != "int8-gemm"}
    label = min(sparse, key=sparse.get)
    return label, _candidates(module, x)[0][label]()


FLOAT_COLS = [
    ("thr", 3, "d"),
    ("weight", 9, "s"),
    ("sparsity", 8, ".0%"),
    ("batch", 5, "d"),
    ("dense us", 9, ".1f"),
    ("sparse us", 9, ".1f"),
    ("kernel", 8, "s"),
    ("speedup", 8, ".2f"),
    ("flops bnd", 9, ".1f"),
    ("bytes bnd", 9, ".1f"),
    ("compile", 9, "s"),
    ("compiled", 8, ".2f"),
    ("note", 13, "s"),
]
INT8_COLS = [
    ("thr", 3, "d"),
    ("weight", 9, "s"),
    ("sparsity", 8, ".0%"),
    ("batch", 5, "d"),
    ("dense us", 9, ".1f"),
    ("t-int8 us", 9, ".1f"),
    ("sparse us", 9, ".1f"),
    ("kernel", 8, "s"),
    ("vs f32", 7, ".2f"),
    ("vs t-int8", 9, ".2f"),
    ("flops bnd", 9, ".1f"),
    ("bytes bnd", 9, ".1f"),
    ("compile", 9, "s"),
    ("compiled", 8, ".2f"),
]


def float_rows(threads: int, budget: float) -> None:
    print(table_line(FLOAT_COLS))
    for out, inn in SHAPES:
        for s in (0.5, 0.7, 0.9):
            layer = pruned_linear(out, inn, s)
            for batch in (1, 8):
                x = torch.randn(batch, inn)
                compiled = rt.compile(nn.Sequential(layer), x)
                d = rt.report(compiled).layers[0]
                label, sparse = best_sparse(layer, x, d)
                t = interleaved({"dense": layer, "sparse": sparse, "compiled": compiled}, x, budget)
                row = {"thr": threads, "weight": f"{out}x{inn}", "sparsity": s, "batch": batch}
                row |= {"dense us": t["dense"], "sparse us": t["sparse"], "kernel": label}
                row |= {"speedup": t["dense"] / t["sparse"], "flops bnd": 1 / (1 - s)}
                row |= {"bytes bnd": bytes_ratio(sparse), "compile": d.chosen}
                row |= {
                    "compiled": t["dense"] / t["compiled"],
                    "note": "" if t["sparse"] < t["dense"] else "sparse loses",
                }
                print(table_line(FLOAT_COLS, row), flush=True)


def int8_rows(threads: int, budget: float) -> None:
    print(table_line(INT8_COLS))
    for out, inn in SHAPES:
        for s in (0.7, 0.9):
            layer = pruned_linear(out, inn, s)
            qref = QuantizedLinear(layer)
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # torch.ao.quantization is deprecated; it is still the baseline
                tq = torch.ao.quantization.quantize_dynamic(
                    nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8
                )
            for batch in (1, 8):
                x = torch.randn(batch, inn)
                compiled = rt.compile(nn.Sequential(qref), x)
                d = rt.report(compiled).layers[0]
                label, sparse = best_sparse(qref, x, d)
                t = interleaved({"dense": layer, "tq": tq, "sparse": sparse, "compiled": compiled}, x, budget)
                row = {"thr": threads, "weight": f"{out}x{inn}", "sparsity": s, "batch": batch}
                row |= {
                    "dense us": t["dense"],
                    "t-int8 us": t["tq"],
                    "sparse us": t["sparse"],
                    "kernel": label,
                }
                row |= {"vs f32": t["dense"] / t["sparse"], "vs t-int8": t["tq"] / t["sparse"]}
                row |= {"flops bnd": 1 / (1 - s), "bytes bnd": bytes_ratio(sparse), "compile": d.chosen}
                row |= {"compiled": t["dense"] / t["compiled"]}
                print(table_line(INT8_COLS, row), flush=True)


def mlp_rows(threads: int, budget: float) -> None:
    """The issue's MLP, compiled with and without the Linear -> GELU -> Linear chain, interleaved."""
    mlp = nn.Sequential(pruned_linear(3072, 768, 0.9, 1), nn.GELU(), pruned_linear(768, 3072, 0.9, 2))
    x = torch.randn(64, 768)
    compiled = rt.compile(mlp, x)
    unchained = rt.compile(mlp, x, chain=False)
    t = interleaved({"dense": mlp, "compiled": compiled, "unchained": unchained}, x, budget)
    print(rt.report(compiled).table())
    print(
        f"MLP 768->3072->768 (GELU), batch 64, 90%, {threads} thread(s): dense {t['dense']:.0f} us, "
        f"compiled {t['compiled']:.0f} us, speedup {t['dense'] / t['compiled']:.2f}x (FLOPs bound 10x); "
        f"without the chain {t['unchained']:.0f} us, {t['dense'] / t['unchained']:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", choices=["f32", "int8", "mlp"], nargs="+", default=["f32", "int8", "mlp"])
    args = parser.parse_args()
    budget = 0.3 if args.quick else 1.0
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, OMP/MKL pool {os.environ['OMP_NUM_THREADS']}, prunekit kernels follow "
        f"torch.get_num_threads(); cores shared with other processes (load average {load})"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        if "f32" in args.only:
            print(f"\nfloat32 sparse vs dense float32 (F.linear), {threads} thread(s)")
            float_rows(threads, budget)
        if "int8" in args.only:
            print(f"\nint8 sparse (bit-exact) vs dense float32 and torch dynamic INT8, {threads} thread(s)")
            int8_rows(threads, budget)
        if "mlp" in args.only:
            print()
            mlp_rows(threads, budget)


if __name__ == "__main__":
    main()
