"""Size on disk of a 70%-pruned INT8 model, compressed, against its dense float32 artifact (issue 15's
target: at most 0.12x).

Models: the demo's digits ResNet (``resnet-digits``, widths 16/32/64, 2 blocks per stage) and a
ResNet-18-shaped one (prunekit's ``SmallResNet`` with ResNet-18's stages: widths 64/128/256/512, 2 basic
blocks each, 3 input channels, 1,000 classes; it differs from torchvision's only in the stem, a 3x3
convolution instead of 7x7 + max pooling: 11.2 M parameters instead of 11.7 M). Seeded random weights
(sizes do not depend on training), 70% global unstructured magnitude pruning of every Conv2d/Linear (the
classifier included, or, with the second row of each model, left dense), then prunekit's INT8 (static
activations, calibrated on random inputs, BatchNorm folded; the classifier int8) and the compressed
format (each tensor in its smallest encoding: prunekit.compress). Sizes are exact byte counts.

The bound: a bitmask costs 1 bit per weight whatever the sparsity, and each kept int8 value 1 byte, so a
70%-sparse int8 weight costs 1/8 + 0.3 = 0.425 bytes against 4 float32 bytes: 0.106x, before the
per-channel scales and constants, the dense biases and the file headers.

    python benchmarks/bench_int8_size.py
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import torch

from prunekit.artifact import plain_state_dict, save_artifact
from prunekit.compress import save_compressed
from prunekit.compress.source import tensor_specs
from prunekit.models import build_model
from prunekit.models.resnet import SmallResNet
from prunekit.quant.ptq import quantize
from prunekit.runtime.cpu import features
from prunekit.sparsifier import Sparsifier
from prunekit.targets import Targets


def measure(name: str, make, shape: tuple[int, ...], prune_classifier: bool, tmp: Path) -> None:
    torch.manual_seed(0)
    model = make().eval()
    dense = save_artifact(tmp / f"{name}-dense.safetensors", model)
    sparsifier = Sparsifier(model, 0.7, group="global", targets=Targets(prune_classifier=prune_classifier))
    sparsifier.prepare()
    sparsifier.prune()
    specs = sparsifier.layer_specs()
    calib = [torch.randn(8, *shape) for _ in range(2)]
    q = quantize(model.eval(), calibration=calib, classifier=True)
    state = plain_state_dict(q.model)
    path = save_compressed(
        state,
        tmp / f"{name}-int8.compressed.safetensors",
        value_dtype="keep",
        specs=tensor_specs(specs, state),
    )
    size = path.stat().st_size
    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]  # safetensors: length, then the JSON header
    weights = sum(p.numel() for n, p in make().named_parameters() if p.dim() > 1)
    head = "pruned too" if prune_classifier else "dense (int8)"
    print(
        f"{name:<14} classifier {head:<13} {dense:>12,} B dense float32 -> {size:>11,} B 70% + INT8 "
        f"compressed: {size / dense:.3f}x; without the file's JSON header ({header:,} B): "
        f"{(size - header) / dense:.3f}x  (bound 0.106x; {weights:,} weights; integer model: {q.integer})"
    )


def main() -> None:
    print(features().describe())
    models = [
        ("digits", lambda: build_model("resnet-digits", {"in_channels": 1}), (1, 8, 8)),
        (
            "resnet18-like",
            lambda: SmallResNet(in_channels=3, num_classes=1000, widths=(64, 128, 256, 512), blocks=2),
            (3, 32, 32),
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, shape in models:
            for prune_classifier in (True, False):
                measure(name, make, shape, prune_classifier, Path(tmp))


if __name__ == "__main__":
    main()
