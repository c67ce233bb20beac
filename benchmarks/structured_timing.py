"""Time to prune and parameters kept: prunekit.structured against Torch-Pruning on torchvision models.

Used by ``bench_structured.py --time`` and ``--params``. Both optional dependencies go into a venv of
their own (never the project's): ``pip install --no-deps torch-pruning==1.6.1 torchvision==0.28.0``.
torchvision's PyPI wheel for torch 2.13 is a CUDA build whose compiled operators (detection ops: nms,
roi_align, ...) do not load with torch+cpu; its classification models are plain Python and need none of
them, so :func:`torchvision_models` stubs the two modules that register kernels for those operators.

Timing: one thread; for every model each tool prunes a fresh deep copy of the same seeded model at ratio
0.5 with round_to=8 and L2 magnitude importance, the two tools alternating (A B, B A, ...) in one process;
the median of ``reps`` runs each is reported. prunekit runs without ``verify`` (Torch-Pruning has no
equivalent check). Torch-Pruning gets the final classifier (a Linear, or SqueezeNet's 1x1 conv) as ignored
layer and, for ``nn.MultiheadAttention``, its head count (its documented recipe for ViT).
"""

from __future__ import annotations

import copy
import gc
import importlib
import multiprocessing
import resource
import statistics
import sys
import time
import types
import warnings

import torch
from torch import nn

import prunekit.structured

TIME_MODELS = ("resnet50", "efficientnet_b7", "densenet201", "vit_b_16", "convnext_base", "regnet_y_16gf")
PARAM_MODELS = (
    "resnet50",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "regnet_y_400mf",
    "regnet_y_1_6gf",
    "regnet_y_16gf",
    "regnet_x_400mf",
    "regnet_x_8gf",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
    "convnext_base",
    "vit_b_16",
    "swin_t",
)


def torchvision_models():
    """``torchvision.models``, importing the CUDA wheel's Python code on torch+cpu if need be (None if
    torchvision is not installed)."""
    try:
        return importlib.import_module("torchvision").models
    except ImportError:
        return None
    except RuntimeError:  # "operator torchvision::nms does not exist": its compiled ops did not load
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("torchvision").models


def torch_pruning():
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        return None


def build(models, name: str, seed: int = 0) -> nn.Module:
    """A seeded torchvision model in eval mode with random BatchNorm statistics (so that a wrongly
    removed channel shows in prunekit's equivalence check)."""
    torch.manual_seed(seed)
    model = getattr(models, name)()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_prunekit(model: nn.Module, x: torch.Tensor, hidden: bool = False, verify: bool = False):
    return prunekit.structured.prune_model(
        model, x, ratio=0.5, round_to=8, verify=verify, prune_norm_coupled=hidden
    )


def prune_torch_pruning(tp, model: nn.Module, x: torch.Tensor) -> None:
    # the layer making the 1000 class logits: a Linear, or SqueezeNet's 1x1 Conv2d (left out, Torch-Pruning
    # halves the classes: SqueezeNet's 0.25 "kept" was 496 logits)
    classifier = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == 1000)
        or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)
    ]
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=classifier,
            round_to=8,
            num_heads=heads,
        )
        pruner.step()


