"""Sensitivity allocation against uniform magnitude pruning on a trained digits model (test accuracy).

    python benchmarks/bench_sensitivity_alloc.py DENSE.safetensors [--targets 0.5,0.8,0.9,0.95] [--epochs 3]

For each target and method -- global magnitude (one threshold), per-layer uniform magnitude, sensitivity
allocation (curves measured once on the validation split, grid up to 0.99) -- prune a copy one-shot and
report test accuracy: as pruned, after re-estimating the BatchNorm statistics on the training split (no
weight update), and after a short fine-tune (masks kept). Same split (seed 0) as the recipes.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from prunekit.allocate.sensitivity import sensitivity_allocation
from prunekit.analysis import evaluate
from prunekit.analysis.sensitivity import sensitivity_analysis
from prunekit.artifact import load_artifact
from prunekit.data import load_splits
from prunekit.recovery import TrainConfig, train
from prunekit.sparsifier import Sparsifier

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader) -> None:
    """Re-estimate BatchNorm running statistics (cumulative average over one pass), weights untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x, _ in loader:
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--targets", default="0.5,0.8,0.9,0.95")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--metric", default="accuracy", help="the sensitivity metric: accuracy or loss")
    ap.add_argument("--seeds", default="0", help="fine-tune shuffle seeds; the column shows their mean")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dense, _ = load_artifact(args.artifact)
    splits = load_splits("digits", seed=0)
    val, test = splits.loader("val", 64), splits.loader("test", 64)
    started = time.perf_counter()
    sens = sensitivity_analysis(copy.deepcopy(dense), val, sparsities=GRID, metric=args.metric)
    print(
        f"sensitivity analysis: {len(sens.layers)} layers x {len(GRID)} sparsities in "
        f"{time.perf_counter() - started:.1f} s; dense test accuracy "
        f"{evaluate(dense, test, 10)['accuracy']:.4f}"
    )
    print(
        "| target | method | as pruned | BN re-estimated | "
        f"+ fine-tune {args.epochs} epochs (seeds {args.seeds}) |"
    )
    print("|---|---|---|---|---|")
    for target in (float(t) for t in args.targets.split(",")):
        plan = sensitivity_allocation(sens.curves(), sens.params(), target)
        for method in ("global", "layer", "sensitivity"):
            torch.manual_seed(0)
            model = copy.deepcopy(dense)
            kwargs = (
                {"allocation": plan.sparsity, "group": "layer"}
                if method == "sensitivity"
                else {"group": method}
            )
            sp = Sparsifier(model, target, **kwargs)
            sp.prepare()
            sp.prune()
            acc = [evaluate(model, test, 10)["accuracy"]]
            recal = copy.deepcopy(model)
            recalibrate_bn(recal, splits.loader("train", 64))
            acc.append(evaluate(recal, test, 10)["accuracy"])
            tuned = []
            for seed in (int(s) for s in args.seeds.split(",")):
                torch.manual_seed(seed)
                copy_ = copy.deepcopy(model)  # the masks are parametrizations: they travel and hold
                loader = splits.loader("train", 64, shuffle=True, seed=seed)
                train(copy_, loader, TrainConfig(epochs=args.epochs, lr=args.lr), progress=False)
                tuned.append(evaluate(copy_, test, 10)["accuracy"])
            acc.append(sum(tuned) / len(tuned))
            spread = f" ({min(tuned):.4f}-{max(tuned):.4f})" if len(tuned) > 1 else ""
            print(f"| {target:.2f} | {method} | " + " | ".join(f"{a:.4f}" for a in acc) + spread + " |")


if __name__ == "__main__":
    main()
