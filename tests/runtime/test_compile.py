"""prunekit.runtime.compile: outputs unchanged, the original untouched, dense kept where sparse is not faster.

No timing assertions: which kernel wins depends on the machine; the tests check that whatever is chosen is
correct, and the one decision no machine can get wrong (a fully dense layer stays dense)."""

import copy

import pytest
import torch
from torch import nn

import prunekit.runtime as rt
from prunekit import Sparsifier, apply_masks
from prunekit.errors import PrunekitError
from prunekit.masking import get_masks, mask_of, squash
from prunekit.models import SmallResNet
from prunekit.quant.layers import QuantizedConv2d, QuantizedLinear
from prunekit.runtime.layers import SparseConv2d, SparseLinear, SparseQuantizedConv2d, SparseQuantizedLinear

FAST = dict(budget_s=0.01, min_reps=3, max_reps=5)  # decisions are not under test here, only correctness


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return y.shape == ref.shape and (y - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1e-30)


def prune_all(model: nn.Module) -> nn.Module:
    """Magnitude-prune every Linear/Conv2d to 90% in place, left masked (parametrized) by apply_masks."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.detach().abs()
            masks[name] = w > w.flatten().kthvalue(int(0.9 * w.numel())).values
    apply_masks(model, masks)
    return model


def test_compile_pruned_resnet_keeps_outputs_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16), blocks=1).eval()
    Sparsifier(model, 0.9, criterion="magnitude", group="layer").prune()  # every layer but the classifier
    prune_all(model.fc)
    masks = get_masks(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    compiled = rt.compile(model, x, **FAST)
    with torch.no_grad():
        assert close(compiled(x), before)
        assert torch.equal(model(x), before)
    assert mask_of(model.stem[0]) is not None and set(get_masks(model)) == set(masks)  # still masked
    table = rt.report(compiled)
    names = {d.name for d in table.layers}
    assert "stem.0" in names and "fc" in names
    for d in table.layers:
        assert d.sparsity > 0.85 and d.dense_us is not None
        assert d.chosen == "dense" or d.chosen in d.candidates
        assert d.chosen == "dense" or d.candidates[d.chosen] < d.dense_us
    assert "stem.0" in str(table)


def test_compile_90pct_small_resnet_with_direct_convs_keeps_outputs(monkeypatch):
    """SmallResNet (16, 32, 64) pruned to 90%: compiled outputs within tolerance, as timed and with every
    convolution forced onto the direct sparse kernel."""
    torch.manual_seed(6)
    model = squash(prune_all(SmallResNet(widths=(16, 32, 64)).eval()))
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    compiled = rt.compile(model, x, segments=False, **FAST)  # the per-layer kernels are under test here
    rows = rt.report(compiled).layers
    assert all("direct" in d.candidates for d in rows if d.kind == "Conv2d")
    import prunekit.runtime.compiler as compiler

    monkeypatch.setattr(
        compiler,
        "_time",
        lambda fns, **kw: (
            {n: (0.5 if n == "direct" else 1e9 if n == "dense" else 1.0) for n in fns},
            {n: 0.0 for n in fns},
        ),
    )
    forced = rt.compile(model, x, segments=False)
    convs = [m for m in forced.modules() if isinstance(m, SparseConv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert all(m.kernel == "direct" for m in convs)
    with torch.inference_mode():
        assert close(compiled(x), ref) and close(forced(x), ref)
        x3 = torch.randn(3, 1, 8, 8)
        assert close(forced(x3), model(x3))


def test_compile_mlp_at_other_batch_sizes_and_leading_dims():
    torch.manual_seed(1)
    mlp = prune_all(nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48)))
    compiled = rt.compile(mlp, torch.randn(1, 48), **FAST)
    for shape in [(1, 48), (5, 48), (2, 3, 48)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            assert close(compiled(x), mlp(x))


def test_grouped_and_depthwise_convs_stay_dense_and_1x1_3x3_are_candidates():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
    )
    for m in model:
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight[torch.rand_like(m.weight) < 0.9] = 0
    x = torch.randn(1, 8, 10, 10)
    compiled = rt.compile(model, x, **FAST)
    with torch.no_grad():
        assert close(compiled(x), model(x))
    rows = {d.name: d for d in rt.report(compiled).layers}
    assert "grouped" in rows["2"].reason and "grouped" in rows["3"].reason and rows["2"].chosen == "dense"
    assert "padding_mode" in rows["5"].reason
    assert rows["0"].candidates and rows["4"].candidates
    assert isinstance(compiled[2], nn.Conv2d)


def test_a_fully_dense_layer_stays_dense():
    """No sparse layout is offered for a layer without zeros; at batch 1 the dense numba GEMV (a candidate
    that streams the same bytes as torch) may still win."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(512, 512))
    for x in (torch.randn(1, 512), torch.randn(4, 512)):
        compiled = rt.compile(model, x, budget_s=0.05, min_reps=15, max_reps=50)
        decision = rt.report(compiled).layers[0]
        assert decision.sparsity == 0.0 and decision.chosen in ("dense", "gemv:dense")
        assert not {c for c in decision.candidates if c.startswith("gemv:") and c != "gemv:dense"}
        assert type(compiled[0]) is nn.Linear or compiled[0].layout == "dense"


def test_compile_int8_layers_is_bit_exact():
    torch.manual_seed(4)
    lin = squash(prune_all(nn.Sequential(nn.Linear(64, 32))))
    conv = squash(prune_all(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))))
    qmodel = nn.Sequential(
        QuantizedConv2d(conv[0]), nn.Flatten(), nn.Linear(8 * 36, 64), QuantizedLinear(lin[0])
    )
    x = torch.randn(2, 4, 6, 6)
    compiled = rt.compile(qmodel, x, **FAST)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 4, 6, 6)
            assert torch.equal(compiled(x), qmodel(x))
    kinds = {d.kind for d in rt.report(compiled).layers}
    assert kinds == {"QuantizedConv2d", "Linear", "QuantizedLinear"}


