"""Widths a LayerNorm/RMSNorm/GroupNorm normalises over: whole GroupNorm groups exactly, the rest only with
``prune_norm_coupled=True`` and approximately (verify reports the difference instead of failing)."""

import copy

import pytest
import torch
from torch import nn

from fixtures.zoo import ZOO
from prunekit import structured
from prunekit.errors import PrunekitError
from prunekit.structured.core import check_equivalence


def _outputs(model, args):
    with torch.no_grad():
        return model(*args)


@pytest.mark.parametrize("name", ["convnext", "vit", "mlp_mixer", "mlp"])
def test_transformer_widths_shrink_only_when_asked_and_are_reported_approximate(name, tmp_path):
    case = ZOO[name]
    exact = structured.prune_model(case.build(), case.example(), ratio=0.5, round_to=1, verify=True)
    assert not exact.approximate
    assert any("prune_norm_coupled=True" in g.blocked for g in exact.groups)  # the reason names the switch

    model, args = case.build(), case.example()
    before = _outputs(model, args)
    result = structured.prune_model(model, args, ratio=0.5, round_to=1, verify=True, prune_norm_coupled=True)
    assert result.params_after <= 0.35 * result.params_before < exact.params_after
    assert result.approximate and all(
        "norm" in why or "statistic" in why for why in result.approximate.values()
    )
    # verify measured the difference against the masked original instead of raising: it is not zero
    assert result.max_abs_diff is not None and result.max_abs_diff > 1e-3
    assert _outputs(model, args).shape == before.shape
    # norms follow the pruned width
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert module.normalized_shape == tuple(module.weight.shape)
    # the prune log replays exactly on a fresh model
    structured.save(model, result.plan, tmp_path)
    assert torch.equal(_outputs(structured.load(case.build(), tmp_path), args), _outputs(model, args))


def _swin_blocks(model) -> dict:
    return {
        f"{stage}.{i}": block
        for stage in ("stage1", "stage2")
        for i, block in enumerate(getattr(model, stage))
    }


def _heads_keep_the_same_positions(plan, name: str, block, rows_before: int) -> None:
    """Each of q, k and v of every head keeps C'/heads of its dims, the same ones, and proj's columns
    follow v's: read off the prune log."""
    width, heads = block.proj.out_features, block.bias_table.shape[1]
    assert width % heads == 0 and block.qkv.out_features == 3 * width
    kept = torch.ones(3 * heads, rows_before // (3 * heads), dtype=torch.bool)  # (q/k/v and head, dim)
    kept.view(-1)[plan[f"{name}.qkv.weight"]["0"]] = False
    assert bool((kept == kept[:1]).all()) and int(kept[0].sum()) == width // heads
    columns = torch.ones(heads * kept.shape[1], dtype=torch.bool)
    columns[plan[f"{name}.proj.weight"]["1"]] = False
    assert torch.equal(columns, kept[0].repeat(heads))


def test_swin_width_shrinks_with_its_head_size_only_when_asked(tmp_path):
    """Swin's attention computes its head size as C // heads from the residual width C: pruning C needs
    every head to lose the same count of q/k/v dims, C' = heads * d' (a count coupling no operation
    expresses, read off the trace)."""
    case = ZOO["swin"]
    model, args = case.build(), case.example()
    widths = [b.proj.out_features for b in _swin_blocks(model).values()]
    exact = structured.prune_model(model, args, ratio=0.5, round_to=1, verify=True)  # raises unless exact
    assert not exact.approximate
    blocks = _swin_blocks(model).values()
    assert [b.proj.out_features for b in blocks] == widths  # the stream and the heads stay
    assert all(b.qkv.out_features == 3 * b.proj.out_features for b in blocks)
    assert all(b.mlp[0].out_features == 2 * b.proj.out_features for b in blocks)  # the MLPs halve

    model = case.build()
    before = _outputs(model, args)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    result = structured.prune_model(model, args, ratio=0.5, round_to=1, verify=True, prune_norm_coupled=True)
    # the same fraction as the ViT-style models: residual and attention widths halve, heads stay
    assert result.params_after <= 0.35 * result.params_before < exact.params_after
    for name, block in _swin_blocks(model).items():
        assert block.bias_table.shape == shapes[f"{name}.bias_table"]  # heads keep their count
        assert 2 * block.proj.out_features == shapes[f"{name}.proj.weight"][0]
        assert block.norm1.normalized_shape == (block.proj.out_features,)
        _heads_keep_the_same_positions(result.plan, name, block, shapes[f"{name}.qkv.weight"][0])
    reasons = set(result.approximate.values())
    assert any("layer_norm" in r for r in reasons) and any("heads whose size shrinks" in r for r in reasons)
    assert result.max_abs_diff is not None and result.max_abs_diff > 1e-3  # reported, not zero
    assert _outputs(model, args).shape == before.shape
    structured.save(model, result.plan, tmp_path)
    assert torch.equal(_outputs(structured.load(case.build(), tmp_path), args), _outputs(model, args))


@pytest.mark.parametrize(
    "options",
    [{"round_to": 8}, {"round_to": 1, "ratio": 0.3}, {"round_to": 1, "global_ranking": True}],
    ids=["round_to_8", "ratio_0.3", "global"],
)
def test_swin_head_sizes_follow_the_width_under_every_allocation(options):
    case = ZOO["swin"]
    model, args = case.build(), case.example()
    options = {"ratio": 0.5, **options}
    result = structured.prune_model(model, args, verify=True, prune_norm_coupled=True, **options)
    assert result.params_after < 0.75 * result.params_before
    for block in _swin_blocks(model).values():
        heads = block.bias_table.shape[1]
        assert block.proj.out_features % heads == 0 and block.qkv.out_features == 3 * block.proj.out_features
        assert block.proj.out_features % options["round_to"] == 0


def test_swin_heads_stay_whole_when_the_width_they_are_computed_from_stays():
    case = ZOO["swin"]
    model, args = case.build(), case.example()
    # the first stage's stream touches an ignored norm: it keeps its width, and so its heads their size
    structured.prune_model(
        model, args, ratio=0.5, round_to=1, verify=True, prune_norm_coupled=True, ignore=["stage1.0.norm1"]
    )
    assert [b.qkv.out_features for b in model.stage1] == [48, 48]
    assert [b.qkv.out_features for b in model.stage2] == [48, 48]  # 96 -> 48: the second stage shrinks


def test_cnns_stay_exact_with_the_switch_on():
    case = ZOO["resnet_bottleneck"]
    model, args = case.build(), case.example()
    reference = copy.deepcopy(model)
    result = structured.prune_model(model, args, ratio=0.5, round_to=1, verify=True, prune_norm_coupled=True)
    assert not result.approximate
    check_equivalence(reference, model, result.plan, args)


def test_groupnorm_loses_whole_groups_exactly():
    case = ZOO["norm_variety"]
    model, args = case.build(), case.example()
    structured.prune_model(model, args, ratio=0.5, round_to=1, verify=True)  # raises unless exact
    assert (model[1].num_groups, model[1].num_channels) == (2, 8)  # 2 of 4 groups of 4 channels
    assert (model[7].num_groups, model[7].num_channels) == (16, 16)  # one channel per group
    assert model[0].out_channels == 8


def test_a_norm_without_affine_parameters_is_left_alone_even_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, 2),
    ).eval()  # fmt: skip
    result = structured.prune_model(model, torch.randn(3, 8), ratio=0.5, round_to=1, prune_norm_coupled=True)
    assert model[0].out_features == 16 and model[2].out_features == 8
    assert any("without a weight" in g.blocked for g in result.groups)


