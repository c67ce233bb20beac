"""The seeds' edge-camera example, measured: ResNet-18 at 224x224, batch 1, pruned with prunekit against the
fastest dense engines a user would deploy instead (issue 15).

The network is ``prunekit.models.ResNet18`` (torchvision's exact layout and init; torchvision's own wheel
for this torch is a CUDA build that does not load here), seeded random weights and random non-trivial
BatchNorm statistics, eval mode, one seeded random 224x224 image; INT8 calibration uses 4 other random
images (the same batches for every engine). Variants, all timed interleaved in one process per thread
count (each round runs every variant in a shuffled order; docs/measuring.md), twice: one call per variant
and round (each call right after another variant: its weights and code start out of the caches, and at 2
threads torch's OpenMP workers may still be spinning from the variant before), and 3 calls in a row, the
last timed (the variant as a deployed model runs: alone and warm):

    dense f32 torch          the model as is
    dense int8 torch-x86     torch FX static PTQ, x86 backend, per-channel    (prunekit.export.engines,
    dense f32 onnxruntime    exported by prunekit.export.onnx                  the engines `prunekit bench`
    dense int8 onnxruntime   static QDQ, per-channel s8 weights, s8 activations   and the demo time too)
    f32 U% <alloc>           magnitude-pruned to U% unstructured (alloc: "layer" = every conv U%, "global"
                             = one threshold), prunekit.runtime.compile (whole-network segments)
    int8 70% 4x1 +head       70% in 4x1 input-channel blocks ("block:1x4@70%:channels"; conv1, 3 input
                             channels: 1x3 blocks, its 3 channels at a tap) + the classifier head pruned
                             to 90%, prunekit INT8
                             (static, calibrated), compiled
    int8 90% 4x1, int8 70% unstr.   the same at 90% blocks / 70% unstructured
    f32/int8 50% channels    prunekit.structured.prune_model(ratio=0.5), float32 compiled / INT8 compiled;
                             plus the structured model on torch-x86 and onnxruntime INT8

prunekit's INT8 variants quantize the classifier too (``classifier=True``), as torch-x86 and onnxruntime do
with theirs: the same layers in INT8 on every engine. ``--float-classifier`` keeps it float32 (prunekit's
default for accuracy; a float32 1000 x 512 classifier streams 2 MB per call).

Printed per thread count: p50 / p99 ms, the ratio to dense torch float32 and to the fastest dense variant
(and, for INT8 rows, to the fastest dense INT8), the file size (dense: torch.save of the float32 state dict;
pruned: prunekit's compressed format; engines: their .onnx / torch.save files), the multiply-adds remaining
(nonzero weights x output positions / dense, the bound on a sparse speed-up at equal efficiency) and the
targets. Then the same on the digits demo model (SmallResNet, 8x8).

    python benchmarks/bench_edge.py                      # ResNet-18 and digits, 1 and 2 threads
    python benchmarks/bench_edge.py --quick              # fewer rounds, 1 thread, fewer variants
    python benchmarks/bench_edge.py --models resnet18 --threads 1 --rounds 40 --bursts 1
"""

from __future__ import annotations

import argparse
import copy
import io
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import prunekit.runtime as rt
import prunekit.structured
from prunekit import Sparsifier
from prunekit.analysis.macs import count_macs
from prunekit.artifact import load_artifact, plain_state_dict
from prunekit.compress.container import save_compressed
from prunekit.export import engines
from prunekit.masking import squash
from prunekit.models import ResNet18, SmallResNet
from prunekit.quant.ptq import quantize_model
from prunekit.runtime import int8_engines
from prunekit.runtime.cpu import features

warnings.filterwarnings("ignore")

TARGETS = {  # issue 15, 1 thread, ResNet-18: (row, baseline, bound)
    "f32 70% layer": ("dense f32 torch", 0.6),
    "f32 90% layer": ("dense f32 torch", 0.35),
    "f32 70% global": ("dense f32 torch", 0.6),
    "f32 90% global": ("dense f32 torch", 0.35),
    "int8 70% 4x1 +head": ("fastest dense int8", 0.8),
    "int8 70% 4x1 global": ("fastest dense int8", 0.8),
    "int8 90% 4x1": ("fastest dense int8", 0.5),
    "int8 70% unstr.": ("fastest dense int8", 0.8),
    "int8 50% channels": ("fastest dense int8", 0.35),
}
DENSE = ("dense f32 torch", "dense int8 torch-x86", "dense f32 onnxruntime", "dense int8 onnxruntime")


