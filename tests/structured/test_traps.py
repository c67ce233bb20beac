"""Models whose code fixes sizes or positions the trace cannot see: pruning must either keep them exact
(the pruned model equals the masked original) or leave the affected units alone -- never return a wrong
or broken model, also with verify=False."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import structured
from prunekit.errors import PrunekitError
from prunekit.structured.core import check_equivalence


class FixedSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y) * y[:, 3:4]  # one channel chosen by position


class SetItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.c1(x)
        y[:, :2] = 0
        return self.c2(y)


class FixedHeads(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class FixedShuffle(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.groups = groups
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        return self.c2(y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w))


class Cached(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)
        self.scale = nn.Parameter(torch.rand(8))
        self.cached = None

    def forward(self, x):
        if self.cached is None:
            self.cached = self.scale.sigmoid().view(1, -1, 1, 1).detach()
        return self.c2(self.c1(x) * self.cached)


class SharedAcrossModules(nn.Module):  # ALBERT-style: two modules hold one Parameter
    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = (
            nn.Linear(4, 8),
            nn.Linear(8, 8),
            nn.Linear(8, 8),
            nn.Linear(8, 2),
        )
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


# each trap with what must happen: the reason nothing can be pruned, or None when part of it is pruned
# (then exactly: the pruned model must equal the masked original)
CASES = {
    "fixed_slice": (
        FixedSlice,
        (2, 3, 4, 4),
        "indexing selects some of the pruned channels by fixed position",
    ),
    "setitem": (SetItem, (2, 3, 4, 4), "an assignment writes some of the pruned channels by fixed position"),
    "fixed_heads": (FixedHeads, (2, 5, 32), "the model's code fixes a size at 'view'"),
    "fixed_shuffle": (FixedShuffle, (2, 3, 4, 4), "the model's code fixes a size at 'view'"),
    "cached": (Cached, (2, 3, 4, 4), "a tensor created inside forward() would need resizing"),
    "shared_across_modules": (SharedAcrossModules, (2, 4), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_never_a_wrong_model_without_verify(name):
    build, shape, refused = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    model(x)  # a first call, as users do (fills the cache of `Cached`)
    reference = copy.deepcopy(model)
    if refused is not None:  # the trap is seen, named, and the model left exactly as it was
        with pytest.raises(PrunekitError, match="nothing can be pruned") as info:
            structured.prune_model(model, x, ratio=0.5, round_to=1, verify=False)
        assert refused in str(info.value)
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())
        )
        return
    result = structured.prune_model(model, x, ratio=0.5, round_to=1, verify=False)
    assert result.params_after < result.params_before  # something was pruned ...
    check_equivalence(reference, model, result.plan, x)  # ... and exactly (raises when the model is wrong)


class Stats(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.l1, self.l2 = nn.Conv1d(3, 8, 1), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        h = self.c1(x)  # (B, 8, 6): the units are channels, the reductions run over them... or not
        values, indices = h.max(2)  # second output shaped like the first
        spread = h.var(2, False, True)  # var's third argument is `unbiased`, its fourth keepdim
        return values.sum(1, keepdim=True) * 0 + self.l1(h.mean(1)) + spread.mean() + indices.float().mean()


def test_reductions_with_several_outputs_and_odd_signatures_stay_exact():
    torch.manual_seed(0)
    model = Stats().eval()
    x = torch.randn(2, 3, 6)
    with pytest.raises(PrunekitError, match="nothing can be pruned") as info:  # the units feed a reduction
        structured.prune_model(model, x, ratio=0.5, round_to=1)
    assert "mean reduces over the units' dimension" in str(info.value)


class SizeFromAnotherTensor(nn.Module):
    """Swin-style: the head size is computed from the *input's* width (C // heads), so the input width is
    tied to the q/k/v split although no operation couples them; the MLP is independent."""

    def __init__(self):
        super().__init__()
        self.heads = 2
        self.inp, self.qkv, self.proj = nn.Linear(8, 16), nn.Linear(16, 48), nn.Linear(16, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        b, t, c = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.fc2(torch.relu(self.fc1(torch.relu(self.proj(a)))))


def test_a_size_computed_from_another_tensors_shape_blames_that_tensors_group():
    torch.manual_seed(0)
    model = SizeFromAnotherTensor().eval()
    x = torch.randn(2, 5, 8)
    reference = copy.deepcopy(model)
    result = structured.prune_model(model, x, ratio=0.5, round_to=1, verify=True)
    check_equivalence(reference, model, result.plan, x)
    assert model.inp.out_features == 16  # its width fixes the head size: un-pruned
    assert any("reshape" in g.blocked for g in result.groups if "inp" in g.seed)
    assert model.fc1.out_features == 16  # the independent MLP width is still pruned


def test_the_width_a_head_size_is_computed_from_shrinks_with_it_when_asked():
    """With prune_norm_coupled, every head loses the same positions and the input width the same fraction:
    C' = heads * (C' // heads) again. Approximate: scaled_dot_product_attention's default scale is
    computed from the (smaller) head size."""
    torch.manual_seed(0)
    model = SizeFromAnotherTensor().eval()
    x = torch.randn(2, 5, 8)
    result = structured.prune_model(model, x, ratio=0.5, round_to=1, verify=True, prune_norm_coupled=True)
    assert (model.inp.out_features, model.qkv.out_features, model.proj.in_features) == (8, 24, 8)
    assert list(result.approximate.values()) == [
        "reshape splits these channels into heads whose size shrinks (a scale computed from it changes)"
    ]
    assert result.max_abs_diff is not None and result.max_abs_diff > 0
