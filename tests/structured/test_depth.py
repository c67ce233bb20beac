"""Layer dropping by block influence (ShortGPT): BI = 1 - mean cos(x_in, x_out)."""

import pytest
import torch
from torch import nn

from prunekit import structured
from prunekit.errors import PrunekitError


def test_block_influence_matches_its_definition():
    x = torch.randn(3, 5, 8)
    assert float(structured.block_influence(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(structured.block_influence(x, -x)) == pytest.approx(2.0, abs=1e-6)
    y = torch.randn(3, 5, 8)
    cos = [float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(x.reshape(-1, 8), y.reshape(-1, 8))]
    assert float(structured.block_influence(x, y)) == pytest.approx(1 - sum(cos) / len(cos), abs=1e-5)


class Residual(nn.Module):
    def __init__(self, width, scale):
        super().__init__()
        self.fc = nn.Linear(width, width)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.mul_(scale)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Stack(nn.Module):
    def __init__(self, scales):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(Residual(16, s) for s in scales)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_drop_layers_removes_the_least_influential_blocks_exactly():
    model = Stack([1.0, 0.0, 2.0, 0.0, 1.5]).eval()  # blocks 1 and 3 are exact identities
    x = torch.randn(6, 4)
    with torch.no_grad():
        before = model(x)
    dropped = structured.drop_layers(model, (x,), 2)
    assert dropped == [1, 3]
    assert len(model.blocks) == 3
    with torch.no_grad():
        assert torch.equal(model(x), before)  # removing identity blocks changes nothing


def test_drop_layers_bad_count_and_no_blocks():
    model = Stack([1.0, 1.0]).eval()
    with pytest.raises(PrunekitError, match="count"):
        structured.drop_layers(model, (torch.randn(2, 4),), 2)
    with pytest.raises(PrunekitError, match="repeated blocks"):
        structured.drop_layers(nn.Linear(4, 4), (torch.randn(2, 4),), 1)


def test_drop_layers_on_a_llama_keeps_generation_and_config_consistent(tmp_path):
    pytest.importorskip("transformers")
    from fixtures.hf import llama

    torch.manual_seed(0)
    model = llama(layers=4).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    dropped = structured.drop_layers(model, (ids,), 2)
    assert len(dropped) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (
        1,
        7,
    )  # the KV cache works
    model.save_pretrained(str(tmp_path))
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
