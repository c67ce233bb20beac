"""Each group importance against its paper's definition, the expected value computed by explicit Python loops
over units and elements (no broadcasting, no scatter), on small groups covering -1 owners (concatenation),
repeated owners (flatten -> Linear, attention heads), owners broadcast on dim 0 and on dim 1."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prunekit.registry import STRUCTURED_IMPORTANCE
from prunekit.structured.importance import (
    ActivationMean,
    APoZ,
    Member,
    UnitGroup,
    activation_mean,
    apoz,
    bn_scale,
    fpgm,
    group_norm,
    l1_norm,
    l2_norm,
    random_scores,
    taylor,
    unit_count,
    unit_sum,
)

# ------------------------------------------------------------------------------------- reference loops


def owner_at(owner: torch.Tensor, idx: tuple[int, ...]) -> int:
    """The owner of element ``idx`` by hand: right-align the owner's dims, index 0 where it has size 1."""
    lead = len(idx) - owner.dim()
    sub = tuple(0 if owner.shape[d] == 1 else idx[lead + d] for d in range(owner.dim()))
    return int(owner[sub])


def elements(tensor: torch.Tensor, owner: torch.Tensor, unit: int) -> list[tuple[tuple[int, ...], float]]:
    """(index, value) of every element of ``tensor`` that ``unit`` owns, in memory order."""
    out = []
    for idx in itertools.product(*(range(s) for s in tensor.shape)):
        if owner_at(owner, idx) == unit:
            out.append((idx, float(tensor[idx])))
    return out


def ref_norm(members: list[Member], n: int, p: float) -> list[float]:
    res = []
    for u in range(n):
        acc = 0.0
        for m in members:
            for _, v in elements(m.tensor.detach(), m.owner, u):
                acc += abs(v) ** p
        res.append(acc ** (1 / p))
    return res


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- groups


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def conv_group() -> tuple[list[Member], int]:
    """conv1 (4 out) -> bn1 -> conv2 (consumes the 4 channels): owners on dim 0 and dim 1, 1-D norm/bias."""
    n = 4
    return [
        Member("conv1.weight", rand(4, 3, 3, 3, seed=1), torch.arange(n).view(4, 1, 1, 1), "out", "Conv2d"),
        Member("conv1.bias", rand(4, seed=2), torch.arange(n), "bias", "Conv2d"),
        Member("bn1.weight", rand(4, seed=3), torch.arange(n), "norm", "BatchNorm2d"),
        Member("bn1.bias", rand(4, seed=4), torch.arange(n), "bias", "BatchNorm2d"),
        Member("conv2.weight", rand(5, 4, 3, 3, seed=5), torch.arange(n).view(1, 4, 1, 1), "in", "Conv2d"),
    ], n


def flatten_concat_group() -> tuple[list[Member], int]:
    """conv a (3 out channels = the units) concatenated with conv b (2 channels, other group), then a 1x1 conv
    (owner [0, 1, 2, -1, -1] on dim 1); conv a also feeds flatten (H*W = 4) -> Linear(12 -> 6): each unit owns
    4 repeated columns on dim 1 of the Linear weight."""
    n = 3
    cat_owner = torch.tensor([0, 1, 2, -1, -1]).view(1, 5, 1, 1)
    flat_owner = torch.arange(n).repeat_interleave(4).view(1, 12)
    return [
        Member("a.weight", rand(3, 2, 1, 1, seed=11), torch.arange(n).view(3, 1, 1, 1), "out", "Conv2d"),
        Member("mix.weight", rand(7, 5, 1, 1, seed=12), cat_owner, "in", "Conv2d"),
        Member("fc.weight", rand(6, 12, seed=13), flat_owner, "in", "Linear"),
    ], n


def linear_group() -> tuple[list[Member], int]:
    """Linear(5 -> 3) producer (owner (3, 1): dim 0), its bias, LayerNorm(3), Linear(3 -> 2) consumer whose
    owner is 1-D (3,), broadcasting on dim 1 of the (2, 3) weight."""
    n = 3
    return [
        Member("fc1.weight", rand(3, 5, seed=21), torch.arange(n).view(3, 1), "out", "Linear"),
        Member("fc1.bias", rand(3, seed=22), torch.arange(n), "bias", "Linear"),
        Member("ln.weight", rand(3, seed=23), torch.arange(n), "norm", "LayerNorm"),
        Member("fc2.weight", rand(2, 3, seed=24), torch.arange(n), "in", "Linear"),
    ], n


