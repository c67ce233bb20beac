"""Time to prune at 50%: prunekit at an older revision (before), this checkout (after) and Torch-Pruning,
in one process, interleaved (A B C, C B A, ...), one thread; median of ``--reps`` runs each.

The older revision is imported from a source tree exported with git, then every ``prunekit`` module is
dropped from ``sys.modules`` and this checkout's is imported: the old ``prune_model`` keeps its own modules
through its globals. Models, importance and Torch-Pruning's settings are ``structured_timing``'s (round_to=8,
L2, classifier kept; torchvision and torch-pruning in a venv of their own)::

    git archive e222ac6 src | tar -x -C /tmp/base     # the revision to compare against
    python benchmarks/structured_before_after.py --base-src /tmp/base/src resnet50 densenet121 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch


def _import_base(path: str):
    """``prunekit.structured.prune_model`` of the tree at ``path``; afterwards ``prunekit`` resolves to this
    checkout again."""
    sys.path.insert(0, path)
    try:
        base = __import__("prunekit.structured", fromlist=["prune_model"]).prune_model
    finally:
        sys.path.remove(path)
        for name in [n for n in sys.modules if n == "prunekit" or n.startswith("prunekit.")]:
            del sys.modules[name]
    return base


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="torchvision model names")
    parser.add_argument("--base-src", required=True, help="the older revision's src/ directory")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.base_src, "prunekit")):
        raise SystemExit(f"--base-src {args.base_src}: no prunekit package there (give the exported src/)")
    base_prune = _import_base(args.base_src)

    import prunekit.structured  # this checkout's, imported after the base one was dropped
    import structured_timing  # benchmarks/, next to this script
    from prunekit.runtime.cpu import features

    assert prunekit.structured.prune_model is not base_prune
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; {features().describe()}")
    models, tp = structured_timing.torchvision_models(), structured_timing.torch_pruning()
    if models is None or tp is None:
        raise SystemExit("needs torchvision and torch-pruning (see structured_timing.py)")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tools = {
        "before": lambda m: base_prune(m, x, ratio=0.5, round_to=8),
        "after": lambda m: prunekit.structured.prune_model(m, x, ratio=0.5, round_to=8),
        "T-P": lambda m: structured_timing.prune_torch_pruning(tp, m, x),
    }
    for name in args.models:
        dense = structured_timing.build(models, name)
        n0 = sum(p.numel() for p in dense.parameters())
        times: dict[str, list[float]] = {k: [] for k in tools}
        kept = {}
        for rep in range(args.reps):
            for tool in list(tools) if rep % 2 == 0 else list(tools)[::-1]:
                model = copy.deepcopy(dense)
                gc.collect()
                start = time.perf_counter()
                tools[tool](model)
                times[tool].append(time.perf_counter() - start)
                kept[tool] = sum(p.numel() for p in model.parameters()) / n0
                print(f"  {name} {tool} run {rep + 1}: {times[tool][-1]:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{name:<16}{n0 / 1e6:6.1f}M  before {med['before']:6.2f} s  after {med['after']:6.2f} s "
            f"({med['after'] / med['before']:.2f}x)  T-P {med['T-P']:6.2f} s  "
            f"after/T-P {med['after'] / med['T-P']:.2f}x  kept before/after/T-P "
            f"{kept['before']:.3f}/{kept['after']:.3f}/{kept['T-P']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
