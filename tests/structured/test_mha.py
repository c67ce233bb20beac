"""Whole-head pruning of nn.MultiheadAttention: the head-pruned module computes what PyTorch's does, and the
pruned model equals the original with the removed heads' weights zeroed, for every variant of the module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structured import load, prune_model, save
from prunekit.structured.apply import apply_plan
from prunekit.structured.mha import HeadPrunedMultiheadAttention, multi_head_attention_forward

E, HEADS, L, S, N = 32, 4, 5, 7, 3


def _mha(seed: int = 0, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, HEADS, **kwargs).eval()
    with torch.no_grad():  # PyTorch zero-initialises the biases: make every term count
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _as_head_pruned(m: nn.MultiheadAttention) -> nn.MultiheadAttention:
    twin = copy.deepcopy(m)
    twin.__class__ = HeadPrunedMultiheadAttention
    return twin


VARIANTS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
    dict(kdim=12, vdim=20),
    dict(kdim=12, vdim=20, batch_first=True, add_bias_kv=True),
]


def _inputs(kwargs, batched: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lead_q = (N, L) if kwargs.get("batch_first") else (L, N)
    lead_k = (N, S) if kwargs.get("batch_first") else (S, N)
    if not batched:
        lead_q, lead_k = (L,), (S,)
    q = torch.randn(*lead_q, E, generator=g)
    k = torch.randn(*lead_k, kwargs.get("kdim", E), generator=g)
    v = torch.randn(*lead_k, kwargs.get("vdim", E), generator=g)
    return q, k, v


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: ",".join(k) or "default")
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_head_pruned_forward_equals_pytorch_before_pruning(kwargs, need_weights, average):
    m = _mha(**kwargs)
    twin = _as_head_pruned(m)
    q, k, v = _inputs(kwargs)
    g = torch.Generator().manual_seed(2)
    padding = torch.rand(N, S, generator=g) < 0.3
    padding[:, 0] = False  # every query sees at least one key
    causal_ish = torch.rand(L, S, generator=g) < 0.2
    float_mask = torch.randn(N * HEADS, L, S, generator=g)
    for masks in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal_ish},
        {"attn_mask": float_mask, "key_padding_mask": padding.float() * -1e4},
    ):
        with torch.no_grad():
            want = m(q, k, v, need_weights=need_weights, average_attn_weights=average, **masks)
            got = twin(q, k, v, need_weights=need_weights, average_attn_weights=average, **masks)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        else:
            assert got[1] is None and want[1] is None


def test_head_pruned_forward_unbatched_and_causal():
    m = _mha()
    twin = _as_head_pruned(m)
    q, k, v = _inputs({}, batched=False)
    with torch.no_grad():
        torch.testing.assert_close(twin(q, k, v)[0], m(q, k, v)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(twin(q, k, v)[1], m(q, k, v)[1], rtol=1e-5, atol=1e-6)
    x = torch.randn(L, N, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        want = m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        got = twin(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_functional_refuses_static_kv_and_wrong_width():
    m = _mha()
    q, k, v = _inputs({})
    args = (E, HEADS, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0, m.out_proj.weight, None)
    with pytest.raises(PrunekitError, match="static_k"):
        multi_head_attention_forward(q, k, v, *args, static_k=torch.zeros(N * HEADS, S, E // HEADS))
    with pytest.raises(PrunekitError, match="query has width 31"):
        multi_head_attention_forward(q[..., :31], k, v, *args)


class SelfAttention(nn.Module):
    """A residual attention layer whose residual stream cannot shrink (the input and output are fixed), so
    only whole heads can go."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.attn = _mha(**kwargs)

    def forward(self, q, k, v):
        out = self.attn(q, k, v, need_weights=False)[0]
        return q + out


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: ",".join(k) or "default")
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_heads_pruned_equal_zeroed_heads(kwargs, ratio):
    model = SelfAttention(**kwargs).eval()
    example = _inputs(kwargs)
    before = copy.deepcopy(model)
    result = prune_model(model, example, ratio=ratio, round_to=1, verify=True)
    attn = model.attn
    kept = HEADS - round(HEADS * ratio)
    assert isinstance(attn, HeadPrunedMultiheadAttention) and isinstance(attn, nn.MultiheadAttention)
    assert attn.num_heads == kept and attn.head_dim == E // HEADS and attn.embed_dim == E
    inner = kept * attn.head_dim
    assert attn.out_proj.weight.shape == (E, inner) and attn.out_proj.in_features == inner
    if attn._qkv_same_embed_dim:
        assert attn.in_proj_weight.shape == (3 * inner, E)
    else:
        assert attn.k_proj_weight.shape == (inner, kwargs["kdim"])
        assert attn.v_proj_weight.shape == (inner, kwargs["vdim"])
    if attn.bias_k is not None:
        assert attn.bias_k.shape == (1, 1, inner) and attn.bias_v.shape == (1, 1, inner)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    # the removed heads are whole heads: every removed row index of one head goes together
    removed = result.plan[next(n for n in result.plan if n.endswith("out_proj.weight"))]["1"]
    d = E // HEADS
    assert len(removed) % d == 0 and {i // d for i in removed} == {i // d for i in removed[::d]}
    assert all(
        removed[j * d : (j + 1) * d] == list(range(removed[j * d], removed[j * d] + d))
        for j in range(len(removed) // d)
    )
    # masks, gradients and training mode work on the pruned module
    model.train()
    out = model(*example)
    out.sum().backward()
    assert attn.out_proj.weight.grad is not None
    # a fresh instance replays the plan
    apply_plan(before, result.plan)
    assert isinstance(before.attn, HeadPrunedMultiheadAttention) and before.attn.num_heads == kept


def test_dropout_in_training_is_applied_to_the_remaining_heads():
    model = SelfAttention(dropout=0.5).eval()
    example = _inputs({})
    prune_model(model, example, ratio=0.5, round_to=1)
    model.train()
    with torch.no_grad():
        a, b = model(*example), model(*example)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*example), model(*example))


