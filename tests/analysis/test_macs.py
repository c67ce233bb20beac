"""count_macs against MACs computed by hand."""

import pytest
import torch
from torch import nn

from prunekit.analysis.macs import count_macs


def test_conv_with_stride_padding_groups():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    # output 9x9 -> floor((9 + 2 - 3) / 2) + 1 = 5; 6*5*5 outputs, each over 4/2 channels x 3x3 taps
    info = count_macs(conv, torch.randn(1, 4, 9, 9))
    assert info["total"] == 6 * 5 * 5 * 2 * 9 == 2700
    assert info["layers"] == [
        {"name": "<model>", "type": "Conv2d", "calls": 1, "macs": 2700, "output_shape": (1, 6, 5, 5)}
    ]


def test_depthwise_conv_counts_batch():
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)
    info = count_macs(conv, torch.randn(2, 8, 10, 10))
    assert info["total"] == 2 * 8 * 10 * 10 * 9 == 14400


def test_conv1d_and_conv3d():
    conv1 = nn.Conv1d(3, 5, kernel_size=4, dilation=2)  # length 20 -> 20 - 2*3 = 14
    assert count_macs(conv1, torch.randn(1, 3, 20))["total"] == 5 * 14 * 3 * 4
    conv3 = nn.Conv3d(2, 4, kernel_size=(1, 3, 3), padding=(0, 1, 1))
    assert count_macs(conv3, torch.randn(1, 2, 3, 6, 6))["total"] == 4 * 3 * 6 * 6 * 2 * 9


def test_conv_transpose_counts_input_scatter():
    deconv = nn.ConvTranspose2d(4, 6, kernel_size=3, stride=2, groups=2)
    # every one of the 4*5*5 inputs is scattered into 6/2 output channels over 3x3 taps
    assert count_macs(deconv, torch.randn(1, 4, 5, 5))["total"] == 4 * 5 * 5 * 3 * 9 == 2700


def test_linear_on_3d_input():
    info = count_macs(nn.Linear(16, 5), torch.randn(2, 7, 16))
    assert info["total"] == 2 * 7 * 5 * 16 == 1120


def test_multihead_attention_counts_projections_and_matmuls_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = model[0]
            self.attn = model[1]

        def forward(self, x):
            x = self.inp(x)
            return self.attn(x, x, x, need_weights=False)[0]

    info = count_macs(SelfAttention(), torch.randn(2, 5, 8))
    # per sample: q/k/v projections 3*5*8*8, Q K^T and A V 2*5*5*8, output projection 5*8*8
    attention = 2 * (3 * 5 * 64 + 2 * 5 * 5 * 8 + 5 * 64)
    assert info["by_type"] == {"Linear": 2 * 5 * 8 * 8, "MultiheadAttention": attention}
    assert [row["name"] for row in info["layers"]] == ["inp", "attn"]  # out_proj is not a row of its own


def test_cross_attention_with_kwargs_and_sequence_first():
    mha = nn.MultiheadAttention(8, 4, kdim=6, vdim=6)
    q, kv = torch.randn(3, 2, 8), torch.randn(7, 2, 6)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, q, kv):
            return self.mha(q, key=kv, value=kv)[0]

    expected = 2 * (3 * 8 * 8 + 7 * 6 * 8 + 7 * 6 * 8 + 2 * 3 * 7 * 8 + 3 * 8 * 8)
    assert count_macs(Cross(), (q, kv))["total"] == expected


def test_per_layer_rows_sum_shared_modules_and_flag_uncounted():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(4), nn.Bilinear(4, 4, 2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            x = self.body[3](self.body[2](self.body[1](self.body[0](x))))
            return self.body[4](x, x)

    info = count_macs(Net(), torch.randn(3, 4))
    assert info["layers"] == [
        {"name": "body.0", "type": "Linear", "calls": 2, "macs": 2 * 3 * 4 * 4, "output_shape": (3, 4)}
    ]
    assert info["uncounted"] == ["body.4"]  # Bilinear is a gap; BatchNorm is cheap by design


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules())


def test_hooks_removed_and_training_flags_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    stats = model[1].running_mean.clone()
    count_macs(model, torch.randn(2, 3, 6, 6))
    assert _hooks(model) == 0
    assert [m.training for m in model] == [True, False, True, True]
    assert torch.equal(model[1].running_mean, stats)

    with pytest.raises(RuntimeError):
        count_macs(model, torch.randn(2, 3, 7, 7))  # wrong size for the Linear: the pass fails
    assert _hooks(model) == 0
    assert model.training