def random_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def prune(model: nn.Module, pattern, group: str, head: float | None = None) -> nn.Module:
    """A pruned copy (masks squashed): ``pattern`` on every conv; for a block pattern over input channels,
    a conv whose input channels do not divide by 4 gets blocks of all its channels (the stem's RGB: one
    block per tap, what the int8 kernel's 4-channel unit holds), or unstructured if it has more than 4;
    the classifier to ``head`` when given."""
    m = copy.deepcopy(model)
    overrides = {}
    if isinstance(pattern, str) and pattern.startswith("block"):
        amount = pattern.split("@")[1].split(":")[0]
        for n, c in m.named_modules():
            if isinstance(c, nn.Conv2d) and c.in_channels % 4:
                cin = c.in_channels
                frac = float(amount.rstrip("%")) / 100
                overrides[n] = f"block:1x{cin}@{amount}:channels" if cin < 4 else frac
    Sparsifier(m, pattern, criterion="magnitude", group=group, overrides=overrides).prune()
    squash(m)
    if head:
        fc = m.fc.weight.data
        thr = fc.abs().flatten().kthvalue(int(head * fc.numel())).values
        fc.mul_(fc.abs() > thr)
    return m


def half_channels(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The "50% channels" variant: a copy with half of every prunable layer's channels removed."""
    return prunekit.structured.prune_model(copy.deepcopy(model), x, ratio=0.5, round_to=8).model.eval()


def size_of(state: dict, compressed: bool) -> int:
    if not compressed:
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.tell()
    with tempfile.TemporaryDirectory() as tmp:
        return save_compressed(state, Path(tmp) / "m.safetensors", value_dtype="keep").stat().st_size


def interleaved(fns: dict, rounds: int, warmup: int = 2, burst: int = 1) -> dict[str, list[float]]:
    """Per round every variant in a shuffled order, ``burst`` calls in a row, the last one timed (``burst``
    1: each call starts right after another variant, its caches holding that variant's weights; 3: a
    variant that runs alone, as a deployed model does)."""
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        out: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                for _ in range(burst):
                    t0 = time.perf_counter()
                    fns[k]()
                    dt = time.perf_counter() - t0
                out[k].append(dt)
    return out


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q))


def int8_model(model: nn.Module, calib: list, args) -> nn.Module:
    """prunekit's static INT8 model, the classifier included unless ``--float-classifier``."""
    classifier = not getattr(args, "float_classifier", False)
    return quantize_model(model, activations="static", calibration=calib, classifier=classifier)


