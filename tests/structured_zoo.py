"""A catalogue of small architectures for testing structured pruning.

Every model is plain ``torch.nn`` code written the way users write it: forwards read sizes from ``x.shape``
and never hard-code channel counts, so a physically pruned model still runs. Each ``Case.build()`` returns a
seeded, randomly initialised model in ``eval()`` mode; ``Case.example()`` returns seeded example inputs with
batch 2.

Normalisation layers get random affine parameters and running statistics (and PReLU random slopes) instead
of PyTorch's identity-like defaults, so that pruning the wrong index of a BatchNorm, LayerNorm or PReLU
changes the output and an output-equivalence check catches it.

All models return a single tensor; ``siamese_shared`` is the only case with more than one input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # the model in eval() mode, seeded (torch.manual_seed inside)
    example: Callable[[], tuple[torch.Tensor, ...]]  # seeded example inputs (batch 2)
    prunable: bool = True  # False when nothing may be removed (`note` says why)
    note: str = ""


# ----------------------------------------------------------------------------------------------------
# helpers


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_RMSNorm = getattr(nn, "RMSNorm", None)


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 1234) -> nn.Module:
    """Give every norm layer random affine parameters / running stats and every PReLU random slopes."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        is_norm = isinstance(m, _NORMS) or (_RMSNorm is not None and isinstance(m, _RMSNorm))
        if is_norm:
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            if isinstance(w, torch.Tensor):
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
            if isinstance(b, torch.Tensor):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            rm = getattr(m, "running_mean", None)
            rv = getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor):
                rm.copy_(0.1 * torch.randn(rm.shape, generator=g))
            if isinstance(rv, torch.Tensor):
                rv.copy_(torch.rand(rv.shape, generator=g) + 0.5)
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(0.05 + 0.45 * torch.rand(m.weight.shape, generator=g))
    return model


def _finish(model: nn.Module) -> nn.Module:
    return randomize_norms(model).eval()