def test_forced_kernels_on_the_compiled_path_agree(monkeypatch):
    """With the margin forced in favour of sparse, compile must swap in the sparse layers (all correct)."""
    torch.manual_seed(5)
    model = squash(
        prune_all(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 25, 10)))
    )
    qmodel = nn.Sequential(QuantizedConv2d(model[0]), nn.Flatten(), QuantizedLinear(model[2]))
    x = torch.randn(3, 3, 5, 5)
    import prunekit.runtime.compiler as compiler

    monkeypatch.setattr(
        compiler,
        "_time",
        lambda fns, **kw: ({n: (1e9 if n == "dense" else 1.0) for n in fns}, {n: 0.0 for n in fns}),
    )
    fast, qfast = rt.compile(model, x), rt.compile(qmodel, x)
    assert isinstance(fast[0], SparseConv2d) and isinstance(fast[2], SparseLinear)
    assert isinstance(qfast[0], SparseQuantizedConv2d) and isinstance(qfast[2], SparseQuantizedLinear)
    with torch.no_grad():
        assert close(fast(x), model(x)) and torch.equal(qfast(x), qmodel(x))
    with pytest.raises(PrunekitError, match="inference-only"):
        fast(torch.randn(3, 3, 5, 5, requires_grad=True))


def test_clear_errors():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(PrunekitError, match="example_inputs do not run the model"):
        rt.compile(model, torch.randn(1, 5))
    with pytest.raises(PrunekitError, match="nn.Module"):
        rt.compile(lambda x: x, torch.randn(1, 4))
    with pytest.raises(PrunekitError, match="margin"):
        rt.compile(model, torch.randn(1, 4), margin=1.5)
    with pytest.raises(PrunekitError, match="not made by"):
        rt.report(model)


def test_layers_never_called_are_reported_and_kept():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    compiled = rt.compile(model, (torch.randn(1, 4),), **FAST)
    rows = {d.name: d for d in rt.report(compiled).layers}
    assert rows["unused"].reason == "not called by example_inputs" and rows["unused"].chosen == "dense"
    assert compiled is not model and copy.deepcopy(compiled) is not None


def test_float64_layers_stay_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(8, 8)).double()
    compiled = rt.compile(model, torch.randn(2, 8, dtype=torch.float64), **FAST)
    decision = rt.report(compiled).layers[0]
    assert decision.chosen == "dense" and "float64" in decision.reason


def _prefer(kernel: str):
    """A stand-in for compile's timer that makes ``kernel`` the fastest candidate and dense the slowest."""
    return lambda fns, **kw: (
        {n: 1e9 if n == "dense" else (1.0 if n == kernel else 2.0) for n in fns},
        {n: 0.0 for n in fns},
    )


def test_compile_chains_xt_linears_around_activations(monkeypatch):
    """Linear -> GELU/ReLU/SiLU/Tanh -> Linear in an nn.Sequential, both xt: one chain layer, same output."""
    import prunekit.runtime.compiler as compiler
    from prunekit.runtime.layers import SparseLinearChain

    monkeypatch.setattr(compiler, "_time", _prefer("xt"))
    torch.manual_seed(6)
    inner = nn.Sequential(nn.Linear(40, 24), nn.SiLU(), nn.Linear(24, 40))
    model = squash(
        prune_all(nn.Sequential(nn.Linear(33, 40), nn.GELU(), nn.Linear(40, 40), nn.Tanh(), inner, nn.ReLU()))
    )
    x = torch.randn(9, 33)
    fast = rt.compile(model, x)
    assert isinstance(fast[0], SparseLinearChain) and isinstance(fast[1], nn.Identity)
    assert isinstance(fast[2], nn.Identity) and isinstance(fast[4][0], SparseLinearChain)
    notes = {d.name: d.reason for d in rt.report(fast).layers}
    assert "chained" in notes["0"] and "chained" in notes["2"] and "chained" in notes["4.2"]
    plain = rt.compile(model, x, chain=False)
    assert isinstance(plain[0], SparseLinear) and isinstance(plain[2], SparseLinear)
    for shape in [(1, 33), (9, 33), (64, 33), (2, 3, 33)]:
        xs = torch.randn(shape)
        with torch.inference_mode():
            assert close(fast(xs), model(xs)) and close(fast(xs), plain(xs))


def test_compile_does_not_chain_rows_kernels_or_other_modules(monkeypatch):
    import prunekit.runtime.compiler as compiler

    monkeypatch.setattr(compiler, "_time", _prefer("rows"))
    torch.manual_seed(7)
    model = squash(prune_all(nn.Sequential(nn.Linear(20, 30), nn.GELU(), nn.Linear(30, 10))))
    # batch 2: batch 1 goes to the decode layouts (prunekit.runtime.gemv)
    fast = rt.compile(model, torch.randn(2, 20))
    assert [type(m) for m in fast] == [SparseLinear, nn.GELU, SparseLinear]
    monkeypatch.setattr(compiler, "_time", _prefer("xt"))
    odd = squash(prune_all(nn.Sequential(nn.Linear(20, 30), nn.Softmax(-1), nn.Linear(30, 10))))
    fast = rt.compile(odd, torch.randn(5, 20))
    assert [type(m) for m in fast] == [SparseLinear, nn.Softmax, SparseLinear]
    x = torch.randn(5, 20)
    with torch.inference_mode():
        assert close(fast(x), odd(x))
