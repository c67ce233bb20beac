"""Grouped and depthwise-grouped convolutions: lockstep within the groups, or whole groups (depthwise)."""

import pytest
import torch
from torch import nn

from fixtures.zoo import ZOO
from prunekit import structured
from prunekit.errors import PrunekitError


def _grouped_convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1}


@pytest.mark.parametrize("round_to", [1, 8])
def test_regnet_lockstep_keeps_every_group_equal_and_the_group_count(round_to):
    case = ZOO["regnet_y"]
    model = case.build()
    before = {n: (m.groups, m.in_channels) for n, m in _grouped_convs(model).items()}
    result = structured.prune_model(model, case.example(), ratio=0.5, round_to=round_to, verify=True)
    assert result.params_after <= 0.35 * result.params_before  # the target for grouped families
    for name, conv in _grouped_convs(model).items():
        groups, channels = before[name]
        assert conv.groups == groups  # lockstep: the group count stays
        assert conv.in_channels == conv.out_channels == channels // 2  # half of every group's positions
        assert conv.in_channels % round_to == 0
    # the same positions of every group went: removed rows of the grouped conv, taken modulo the group
    # width, are the same set in every group
    for name in _grouped_convs(model):
        rows = result.plan[f"{name}.weight"]["0"]
        width = before[name][1] // before[name][0]
        per_group = [sorted(r % width for r in rows if r // width == j) for j in range(before[name][0])]
        assert all(p == per_group[0] for p in per_group) and len(per_group[0]) == width // 2


def test_depthwise_with_a_channel_multiplier_loses_whole_groups():
    case = ZOO["grouped_variety"]
    model = case.build()
    structured.prune_model(model, case.example(), ratio=0.5, round_to=1, verify=True)
    assert (model.dw.groups, model.dw.in_channels, model.dw.out_channels) == (8, 8, 16)  # 2 outputs each
    assert model.stem[0].out_channels == 8 and model.bn.num_features == 16
    # the grouped transposed conv: 2 groups, each keeps half of its inputs and of its outputs
    assert (model.up.groups, model.up.in_channels, model.up.out_channels) == (2, 12, 8)


@pytest.mark.parametrize("groups, kept", [(2, 24), (4, 24), (3, 24)])
def test_grouped_conv_units_of_every_group_count_as_channels_for_round_to(groups, kept):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 48, 1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, groups=groups), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 5),
    ).eval()  # fmt: skip
    # one unit = one position in each group = `groups` channels: round_to=8 counts channels, so 2 groups
    # step by 4 positions (12 of 24 kept), 4 groups by 2 (6 of 12), 3 groups by 8 (8 of 16)
    structured.prune_model(model, torch.randn(2, 3, 8, 8), ratio=0.5, round_to=8, verify=True)
    assert model[0].out_channels == model[2].in_channels == model[2].out_channels == kept
    assert model[2].groups == groups and kept % 8 == 0


def test_a_grouped_conv_fed_by_a_concatenation_it_cannot_split_evenly_is_left_alone():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            # group 0 of `g` reads only a's channels, group 1 only b's: pruning a alone would unbalance them
            y = self.g(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model = Cat().eval()
    result = structured.prune_model(model, torch.randn(2, 3, 8, 8), ratio=0.5, round_to=1, verify=True)
    assert model.a.out_channels == model.b.out_channels == 8
    assert any("grouped convolution" in g.blocked for g in result.groups)
    assert model.g.out_channels == 8  # its own outputs are still pruned in lockstep


def test_unbatched_convolution_input_is_one_clear_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with pytest.raises(PrunekitError, match=r"conv2d '0' without a batch dimension .*\[3, 16, 16\]"):
        structured.prune(model, torch.randn(3, 16, 16), ratio=0.5)
    structured.prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, round_to=1, verify=True)  # batched: fine