def test_multihead_attention_embedding_width_is_pruned_exactly():
    class Attention(nn.Module):  # no norm on the width: pruning it is exact
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out = nn.Linear(32, 3)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            return self.out(torch.relu(self.attn(h, h, h, need_weights=False)[0]))

    torch.manual_seed(0)
    model = Attention().eval()
    result = structured.prune_model(model, torch.randn(2, 5, 6), ratio=0.5, round_to=1, verify=True)
    assert not result.approximate
    assert model.inp.out_features == 16 and model.attn.embed_dim == 16 and model.attn.num_heads == 2
    assert model.attn.in_proj_weight.shape == (3 * 2 * 8, 16) and model.attn.out_proj.weight.shape == (16, 16)


pytest.importorskip("transformers")
from fixtures.hf import gpt2, llama, qwen2  # noqa: E402  (needs transformers)


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama", "qwen2"])
def test_llm_hidden_size_pruned_loads_with_plain_from_pretrained(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    result = structured.prune_model(
        model, (ids,), ratio=0.5, round_to=1, verify=True, prune_norm_coupled=True
    )
    assert model.model.embed_tokens.embedding_dim == 32 and model.lm_head.in_features == 32
    assert result.approximate  # RMSNorm statistics over the pruned stream
    structured.save_pretrained(model, tmp_path)
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()  # plain transformers
    assert reloaded.config.hidden_size == 32
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_gpt2_ties_its_attention_width_to_the_hidden_size_and_says_so(tmp_path):
    torch.manual_seed(0)
    model = gpt2().eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    structured.prune_model(model, (ids,), ratio=0.5, round_to=1, prune_norm_coupled=True)
    with pytest.raises(PrunekitError, match="prunekit.structured.save"):
        structured.save_pretrained(model, tmp_path)


def test_cli_hidden_prunes_the_residual_stream_and_reports_it_approximate(tmp_path, monkeypatch, capsys):
    import json

    from fixtures.cli import call_main

    out = tmp_path / "out"
    args = ["--model", "fixtures.zoo:tiny_vit", "--input-shape", "2,3,32,32", "--ratio", "0.5", "--runs", "5"]
    code, _, err = call_main(
        monkeypatch, capsys, "structured", *args, "--round-to", "1", "--hidden", "--out", str(out)
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prune_norm_coupled"] and metrics["approximate"]
    assert metrics["ratios"]["params"] <= 0.35
    assert "fine-tune or distill" in (out / "report.md").read_text()


def test_recipe_key_reaches_the_structured_stage(tmp_path):
    import yaml

    from prunekit.jobs import recipe

    data = yaml.safe_load(recipe.builtin_text("edge-digits-structured"))
    stage = next(s for s in data["stages"] if s["type"] == "structured")
    stage["prune_norm_coupled"] = True
    parsed = recipe.from_dict(data)
    assert next(s for s in parsed.stages if s.type == "structured").prune_norm_coupled is True
    stage["prune_norm_coupled"] = "sometimes"
    with pytest.raises(PrunekitError, match="prune_norm_coupled"):
        recipe.from_dict(data)
