"""ALPS, DSnoT and block reconstruction through prune_llm and the block runner, on tiny random models.

The runner's ``after_visit`` hook sees exactly the inputs the block was calibrated on and the dense block's
outputs on them; reconstruction never raises any block's output error and keeps every pruned weight exactly
zero (the N:M pattern and the sparsity are the method's); DSnoT keeps the pattern exactly; ALPS fits every
family's layers; nothing outside the blocks' linear weights changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fixtures.hf import gpt2, llama  # noqa: E402
from prunekit.calib.blocks import capture_calls, find_blocks, linear_layers, out_in_weight  # noqa: E402
from prunekit.calib.sequential import sequential  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.llm.prune import LLMPruneConfig, prune_llm, zero_counts  # noqa: E402
from prunekit.llm.reconstruct import least_squares_pass, linear_stages, sublayers  # noqa: E402
from prunekit.spec import NM, Block, Unstructured  # noqa: E402

BUILD = {"llama": llama, "gpt2": gpt2}


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILD[family]().eval()
    with torch.no_grad():  # norms and biases away from 1 and 0 so "left untouched" means something
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _ids(rows: int = 6, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (rows, seqlen), generator=torch.Generator().manual_seed(1))


def _block_weight_names(model: nn.Module) -> set[str]:
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{name}.weight" for i, b in enumerate(blocks) for name in linear_layers(b)}


def _assert_only_linear_weights_changed(before: dict, model: nn.Module) -> None:
    skip = _block_weight_names(model)
    after = model.state_dict()
    assert [k for k in before if k not in skip and not torch.equal(before[k], after[k])] == []


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in linear_layers(b).items()}


def _nm_alive(module: nn.Module) -> torch.Tensor:
    w = out_in_weight(module)  # GPT-2's Conv1D stores (in, out)
    return (w != 0).reshape(w.shape[0], -1, 4).sum(dim=-1)


def test_after_visit_sees_the_calibrated_inputs_and_the_dense_blocks_outputs():
    model = _model("llama")
    ids = _ids()
    _, blocks = find_blocks(model)
    seen = []
    dense_blocks = {}

    def visit(index, block, linears, stats):
        dense_blocks[index] = copy.deepcopy(block)
        for module in linears.values():
            module.weight.data.mul_((module.weight.abs() > module.weight.abs().median()).float())

    def after(data):  # the runner's BlockData
        index, block, inputs, dense_outputs, call = (
            data.index,
            data.block,
            data.inputs,
            data.dense_outputs,
            data.call,
        )
        ref = torch.cat([call.run(dense_blocks[index], inputs[i : i + 1]) for i in range(inputs.shape[0])])
        assert torch.allclose(dense_outputs, ref, atol=1e-6)
        pruned = torch.cat([call.run(block, inputs[i : i + 1]) for i in range(inputs.shape[0])])
        assert not torch.allclose(pruned, ref)  # the hook runs after the visitor pruned the block
        seen.append((index, inputs.clone()))

    sequential(model, ids, visit, "sq_norm", after_visit=after, dense_outputs=True)
    assert [i for i, _ in seen] == [0, 1]
    # the second block's inputs are the pruned first block's outputs on the first block's inputs
    call = capture_calls(model, blocks, ids[:1])[0]
    with torch.no_grad():
        expected = torch.cat([call.run(blocks[0], seen[0][1][i : i + 1]) for i in range(ids.shape[0])])
    assert torch.allclose(seen[1][1], expected, atol=1e-6)


def test_sublayers_and_linear_stages_follow_the_call_order():
    model = _model("llama")
    _, blocks = find_blocks(model)
    call = capture_calls(model, blocks, _ids()[:1])[0]
    hidden = torch.randn(1, 16, 64)
    assert [name for name, _ in sublayers(blocks[0], call, hidden)] == ["self_attn", "mlp"]
    assert linear_stages(blocks[0], call, hidden) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_layer_least_squares_fits_each_layer_to_the_dense_activations():
    """After the ``layer`` pass, every layer's kept weights are the exact least squares of
    E||x . w - x_d . w^||^2 on the inputs it now receives (x) and the dense block's (x_d): perturbing any
    kept weight of the last layer raises that objective."""
    model = _model("llama")
    _, blocks = find_blocks(model)
    ids = _ids()
    call = capture_calls(model, blocks, ids[:1])[0]
    inputs = torch.randn(6, 16, 64, generator=torch.Generator().manual_seed(3))
    block = blocks[0]
    dense = copy.deepcopy(block)
    with torch.no_grad():
        for module in linear_layers(block).values():
            module.weight.mul_((module.weight.abs() > module.weight.abs().median()).float())
    least_squares_pass(block, dense, call, inputs, batch=2, damp=1e-8)
    captured = {}
    for name, b in (("p", block), ("d", dense)):
        with torch.no_grad():
            captured[name] = torch.cat(
                [_grab(b, "mlp.down_proj", call, inputs[i : i + 1]) for i in range(inputs.shape[0])]
            ).double()
    w = block.mlp.down_proj.weight.detach().double()
    target = captured["d"] @ dense.mlp.down_proj.weight.detach().double().T

    def loss(weight):
        return float((captured["p"] @ weight.T - target).pow(2).mean())

    base = loss(w)
    kept = (w != 0).nonzero()[:20]
    for r, c in kept:
        for step in (1e-3, -1e-3):
            bumped = w.clone()
            bumped[r, c] += step
            assert loss(bumped) >= base - 1e-12


def _grab(block, name, call, x):
    got = []

    def hook(module, args):
        got.append(args[0].reshape(-1, args[0].shape[-1]))

    handle = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        call.run(block, x)
    finally:
        handle.remove()
    return got[0]


@pytest.mark.parametrize("mode", ["layer", "block", "sublayer"])
@pytest.mark.parametrize("spec", [NM(2, 4), Unstructured(0.6)], ids=["2:4", "u60"])
@pytest.mark.parametrize("family", BUILD)
def test_reconstruction_never_raises_a_blocks_error_and_keeps_the_pattern(family, spec, mode):
    model = _model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LLMPruneConfig("wanda", spec, reconstruct=mode, reconstruct_epochs=3, reconstruct_lr=3e-4)
    info = prune_llm(model, _ids(), config)
    parts = info["reconstruction"]
    assert [(p["block"], p["mode"]) for p in parts] == [(0, mode), (1, mode)]
    assert all(p["error_after"] < p["error_before"] for p in parts)
    assert info["seconds"]["reconstruct"] > 0
    _assert_only_linear_weights_changed(before, model)
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, module in linear_layers(block).items():
            if isinstance(spec, NM):
                assert bool((_nm_alive(module) == 2).all()), name
    counts = zero_counts(model)
    if isinstance(spec, Unstructured):  # wanda per row: round(0.6 * in) of every row, kept by the refit
        plain = _model(family)
        prune_llm(plain, _ids(), LLMPruneConfig("wanda", spec))
        assert zero_counts(plain) == counts


def test_reconstruction_weights_differ_from_the_plain_method_but_zeros_of_block_0_match():
    plain, rebuilt = _model("llama"), _model("llama")
    prune_llm(plain, _ids(), LLMPruneConfig("sparsegpt", NM(2, 4)))
    prune_llm(
        rebuilt, _ids(), LLMPruneConfig("sparsegpt", NM(2, 4), reconstruct="block", reconstruct_lr=1e-3)
    )
    a = linear_layers(find_blocks(plain)[1][0])
    b = linear_layers(find_blocks(rebuilt)[1][0])
    for name in a:
        assert torch.equal(a[name].weight == 0, b[name].weight == 0), name  # same first-block masks
    assert any(not torch.equal(a[n].weight, b[n].weight) for n in a)


@pytest.mark.parametrize("spec", [NM(2, 4), Unstructured(0.5)], ids=["2:4", "u50"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_dsnot_keeps_the_pattern_and_changes_the_mask(method, spec):
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = prune_llm(model, _ids(), LLMPruneConfig(method, spec, refine="dsnot", dsnot_threshold=0.0))
    plain = _model("llama")
    prune_llm(plain, _ids(), LLMPruneConfig(method, spec))
    assert info["seconds"]["refine"] > 0
    _assert_only_linear_weights_changed(before, model)
    changed = False
    for (name, module), ref in zip(_block_linears(model).items(), _block_linears(plain).values()):
        if isinstance(spec, NM):
            assert bool((_nm_alive(module) == 2).all()), name
        else:
            assert torch.equal((module.weight == 0).sum(), (ref.weight == 0).sum()), name
        changed |= not torch.equal(module.weight == 0, ref.weight == 0)
    assert changed


@pytest.mark.parametrize("spec", [NM(2, 4), Unstructured(0.7)], ids=["2:4", "u70"])
@pytest.mark.parametrize("family", BUILD)
def test_alps_through_prune_llm(family, spec):
    model = _model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_llm(model, _ids(), LLMPruneConfig("alps", spec, alps_iters=30))
    _assert_only_linear_weights_changed(before, model)
    counts = zero_counts(model)
    for name, (zeros, total) in counts.items():
        if isinstance(spec, NM):
            assert zeros >= total // 2, name
        else:
            assert zeros >= round(0.7 * total), name


def test_alps_with_owl_dsnot_and_sublayer_reconstruction_together():
    model = _model("llama")
    config = LLMPruneConfig("alps", Unstructured(0.6), owl=True, refine="dsnot", reconstruct="sublayer")
    info = prune_llm(model, _ids(), config)
    assert set(info["seconds"]) == {"refine", "reconstruct"}
    assert all(p["error_after"] <= p["error_before"] for p in info["reconstruction"])
    targets = info["block_sparsity_targets"]
    for index, block in enumerate(find_blocks(model)[1]):
        for name, module in linear_layers(block).items():
            assert float((module.weight == 0).float().mean()) >= targets[index] - 0.01, name


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"refine": "dsnott"}, "unknown refinement 'dsnott'"),
        ({"reconstruct": "blok"}, "unknown reconstruction 'blok'"),
        ({"reconstruct_epochs": -1}, "reconstruct_epochs"),
        ({"reconstruct_lr": 0.0}, "reconstruct_lr"),
        ({"reconstruct_batch": 0}, "reconstruct_batch"),
        ({"alps_iters": 1.5}, "alps_iters"),
        ({"dsnot_threshold": -1.0}, "dsnot_threshold"),
    ],
)
def test_config_errors_are_one_line(kwargs, needle):
    with pytest.raises(PrunekitError, match=needle) as info:
        LLMPruneConfig("wanda", NM(2, 4), **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [{"method": "alps"}, {"method": "wanda", "refine": "dsnot"}])
def test_alps_and_dsnot_refuse_block_patterns_in_one_line(kwargs):
    with pytest.raises(PrunekitError, match="not block patterns") as info:
        LLMPruneConfig(spec=Block((8, 1), 0.5), **kwargs)
    assert "\n" not in str(info.value)


def test_magnitude_with_refinement_or_reconstruction_needs_data():
    for kwargs in ({"refine": "dsnot"}, {"reconstruct": "block"}):
        config = LLMPruneConfig("magnitude", NM(2, 4), **kwargs)
        assert config.needs_data
        with pytest.raises(PrunekitError, match="needs calibration"):
            prune_llm(_model("llama"), None, config)
