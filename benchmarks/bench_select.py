"""Global magnitude selection: prunekit's streaming radix select against the naive torch.cat + kthvalue.

Baseline (what most code does): ``torch.cat([w.abs().flatten() for w in weights])``, ``torch.kthvalue`` for
the threshold, then ``|w| > threshold`` per layer. It holds every |w| twice (the list and the cat) and
kthvalue works on a further copy. The library call is
``prunekit.select.unstructured_masks({name: lambda: w.abs()}, sparsity, group="global")``: scores are
produced one layer at a time, so the only large result is the boolean masks.

Time: both approaches run in this process on the same weights, interleaved (A B A B ...) after one warm-up
each; the table gives medians and the ratio library/naive. Memory: each approach runs once more in a fresh
subprocess (``--mode naive|library``); peak extra memory is the peak RSS during selection minus the RSS right
after the weights were built (the peak is reset through /proc/self/clear_refs when the kernel allows it,
otherwise ru_maxrss is used, which is also fine because building the weights is the earlier peak). Both
include the returned masks (1 byte per weight).

    python benchmarks/bench_select.py                       # 500M params, sparsity 0.7, 3 repeats
    python benchmarks/bench_select.py --params 50_000_000 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LAYER_MIXES = {
    # LLaMA-7B-like projections with a few small layers
    "mixed": [(4096, 4096), (4096, 11008), (11008, 4096), (1024, 1024)],
    "square": [(4096, 4096)],
    "mlp": [(4096, 11008), (11008, 4096)],
    "small": [(1024, 1024)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=500_000_000)
    parser.add_argument(
        "--layers", choices=sorted(LAYER_MIXES), default="mixed", help="layer shapes to cycle"
    )
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each approach (after a warm-up)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--mode", choices=["bench", "naive", "library"], default="bench", help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def build_weights(params: int, mix: str) -> dict:
    """Random float32 layers cycling through the mix until about ``params`` weights (at least one layer)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    weights, total, i = {}, 0, 0
    shapes = LAYER_MIXES[mix]
    while total < params:
        shape = shapes[i % len(shapes)]
        if weights and total + shape[0] * shape[1] > params * 1.02:
            shape = (1024, 1024)  # top up with small layers instead of overshooting
        weights[f"layer{i}"] = torch.empty(shape).normal_(generator=gen)
        total += shape[0] * shape[1]
        i += 1
    return weights


def naive(weights: dict, sparsity: float) -> dict:
    import torch

    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(sparsity * flat.numel())
    threshold = torch.kthvalue(flat, k).values if k else flat.min() - 1
    del flat
    return {name: w.abs() > threshold for name, w in weights.items()}


def library(weights: dict, sparsity: float) -> dict:
    from prunekit.select import unstructured_masks

    scores = {name: (lambda w=w: w.abs()) for name, w in weights.items()}
    return unstructured_masks(scores, sparsity, group="global")


APPROACHES = {"naive": naive, "library": library}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def pruned_count(masks: dict) -> int:
    return sum(int((~m).sum()) for m in masks.values())


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: build the weights, run one approach once, print JSON with its peak extra RSS."""
    import torch

    import prunekit.select  # noqa: F401  (imported by both modes, so its import is not counted)

    weights = build_weights(args.params, args.layers)
    gc.collect()
    base_kib = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        method = "VmHWM reset after build"
    except OSError:
        method = "ru_maxrss"
    start = time.perf_counter()
    masks = APPROACHES[args.mode](weights, args.sparsity)
    seconds = time.perf_counter() - start
    peak_kib = (
        status_kib("VmHWM")
        if method.startswith("VmHWM")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    model_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    print(
        json.dumps(
            {
                "extra_mib": (peak_kib - base_kib) / 1024,
                "model_mib": model_bytes / 2**20,
                "seconds": seconds,
                "pruned": pruned_count(masks),
                "method": method,
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_child(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--params", str(args.params)]
    cmd += ["--layers", args.layers, "--sparsity", str(args.sparsity)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.mode != "bench":
        measure_memory(args)
        return
    import torch

    # memory first, one fresh process per approach, before this process holds its own copy of the weights
    memory = {mode: run_child(args, mode) for mode in APPROACHES}

    weights = build_weights(args.params, args.layers)
    total = sum(w.numel() for w in weights.values())
    model_mib = total * 4 / 2**20
    print(
        f"{len(weights)} layers ({args.layers}), {total:,} float32 params ({model_mib:,.0f} MiB), "
        f"sparsity {args.sparsity}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    times: dict[str, list[float]] = {mode: [] for mode in APPROACHES}
    masks: dict[str, dict] = {}
    for rep in range(args.repeats + 1):  # the first round is the warm-up
        for mode, fn in APPROACHES.items():
            masks.pop(mode, None)
            gc.collect()
            start = time.perf_counter()
            masks[mode] = fn(weights, args.sparsity)
            elapsed = time.perf_counter() - start
            if rep:
                times[mode].append(elapsed)

    # same selection: the library removes exactly k; the naive threshold also removes every weight tied with
    # the k-th smallest |w|, so it may remove a few more, and the masks differ only at those tied weights
    k = round(args.sparsity * total)
    counts = {mode: pruned_count(m) for mode, m in masks.items()}
    differ = sum(int((masks["naive"][n] != masks["library"][n]).sum()) for n in weights)
    assert counts["library"] == k, (counts, k)
    assert counts["naive"] >= k and differ == counts["naive"] - k, (counts, differ)
    for mode in APPROACHES:
        assert memory[mode]["pruned"] == counts[mode], (mode, memory[mode], counts)
    print(
        f"pruned weights: naive {counts['naive']:,}, library {counts['library']:,} (exact k = {k:,}); "
        f"masks differ at {differ:,} tied weights"
    )

    print()
    header = f"{'approach':<9} {'median s':>9} {'min s':>8} {'peak extra MiB':>15} {'extra / model':>14}"
    print(header)
    print("-" * len(header))
    for mode in APPROACHES:
        mem = memory[mode]["extra_mib"]
        print(
            f"{mode:<9} {statistics.median(times[mode]):>9.2f} {min(times[mode]):>8.2f} "
            f"{mem:>15,.0f} {mem / model_mib:>14.2f}"
        )
    t_ratio = statistics.median(times["library"]) / statistics.median(times["naive"])
    pair_ratio = statistics.median(lib / nai for lib, nai in zip(times["library"], times["naive"]))
    m_ratio = memory["library"]["extra_mib"] / memory["naive"]["extra_mib"]
    print()
    print(
        f"library / naive: time {t_ratio:.2f}x (median of per-pair ratios {pair_ratio:.2f}x), "
        f"peak extra memory {m_ratio:.2f}x"
    )
    print(
        f"floor for either: the boolean masks alone are {total / 2**20:,.0f} MiB "
        f"({total / 2**20 / model_mib:.2f} of the model); memory method: {memory['naive']['method']}"
    )


if __name__ == "__main__":
    main()