def _timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_models(names, reps: int = 3) -> list[dict]:
    """Median seconds to prune each model at 50%, both tools interleaved; one thread."""
    models, tp = torchvision_models(), torch_pruning()
    if models is None:
        raise SystemExit("--time needs torchvision (pip install --no-deps torchvision==0.28.0, own venv)")
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in names:
        dense = build(models, name)
        times: dict[str, list[float]] = {"prunekit": [], "torch_pruning": []}
        kept: dict[str, float] = {}
        for rep in range(reps):
            order = ["torch_pruning", "prunekit"] if rep % 2 == 0 else ["prunekit", "torch_pruning"]
            for tool in order:
                if tool == "torch_pruning" and tp is None:
                    continue
                model = copy.deepcopy(dense)
                if tool == "prunekit":
                    times[tool].append(_timed(lambda m=model: prune_prunekit(m, x)))
                else:
                    times[tool].append(_timed(lambda m=model: prune_torch_pruning(tp, m, x)))
                kept[tool] = _params(model) / _params(dense)
                print(f"  {name} {tool} run {rep + 1}: {times[tool][-1]:.2f} s", flush=True)
        row = {"model": name, "params_dense": _params(dense), "kept": kept}
        for tool, values in times.items():
            row[tool] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def print_times(rows: list[dict]) -> None:
    print(
        "\ntime to prune at ratio 0.5 (round_to=8, L2), 1 thread, median of the runs above; "
        "kept = parameters after / before"
    )
    header = (
        f"{'model':<18}{'params':>9}{'prunekit s':>12}{'T-P s':>9}{'ratio':>8}{'pk kept':>9}{'T-P kept':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        pk, tp = r["prunekit"], r["torch_pruning"]
        ratio = f"{pk / tp:.2f}x" if tp else "-"
        tp_s = f"{tp:.2f}" if tp else "-"
        tp_kept = f"{r['kept']['torch_pruning']:.3f}" if "torch_pruning" in r["kept"] else "-"
        print(
            f"{r['model']:<18}{r['params_dense'] / 1e6:>8.1f}M{pk:>12.2f}{tp_s:>9}{ratio:>8}"
            f"{r['kept']['prunekit']:>9.3f}{tp_kept:>10}"
        )
    for r in rows:
        if r["torch_pruning"]:
            pk, tp = r["prunekit"], r["torch_pruning"]
            print(
                f"target {r['model']}: prunekit {pk:.2f} s vs Torch-Pruning {tp:.2f} s "
                f"({pk / tp:.2f}x, <= 1.0x) -> {'MET' if pk <= tp else 'MISSED'}"
            )


TP_MEMORY_GB = 8


def _tp_kept_in_child(tp, dense: nn.Module, x: torch.Tensor) -> str:
    """Torch-Pruning's kept fraction, pruned in a forked child under an address-space limit: on Swin it
    grows past 22 GB and the kernel's OOM killer would take this process (and whatever else runs) with it."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)

    def kept() -> str:
        try:
            model = copy.deepcopy(dense)
            prune_torch_pruning(tp, model, x)
            return f"{_params(model) / _params(dense):.3f}"
        except BaseException as exc:  # Torch-Pruning fails on some models (Swin: MemoryError, ...)
            return f"fails ({type(exc).__name__})"  # its frames and their memory go on return

    def run() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (TP_MEMORY_GB << 30, TP_MEMORY_GB << 30))
        child.send(kept())

    process = context.Process(target=run)
    process.start()
    process.join()
    return parent.recv() if parent.poll() else f"fails (exit {process.exitcode})"


def param_ratios(names) -> None:
    """Parameters kept at ratio 0.5: prunekit (verified against the masked original), prunekit with
    norm-coupled widths (``--hidden``: approximate, the output difference is reported), Torch-Pruning."""
    models, tp = torchvision_models(), torch_pruning()
    if models is None:
        raise SystemExit("--params needs torchvision (pip install --no-deps torchvision==0.28.0, own venv)")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"\n{'model':<20}{'params':>9}{'prunekit':>10}{'max|diff|':>11}{'--hidden':>10}  {'T-P'}")
    for name in names:
        dense = build(models, name)
        exact = prune_prunekit(copy.deepcopy(dense), x, verify=True)
        hidden = prune_prunekit(copy.deepcopy(dense), x, hidden=True)
        tp_kept = "-" if tp is None else _tp_kept_in_child(tp, dense, x)
        print(
            f"{name:<20}{_params(dense) / 1e6:>8.1f}M{exact.params_after / exact.params_before:>10.3f}"
            f"{exact.max_abs_diff:>11.1e}{hidden.params_after / hidden.params_before:>10.3f}  {tp_kept}",
            flush=True,
        )
