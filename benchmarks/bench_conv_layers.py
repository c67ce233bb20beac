"""Single convolution layers at real image sizes: prunekit's direct sparse kernels against dense engines.

Every distinct ResNet-18 convolution at 224x224 and the MobileNetV2 pointwise (1x1) shapes, batch 1, one
thread by default. Each layer's weight is magnitude-pruned to the sparsity (float32: unstructured; int8:
4x1 input-channel blocks, the shape the int8 kernel consumes), its input is a random ReLU output. Timed
interleaved (docs/measuring.md), medians:

    f32 dense        torch conv2d + bias + ReLU (oneDNN)
    f32 in layout    DirectConvF32 on its input already in the plane layout, bias + ReLU fused, the fastest
                     of its tiles (what a layer costs inside a compiled segment)
    f32 per layer    PlanesConv2d: the same plus the conversions NCHW -> layout -> NCHW on every call
    int8 dense       torch's x86 INT8 engine (quantized conv + ReLU, per-channel, channels-last input)
    int8 in layout   DirectConvI8 (vpdpbusd, or the AVX2 path), requantization fused, fastest tile

Ratios are against the dense engine of the same precision; "GMAC/s" counts the nonzero multiply-adds.

    python benchmarks/bench_conv_layers.py                 # 70% and 90%
    python benchmarks/bench_conv_layers.py --sparsity 0.5,0.7,0.9 --rounds 15 --isa avx2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.runtime import conv as C
from prunekit.runtime import conv_layout as L
from prunekit.runtime.cpu import features

warnings.filterwarnings("ignore")

# name, cin, cout, k, stride, input size
LAYERS = [
    ("r18 conv1 7x7/2", 3, 64, 7, 2, 224),
    ("r18 3x3 64@56", 64, 64, 3, 1, 56),
    ("r18 3x3/2 64->128", 64, 128, 3, 2, 56),
    ("r18 1x1/2 64->128", 64, 128, 1, 2, 56),
    ("r18 3x3 128@28", 128, 128, 3, 1, 28),
    ("r18 3x3 256@14", 256, 256, 3, 1, 14),
    ("r18 3x3 512@7", 512, 512, 3, 1, 7),
    ("mnv2 1x1 16->96 @112", 16, 96, 1, 1, 112),
    ("mnv2 1x1 144->24 @56", 144, 24, 1, 1, 56),
    ("mnv2 1x1 192->32 @28", 192, 32, 1, 1, 28),
    ("mnv2 1x1 384->64 @14", 384, 64, 1, 1, 14),
    ("mnv2 1x1 576->96 @14", 576, 96, 1, 1, 14),
    ("mnv2 1x1 960->160 @7", 960, 160, 1, 1, 7),
    ("mnv2 1x1 320->1280 @7", 320, 1280, 1, 1, 7),
]


def timed(fns: dict, rounds: int) -> dict[str, float]:
    for f in fns.values():
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def block_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    o, i, kh, kw = w.shape
    if i % 4:
        return unstructured(w, sparsity)
    norms = w.reshape(o, i // 4, 4, kh, kw).pow(2).sum(2)
    k = int(sparsity * norms.numel())
    keep = norms > norms.flatten().kthvalue(k).values if k else torch.ones_like(norms, dtype=torch.bool)
    return w * keep.unsqueeze(2).expand(o, i // 4, 4, kh, kw).reshape(w.shape)


def unstructured(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(sparsity * w.numel())
    return w * (w.abs() > w.abs().flatten().kthvalue(k).values) if k else w


def torch_int8_conv(w: torch.Tensor, b: torch.Tensor, stride: int, pad: int, x: torch.Tensor):
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d

    torch.backends.quantized.engine = "x86"
    cout, cin, k, _ = w.shape
    qc = ConvReLU2d(cin, cout, k, stride, pad)
    s_w = (w.abs().reshape(cout, -1).amax(1) / 127).clamp_min(1e-8).double()
    qc.set_weight_bias(
        torch.quantize_per_channel(w, s_w, torch.zeros(cout, dtype=torch.long), 0, torch.qint8), b
    )
    qc.scale, qc.zero_point = float(x.abs().max()) / 127, 0
    qx = torch.quantize_per_tensor(x, float(x.abs().max()) / 255, 0, torch.quint8)
    qx = qx.contiguous(memory_format=torch.channels_last)
    return lambda: qc(qx)


def run_layer(spec, sparsity: float, rounds: int, isa: str, vw: int) -> list[str]:
    name, cin, cout, k, stride, s = spec
    g = torch.Generator().manual_seed(0)
    pad = k // 2
    w0 = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cout * k * k)) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    x = torch.randn(1, cin, s, s, generator=g).relu()
    geom = C.ConvGeom(cin, cout, (k, k), (stride, stride), (pad, pad), (1, 1))
    rows = []
    # float32
    w = unstructured(w0, sparsity)
    inp = L.gather(cin, s, s, *geom.args)
    out = L.planes(cout, inp.height, inp.width, 0, 0, (), pitch=inp.pitch)
    X, Y = inp.alloc(), out.alloc()
    L.fill(x.numpy().reshape(-1).view(np.int32), 0, s * s, s, s, s, cin, X, L.fill_geo(inp), np.int32(0))
    kernels = {
        (nv, cb): C.DirectConvF32(
            w.numpy(), b.numpy(), geom, inp, out, nv=nv, vw=vw, cb=cb, clamp=(0, np.inf)
        )
        for nv in C.tile_options(vw)
        for cb in (8, 16, None)
        if cb is None or cb < cin
    }
    conv = torch.nn.Conv2d(cin, cout, k, stride, pad).eval()
    conv.weight.data, conv.bias.data = w, b
    layer = C.PlanesConv2d(conv, vw=vw, cb=16)
    fns = {"dense": lambda: F.conv2d(x, w, b, stride, pad).relu_(), "per-layer": lambda: layer(x)}
    fns |= {kk: (lambda c=c: c(X, Y)) for kk, c in kernels.items()}
    t = timed(fns, rounds)
    best = min((kk for kk in t if isinstance(kk, tuple)), key=t.get)
    nnz_macs = int(torch.count_nonzero(w)) * out.height * out.width
    rows.append(
        f"| {name} | f32 | {sparsity:.0%} | {t['dense'] * 1e6:.0f} | {t[best] * 1e6:.0f} | "
        f"{t[best] / t['dense']:.2f} | {t['per-layer'] / t['dense']:.2f} | {nnz_macs / t[best] / 1e9:.0f} | "
        f"nv{best[0]}/cb{best[1] or 'all'} |"
    )
    # int8, 4x1 blocks
    w8 = block_prune(w0, sparsity)
    s_w = (w8.abs().reshape(cout, -1).amax(1) / 127).clamp_min(1e-8)
    wq = torch.round(w8 / s_w.reshape(-1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
    s_x = float(x.abs().max()) / 127
    groups = -(-cin // 4)
    inq = L.gather(groups, s, s, *geom.args)
    outq = L.planes(-(-cout // 4), inq.height, inq.width, 1, 1, (-1, 0, 1), pitch=inq.pitch)
    Xq, Yq = inq.alloc(), outq.alloc()
    packed = np.empty(groups * s * s, np.int32)
    L.quantize_pack(x.numpy().reshape(-1), cin, s * s, np.float32(s_x), 0, packed)
    L.fill(packed, 0, s * s, s, s, s, groups, Xq, L.fill_geo(inq), np.int32(0))
    scale = (np.float32(s_x) * s_w.numpy()).astype(np.float32)
    dest = C.Int8Out(layout=outq, s_next=s_x, qlo=-127.0)
    qk = {
        (nv, cbg): C.DirectConvI8(
            wq.numpy(), scale, b.numpy(), geom, inq, dest, nv=nv, isa=isa, cbg=cbg, clamp=(0, np.inf)
        )  # fmt: skip
        for nv in C.tile_options(vw)
        for cbg in (2, 4, None)
        if cbg is None or cbg < groups
    }
    fns = {"dense": torch_int8_conv(w8, b, stride, pad, x)}
    fns |= {kk: (lambda c=c: c(Xq, Yq)) for kk, c in qk.items()}
    t = timed(fns, rounds)
    best = min((kk for kk in t if isinstance(kk, tuple)), key=t.get)
    nnz_macs = int(torch.count_nonzero(w8)) * outq.height * outq.width
    rows.append(
        f"| {name} | int8 4x1 | {sparsity:.0%} | {t['dense'] * 1e6:.0f} | {t[best] * 1e6:.0f} | "
        f"{t[best] / t['dense']:.2f} | - | {nnz_macs / t[best] / 1e9:.0f} | "
        f"nv{best[0]}/cbg{best[1] or 'all'} |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", default="0.7,0.9")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa", default=None, help="vnni512 or avx2 (default: this CPU's)")
    ap.add_argument("--only", default="", help="substring of the layer names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = args.isa or C.isa_name()
    vw = 16 if isa == "vnni512" else 8
    print(f"CPU: {features().describe()}; int8 path {isa}; float32 {vw * 32}-bit; {args.threads} thread(s)")
    head = ["layer", "kind", "sparsity", "dense us", "sparse us", "in layout / dense", "per layer / dense"]
    print("| " + " | ".join([*head, "GMAC/s", "tile"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in LAYERS:
        if args.only and args.only not in spec[0]:
            continue
        for sparsity in [float(v) for v in args.sparsity.split(",")]:
            for row in run_layer(spec, sparsity, args.rounds, isa, vw):
                print(row, flush=True)


if __name__ == "__main__":
    main()
