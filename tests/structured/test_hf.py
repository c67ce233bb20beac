"""Structured pruning of Hugging Face transformers built from tiny random configs (no downloads).

Attention is pruned by whole heads (whole key/value groups under grouped-query attention), the FFN by
width (gate/up/down together); the residual width stays because RMSNorm/LayerNorm normalise over it.
"""

import pytest
import torch

from prunekit import structured
from prunekit.errors import PrunekitError

pytest.importorskip("transformers")
from fixtures.hf import bert, gpt2, llama, qwen2  # noqa: E402  (needs transformers)

BUILDERS = {"llama_gqa": llama, "qwen2": qwen2, "gpt2": gpt2, "bert": bert}


def build(name):
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def first_output(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_hf_models_prune_and_match_the_masked_original(name, ratio, tmp_path):
    model = build(name)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    before = first_output(model, ids)
    result = structured.prune_model(model, (ids,), ratio=ratio, round_to=1, verify=True)
    after = first_output(model, ids)
    assert after.shape == before.shape
    assert result.params_after < result.params_before
    structured.save(model, result.plan, tmp_path)
    assert torch.equal(first_output(structured.load(build(name), tmp_path), ids), after)


def test_grouped_query_attention_loses_whole_kv_groups():
    model = build("llama_gqa")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    structured.prune(model, (ids,), ratio=0.5, round_to=1, verify=True)
    for layer in model.model.layers:
        attn = layer.self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        q_heads = attn.q_proj.out_features // attn.head_dim
        assert kv_heads == 1 and q_heads == 4  # 2 -> 1 KV group, with its 4 query heads
        assert attn.v_proj.out_features == attn.k_proj.out_features
        assert attn.o_proj.in_features == attn.q_proj.out_features
        assert q_heads // kv_heads == attn.num_key_value_groups  # the model stays valid GQA
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == 64
        assert layer.mlp.down_proj.in_features == 64
    assert model.lm_head.out_features == 128 and model.model.embed_tokens.embedding_dim == 64


def test_bert_heads_and_ffn_width():
    model = build("bert")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    structured.prune(model, (ids,), ratio=0.5, round_to=1, verify=True)
    for layer in model.encoder.layer:
        assert layer.attention.self.query.out_features == 32  # 2 of 4 heads of 16
        assert layer.intermediate.dense.out_features == 64


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "gpt2"])
def test_uniformly_pruned_models_load_with_plain_from_pretrained(name, tmp_path):
    model = build(name)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    structured.prune(model, (ids,), ratio=0.5, round_to=1, verify=True)
    structured.save_pretrained(model, tmp_path)
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()  # plain transformers, no prunekit code
    assert torch.equal(first_output(reloaded, ids), first_output(model, ids))


def test_a_failed_save_leaves_the_directory_and_the_model_as_they_were(tmp_path, monkeypatch):
    model = build("llama_gqa")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    structured.prune(model, (ids,), ratio=0.5, round_to=1)
    (tmp_path / "notes.txt").write_text("mine")
    config = model.config

    def disk_full(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(type(model), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="simulated"):
        structured.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing half-written, nothing left
    assert model.config is config
    monkeypatch.undo()
    structured.save_pretrained(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "config.json").is_file()


def test_shapes_one_config_cannot_describe_point_to_the_prunekit_loader(tmp_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    bert_model = build("bert")  # BERT derives its head size from hidden_size / heads
    structured.prune(bert_model, (ids,), ratio=0.5, round_to=1)
    with pytest.raises(PrunekitError, match="prunekit.structured.save"):
        structured.save_pretrained(bert_model, tmp_path)
    llama_model = build("llama_gqa")  # layer 0 keeps more FFN width than layer 1
    structured.prune(llama_model, (ids,), ratio=0.5, round_to=1, ratios={"model.layers.0.mlp.*": 0.25})
    with pytest.raises(PrunekitError, match="layers differ in FFN width"):
        structured.save_pretrained(llama_model, tmp_path)
