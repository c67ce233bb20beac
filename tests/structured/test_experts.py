"""Whole-expert pruning of tiny random mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from prunekit.errors import PrunekitError
from prunekit.structured import experts as moe

transformers = pytest.importorskip("transformers")
from fixtures.hf import llama, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: E402  (needs transformers)

BUILDERS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe}


def build(name):
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def ids(seed, shape=(2, 16)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


class MaskedRouters(TorchFunctionMode):
    """The original model with the given experts' router logits set to -inf (the definition of removing
    them): every F.linear with a router's weight gets its logit columns masked."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks  # id(router weight) -> bool mask over experts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.masks:
            out = out.masked_fill(self.masks[id(args[1])], float("-inf"))
        return out


@pytest.mark.parametrize("criterion", moe.CRITERIA)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_removing_experts_equals_masking_their_router_logits_and_loads(name, criterion, tmp_path):
    model = build(name)
    original = copy.deepcopy(model)
    result = moe.prune_experts(model, [ids(1), ids(2)], ratio=0.25, criterion=criterion)
    assert (result.experts_before, result.experts_after) == (8, 6)
    assert all(len(r) == 2 for r in result.removed.values()) and result.params_after < result.params_before
    masks = {}
    for block in moe.find_moe_blocks(original):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[result.removed[block.name]] = True
        masks[id(block.router.weight)] = mask
    x = ids(3)
    with torch.no_grad():
        with MaskedRouters(masks):
            expected = original(x).logits
        got = model(x).logits
        dense = original(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(dense, expected)  # the experts mattered: the check compares a changed model
    dropped = assert_kept_rows_are_the_originals(original, model, result.removed)
    assert result.params_before - result.params_after == dropped  # exactly the removed experts' rows
    assert result.params_after == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()  # plain transformers
    key = "num_local_experts" if name == "mixtral" else "num_experts"
    assert getattr(reloaded.config, key) == getattr(model.config, key) == 6
    assert all(b.num_experts == 6 for b in moe.find_moe_blocks(reloaded))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, got)


def assert_kept_rows_are_the_originals(original, pruned, removed):
    """Every per-expert tensor (router rows and biases, stacked expert weights) of the pruned model is the
    original's tensor at the kept experts, bit for bit; every other parameter (attention, shared expert,
    norms) is untouched."""
    before, after = dict(original.named_parameters()), dict(pruned.named_parameters())
    assert before.keys() == after.keys()
    sliced, dropped = set(), 0
    pruned_blocks = {b.name: b for b in moe.find_moe_blocks(pruned)}
    for block in moe.find_moe_blocks(original):
        keep = [j for j in range(8) if j not in removed[block.name]]
        new = pruned_blocks[block.name]
        assert new.num_experts == new.router.weight.shape[0] == 6
        for old_owner, new_owner in ((block.router, new.router), (block.experts, new.experts)):
            for key, tensor in old_owner.named_parameters(recurse=False):
                if tensor.shape[0] == 8:
                    assert torch.equal(getattr(new_owner, key), tensor[keep]), (block.name, key)
                    sliced.add(id(tensor))
                    dropped += tensor[0].numel() * (8 - len(keep))
    assert len(sliced) >= 2 * len(pruned_blocks)  # at least a router and an expert stack per block
    for key, tensor in before.items():
        if id(tensor) not in sliced:
            assert torch.equal(after[key], tensor), key
    return dropped


def test_reap_and_frequency_follow_their_definitions():
    routed = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    norms = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)  # sums of ||f_j(x)|| over X_j
    gated = torch.tensor([1.5, 0.0, 1.0], dtype=torch.float64)  # sums of g_j(x) ||f_j(x)||
    assert moe.reap(routed, gated).tolist() == [0.75, 0.0, 0.25]  # mean over X_j; 0 when nothing routed
    assert moe.frequency_norm(routed, norms, tokens=8).tolist() == [2 / 8 * 1.5, 0.0, 4 / 8 * 1.0]


class ScaleExperts(nn.Module):
    """Four experts in the transformers >= 5 convention; expert j multiplies its input by scale[j]."""

    num_experts = 4

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 10.0]))

    def forward(self, hidden, top_k_index, top_k_weights):
        return (top_k_weights * self.scale[top_k_index]).sum(-1, keepdim=True) * hidden