def heads_group() -> tuple[list[Member], int]:
    """2 heads of head_dim 3: q/k producers own 3 repeated rows each (dim 0), o owns 3 columns (dim 1)."""
    n, hd, d = 2, 3, 4
    rows = torch.arange(n).repeat_interleave(hd)
    return [
        Member("q.weight", rand(n * hd, d, seed=31), rows.view(-1, 1), "out", "Linear"),
        Member("k.weight", rand(n * hd, d, seed=32), rows.view(-1, 1), "out", "Linear"),
        Member("q.bias", rand(n * hd, seed=33), rows, "bias", "Linear"),
        Member("o.weight", rand(d, n * hd, seed=34), rows.view(1, -1), "in", "Linear"),
    ], n


GROUPS = [conv_group, flatten_concat_group, linear_group, heads_group]


# ------------------------------------------------------------------------------------------ group norm


@pytest.mark.parametrize("make", GROUPS)
@pytest.mark.parametrize("p", [1, 2])
def test_group_norm_matches_loops(make, p):
    members, n = make()
    close(group_norm(members, n, p=p), ref_norm(members, n, p))


def test_l1_l2_aliases_and_li_filter_norm():
    members, n = conv_group()
    torch.testing.assert_close(l1_norm(members, n), group_norm(members, n, p=1))
    torch.testing.assert_close(l2_norm(members, n), group_norm(members, n, p=2))
    # a lone conv: Li et al.'s filter norm sum_{c,k,k} |W[i]|
    w = members[0]
    close(l1_norm([w], n), [sum(abs(v) for _, v in elements(w.tensor, w.owner, u)) for u in range(n)])


def test_group_norm_ignores_minus_one_and_counts_repeats():
    # by hand: unit 0 owns columns 0 and 2 (values 3, 4), unit 1 column 1 (value 5); column 3 is excluded
    m = Member("fc.weight", torch.tensor([[3.0, 5.0, 4.0, 100.0]]), torch.tensor([[0, 1, 0, -1]]), "in")
    close(group_norm([m], 2, p=2), [5.0, 5.0])
    close(group_norm([m], 3, p=1), [7.0, 5.0, 0.0])  # a unit owning nothing scores 0


def test_parameters_with_grad_give_detached_scores():
    w = torch.nn.Parameter(torch.ones(2, 3))
    m = Member("fc.weight", w, torch.arange(2).view(2, 1), "out")
    s = l2_norm([m], 2)
    assert not s.requires_grad
    close(s, [math.sqrt(3)] * 2)


def test_bad_inputs_raise_value_error():
    w = torch.ones(2, 3)
    with pytest.raises(ValueError, match="role"):
        Member("w", w, torch.arange(2).view(2, 1), "output")
    with pytest.raises(ValueError, match="broadcast"):
        Member("w", w, torch.arange(2), "in")  # (2,) right-aligns with dim 1 (size 3)
    with pytest.raises(ValueError, match="integer"):
        Member("w", w, torch.zeros(2, 1), "out")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        l2_norm([Member("w", w, torch.tensor([[0], [2]]), "out")], 2)
    with pytest.raises(ValueError, match="p must"):
        group_norm([Member("w", w, torch.arange(2).view(2, 1), "out")], 2, p=0)


def test_unit_sum_and_count():
    x = torch.arange(12.0).view(3, 4)
    owner = torch.tensor([0, 1, 0, -1])
    close(unit_sum(x, owner, 2), [0 + 2 + 4 + 6 + 8 + 10, 1 + 5 + 9])
    assert unit_count(owner, x.shape, 2).tolist() == [6, 3]


def test_members_compare_by_identity():
    members, _ = conv_group()
    assert members[0] == members[0] and members[0] != members[1]
    assert len(set(members)) == len(members)


# -------------------------------------------------------------------------------------------- bn scale


def test_bn_scale_sums_gamma_of_every_batchnorm():
    members, n = conv_group()
    # a residual add couples a second BatchNorm (on the shortcut) into the same group
    members.append(Member("down.bn.weight", rand(4, seed=41), torch.arange(n), "norm", "BatchNorm2d"))
    expected = []
    for u in range(n):
        expected.append(
            sum(
                abs(v)
                for m in members
                if m.role == "norm" and m.module_type.startswith("BatchNorm")
                for _, v in elements(m.tensor, m.owner, u)
            )
        )
    close(bn_scale(members, n), expected)


def test_bn_scale_takes_gamma_only_with_concat_owner():
    # BN over a 5-channel concat; units are its first 3 channels. Bias and running stats tagged "norm" too
    # (as the graph does) are not gamma.
    gamma = torch.tensor([-1.0, 2.0, 0.5, 9.0, 9.0])
    owner = torch.tensor([0, 1, 2, -1, -1])
    members = [
        Member("bn.weight", gamma, owner, "norm", "BatchNorm2d"),
        Member("bn.bias", torch.full((5,), 7.0), owner, "norm", "BatchNorm2d"),
        Member("bn.running_mean", torch.full((5,), 3.0), owner, "norm", "BatchNorm2d"),
        Member("bn.running_var", torch.full((5,), 2.0), owner, "norm", "BatchNorm2d"),
    ]
    close(bn_scale(members, 3), [1.0, 2.0, 0.5])


