"""Whole-expert pruning of tiny random mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

import copy

import pytest
import torch
import torch.nn.functional as F
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
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()  # plain transformers
    assert getattr(reloaded.config, "num_local_experts", None) == 6 or reloaded.config.num_experts == 6
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, got)


def test_reap_and_frequency_follow_their_definitions():
    routed = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    norms = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)  # sums of ||f_j(x)|| over X_j
    gated = torch.tensor([1.5, 0.0, 1.0], dtype=torch.float64)  # sums of g_j(x) ||f_j(x)||
    assert moe.reap(routed, gated).tolist() == [0.75, 0.0, 0.25]  # mean over X_j; 0 when nothing routed
    assert moe.frequency_norm(routed, norms, tokens=8).tolist() == [2 / 8 * 1.5, 0.0, 4 / 8 * 1.0]


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
