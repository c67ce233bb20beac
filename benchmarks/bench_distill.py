"""Distillation against plain fine-tuning on the digits demo at 90% sparsity (and, with ``--l0``, learned
L0 masks against magnitude), through real recipes.

Per seed: the demo's dense model (``resnet-digits`` widths 16/32/64, 2 blocks) is trained once by a
recipe (``train`` + ``export``), then each variant starts from that same artifact with the same seed and
runs the demo's pruning stage: iterative global magnitude to 90% in rounds of 20% of the remaining
weights, ``--finetune-epochs`` of fine-tuning after each round (the edge-digits recipe without its
quantize stage). The variants differ only in the fine-tuning's ``distill`` (the teacher is the loaded
dense model):

    plain      cross-entropy only
    distill    alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * CE

(``--sparsity`` / ``--schedule one-shot`` make the pruning harder than the demo's) and, with ``--l0``,
a one-shot prune stage with criterion ``l0`` (gates trained for as many epochs as the
iterative variant fine-tunes in total) followed by ``--finetune-epochs`` of plain fine-tuning.

Printed: validation accuracy after the last round and test accuracy of every run, and per seed the
difference distill - plain. Accuracies are measured, so the sign of the gap is the result.

    python benchmarks/bench_distill.py                          # seeds 0 1 2, 30 dense epochs
    python benchmarks/bench_distill.py --seeds 0 --dense-epochs 15 --alpha 0.5 --temperature 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe

MODEL = {"builtin": "resnet-digits", "args": {"widths": [16, 32, 64], "blocks": 2}}


def dense(seed: int, epochs: int, out: Path) -> Path:
    data = {
        "name": f"dense-{seed}",
        "seed": seed,
        "threads": 1,
        "model": MODEL,
        "stages": [
            {"type": "train", "epochs": epochs, "lr": 0.05},
            {"type": "evaluate", "label": "dense", "latency_runs": 1, "latency_warmup": 0},
            {"type": "export", "name": "dense"},
        ],
    }
    metrics = run_recipe(recipe.from_dict(data), out, progress=False)
    print(f"seed {seed}: dense test accuracy {metrics['dense']['accuracy']:.4f}", flush=True)
    return out / "dense.safetensors"


def pruned(seed: int, artifact: Path, variant: str, args, out: Path) -> dict:
    finetune = {"epochs": args.finetune_epochs, "lr": 0.01}
    if variant == "distill":
        finetune["distill"] = {"alpha": args.alpha, "temperature": args.temperature}
    schedule = {"type": "iterative", "rate": 0.2} if args.schedule == "iterative" else {"type": "one-shot"}
    stage = {
        "type": "prune",
        "pattern": args.sparsity,
        "criterion": "magnitude",
        "group": "global",
        "schedule": schedule,
        "finetune": finetune,
    }
    stages = [stage]
    if variant == "l0":
        from prunekit.schedule import geometric_rounds

        rounds = len(geometric_rounds(args.sparsity, 0.2)) if args.schedule == "iterative" else 1
        stage = {
            "type": "prune",
            "pattern": args.sparsity,
            "criterion": "l0",
            "group": "global",
            "finetune": {"epochs": rounds * args.finetune_epochs, "lr": 0.01},
        }
        stages = [stage, {"type": "finetune", "epochs": args.finetune_epochs, "lr": 0.01}]
    data = {
        "name": f"{variant}-{seed}",
        "seed": seed,
        "threads": 1,
        "model": {"artifact": str(artifact)},
        "stages": [*stages, {"type": "evaluate", "label": "pruned", "latency_runs": 1, "latency_warmup": 0}],
    }
    started = time.perf_counter()
    metrics = run_recipe(recipe.from_dict(data), out, progress=False)
    row = {
        "seed": seed,
        "variant": variant,
        "val_accuracy": metrics["rounds"][-1]["val_accuracy"],
        "test_accuracy": metrics["pruned"]["accuracy"],
        "sparsity": metrics["rounds"][-1]["targeted_sparsity"],
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--schedule", choices=["iterative", "one-shot"], default="iterative")
    parser.add_argument("--l0", action="store_true", help="also learned L0 masks (criterion l0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"threads 1 (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), torch {torch.__version__}")
    variants = ["plain", "distill"] + (["l0"] if args.l0 else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            artifact = dense(seed, args.dense_epochs, Path(tmp) / f"dense-{seed}")
            for variant in variants:
                rows.append(pruned(seed, artifact, variant, args, Path(tmp) / f"{variant}-{seed}"))
    print(
        f"\n{args.schedule} to {args.sparsity:.0%}, alpha {args.alpha}, T {args.temperature}, "
        f"finetune {args.finetune_epochs} epochs per round, dense {args.dense_epochs} epochs"
    )
    print(f"{'seed':>4} {'variant':>8} {'val acc':>8} {'test acc':>9} {'sparsity':>9} {'s':>6}")
    for r in rows:
        print(
            f"{r['seed']:>4} {r['variant']:>8} {r['val_accuracy']:>8.4f} {r['test_accuracy']:>9.4f} "
            f"{r['sparsity']:>9.4f} {r['seconds']:>6.0f}"
        )
    by = {(r["seed"], r["variant"]): r for r in rows}
    for key in ("val_accuracy", "test_accuracy"):
        gaps = [by[(s, "distill")][key] - by[(s, "plain")][key] for s in args.seeds]
        print(
            f"distill - plain, {key}: "
            + " ".join(f"{g:+.4f}" for g in gaps)
            + f"  mean {sum(gaps) / len(gaps):+.4f}"
        )


if __name__ == "__main__":
    main()