class HandRoutedMoE(nn.Module):
    """A one-block MoE whose routing is written out per token id (the router 'gate' only has to exist:
    REAP's definition reads the weights the block multiplies each expert's output by, whatever computed
    them). Token 0: x = (3, 4), experts 0 (g = 0.75) and 1 (0.25); token 1: x = (0, 1), experts 1 (0.5) and
    3 (0.5); token 2: x = (6, 8), experts 0 (0.5) and 1 (0.5). Expert 2 is never chosen."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(2, 4, bias=False)
        self.gate.top_k = 2
        self.experts = ScaleExperts()
        self.register_buffer("x", torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]))
        self.register_buffer("index", torch.tensor([[0, 1], [1, 3], [0, 1]]))
        self.register_buffer("weights", torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]]))

    def forward(self, ids):
        ids = ids.reshape(-1)
        return self.experts(self.x[ids], self.index[ids], self.weights[ids])


def test_reap_on_a_hand_routed_block_equals_the_papers_definition():
    """S_j = 1/|X_j| sum_{x in X_j} g_j(x) ||f_j(x)||_2 (Lasby et al. 2025, REAP), with f_j(x) = s_j x,
    s = (1, 2, 3, 10), |x| = 5, 1, 10 for tokens 0, 1, 2; frequency x norm = |X_j| / N x mean ||f_j(x)||."""
    model = HandRoutedMoE()
    (block,) = moe.find_moe_blocks(model)
    stats = moe.collect_stats(model, [block], [torch.tensor([[0, 1, 2]])])[""]
    assert stats.tokens == 3 and stats.routed.tolist() == [2, 3, 0, 1]
    reap = [(0.75 * 1 * 5 + 0.5 * 1 * 10) / 2, (0.25 * 2 * 5 + 0.5 * 2 * 1 + 0.5 * 2 * 10) / 3, 0.0, 0.5 * 10]
    assert reap == [4.375, 4.5, 0.0, 5.0]
    torch.testing.assert_close(moe.scores(stats, "reap"), torch.tensor(reap, dtype=torch.float64))
    frequency = [2 / 3 * (5 + 10) / 2, 3 / 3 * (10 + 2 + 20) / 3, 0.0, 1 / 3 * 10]
    torch.testing.assert_close(moe.scores(stats, "frequency"), torch.tensor(frequency, dtype=torch.float64))
    # the criteria disagree on the rarely chosen, strongly weighted expert 3: REAP keeps it
    for criterion, removed in (("reap", [0, 2]), ("frequency", [2, 3])):
        model = HandRoutedMoE()
        router = model.gate.weight.detach().clone()
        result = moe.prune_experts(model, [torch.tensor([[0, 1, 2]])], ratio=0.5, criterion=criterion)
        assert result.removed == {"": removed} and (result.experts_before, result.experts_after) == (4, 2)
        kept = [j for j in range(4) if j not in removed]
        assert model.experts.scale.tolist() == [[1.0, 2.0, 3.0, 10.0][j] for j in kept]
        assert torch.equal(model.gate.weight, router[kept]) and model.experts.num_experts == 2


def test_collected_scores_match_a_direct_computation_of_reap():
    model = build("mixtral")
    block = moe.find_moe_blocks(model)[0]
    seen = []
    handle = block.experts.register_forward_pre_hook(lambda m, args: seen.append(args))
    stats = moe.collect_stats(model, [block], [ids(4)])
    handle.remove()
    ((hidden, index, weights),) = seen
    experts = block.experts
    gated, routed = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    torch.set_grad_enabled(False)
    for t in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            j = int(index[t, slot])
            gate, up = F.linear(hidden[t], experts.gate_up_proj[j]).chunk(2)
            out = F.linear(F.silu(gate) * up, experts.down_proj[j])  # Mixtral's expert: SwiGLU
            gated[j] += float(weights[t, slot]) * float(out.norm())
            routed[j] += 1
    torch.set_grad_enabled(True)
    torch.testing.assert_close(moe.reap(stats[block.name].routed, stats[block.name].gated_norm_sum),
                               moe.reap(routed, gated), rtol=1e-5, atol=1e-8)  # fmt: skip


def test_an_expert_that_writes_nothing_goes_first():
    model = build("olmoe")
    with torch.no_grad():
        for block in moe.find_moe_blocks(model):
            block.experts.down_proj[5].zero_()
    result = moe.prune_experts(model, [ids(5)], ratio=0.125)
    assert all(removed == [5] for removed in result.removed.values())


def test_bad_requests_are_clear_errors():
    with pytest.raises(PrunekitError, match=r"\(0, 1\)"):
        moe.prune_experts(build("mixtral"), [ids(1)], ratio=1.0)
    with pytest.raises(PrunekitError, match="criterion"):
        moe.prune_experts(build("mixtral"), [ids(1)], ratio=0.25, criterion="loud")
    with pytest.raises(PrunekitError, match="removes no expert"):
        moe.prune_experts(build("mixtral"), [ids(1)], ratio=0.01)
    torch.manual_seed(0)
    with pytest.raises(PrunekitError, match="no mixture-of-experts blocks"):
        moe.prune_experts(llama().eval(), [ids(1)], ratio=0.25)
    model = build("mixtral")
    blocks = moe.find_moe_blocks(model)
    with pytest.raises(PrunekitError, match="same number of experts"):
        moe.remove_experts(model, blocks, {blocks[0].name: [1]})
    with pytest.raises(PrunekitError, match="at least 2"):
        moe.remove_experts(model, blocks, {b.name: list(range(7)) for b in blocks})