def test_a_pruned_model_prunes_again_and_never_to_zero_heads():
    model = SelfAttention().eval()
    example = _inputs({})
    prune_model(model, example, ratio=0.5, round_to=1, verify=True)
    assert model.attn.num_heads == 2
    prune_model(model, example, ratio=0.5, round_to=1, verify=True)
    assert model.attn.num_heads == 1
    prune_model(model, example, ratio=0.9, round_to=1, verify=True)
    assert model.attn.num_heads == 1  # a group is never pruned to zero units


def test_heads_round_to_counts_channels():
    model = SelfAttention().eval()  # head_dim 8: round_to=16 keeps an even number of heads
    prune_model(model, _inputs({}), ratio=0.7, round_to=16, verify=True)
    assert model.attn.num_heads == 2


def test_heads_ranked_by_importance_keep_the_strongest_heads():
    model = SelfAttention().eval()
    d = E // HEADS
    with torch.no_grad():  # head 2 gets large output weights, head 0 tiny ones
        model.attn.out_proj.weight[:, 2 * d : 3 * d] *= 50
        model.attn.out_proj.weight[:, 0:d] *= 0.01
    before = copy.deepcopy(model)
    result = prune_model(model, _inputs({}), ratio=0.75, round_to=1, importance="l2", verify=True)
    (removed,) = [u for g, u in result.removed.items() if "attn" in result.groups[g].seed]
    assert removed == [0, 1, 3]
    torch.testing.assert_close(
        model.attn.out_proj.weight, before.attn.out_proj.weight[:, 2 * d : 3 * d], rtol=0, atol=0
    )


@pytest.mark.parametrize("importance", ["activation_mean", "taylor"])
def test_data_importances_cover_heads(importance):
    model = SelfAttention().eval()
    example = _inputs({})
    calibration = [(example, torch.zeros(L, N, E))]
    prune_model(
        model,
        example,
        ratio=0.5,
        round_to=1,
        importance=importance,
        calibration=calibration,
        loss_fn=lambda out, target: ((out - target) ** 2).mean(),
        verify=True,
    )
    assert model.attn.num_heads == 2


def test_save_load_round_trip(tmp_path):
    model = SelfAttention(batch_first=True).eval()
    example = _inputs({"batch_first": True})
    result = prune_model(model, example, ratio=0.5, round_to=1)
    save(result.model, result.plan, tmp_path)
    fresh = SelfAttention(batch_first=True).eval()
    rebuilt = load(fresh, tmp_path)
    assert isinstance(rebuilt.attn, HeadPrunedMultiheadAttention)
    with torch.no_grad():
        assert torch.equal(rebuilt(*example), model(*example))


def test_heads_ignored_on_request():
    model = SelfAttention().eval()
    with pytest.raises(PrunekitError, match="nothing can be pruned"):
        prune_model(model, _inputs({}), ratio=0.5, ignore=["attn"])


class Encoder(nn.Module):
    def __init__(self, nested: bool):
        super().__init__()
        torch.manual_seed(3)
        layer = nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(E, 5)

    def forward(self, x, padding):
        return self.head(self.enc(x, src_key_padding_mask=padding)[:, 0])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("nested", [False, True])
def test_transformer_encoder_heads_and_ffn(tmp_path, nested):
    """PyTorch's fused encoder kernels read in_proj_weight as 3 x embed_dim rows: a head-pruned encoder must
    stay off them, in the pruned model and in one rebuilt from the saved plan."""
    model = Encoder(nested).eval()
    x = torch.randn(N, L, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, 3:] = True
    result = prune_model(model, (x, padding), ratio=0.5, round_to=1, verify=True)
    layer = model.enc.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == E
    with torch.no_grad():  # eval + no_grad: where PyTorch would take the fused path
        out = model(x, padding)
    save(model, result.plan, tmp_path)
    rebuilt = load(Encoder(nested).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, padding), out)


def test_transformer_decoder_self_and_cross_attention_heads():
    torch.manual_seed(4)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(E, HEADS, 2 * E, dropout=0.0)

        def forward(self, tgt, memory):
            return self.dec(tgt, memory)

    model = Decoder().eval()
    tgt, memory = torch.randn(L, N, E), torch.randn(S, N, E)
    result = prune_model(model, (tgt, memory), ratio=0.5, round_to=1, verify=True)
    assert model.dec.self_attn.num_heads == 2 and model.dec.multihead_attn.num_heads == 2
    assert result.params_after < result.params_before


class BiasedHeads(nn.Module):
    """Attention with a learned per-head bias passed to scaled_dot_product_attention as attn_mask."""

    def __init__(self, d=32, heads=4, tokens=6):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(1, heads, tokens, tokens))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).unflatten(-1, (-1, 8)).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.to(q.dtype))
        return self.o(y.transpose(1, 2).flatten(2))


def test_a_per_head_attention_mask_loses_the_removed_heads_rows():
    torch.manual_seed(0)
    model = BiasedHeads().eval()
    result = prune_model(model, torch.randn(2, 6, 32), ratio=0.5, round_to=1, verify=True)
    assert model.q.out_features == model.k.out_features == model.v.out_features == 16  # 2 heads of 8
    assert model.bias.shape == (1, 2, 6, 6)
    (heads,) = [g for g in result.groups if "q.weight" in g.seed]
    assert result.plan["bias"] == {"1": result.removed[heads.index]}  # the removed heads' rows of the bias
