"""Structured pruning: MACs reduction against measured CPU latency, ResNet-18 and MobileNetV2 shapes.

Issue 3's benchmark. Both models are defined here (torchvision's layouts, written out because torchvision is
not usable with this torch), with seeded random weights and random BatchNorm statistics, in eval mode; the
input is one 224x224 image. For each channel ratio 0.3 / 0.5 / 0.7 a deep copy is pruned with
``prunekit.structured.prune_model(copy, x, ratio=r, round_to=8, verify=True)`` (verify: the pruned model
must equal the original with the removed channels zeroed; a few seconds at 224x224).

Time: for each memory format (NCHW, the PyTorch default, and channels_last) and thread count, the dense model
and the three pruned copies are timed in the same process, interleaved call by call (A B C D, D C B A, ...)
after a warm-up, so that load from other processes hits all of them alike. The table gives

- params, MACs (``prunekit.analysis.macs.count_macs``) and memory-traffic ratios pruned/dense,
- ideal speedup = 1 / MACs ratio (the bound when latency is proportional to MACs; a memory-bound model
  could reach at most 1 / bytes ratio),
- measured speedup = dense p50 / pruned p50, measured/ideal, and efficiency = (measured - 1) / (ideal - 1)
  (the share of the time the MACs promise to save that is saved),
- two estimates more robust to a shared machine: the median of per-round ratios and the ratio of minima,
- p50 and p99 of both.

Issue 3's target reads "at 50% of channels the measured latency speedup reaches at least 80% of the MACs
reduction's ideal speedup", i.e. ``measured >= 0.8 * ideal`` (the ``meas/ideal`` column, not ``eff.``);
the verdict lines after the table check it for every model, format and thread count at ratio 0.5.
``--profile`` adds, at 1 thread and ratio 0.5, the time per layer kind (3x3, 1x1, depthwise convs, norms,
activations, pooling) next to its work ratio, and the single layers that scale worst.

    python benchmarks/bench_structured.py              # full run: 2 formats x 1, 2 threads (about 6 minutes)
    python benchmarks/bench_structured.py --quick      # smoke run: few calls, NCHW, 1 thread
    python benchmarks/bench_structured.py --quick --profile --models mobilenet_v2 --formats channels_last

Pruning itself (``structured_timing.py``; torchvision and Torch-Pruning in a venv of their own):

    python benchmarks/bench_structured.py --time                 # prunekit vs Torch-Pruning, time to prune
    python benchmarks/bench_structured.py --time --tv-models resnet50 --reps 5
    python benchmarks/bench_structured.py --params               # parameters kept at 0.5, both tools
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import prunekit.structured
import structured_timing  # benchmarks/, next to this script
from prunekit.analysis.macs import count_macs
from prunekit.models.resnet import BasicBlock
from prunekit.runtime.cpu import features

RATIOS = (0.3, 0.5, 0.7)
TARGET_RATIO = 0.5
TARGET_SHARE = 0.8


# --------------------------------------------------------------------------------------------- models
class ResNet18(nn.Module):
    """He et al. 2016, ImageNet layout: 7x7/2 stem, 3x3/2 max pool, BasicBlock stages [2, 2, 2, 2]."""

    def __init__(self, num_classes: int = 1000, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """Sandler et al. 2018, width 1.0; CONFIG rows are (expand t, channels c, repeats n, stride s)."""

    CONFIG = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        layers = [_conv_bn(3, cin, 3, 2)]
        for t, c, n, s in self.CONFIG:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded He-normal convs, small linear weights, and random BatchNorm affine/statistics, so that channel
    norms differ (with BN at weight 1 / mean 0 / var 1 the ranking would be left to conv weights only)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.01)
                m.bias.zero_()
    return model.eval()


MODELS = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}


# ------------------------------------------------------------------------------------------ measuring
def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Deployment-style inference: fold every eval-mode BatchNorm2d into the Conv2d before it (consecutive
    entries of an nn.Sequential, or attributes named ``convN`` / ``bnN``) and replace it by nn.Identity."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            paired = isinstance(parent, nn.Sequential) or (a.startswith("conv") and b == "bn" + a[4:])
            if paired and isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    return model


def prune_copies(dense: nn.Module, x: torch.Tensor, ratios) -> dict[float, dict]:
    """Prune one deep copy per ratio, with ``verify=True`` (a few seconds at 224x224 for these models)."""
    out = {}
    for r in ratios:
        start = time.perf_counter()
        result = prunekit.structured.prune_model(copy.deepcopy(dense), x, ratio=r, round_to=8, verify=True)
        out[r] = {
            "model": result.model.eval(),
            "params": result.params_after,
            "max_abs_diff": result.max_abs_diff,
            "prune_s": time.perf_counter() - start,
        }
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


@torch.inference_mode()
def interleaved_times(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int) -> dict:
    """Per-call times (ms): every round calls each model once, in an order reversed every other round
    (A B C, C B A, ...), so load from other processes hits all models alike. Unlike
    ``prunekit.analysis.compare_latency`` (blocks of calls, summary statistics only) this keeps the raw
    times, which gives the per-round ratio dense/pruned: a paired estimate that cancels slow drifts."""
    names = list(models)
    for name in names:
        for _ in range(warmup):
            models[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            models[name](x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.BatchNorm2d):
        return "batchnorm"
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return "activation"
    if isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return "pool"
    if m.groups > 1 and m.groups == m.in_channels:
        return "conv depthwise 3x3"
    if m.in_channels == 3:
        return f"conv stem {m.kernel_size[0]}x{m.kernel_size[1]}"
    return f"conv {m.kernel_size[0]}x{m.kernel_size[1]}"


_PROFILED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def _shape(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"{m.in_features}->{m.out_features}"
    return f"{m.in_channels}->{m.out_channels}" + (f" g{m.groups}" if m.groups > 1 else "")


def layer_times(model: nn.Module, x: torch.Tensor, runs: int) -> tuple[dict[str, list[float]], list[float]]:
    """Per-call milliseconds inside each profiled module (torch.profiler regions opened and closed by
    hooks) and per-call wall times; wall minus the modules is residual adds, flatten and eager overhead."""
    from torch.profiler import ProfilerActivity, profile, record_function

    stack: list = []
    handles = []

    def enter(name: str):
        def hook(module, inputs):
            region = record_function(f"layer::{name}")
            region.__enter__()
            stack.append(region)

        return hook

    def leave(module, inputs, output):
        stack.pop().__exit__(None, None, None)

    walls = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, _PROFILED):
                handles.append(m.register_forward_pre_hook(enter(name)))
                handles.append(m.register_forward_hook(leave))
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    start = time.perf_counter()
                    model(x)
                    walls.append((time.perf_counter() - start) * 1e3)
    finally:
        for h in handles:
            h.remove()
    prefix = "layer::"
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.name.startswith(prefix):
            times.setdefault(e.name[len(prefix) :], []).append(e.cpu_time_total / 1e3)
    return times, walls


def _output_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    sizes: dict[str, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: sizes.__setitem__(name, o.numel()))
        for name, m in model.named_modules()
        if isinstance(m, _PROFILED)
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sizes


def profile_report(name: str, dense: nn.Module, pruned: nn.Module, x: torch.Tensor, runs: int) -> None:
    """Which layers stop scaling: fastest time per layer kind, dense against pruned, next to the kind's work
    ratio (MACs for convs and linear layers, output elements for norms, activations and pooling)."""
    models = {"dense": dense, "pruned": pruned}
    macs = {k: {row["name"]: row["macs"] for row in count_macs(m, x)["layers"]} for k, m in models.items()}
    sizes = {k: _output_sizes(m, x) for k, m in models.items()}
    kinds = {
        n: _kind(m) for n, m in dense.named_modules() if isinstance(m, _PROFILED) and n in sizes["dense"]
    }
    per_call: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    walls: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):  # alternate the two models' profiles
        for label, model in models.items():
            t, w = layer_times(model, x, runs)
            walls[label] += w
            for layer, values in t.items():
                per_call[label].setdefault(layer, []).extend(values)
    # minimum over calls: the estimate least disturbed by other processes (a median per layer would not add
    # up to the median wall time when the process is descheduled now and then)
    best = {k: {layer: min(v) for layer, v in per_call[k].items()} for k in models}
    wall = {k: min(walls[k]) for k in models}
    work = {
        k: {n: macs[k].get(n) or sizes[k].get(n, 0) for n in kinds} for k in models
    }  # MACs, or output elements for the MAC-free kinds
    rows: dict[str, list] = {}
    for layer, kind in sorted(kinds.items(), key=lambda item: item[1]):
        row = rows.setdefault(kind, [0, 0.0, 0.0, 0, 0])
        row[0] += 1
        row[1] += best["dense"].get(layer, 0.0)
        row[2] += best["pruned"].get(layer, 0.0)
        row[3] += work["dense"][layer]
        row[4] += work["pruned"][layer]
    act = rows.get("activation", [0, 0, 0, 1, 1])
    rows["rest: adds, overhead"] = [
        0,
        wall["dense"] - sum(r[1] for r in rows.values()),
        wall["pruned"] - sum(r[2] for r in rows.values()),
        act[3],
        act[4],
    ]
    print(
        f"\n{name}, ratio {TARGET_RATIO}, {torch.get_num_threads()} thread(s): fastest ms per forward "
        "by layer kind\n(torch.profiler; work = MACs for conv/linear, output elements otherwise; "
        "rest scaled like activations)"
    )
    header = (
        f"{'kind':<22}{'layers':>7}{'dense ms':>10}{'pruned ms':>10}{'time ratio':>11}{'work ratio':>11}"
        f"{'% dense':>9}{'% pruned':>9}{'% dense MACs':>13}"
    )
    print(header)
    print("-" * len(header))
    total_macs = sum(macs["dense"].values())
    bound = 0.0
    for kind, (n, td, tp, wd, wp) in rows.items():
        bound += td * wp / wd
        share = sum(macs["dense"].get(layer, 0) for layer, k in kinds.items() if k == kind) / total_macs
        print(
            f"{kind:<22}{n:>7}{td:>10.2f}{tp:>10.2f}{tp / td:>11.3f}{wp / wd:>11.3f}"
            f"{td / wall['dense']:>9.1%}{tp / wall['pruned']:>9.1%}{share:>13.1%}"
        )
    ideal = total_macs / sum(macs["pruned"].values())
    print(
        f"{'total (fastest wall)':<22}{len(kinds):>7}{wall['dense']:>10.2f}{wall['pruned']:>10.2f}"
        f"{wall['pruned'] / wall['dense']:>11.3f}{1 / ideal:>11.3f}"
    )
    print(
        f"speedup: measured here {wall['dense'] / wall['pruned']:.2f}x; MACs ideal {ideal:.2f}x; "
        f"if every kind scaled exactly with its own work ratio: {wall['dense'] / bound:.2f}x "
        "(the time-weighted bound)"
    )

    def lost(n: str) -> float:  # ms the layer loses against scaling with its work ratio
        return best["pruned"].get(n, 0.0) - best["dense"].get(n, 0.0) * work["pruned"][n] / work["dense"][n]

    print("layers losing the most time against their own work ratio (pruned ms - dense ms * work ratio):")
    mods_dense, mods_pruned = dict(dense.named_modules()), dict(pruned.named_modules())
    for n in sorted((n for n in kinds if kinds[n].startswith(("conv", "linear"))), key=lost, reverse=True)[
        :8
    ]:
        td, tp = best["dense"].get(n, 0.0), best["pruned"].get(n, 0.0)
        wd, wp = work["dense"][n], work["pruned"][n]
        print(
            f"  {n:<22}{kinds[n]:<20}{_shape(mods_dense[n]):>15} -> {_shape(mods_pruned[n]):<15}"
            f"{td:6.3f} -> {tp:6.3f} ms  time x{tp / td:.2f}  MACs x{wp / wd:.2f}"
        )


def traffic_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """A lower bound on memory traffic: float32 inputs, outputs and parameters of every leaf module that runs
    (convs, linear, norms, activations, pooling), each read or written once. Functional adds are left out."""
    total = [0]

    def hook(module, inputs, output):
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)] + [output]
        params = sum(p.numel() for p in module.parameters(recurse=False))
        total[0] += 4 * (sum(t.numel() for t in tensors) + params)

    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _timing_rounds(models: dict[str, nn.Module], x: torch.Tensor, budget_s: float) -> int:
    """Rounds (one call of every model each) that fit ``budget_s`` at the current thread count."""
    with torch.inference_mode():
        for m in models.values():
            m(x)
        start = time.perf_counter()
        for m in models.values():
            m(x)
        per_round = time.perf_counter() - start
    return max(20, min(1000, int(budget_s / per_round)))


FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few timed calls, 1 thread, NCHW")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 1 2)")
    parser.add_argument(
        "--formats", nargs="+", choices=sorted(FORMATS), default=None, help="memory formats (default both)"
    )
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument(
        "--seconds", type=float, default=None, help="timing budget per model, format and thread count (25)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="per-layer-kind CPU times at ratio 0.5, 1 thread"
    )
    parser.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs after pruning")
    parser.add_argument("--time", action="store_true", help="time to prune: prunekit vs Torch-Pruning")
    parser.add_argument("--params", action="store_true", help="parameters kept at 0.5: prunekit vs T-P")
    parser.add_argument("--tv-models", nargs="+", default=None, help="torchvision models for --time/--params")
    parser.add_argument("--reps", type=int, default=3, help="runs per tool and model for --time")
    args = parser.parse_args(argv)
    if args.time or args.params:
        print(f"torch {torch.__version__}, {_cpu_name()}, {features().describe()}")
        if args.time:
            structured_timing.print_times(
                structured_timing.time_models(args.tv_models or structured_timing.TIME_MODELS, args.reps)
            )
        if args.params:
            structured_timing.param_ratios(args.tv_models or structured_timing.PARAM_MODELS)
        return
    threads = args.threads or ([1] if args.quick else [1, 2])
    formats = args.formats or (["contiguous"] if args.quick else ["contiguous", "channels_last"])
    budget = args.seconds or (5.0 if args.quick else 25.0)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    print(
        f"torch {torch.__version__}, {platform.machine()}, cpu_count {os.cpu_count()}, "
        f"torch.get_num_threads() {torch.get_num_threads()} at start, "
        f"mkldnn {torch.backends.mkldnn.enabled}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        f"input 1x3x{args.size}x{args.size}, batch 1, round_to=8, importance=l2, fold_bn={args.fold_bn}; "
        f"load average {_load()}"
    )
    rows = []
    profiled = {}
    for name in args.models:
        dense = _init(MODELS[name](), seed=0)
        torch.set_num_threads(max(threads))
        pruned = prune_copies(dense, x, RATIOS)
        macs_dense = count_macs(dense, x)["total"]
        bytes_dense = traffic_bytes(dense, x)
        params_dense = _params(dense)
        print(
            f"{name}: dense {params_dense / 1e6:.2f} M params, {macs_dense / 1e9:.3f} GMACs, "
            f"{bytes_dense / 2**20:.1f} MiB traffic"
        )
        for r, p in pruned.items():
            p["macs"] = count_macs(p["model"], x)["total"]
            p["bytes"] = traffic_bytes(p["model"], x)
            print(
                f"  ratio {r}: {p['params'] / 1e6:.2f} M params, {p['macs'] / 1e9:.3f} GMACs, "
                f"{p['bytes'] / 2**20:.1f} MiB, prune+verify {p['prune_s']:.1f} s, "
                f"max|diff| vs masked original {p['max_abs_diff']:.1e}"
            )
        models = {"dense": dense, **{f"r{r}": p["model"] for r, p in pruned.items()}}
        if args.fold_bn:
            models = {k: fold_batchnorm(m) for k, m in models.items()}
        for fmt_name in formats:
            fmt = FORMATS[fmt_name]
            models = {k: m.to(memory_format=fmt) for k, m in models.items()}
            xf = x.contiguous(memory_format=fmt)
            for t in threads:
                torch.set_num_threads(t)
                load = _load()
                rounds = _timing_rounds(models, xf, budget)
                times = interleaved_times(models, xf, rounds, warmup=max(5, rounds // 20))
                dense_times = times["dense"]
                for r, p in pruned.items():
                    pruned_times = times[f"r{r}"]
                    ideal = macs_dense / p["macs"]
                    measured = statistics.median(dense_times) / statistics.median(pruned_times)
                    rows.append(
                        {
                            "model": name,
                            "format": "NHWC" if fmt_name == "channels_last" else "NCHW",
                            "ratio": r,
                            "threads": torch.get_num_threads(),
                            "params": p["params"] / params_dense,
                            "macs": p["macs"] / macs_dense,
                            "bytes": p["bytes"] / bytes_dense,
                            "ideal": ideal,
                            "measured": measured,
                            "share": measured / ideal,
                            "eff": (measured - 1) / (ideal - 1),
                            "paired": statistics.median(d / q for d, q in zip(dense_times, pruned_times)),
                            "best": min(dense_times) / min(pruned_times),
                            "dense_p50": statistics.median(dense_times),
                            "p50": statistics.median(pruned_times),
                            "dense_p99": _p(dense_times, 0.99),
                            "p99": _p(pruned_times, 0.99),
                            "runs": rounds,
                            "load": load,
                        }
                    )
            if args.profile:
                xp = x.contiguous(memory_format=fmt)
                pair = copy.deepcopy(models["dense"]), copy.deepcopy(models[f"r{TARGET_RATIO}"])
                profiled[f"{name} {fmt_name}"] = (*pair, xp)

    header = (
        f"{'model':<13}{'fmt':>5}{'ratio':>6}{'thr':>4}{'params':>7}{'MACs':>7}{'bytes':>7}{'ideal':>8}"
        f"{'meas.':>8}{'meas/ideal':>11}{'eff.':>6}{'paired':>8}{'min':>7}{'dense p50':>10}{'prun p50':>9}"
        f"{'dense p99':>10}{'prun p99':>9}{'runs':>5}  load"
    )
    print(
        "\nparams, MACs, bytes (memory traffic lower bound): pruned/dense. ideal = 1 / MACs ratio; "
        "a memory-bound model\ncould reach at most 1 / bytes ratio. meas. = dense p50 / pruned p50. "
        "eff. = (meas. - 1) / (ideal - 1).\npaired = median over rounds of dense/pruned; min = dense min / "
        "pruned min (least disturbed by other load).\nTimes in ms; dense and the three pruned copies "
        "interleaved call by call in one process.\nissue-3 target: meas. >= 0.8 * ideal, "
        "i.e. meas/ideal >= 0.8, at ratio 0.5.\n"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['model']:<13}{row['format']:>5}{row['ratio']:>6.1f}{row['threads']:>4}{row['params']:>7.3f}"
            f"{row['macs']:>7.3f}{row['bytes']:>7.3f}{row['ideal']:>7.2f}x{row['measured']:>7.2f}x"
            f"{row['share']:>11.2f}{row['eff']:>6.2f}{row['paired']:>7.2f}x{row['best']:>6.2f}x"
            f"{row['dense_p50']:>10.2f}{row['p50']:>9.2f}{row['dense_p99']:>10.2f}{row['p99']:>9.2f}"
            f"{row['runs']:>5}  {row['load']}"
        )
    print()
    for row in rows:
        if row["ratio"] == TARGET_RATIO:
            ok = row["measured"] >= TARGET_SHARE * row["ideal"]
            print(
                f"target {row['model']} {row['format']}, {row['threads']} thread(s): measured "
                f"{row['measured']:.2f}x vs 0.8 * ideal = {TARGET_SHARE * row['ideal']:.2f}x "
                f"(meas/ideal {row['share']:.2f}) -> {'MET' if ok else 'MISSED'}"
            )
    one_thread = {(r["model"], r["format"]): r["dense_p50"] for r in rows if r["threads"] == 1}
    for row in rows:
        base = one_thread.get((row["model"], row["format"]))
        if row["threads"] > 1 and row["ratio"] == RATIOS[0] and base and row["dense_p50"] >= base:
            print(
                f"WARNING: {row['model']} {row['format']} dense at {row['threads']} threads "
                f"({row['dense_p50']:.1f} ms) is no faster than at 1 thread ({base:.1f} ms): the cores are "
                f"busy with other processes (load {row['load']} on {os.cpu_count()} cores) and OpenMP "
                "threads wait on each other; these rows measure contention, not the models"
            )
    print(f"load average at end {_load()}")
    if args.profile:
        torch.set_num_threads(1)
        for name, (dense, pruned_model, xf) in profiled.items():
            profile_report(name, dense, pruned_model, xf, runs=10 if args.quick else 20)


if __name__ == "__main__":
    main()