def _images(c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> Callable[[], tuple[torch.Tensor, ...]]:
    def example() -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(2, c, h, w, generator=g),)

    return example


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------
# ResNet: BasicBlock and Bottleneck


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetBasic(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, stride=2), BasicBlock(64, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBottleneck(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 8))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, stride=2), Bottleneck(64, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------------------------------
# MobileNetV2 inverted residuals


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, 1),  # no expansion layer, residual
            InvertedResidual(16, 24, 2, 6),
            InvertedResidual(24, 24, 1, 6),  # residual
            InvertedResidual(24, 32, 2, 6),
            InvertedResidual(32, 32, 1, 6),  # residual
            conv_bn(32, 128, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


# ----------------------------------------------------------------------------------------------------
# EfficientNet-like MBConv with squeeze-excitation


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = conv_bn(cin, hidden, 1, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = conv_bn(hidden, cout, 1, act=None)

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.use_res else out


class EfficientNetSE(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(
            MBConv(16, 16, 1, 1),
            MBConv(16, 24, 2, 4),
            MBConv(24, 24, 1, 4),
        )
        self.head = conv_bn(24, 96, 1, act=nn.SiLU)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


# ----------------------------------------------------------------------------------------------------
# DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.norm(x))))


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 10, growth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        c = 16
        layers: list[nn.Module] = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)  # 16 -> 40
        self.trans1 = Transition(c, c // 2)  # 40 -> 20
        c //= 2
        layers = []
        for _ in range(2):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*layers)  # 20 -> 36
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.block2(self.trans1(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------------------------------
# Inception


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


class Inception(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.inc1 = InceptionBlock(32, 16, 16, 24, 8, 8, 8)  # -> 56
        self.pool = nn.MaxPool2d(2)
        self.inc2 = InceptionBlock(56, 24, 24, 32, 8, 16, 16)  # -> 88
        self.fc = nn.Linear(88, num_classes)

    def forward(self, x):
        x = self.inc2(self.pool(self.inc1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------
# UNet


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    def __init__(self, in_ch: int = 3, out_ch: int = 2):
        super().__init__()
        self.enc1 = double_conv(in_ch, 16)
        self.enc2 = double_conv(16, 32)
        self.bottleneck = double_conv(32, 64)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = double_conv(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = double_conv(32, 16)
        self.out = nn.Conv2d(16, out_ch, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


# ----------------------------------------------------------------------------------------------------
# ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. stride 2: both branches see the whole input; stride 1: split into halves."""

    def __init__(self, cin: int, cout: int, stride: int, use_chunk: bool = True):
        super().__init__()
        self.stride = stride
        self.use_chunk = use_chunk
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn(cin, half, 1),
            )
            b2_in = cin
        else:
            self.branch1 = None
            b2_in = half
        self.branch2 = nn.Sequential(
            conv_bn(b2_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, act=None),  # depthwise
            conv_bn(half, half, 1),
        )

    def forward(self, x):
        if self.branch1 is not None:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        else:
            if self.use_chunk:
                x1, x2 = x.chunk(2, dim=1)
            else:
                x1, x2 = torch.split(x, x.shape[1] // 2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.stage = nn.Sequential(
            ShuffleUnit(24, 48, 2),
            ShuffleUnit(48, 48, 1, use_chunk=True),
            ShuffleUnit(48, 48, 1, use_chunk=False),
        )
        self.conv_last = conv_bn(48, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.conv_last(self.stage(self.stem(x)))
        return self.fc(x.mean([2, 3]))


# ----------------------------------------------------------------------------------------------------
# ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, via permutes (as in torchvision's ConvNeXt)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # layer scale; real ConvNeXt starts at 1e-6, which would hide the block from an equivalence check
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), LayerNorm2d(32, eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 64, 2, stride=2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(64))
        self.norm = nn.LayerNorm(64, eps=1e-6)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# ----------------------------------------------------------------------------------------------------
# ViT


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(
        self, img: int = 32, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4, classes=10
    ):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, n + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------------------------------
# 1-D conv audio model


class ResBlock1d(nn.Module):
    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(c)
        self.act1 = nn.PReLU(c)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(c)
        self.act2 = nn.PReLU()  # single shared slope: not tied to any channel

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + x)


class Conv1dAudio(nn.Module):
    """Keyword-spotting style model over 40 log-mel bands x 100 frames."""

    def __init__(self, mels: int = 40, classes: int = 12):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(mels, 64, 5, padding=2, bias=False), nn.BatchNorm1d(64), nn.PReLU(64)
        )
        self.block1 = ResBlock1d(64, dilation=2)
        self.down = nn.Sequential(nn.Conv1d(64, 96, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(96))
        self.act = nn.PReLU(96)
        self.block2 = ResBlock1d(96)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(96, classes)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = self.block2(self.act(self.down(x)))
        return self.fc(self.pool(x).flatten(1))


# ----------------------------------------------------------------------------------------------------
# MLP-Mixer


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x):  # x: (B, N, D)
        y = self.norm1(x).transpose(1, 2)  # (B, D, N): mix across tokens
        x = x + self.token_mlp(y).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, img: int = 32, patch: int = 4, dim: int = 64, depth: int = 2, classes: int = 10):
        super().__init__()
        tokens = (img // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 32, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


# ----------------------------------------------------------------------------------------------------
# CNN with flatten -> Linear over channel x spatial


class FlattenLinear(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        x = self.features(x)  # (B, 32, 4, 4) for 16x16 inputs
        x = x.flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


# ----------------------------------------------------------------------------------------------------
# MLP, grouped conv, embedding


class MLP(nn.Module):
    def __init__(self, din: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(din, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)


class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, groups: int = 4, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
        self.conv3 = conv_bn(width, cout, 1, act=None)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x):
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class GroupedConvNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.block1 = ResNeXtBlock(32, 64, 64, groups=4)
        self.block2 = ResNeXtBlock(64, 64, 64, groups=4)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PReLUEmbedding(nn.Module):
    def __init__(self, vocab: int = 100, emb: int = 32, hidden: int = 64, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb, padding_idx=0)
        self.proj = nn.Linear(emb, hidden)
        self.act = nn.PReLU(num_parameters=hidden)  # PReLU's channel dim is dim 1
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        h = self.proj(self.embed(tokens))  # (B, T, H)
        h = self.act(h.transpose(1, 2))  # (B, H, T)
        return self.head(h.mean(dim=2))


# ----------------------------------------------------------------------------------------------------
# extra cases


class ChannelScale(nn.Module):
    """Per-channel learned scale/shift Parameters combined with torch.mul / torch.sub / broadcast add."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.scale1 = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.scale2 = nn.Parameter(torch.rand(32) + 0.5)
        self.shift2 = nn.Parameter(0.1 * torch.randn(32, 1, 1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.sub(x, torch.mul(self.conv1(x), self.scale1))  # residual subtraction
        y = self.conv2(x)
        y = F.relu(y * self.scale2.view(1, -1, 1, 1) + self.shift2)
        return self.fc(y.mean((2, 3)))


class SiameseShared(nn.Module):
    """Two inputs through one encoder; inside it one conv module is applied twice (weight sharing)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)  # used twice in a row: its in and out channels are tied
        self.fc1 = nn.Linear(48, 32)
        self.fc2 = nn.Linear(32, classes)

    def encode(self, x):
        x = self.stem(x)
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return x.mean((2, 3))

    def forward(self, a, b):
        fa, fb = self.encode(a), self.encode(b)
        f = torch.cat([fa, fb, (fa - fb).abs()], dim=1)
        return self.fc2(F.relu(self.fc1(f)))


def norm_variety(classes: int = 10) -> nn.Sequential:
    """nn.Sequential with GroupNorm (4 groups), InstanceNorm2d(affine), per-channel GroupNorm, RMSNorm."""
    rms = nn.RMSNorm(64) if _RMSNorm is not None else nn.LayerNorm(64)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.GroupNorm(4, 16),
        nn.SiLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.InstanceNorm2d(32, affine=True),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.GroupNorm(32, 32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        rms,
        nn.GELU(),
        nn.Linear(64, classes),
    )


class IOTied(nn.Module):
    """Every dimension is tied to the model's input or output channels: nothing may be removed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, x):
        return x + self.dw(F.relu(self.bn(self.conv(x))))


# ----------------------------------------------------------------------------------------------------
# the catalogue


def _builder(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return _finish(factory())

    return build


def _tokens() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(1, 100, (2, 12), generator=g),)


def _features() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 64, generator=g),)


def _audio() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 40, 100, generator=g),)


def _pair() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g))


_LN_NOTE = (
    "LayerNorm normalises over the pruned dim: pruning differs from zeroing unless stats use kept dims only"
)

_CASES = [
    Case("resnet_basic", _builder(ResNetBasic), _images()),
    Case("resnet_bottleneck", _builder(ResNetBottleneck), _images()),
    Case("mobilenetv2", _builder(MobileNetV2), _images()),
    Case("efficientnet_se", _builder(EfficientNetSE), _images()),
    Case("densenet", _builder(DenseNet), _images()),
    Case("inception", _builder(Inception), _images()),
    Case(
        "unet", _builder(UNet), _images(), note="dense output: (B, 2, H, W); the 2 output channels are fixed"
    ),
    Case("shufflenet", _builder(ShuffleNet), _images()),
    Case("convnext", _builder(ConvNeXt), _images(), note=_LN_NOTE),
    Case(
        "vit",
        _builder(ViT),
        _images(),
        note="4 heads of 16: whole heads go (q/k/v rows and out_proj columns; the module becomes a "
        "HeadPrunedMultiheadAttention), and MLP width. The residual stream stays: " + _LN_NOTE,
    ),
    Case("conv1d_audio", _builder(Conv1dAudio), _audio, note="input (B, 40 mel bands, 100 frames)"),
    Case(
        "mlp_mixer",
        _builder(MLPMixer),
        _images(),
        note="tokens (64) are fixed by the input size. " + _LN_NOTE,
    ),
    Case(
        "flatten_linear",
        _builder(FlattenLinear),
        _images(3, 16, 16),
        note="fc1 sees 32 channels x 16 positions: removing channel c removes fc1 inputs c*16 .. c*16+15",
    ),
    Case("mlp", _builder(MLP), _features, note=_LN_NOTE),
    Case(
        "grouped_conv",
        _builder(GroupedConvNet),
        _images(),
        note="groups=4: every group must keep the same number of channels",
    ),
    Case("prelu_embedding", _builder(PReLUEmbedding), _tokens, note="integer token input (B, T)"),
    Case("channel_scale", _builder(ChannelScale), _images()),
    Case(
        "siamese_shared",
        _builder(SiameseShared),
        _pair,
        note="two inputs; `shared` conv is called twice per encode and the encoder twice per forward",
    ),
    Case(
        "norm_variety",
        _builder(norm_variety),
        _images(),
        note="GroupNorm(4, 16) mixes 4 channels per group: output-equivalent only when whole groups go "
        "(num_groups shrinks); GroupNorm(32, 32) and InstanceNorm are per-channel; RMSNorm as LayerNorm",
    ),
    Case(
        "io_tied",
        _builder(IOTied),
        _images(),
        prunable=False,
        note="every channel dim is tied to the 3 input / 3 output channels by the residual add",
    ),
]

ZOO: dict[str, Case] = {case.name: case for case in _CASES}