def test_bn_scale_without_batchnorm_raises():
    members, n = linear_group()  # LayerNorm only
    with pytest.raises(ValueError, match="BatchNorm"):
        bn_scale(members, n)


# ----------------------------------------------------------------------------------------------- taylor


def grads_for(members: list[Member], seed: int) -> list[torch.Tensor]:
    return [rand(*m.tensor.shape, seed=seed + i) for i, m in enumerate(members)]


@pytest.mark.parametrize("make", GROUPS)
def test_taylor_matches_loops(make):
    members, n = make()
    grads = grads_for(members, 100)
    grads[1] = None  # no gradient for this member: skipped
    expected = []
    for u in range(n):
        total = 0.0
        for m, g in zip(members, grads):
            if g is None:
                continue
            for idx, w in elements(m.tensor, m.owner, u):
                total += w * float(g[idx])
        expected.append(abs(total))
    close(taylor(members, grads, n), expected)


def test_taylor_is_abs_of_the_group_sum_not_sum_of_abs():
    # unit 0: +1*2 (producer) and -1*2 (consumer) cancel; removing the unit changes the loss by ~0
    a = Member("fc1.weight", torch.tensor([[1.0], [1.0]]), torch.arange(2).view(2, 1), "out")
    b = Member("fc2.weight", torch.tensor([[-1.0, 3.0]]), torch.arange(2), "in")
    g = [torch.tensor([[2.0], [1.0]]), torch.tensor([[2.0, 1.0]])]
    close(taylor([a, b], g, 2), [0.0, 4.0])


def test_taylor_checks_gradients():
    members, n = linear_group()
    with pytest.raises(ValueError, match="gradients for"):
        taylor(members, [None], n)
    with pytest.raises(ValueError, match="at least one"):
        taylor(members, [None] * len(members), n)
    bad = grads_for(members, 0)
    bad[0] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        taylor(members, bad, n)


# ------------------------------------------------------------------------------------------------- fpgm


def ref_fpgm(members: list[Member], n: int) -> list[float]:
    filters = [
        [v for m in members if m.role == "out" for _, v in elements(m.tensor, m.owner, u)] for u in range(n)
    ]
    return [
        sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(filters[i], filters[j]))) for j in range(n))
        for i in range(n)
    ]


@pytest.mark.parametrize("make", GROUPS)
def test_fpgm_matches_loops(make):
    members, n = make()
    close(fpgm(members, n), ref_fpgm(members, n), tol=1e-4)


def test_fpgm_concatenates_producers_and_chunks():
    # two producers summed by a residual add: each unit's filter is both rows concatenated
    members, n = conv_group()
    members.append(Member("down.weight", rand(4, 3, 1, 1, seed=51), torch.arange(n).view(4, 1, 1, 1), "out"))
    expected = ref_fpgm(members, n)
    close(fpgm(members, n), expected, tol=1e-4)
    close(fpgm(members, n, chunk=3), expected, tol=1e-4)


def test_fpgm_owner_on_dim_1_and_on_two_dims():
    # ConvTranspose2d weight (Cin, Cout, k, k): the producer's units are on dim 1
    convt = Member("up.weight", rand(3, 4, 2, 2, seed=52), torch.arange(4).view(1, 4, 1, 1), "out")
    close(fpgm([convt], 4), ref_fpgm([convt], 4), tol=1e-4)
    # an owner varying on two dims (checkerboard, one element outside the group) takes the element-wise path
    w = rand(4, 4, seed=53)
    board = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, -1, 1], [1, 0, 1, 0]])
    with pytest.raises(ValueError, match="different sizes"):  # unit 0 owns 7 elements, unit 1 owns 8
        fpgm([Member("odd.weight", w, board, "out")], 2)
    board = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, -1, -1, 1], [1, 0, 1, 0]])
    even = Member("odd.weight", w, board, "out")
    close(fpgm([even], 2), ref_fpgm([even], 2), tol=1e-4)


def test_fpgm_median_filter_scores_lowest():
    # 1-D filters 0, 1, 2, 10: distance sums 13, 11, 11, 27 -> the two central filters are the redundant ones
    m = Member("fc.weight", torch.tensor([[0.0], [1.0], [2.0], [10.0]]), torch.arange(4).view(4, 1), "out")
    close(fpgm([m], 4), [13.0, 11.0, 11.0, 27.0])


