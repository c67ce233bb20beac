"""Latency-aware structured allocation: how close does the additive per-group prediction come to the
measured latency of the pruned model?

A ResNet-ish SmallResNet (3 input channels, widths 32/64/128, 2 blocks per stage) on a 64x64 random input
at batch 1, and the tiny digits model (1x8x8) for contrast. The tables are measured once; for each target
the allocator chooses ratios, the model is pruned with them and timed interleaved with the dense model
(docs/measuring.md), every pair in ``--passes`` passes, medians kept; a miss lowers the aim by the miss and
retries (``closed_loop``, up to 2 retries), every attempt printed. The predicted loss is the data-free
output distortion on random inputs (no labels here).

    OMP_NUM_THREADS=1 python benchmarks/bench_latency_alloc.py [--threads 1] [--runs 20] [--passes 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from prunekit.allocate.latency import closed_loop, measure_tables, resolve_budget
from prunekit.analysis import count_macs
from prunekit.models import SmallResNet
from prunekit.structured import prune_model


def bench(label: str, model, example, timing, targets, runs: int, grid, passes: int) -> None:
    started = time.perf_counter()
    tables = measure_tables(model, example, timing, grid=grid, runs=runs, warmup=5, passes=passes, round_to=8)
    took = time.perf_counter() - started
    dense_macs = count_macs(model, timing)["total"]
    print(f"\n## {label}: {len(tables.groups)} groups, tables measured in {took:.0f} s")
    print(
        f"dense p50 {tables.dense_ms:.3f} ms ({tables.threads} thread(s), {tables.runs} runs per variant "
        f"and pass, {passes} passes, medians); ratios below are pruned/dense p50 within one pair"
    )
    print("| target | attempt | aim | predicted | measured | met | pred. error | MACs/dense | loss proxy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for target in targets:
        goal = resolve_budget(target, tables.dense_ms) / tables.dense_ms
        best, attempts = closed_loop(
            model, example, tables, goal, timing, runs * 2, 10, passes, 2, round_to=8
        )
        for i, a in enumerate(attempts):
            pruned = copy.deepcopy(model)
            prune_model(pruned, example, ratio=0.0, ratios={n: r for n, r in a["ratios"].items() if r > 0})
            macs = count_macs(pruned, timing)["total"] / dense_macs
            kept = " (kept)" if a is best else ""
            print(
                f"| {target} | {i + 1}{kept} | {a['aim_ratio']:.3f} | {a['predicted_ratio']:.3f}"
                f"{'' if a['predicted_feasible'] else ' (infeasible)'} | {a['measured_ratio']:.3f} | "
                f"{'yes' if a['measured_ratio'] <= goal else 'no'} | "
                f"{a['measured_ratio'] - a['predicted_ratio']:+.3f} | {macs:.3f} | "
                f"{a['predicted_loss']:.4f} |"
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
            args.passes,
        )


if __name__ == "__main__":
    main()