def build_variants(name: str, model: nn.Module, x: torch.Tensor, calib: list, args, tmp: str) -> dict:
    """name -> dict(model, size, macs, note, int8) for every variant; compiled at the current thread count."""
    variants: dict[str, dict] = {}
    dense_state = plain_state_dict(model)
    dense_size = size_of(dense_state, compressed=False)
    variants["dense f32 torch"] = dict(model=model, size=dense_size, macs=1.0, int8=False)
    ort_dir = Path(tmp) / name
    ort_dir.mkdir(parents=True, exist_ok=True)
    labels = {
        engines.TORCH_INT8: ("dense int8 torch-x86", True),
        engines.ORT_FP32: ("dense f32 onnxruntime", False),
        engines.ORT_INT8: ("dense int8 onnxruntime", True),
    }
    for b in engines.dense_baselines(model, x, calib, workdir=ort_dir):
        if b.model is None:
            print(f"  {labels[b.name][0]}: skipped ({b.skipped})")
            continue
        size = b.size_bytes if b.size_bytes is not None else size_of(b.model.state_dict(), False)
        variants[labels[b.name][0]] = dict(model=b.model, size=size, macs=1.0, int8=labels[b.name][1])

    def compiled(label: str, pruned: nn.Module, int8: bool) -> None:
        target = int8_model(pruned, calib, args) if int8 else pruned
        t0 = time.perf_counter()
        c = rt.compile(target, x)
        report = rt.report(c)
        with torch.inference_mode():
            ref, y = target(x), c(x)
        err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        state = plain_state_dict(target)
        variants[label] = dict(
            model=c, size=size_of(state, compressed=True), macs=report.macs_remaining, int8=int8,
            note=f"{report.mode}, compile {time.perf_counter() - t0:.0f} s, max err vs uncompiled {err:.1e}",
            report=report,
        )  # fmt: skip

    # prunekit's dense INT8 path: its own exact kernels, or the fastest dense engine (delegation, inexact)
    q8 = int8_model(model, calib, args)
    dense8 = rt.compile(q8, x)
    chosen, choice, medians = int8_engines.fastest_int8(
        {"prunekit": dense8}, x, float_source=model, calibration=calib, allow_inexact=True
    )
    variants["int8 dense prunekit"] = dict(
        model=dense8, size=size_of(plain_state_dict(q8), True), macs=1.0, int8=True,
        note=f"exact prunekit integers, {rt.report(dense8).mode}",
    )  # fmt: skip
    variants["int8 dense prunekit->fastest"] = dict(
        model=chosen, size=None, macs=1.0, int8=True, note=f"choose_int8: {choice.engine} ({choice.reason})"
    )
    levels = [0.7] if args.quick else [0.7, 0.9]
    for s in levels:
        for alloc in args.alloc:
            compiled(f"f32 {s:.0%} {alloc}", prune(model, s, alloc), False)
    compiled("int8 70% 4x1 +head", prune(model, "block:1x4@70%:channels", "layer", head=0.9), True)
    if not args.quick:
        compiled("int8 90% 4x1", prune(model, "block:1x4@90%:channels", "layer"), True)
        compiled("int8 70% unstr.", prune(model, 0.7, "layer"), True)
        if "global" in args.alloc:
            compiled("int8 70% 4x1 global", prune(model, "block:1x4@70%:channels", "global"), True)
    structured = half_channels(model, x)
    compiled("f32 50% channels", structured, False)
    compiled("int8 50% channels", structured, True)
    kept = count_macs(structured, x)["total"] / count_macs(model, x)["total"]  # MACs left after the trim
    for label in ("f32 50% channels", "int8 50% channels"):
        variants[label]["macs"] = kept
    for b in engines.dense_baselines(
        structured, x, calib, workdir=ort_dir / "s8", names=(engines.TORCH_INT8, engines.ORT_INT8)
    ):
        if b.model is not None:
            label = "int8 50% ch. torch-x86" if b.name == engines.TORCH_INT8 else "int8 50% ch. onnxruntime"
            size = b.size_bytes if b.size_bytes is not None else size_of(b.model.state_dict(), False)
            variants[label] = dict(model=b.model, size=size, macs=kept, int8=True)
    return variants


