"""Latency-aware structured allocation: how close does the additive per-group prediction come to the
measured latency of the pruned model?

A ResNet-ish SmallResNet (3 input channels, widths 32/64/128, 2 blocks per stage) on a 64x64 random input
at batch 1, and the tiny digits model (1x8x8) for contrast. The tables are measured once; for each target
the allocator chooses ratios, the model is pruned with them and timed interleaved with the dense model
(MEASURING.md), every pair in ``--passes`` passes, medians kept. The predicted loss is the data-free
output distortion on random inputs (no labels here).

    OMP_NUM_THREADS=1 python benchmarks/bench_latency_alloc.py [--threads 1] [--runs 20] [--passes 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from prunekit.analysis import count_macs
from prunekit.models import SmallResNet
from prunekit.structured import prune_model
from prunekit.structured.latency import allocate, measure_tables, paired_ratios, resolve_budget


def bench(label: str, model, example, timing, targets, runs: int, grid, passes: int) -> None:
    started = time.perf_counter()
    tables = measure_tables(model, example, timing, grid=grid, runs=runs, warmup=5, passes=passes, round_to=8)
    took = time.perf_counter() - started
    dense_macs = count_macs(model, timing)["total"]
    print(f"\n## {label}: {len(tables.groups)} groups, tables measured in {took:.0f} s")
    print(
        f"dense p50 {tables.dense_ms:.3f} ms ({tables.threads} thread(s), {tables.runs} runs per variant "
        f"and pass, {passes} passes, medians)"
    )
    print(
        "| target | budget ms | predicted ms | measured ms (dense same run) | measured/dense | met | "
        "pred. error | MACs/dense | loss proxy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for target in targets:
        budget = resolve_budget(target, tables.dense_ms)
        _, alloc = allocate(tables.groups, tables.base_ms, budget)
        pruned = copy.deepcopy(model)
        chosen = {n: r for n, r in alloc.ratios.items() if r > 0}
        prune_model(pruned, example, ratio=0.0, ratios=chosen, round_to=8)
        ratio, dense_p50, pruned_p50 = paired_ratios({"p": (model, pruned)}, timing, runs * 2, 10, passes)
        dense_ms, ms, measured_ratio = dense_p50["p"], pruned_p50["p"], ratio["p"]
        predicted_ratio = alloc.predicted_ms / tables.dense_ms
        macs = count_macs(pruned, timing)["total"] / dense_macs
        met = "yes" if measured_ratio <= target else "no"
        print(
            f"| {target} | {budget:.3f} | {alloc.predicted_ms:.3f}{'' if alloc.feasible else ' (infeasible)'}"
            f" | {ms:.3f} ({dense_ms:.3f}) | {measured_ratio:.3f} | {met}"
            f" | {measured_ratio - predicted_ratio:+.3f} | {macs:.3f} | {alloc.predicted_loss:.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = (0.5, 0.6, 0.7, 0.8)
    big = SmallResNet(in_channels=3, widths=[32, 64, 128], blocks=2).eval()
    calib = torch.randn(4, 3, 64, 64)
    bench(
        "SmallResNet 32/64/128 on 1x3x64x64",
        big,
        calib,
        calib[:1],
        targets,
        args.runs,
        (0.25, 0.5, 0.75),
        args.passes,
    )
    if not args.skip_digits:
        tiny = SmallResNet(widths=[16, 32, 64], blocks=2).eval()
        x = torch.randn(4, 1, 8, 8)
        bench(
            "digits SmallResNet 16/32/64 on 1x1x8x8",
            tiny,
            x,
            x[:1],
            targets,
            args.runs * 2,
            (0.25, 0.5, 0.75),
        )


if __name__ == "__main__":
    main()