def test_fpgm_errors():
    members, n = conv_group()
    with pytest.raises(ValueError, match="producer"):
        fpgm([m for m in members if m.role != "out"], n)
    uneven = Member("fc.weight", torch.ones(3, 2), torch.tensor([0, 0, 1]).view(3, 1), "out")
    with pytest.raises(ValueError, match="different sizes"):
        fpgm([uneven], 2)


# ------------------------------------------------------------------------------------------ activations


def ref_act(acts: torch.Tensor, owner: torch.Tensor, n: int, stat) -> list[float]:
    res = []
    for u in range(n):
        vals = [v for _, v in elements(acts, owner, u)]
        res.append(sum(stat(v) for v in vals) / len(vals))
    return res


ACT_CASES = [
    # conv output (N, C, H, W), owner on dim 1 with the last channel in another group (concat)
    (lambda: torch.relu(rand(2, 4, 3, 3, seed=61)), torch.tensor([0, 1, 2, -1]).view(1, 4, 1, 1), 3),
    # transformer output (N, T, heads * head_dim), 1-D owner on the last dim, each head owns 2 features
    (lambda: torch.relu(rand(2, 3, 6, seed=62)), torch.arange(3).repeat_interleave(2), 3),
    # Linear output (N, D), owner (1, D)
    (lambda: torch.relu(rand(5, 4, seed=63)), torch.arange(4).view(1, 4), 4),
]


@pytest.mark.parametrize(("make", "owner", "n"), ACT_CASES)
def test_activation_mean_matches_loops(make, owner, n):
    acts = make()
    close(activation_mean(acts, n, owner), ref_act(acts, owner, n, abs))


@pytest.mark.parametrize(("make", "owner", "n"), ACT_CASES)
def test_apoz_matches_loops(make, owner, n):
    acts = make()
    close(apoz(acts, n, owner), ref_act(acts, owner, n, lambda v: 1.0 if v != 0 else 0.0))


def test_apoz_hand_numbers_and_threshold():
    acts = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 1e-4]])
    owner = torch.arange(3)
    close(apoz(acts, 3, owner), [0.0, 1.0, 0.5])  # APoZ = 1, 0, 0.5
    close(apoz(acts, 3, owner, zero=1e-3), [0.0, 1.0, 0.0])


@pytest.mark.parametrize("cls", [ActivationMean, APoZ])
def test_streaming_equals_one_batch(cls):
    owner = torch.tensor([0, 1, 2, -1]).view(1, 4, 1, 1)
    a, b = torch.relu(rand(2, 4, 3, 3, seed=71)), torch.relu(rand(3, 4, 3, 3, seed=72))
    acc = cls(3, owner)
    acc.add_batch(a)
    acc.add_batch(b)
    whole = cls(3, owner)
    whole.add_batch(torch.cat([a, b]))
    torch.testing.assert_close(acc.value(), whole.value())
    acc.reset()
    with pytest.raises(RuntimeError, match="no batch"):
        acc.value()


def test_activation_owner_must_cover_every_unit():
    acc = ActivationMean(3, torch.tensor([0, 1, -1]))
    acc.add_batch(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"units \[2\]"):
        acc.value()


# --------------------------------------------------------------------------------------- random, registry


def test_random_scores_reproducible():
    a = random_scores(5, torch.Generator().manual_seed(3))
    b = random_scores(5, torch.Generator().manual_seed(3))
    assert a.shape == (5,) and a.dtype == torch.float32
    assert torch.equal(a, b) and bool(((a >= 0) & (a < 1)).all())


def test_registry_declares_data_needs_and_runs():
    builtins = {"l1", "l2", "bn_scale", "taylor", "fpgm", "activation_mean", "apoz", "random"}
    assert builtins <= set(STRUCTURED_IMPORTANCE.names())
    needs = {name: STRUCTURED_IMPORTANCE.get(name).needs for name in builtins}
    assert needs["taylor"] == "gradients"
    assert needs["activation_mean"] == needs["apoz"] == "activations"
    assert {needs[n] for n in ("l1", "l2", "bn_scale", "fpgm", "random")} == {"weights"}
    assert STRUCTURED_IMPORTANCE.get("apoz").accumulator is APoZ
    members, n = conv_group()
    group = UnitGroup(0, "conv.weight", n, members, generator=torch.Generator().manual_seed(0))
    for name in builtins:
        entry = STRUCTURED_IMPORTANCE.get(name)
        if entry.needs == "weights":
            out = entry(group)
            assert out.shape == (n,) and out.dtype == torch.float32, name
    assert torch.equal(STRUCTURED_IMPORTANCE.get("l1")(group), l1_norm(members, n))