def table(name: str, variants: dict, x: torch.Tensor, rounds: int, threads: int, burst: int = 1) -> None:
    fns = {k: (lambda m=v["model"]: m(x)) for k, v in variants.items()}
    t = interleaved(fns, rounds, burst=burst)
    p50 = {k: statistics.median(v) for k, v in t.items()}
    base = p50["dense f32 torch"]
    fastest = min((k for k in DENSE if k in p50), key=p50.get)  # an engine not built here is left out
    fastest8 = min((k for k in ("dense int8 torch-x86", "dense int8 onnxruntime") if k in p50), key=p50.get)
    dense_size = variants["dense f32 torch"]["size"]
    how = "one call per variant" if burst == 1 else f"{burst} calls in a row per variant, the last timed"
    print(f"\n{name}, batch 1, {threads} thread(s), {rounds} interleaved rounds ({how})")
    print(f"fastest dense: {fastest} ({p50[fastest] * 1e3:.2f} ms); fastest dense int8: {fastest8}")
    print(
        "| variant | p50 ms | p99 ms | vs dense torch f32 | vs fastest dense | vs fastest dense int8 "
        "| MACs left | file MB (vs dense) | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, v in variants.items():
        macs = "-" if v.get("macs") is None else f"{v['macs']:.1%}"
        vs8 = f"{p50[k] / p50[fastest8]:.3f}" if v["int8"] else "-"
        size = "-" if v["size"] is None else f"{v['size'] / 1e6:.2f} ({v['size'] / dense_size:.3f})"
        print(
            f"| {k} | {p50[k] * 1e3:.2f} | {pct(t[k], 99) * 1e3:.2f} | {p50[k] / base:.3f} | "
            f"{p50[k] / p50[fastest]:.3f} | {vs8} | {macs} | {size} | {v.get('note', '')} |"
        )
    if name.startswith("ResNet-18") and threads == 1:
        print(f"\ntargets (issue 15, 1 thread; {how}):")
        for k, (ref, bound) in TARGETS.items():
            if k not in p50:
                continue
            denom = p50[fastest8] if ref == "fastest dense int8" else p50[ref]
            ratio = p50[k] / denom
            macs = variants[k].get("macs")
            floor = "" if macs is None else f"; MACs left {macs:.1%} (the ratio at equal per-MAC efficiency)"
            verdict = "met" if ratio <= bound else "MISSED"
            print(f"  {k}: {ratio:.3f} of {ref} (target <= {bound}) {verdict}{floor}")
        own, fast = p50["int8 dense prunekit"], p50["int8 dense prunekit->fastest"]
        print(f"  prunekit dense INT8, exact kernels: {own / p50[fastest8]:.3f} of {fastest8} (target <= 1)")
        print(
            f"  prunekit dense INT8, fastest engine: {fast / p50[fastest8]:.3f} of {fastest8} (target <= 1)"
        )
        for k8, kf in (("int8 70% unstr.", "f32 70% layer"), ("int8 70% 4x1 +head", "f32 70% layer")):
            if k8 in p50 and kf in p50:  # the same sparsity level; the int8 must not be slower than float32
                print(f"  {k8} vs {kf}: {p50[k8] / p50[kf]:.3f} (never slower than float32: <= 1)")
        d8 = min(p50[k] for k in variants if k.startswith("int8 50% ch."))
        print(f"  50% channels INT8 on the fastest engine (torch-x86/onnxruntime): {d8 / p50[fastest8]:.3f}")
        k70 = "int8 70% 4x1 +head"
        if k70 in variants:
            ratio = variants[k70]["size"] / dense_size
            print(f"  file size of 70% + INT8 compressed: {ratio:.3f} of dense float32 (target <= 0.12)")


def reports(variants: dict) -> None:
    for k, v in variants.items():
        if "report" in v:
            print(f"\n-- {k} --\n{v['report']}")


def resnet(args) -> tuple[nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    model = random_bn(ResNet18())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 224, 224, generator=g)
    calib = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(4)]
    return model, x, calib


def digits(args) -> tuple[nn.Module, torch.Tensor, list]:
    """The digits demo's SmallResNet: its trained dense artifact with ``--demo-dir``, else seeded random
    weights (latency depends on where the zeros are, not on the values)."""
    torch.manual_seed(0)
    if args.demo_dir is not None:
        model = load_artifact(Path(args.demo_dir) / "dense.safetensors", masked=False)[0].eval()
    else:
        model = random_bn(SmallResNet(widths=(16, 32, 64), blocks=2))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8, 8, generator=g)
    calib = [torch.randn(1, 1, 8, 8, generator=g) for _ in range(4)]
    return model, x, calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,digits")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument(
        "--bursts", default="1,3", help="calls in a row per variant and round, the last timed (a table each)"
    )
    ap.add_argument("--alloc", default="layer,global", help="unstructured float32 allocations to run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reports", action="store_true", help="print compile's per-layer decision tables")
    ap.add_argument(
        "--float-classifier", action="store_true", help="prunekit's INT8 variants keep the classifier float32"
    )
    ap.add_argument(
        "--demo-dir", default=None, help="the digits demo's output directory (its dense artifact)"
    )
    args = ap.parse_args()
    args.alloc = args.alloc.split(",")
    if args.quick:
        args.threads, args.rounds = "1", min(args.rounds, 10)
    flags = sorted(
        features().flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni"}
    )
    print(f"CPU: {features().describe()}; flags: {' '.join(flags)}; torch {torch.__version__}")
    builders = {"resnet18": ("ResNet-18 224x224", resnet), "digits": ("digits SmallResNet 8x8", digits)}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            label, make = builders[key]
            model, x, calib = make(args)
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                variants = build_variants(f"{key}-{threads}", model, x, calib, args, tmp)
                for burst in [int(b) for b in args.bursts.split(",")]:
                    table(label, variants, x, args.rounds, threads, burst)
                if args.reports:
                    reports(variants)


if __name__ == "__main__":
    main()
