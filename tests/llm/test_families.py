"""One-shot LLM pruning (prunekit.llm, prunekit.calib) across Hugging Face causal-LM families.

Every model is a tiny random one built from its config (no download): hidden 32, 2 decoder blocks, vocab 128,
so that 2:4 divides every linear layer's input dimension. Checked here: the blocks are found, every method
delivers its pattern exactly and touches nothing outside the blocks' linear weights, the block-by-block
runner reproduces the model's own forward, statistics of block k come from the pruned blocks before it,
pruned models save and reload bit for bit, the text and perplexity utilities, OWL, and the error paths.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

from prunekit.allocate.owl import owl_sparsities  # noqa: E402
from prunekit.calib.blocks import (  # noqa: E402
    capture_calls,
    capture_inputs,
    find_blocks,
    linear_layers,
    out_in_weight,
)
from prunekit.calib.sequential import sequential  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.jobs.llm import TextSettings, _save, run_prune  # noqa: E402
from prunekit.llm.load import load_causal_lm  # noqa: E402
from prunekit.llm.perplexity import perplexity  # noqa: E402
from prunekit.llm.prune import LLMPruneConfig, prune_llm, zero_counts  # noqa: E402
from prunekit.llm.text import (  # noqa: E402
    calibration_windows,
    eval_windows,
    pydoc_topics_split,
    tokenize,
)
from prunekit.methods import wanda_mask  # noqa: E402
from prunekit.spec import NM, Block, Unstructured  # noqa: E402

T = transformers
VOCAB = 128
SEQLEN = 16
SAMPLES = 4


def _decoder(layers: int, **extra) -> dict:
    """Config fields shared by the Llama-like families."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **extra,
    )


# family -> (blocks path, final norm path, builder(layers))
FAMILIES = {
    "llama": ("model.layers", "model.norm", lambda n: T.LlamaForCausalLM(T.LlamaConfig(**_decoder(n)))),
    "mistral": (
        "model.layers",
        "model.norm",
        lambda n: T.MistralForCausalLM(T.MistralConfig(**_decoder(n, sliding_window=8))),
    ),
    "qwen2": ("model.layers", "model.norm", lambda n: T.Qwen2ForCausalLM(T.Qwen2Config(**_decoder(n)))),
    "qwen3": ("model.layers", "model.norm", lambda n: T.Qwen3ForCausalLM(T.Qwen3Config(**_decoder(n)))),
    "phi": (
        "model.layers",
        "model.final_layernorm",
        lambda n: T.PhiForCausalLM(
            T.PhiConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=n,
                num_attention_heads=4,
                partial_rotary_factor=0.5,
                max_position_embeddings=64,
            )
        ),
    ),
    "gpt2": (
        "transformer.h",
        "transformer.ln_f",
        lambda n: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=n,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
    ),
    "opt": (
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        lambda n: T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=n,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
            )
        ),
    ),
    "gemma": ("model.layers", "model.norm", lambda n: T.GemmaForCausalLM(T.GemmaConfig(**_decoder(n)))),
    # alternating sliding-window (8 < SEQLEN) and full attention: each block gets its own mask
    "gemma2": (
        "model.layers",
        "model.norm",
        lambda n: T.Gemma2ForCausalLM(
            T.Gemma2Config(**_decoder(n, sliding_window=8), attn_implementation="eager")
        ),
    ),
}
LINEAR_COUNT = {"phi": 6, "gpt2": 4, "opt": 6}  # the rest: q, k, v, o, gate, up, down

METHODS = ("magnitude", "wanda", "sparsegpt")
SPECS = {"unstructured50": Unstructured(0.5), "2:4": NM(2, 4)}


def build(family: str, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family][2](layers).eval()
    with (
        torch.no_grad()
    ):  # biases start at zero and norms at one: make "left untouched" checks mean something
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def token_ids(rows: int = SAMPLES, seqlen: int = SEQLEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seqlen), generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``(out, in)`` weight of every prunable layer in the blocks, by full module name."""
    path, blocks = find_blocks(model)
    return {
        f"{path}.{index}.{name}": out_in_weight(module).clone()
        for index, block in enumerate(blocks)
        for name, module in linear_layers(block).items()
    }


def assert_same_state(
    before: dict[str, torch.Tensor], model: nn.Module, skip: set[str] = frozenset()
) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [name for name in before if name not in skip and not torch.equal(before[name], after[name])]
    assert not changed, f"modified outside the pruned weights: {changed}"


def full_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# -- 1. every family, every method, both patterns ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks(family):
    model = build(family)
    path, blocks = find_blocks(model)
    assert path == FAMILIES[family][0]
    assert blocks is model.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    for block in blocks:
        layers = linear_layers(block)
        assert len(layers) == LINEAR_COUNT.get(family, 7), sorted(layers)
        for module in layers.values():
            assert out_in_weight(module).shape[1] % 4 == 0  # 2:4 fits every layer
    # an explicit path finds the same list; a wrong one is a clear error
    assert find_blocks(model, path)[1] is blocks
    with pytest.raises(PrunekitError, match="no module named"):
        find_blocks(model, "model.nope")


def check_pattern(method: str, spec, before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = block_weights(model)
    assert set(after) == set(before)
    for name, weight in after.items():
        old = before[name]
        rows, cols = weight.shape
        zero = weight == 0
        assert not (old == 0).any()  # random init: every zero below was made by pruning
        if isinstance(spec, NM):
            alive = (~zero).reshape(rows, cols // 4, 4).sum(dim=-1)
            assert int(alive.max()) <= 2, name
            if method != "sparsegpt":  # a mask only: exactly N kept of every M
                assert bool((alive == 2).all()), name
        elif method == "magnitude":  # compared within the layer
            assert int(zero.sum()) == round(0.5 * rows * cols), name
            assert float(old[zero].abs().max()) <= float(old[~zero].abs().min()), name
        elif method == "wanda":  # compared within each output row
            assert bool((zero.sum(dim=1) == round(0.5 * cols)).all()), name
        else:  # sparsegpt: the lowest fraction of every 128-column block
            for start in range(0, cols, 128):
                part = zero[:, start : start + 128]
                assert int(part.sum()) == round(0.5 * part.numel()), (name, start)
        if method == "sparsegpt":  # OBS reconstruction moves the kept weights
            assert not torch.equal(weight[~zero], old[~zero]), name
        else:  # masking leaves the kept weights bit for bit
            assert torch.equal(weight, old.masked_fill(zero, 0)), name


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_llm_pattern(family, method, spec):
    model = build(family)
    calib = token_ids()
    state = snapshot(model)
    weights = block_weights(model)
    embed = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()

    info = prune_llm(model, calib, LLMPruneConfig(method, spec))

    assert info["blocks"] == FAMILIES[family][0] and info["block_count"] == 2
    assert info["block_sparsity_targets"] == [0.5, 0.5]
    check_pattern(method, spec, weights, model)
    # nothing but the blocks' linear weights changed: embeddings, LM head, norms, biases, buffers
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert_same_state(state, model, skip={f"{name}.weight" for name in weights})
    counts = zero_counts(model)
    zeros, total = sum(z for z, _ in counts.values()), sum(n for _, n in counts.values())
    if method == "sparsegpt" and isinstance(spec, NM):
        assert zeros >= total // 2  # inputs dead on all calibration tokens (OPT's ReLU) are zeroed too
    else:
        assert zeros == total // 2
    assert not model.training


def test_prune_restores_training_mode():
    model = build("llama").train()
    prune_llm(model, token_ids(), LLMPruneConfig("wanda", Unstructured(0.5)))
    assert model.training


def test_gpt2_nm_groups_run_along_conv1d_inputs():
    """Conv1D stores (in, out): the 2:4 groups must run along dim 0 of the stored weight."""
    model = build("gpt2")
    prune_llm(model, token_ids(), LLMPruneConfig("wanda", NM(2, 4)))
    _, blocks = find_blocks(model)
    fc = blocks[0].mlp.c_fc
    assert type(fc).__name__ == "Conv1D" and fc.weight.shape == (32, 128)
    stored = fc.weight.detach()
    assert bool(((stored != 0).reshape(8, 4, 128).sum(dim=1) == 2).all())  # groups of 4 input rows
    assert not bool(((stored != 0).reshape(32, 32, 4).sum(dim=-1) == 2).all())  # not along the outputs


# -- 2. the block-by-block runner reproduces the model's own forward ------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_block_calls_reproduce_forward(family):
    model = build(family)
    path, norm_path, _ = FAMILIES[family]
    blocks = model.get_submodule(path)
    samples = token_ids(3)

    outs: list[list[torch.Tensor]] = [[] for _ in blocks]
    final_in: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(
            lambda module, args, out, i=i: outs[i].append((out[0] if isinstance(out, tuple) else out).clone())
        )
        for i, block in enumerate(blocks)
    ]
    handles.append(
        model.get_submodule(norm_path).register_forward_pre_hook(
            lambda m, args: final_in.append(args[0].clone())
        )
    )
    try:
        for row in range(samples.shape[0]):
            full_forward(model, samples[row : row + 1])
    finally:
        for handle in handles:
            handle.remove()

    calls = capture_calls(model, blocks, samples[:1])
    inputs = capture_inputs(model, blocks, samples)
    assert inputs.shape == (3, SEQLEN, 32)
    with torch.no_grad():
        for row in range(samples.shape[0]):
            hidden = inputs[row : row + 1]
            for index, block in enumerate(blocks):
                hidden = calls[index].run(block, hidden)
                torch.testing.assert_close(hidden, outs[index][row], atol=1e-5, rtol=0)
            # the last block's output is what the final norm receives
            torch.testing.assert_close(hidden, final_in[row], atol=1e-5, rtol=0)


def test_gemma2_blocks_get_their_own_masks():
    """Gemma2 alternates sliding-window and full attention: block calls must be captured per block."""
    model = build("gemma2")
    _, blocks = find_blocks(model)
    ids = token_ids(1)
    calls = capture_calls(model, blocks, ids)
    mask0, mask1 = calls[0].kwargs["attention_mask"], calls[1].kwargs["attention_mask"]
    assert mask0.shape == mask1.shape == (1, 1, SEQLEN, SEQLEN)
    assert not torch.equal(mask0, mask1)
    # block 0 run with block 1's (full) mask is not what the model computes
    hidden = capture_inputs(model, blocks, ids)
    with torch.no_grad():
        right = calls[0].run(blocks[0], hidden)
        wrong = calls[1].run(blocks[0], hidden)
    assert (right - wrong).abs().max() > 1e-4


# -- 3. block k is calibrated on what the pruned blocks before it produce ------------------------------


def hooked_sq_norms(model: nn.Module, block: nn.Module, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of x_j^2 over every token of every sample, for each linear layer of ``block``, from full model
    forwards."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for name, module in linear_layers(block).items()
    ]
    try:
        for row in range(samples.shape[0]):
            full_forward(model, samples[row : row + 1])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs).pow(2).mean(dim=0) for name, xs in seen.items()}


def test_sequential_stats_come_from_pruned_predecessors():
    model = build("llama")
    dense = copy.deepcopy(model)
    calib = token_ids()
    recorded: dict[int, dict[str, torch.Tensor]] = {}

    def visit(index, block, linears, stats):
        recorded[index] = {name: value.clone() for name, value in stats.items()}
        if index == 0:  # prune block 0 only: zero every other input column of each layer
            for module in linears.values():
                module.weight.data[:, ::2] = 0

    sequential(model, calib, visit, "sq_norm")

    assert sorted(recorded) == [0, 1]
    _, blocks = find_blocks(model)
    _, dense_blocks = find_blocks(dense)
    names = set(linear_layers(blocks[0]))
    assert set(recorded[0]) == set(recorded[1]) == names
    expected0 = hooked_sq_norms(dense, dense_blocks[0], calib)  # block 0 sees the dense embeddings
    expected1 = hooked_sq_norms(model, blocks[1], calib)  # model: block 0 pruned, block 1 untouched
    dense1 = hooked_sq_norms(dense, dense_blocks[1], calib)
    for name in names:
        torch.testing.assert_close(recorded[0][name], expected0[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(recorded[1][name], expected1[name], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(recorded[1][name], dense1[name], rtol=1e-2), name  # not the dense stats
    assert torch.equal(blocks[1].self_attn.q_proj.weight, dense_blocks[1].self_attn.q_proj.weight)


def test_sequential_read_only_one_pass_matches_dense_stats():
    """``modifies=False`` takes statistics and next inputs from one forward: the dense model's numbers."""
    model = build("qwen2")
    calib = token_ids()
    recorded: dict[int, dict[str, torch.Tensor]] = {}
    sequential(
        model, calib, lambda i, b, lin, stats: recorded.__setitem__(i, stats), "sq_norm", modifies=False
    )
    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        expected = hooked_sq_norms(model, block, calib)
        assert set(recorded[index]) == set(expected)
        for name in expected:
            torch.testing.assert_close(recorded[index][name], expected[name], rtol=1e-5, atol=1e-7)


def test_prune_llm_wanda_masks_use_pruned_block_inputs():
    """prune_llm's own wanda masks for block 1 are those of block 1's dense weights scored with the input
    norms that block 0, already pruned, produces."""
    model = build("llama")
    original = copy.deepcopy(model)
    calib = token_ids()
    spec = Unstructured(0.5)
    prune_llm(model, calib, LLMPruneConfig("wanda", spec))

    # block 0 pruned as prune_llm left it, block 1 back to dense: the state block 1 was calibrated in
    probe = copy.deepcopy(model)
    _, probe_blocks = find_blocks(probe)
    _, orig_blocks = find_blocks(original)
    probe_blocks[1].load_state_dict(orig_blocks[1].state_dict())
    norms = hooked_sq_norms(probe, probe_blocks[1], calib)
    dense_norms = hooked_sq_norms(original, orig_blocks[1], calib)

    _, blocks = find_blocks(model)
    differs = 0
    for name, module in linear_layers(blocks[1]).items():
        weight = out_in_weight(linear_layers(orig_blocks[1])[name])
        kept = out_in_weight(module) != 0
        assert torch.equal(kept, wanda_mask(weight, norms[name], spec)), name
        differs += int((kept != wanda_mask(weight, dense_norms[name], spec)).sum())
    assert differs > 0  # dense-input statistics would have chosen other weights


# -- 4. save and reload -------------------------------------------------------------------------------


def word_tokenizer():
    """A tiny word-level fast tokenizer ("w1 w2 ..." -> ids), saved and loaded like any HF tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_reload_identical(family, tmp_path):
    model = build(family)
    prune_llm(model, token_ids(), LLMPruneConfig("sparsegpt", NM(2, 4)))
    probe = token_ids(2, seed=5)
    logits = full_forward(model, probe)
    out = tmp_path / "pruned"
    _save(model, word_tokenizer(), out, {"note": 1})
    assert (out / "metrics.json").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind

    for loaded in (
        T.AutoModelForCausalLM.from_pretrained(str(out)).eval(),
        load_causal_lm(out)[0],
    ):
        assert type(loaded) is type(model)
        assert torch.equal(full_forward(loaded, probe), logits)
        assert zero_counts(loaded) == zero_counts(model)
        reloaded = block_weights(loaded)
        for name, weight in block_weights(model).items():
            assert torch.equal(reloaded[name], weight), name

    # saving again over an existing directory replaces its files
    _save(model, word_tokenizer(), out, {"note": 2})
    assert '"note": 2' in (out / "metrics.json").read_text()


def test_run_prune_end_to_end(tmp_path):
    source = tmp_path / "dense"
    model = build("llama")
    model.save_pretrained(str(source))
    word_tokenizer().save_pretrained(str(source))
    words = random.Random(0)
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(" ".join(f"w{words.randrange(1, VOCAB)}" for _ in range(400)))
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(" ".join(f"w{words.randrange(1, VOCAB)}" for _ in range(50)))
    text = TextSettings(
        calib_samples=SAMPLES, seqlen=SEQLEN, calib_file=str(calib_file), eval_file=str(eval_file)
    )
    metrics = run_prune(str(source), LLMPruneConfig("wanda", NM(2, 4)), text, tmp_path / "out")
    assert metrics["sparsity_pruned_layers"] == 0.5
    assert metrics["evaluation"]["windows"] == 50 // SEQLEN
    assert metrics["ppl_dense"] > 1 and metrics["ppl_pruned"] > 1
    assert set(metrics["layer_sparsity"].values()) == {0.5}
    pruned, tokenizer = load_causal_lm(tmp_path / "out")
    counts = zero_counts(pruned)
    assert sum(z for z, _ in counts.values()) == sum(n for _, n in counts.values()) // 2
    windows = eval_windows(tokenize(tokenizer, eval_file.read_text()), SEQLEN)
    assert perplexity(pruned, windows) == metrics["ppl_pruned"]


# -- 5. text and perplexity ---------------------------------------------------------------------------


def test_calibration_windows():
    ids = torch.arange(100)
    windows = calibration_windows(ids, 5, 10, seed=0)
    assert windows.shape == (5, 10)
    starts = windows[:, 0].tolist()
    assert len(set(starts)) == 5 and all(s % 10 == 0 for s in starts)  # aligned: no two overlap
    for row in windows:
        assert torch.equal(
            row, torch.arange(int(row[0]), int(row[0]) + 10)
        )  # contiguous slices of the stream
    assert len(set(windows.reshape(-1).tolist())) == 50
    assert torch.equal(windows, calibration_windows(ids, 5, 10, seed=0))
    assert not torch.equal(windows, calibration_windows(ids, 5, 10, seed=1))
    assert calibration_windows(ids, 10, 10, seed=3)[:, 0].sort().values.tolist() == list(range(0, 100, 10))


def test_calibration_windows_too_few_tokens():
    with pytest.raises(PrunekitError, match=r"has 30 tokens"):
        calibration_windows(torch.arange(30), 2, 16)
    with pytest.raises(PrunekitError, match="seqlen"):
        calibration_windows(torch.arange(30), 1, 1)
    with pytest.raises(PrunekitError, match="calib-samples"):
        calibration_windows(torch.arange(30), 0, 4)


def test_eval_windows_drop_the_tail():
    windows = eval_windows(torch.arange(35), 10)
    assert torch.equal(windows, torch.arange(30).reshape(3, 10))
    with pytest.raises(PrunekitError, match="9 tokens"):
        eval_windows(torch.arange(9), 10)


def test_pydoc_topics_split_deterministic():
    calib, held = pydoc_topics_split()
    assert (calib, held) == pydoc_topics_split()
    assert len(held) > 10_000 and len(calib) > 8 * len(held)
    assert not calib.endswith("\n\n") and held and not held.startswith("\n")
    assert held[:200] not in calib


def test_pydoc_topics_split_no_eval_paragraph_in_calibration():
    calib, held = pydoc_topics_split()
    paragraphs = [p.strip() for p in held.split("\n\n") if p.strip()]
    # exact paragraphs never; and no paragraph longer than a method name ("clear()", "keys()") as a substring
    leaked = [p for p in paragraphs if p in calib.split("\n\n") or (len(p) >= 20 and p in calib)]
    assert not leaked, f"{len(leaked)} of {len(paragraphs)} evaluation paragraphs occur in calibration"


def test_tokenize_rejects_a_foreign_tokenizer():
    tokenizer = word_tokenizer()
    assert tokenize(tokenizer, "w1 w5 w127").tolist() == [1, 5, 127]
    assert tokenize(tokenizer, "w1 w5 w127", vocab_size=VOCAB).tolist() == [1, 5, 127]
    with pytest.raises(PrunekitError, match="token id 127 but the model has 100 embeddings"):
        tokenize(tokenizer, "w1 w5 w127", vocab_size=100)


def test_perplexity_matches_hand_computation():
    model = build("gpt2").train()  # dropout 0.1: perplexity must evaluate in eval mode
    windows = token_ids(2)
    model.eval()
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    log_probs = F.log_softmax(logits.double(), dim=-1)
    nll = -log_probs.gather(-1, windows[:, 1:].unsqueeze(-1)).mean()
    expected = math.exp(float(nll))
    model.train()
    steps = []
    got = perplexity(model, windows, progress=lambda done, total: steps.append((done, total)))
    assert math.isclose(got, expected, rel_tol=1e-5)
    assert model.training  # restored
    assert steps == [(1, 2), (2, 2)]


# -- 6. OWL -------------------------------------------------------------------------------------------


def test_owl_end_to_end():
    model = build("llama", layers=4)
    calib = token_ids()
    config = LLMPruneConfig("wanda", Unstructured(0.5), owl=True, owl_m=3.0, owl_lambda=0.08)
    info = prune_llm(model, calib, config)

    targets = info["block_sparsity_targets"]
    ratios = info["owl"]["outlier_ratios"]
    assert len(targets) == len(ratios) == 4
    assert len(set(ratios)) > 1 and len(set(targets)) > 1  # the allocation is not trivially uniform
    assert abs(sum(targets) / 4 - 0.5) < 1e-9
    # centring the [0, 2 lambda] spread keeps each block within 2 lambda (n-1)/n of the target (not lambda:
    # see test_owl_sparsities_lopsided_ratios)
    assert all(abs(t - 0.5) <= 2 * 0.08 * 3 / 4 + 1e-12 for t in targets)
    assert abs(max(targets) - min(targets) - 2 * 0.08) < 1e-12
    # more outliers, less pruning
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [targets[i] for i in order] == sorted(targets, reverse=True)

    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        zeros = total = rows = 0
        for name, module in linear_layers(block).items():
            weight = out_in_weight(module)
            per_row = (weight == 0).sum(dim=1)
            assert bool((per_row == round(targets[index] * weight.shape[1])).all()), (index, name)
            zeros += int(per_row.sum())
            total += weight.numel()
            rows += weight.shape[0]
        assert abs(zeros - targets[index] * total) <= rows  # within rounding of one weight per row


def test_owl_sparsities_lopsided_ratios():
    """The reference formula: spread exactly 2 lambda, mean exactly the target; lopsided ratios put one block
    up to 2 lambda (n-1)/n away, and a result outside [0, 1) is an error, not a clipped allocation."""
    got = owl_sparsities([1.0, 1.0, 1.0, 0.0], 0.5, 0.08)
    assert abs(sum(got) / 4 - 0.5) < 1e-12
    assert abs(max(got) - min(got) - 0.16) < 1e-12
    assert abs(got[3] - (0.5 + 2 * 0.08 * 3 / 4)) < 1e-12  # the fewest outliers: pruned most
    for ratios, sparsity in (([1.0, 1.0, 1.0, 0.0], 0.9), ([0.0, 0.0, 0.0, 1.0], 0.1)):
        # lambda 0.09 passes the up-front check (sparsity +- lambda within [0, 1)) ...
        with pytest.raises(PrunekitError, match="smaller --owl-lambda"):  # ... but a block would leave it
            owl_sparsities(ratios, sparsity, 0.09)


def test_owl_rejects_nm():
    with pytest.raises(PrunekitError, match="not to N:M"):
        LLMPruneConfig("wanda", NM(2, 4), owl=True)


def test_owl_allocates_block_patterns_in_whole_tiles():
    """OWL with 8x1 blocks: each decoder block gets its own sparsity, delivered as whole tiles, exactly
    round(sparsity x tiles) per layer (the magnitude path compares tiles per layer)."""
    model = build("llama", layers=4)
    config = LLMPruneConfig("magnitude", Block((8, 1), 0.5), owl=True, owl_m=3.0, owl_lambda=0.08)
    info = prune_llm(model, token_ids(), config)
    targets = info["block_sparsity_targets"]
    assert len(set(targets)) > 1 and abs(sum(targets) / 4 - 0.5) < 1e-9
    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block).items():
            weight = out_in_weight(module)
            t = (weight != 0).reshape(weight.shape[0] // 8, 8, weight.shape[1])
            kept, none = t.all(dim=1), ~t.any(dim=1)
            assert bool((kept | none).all()), (index, name)  # whole 8x1 tiles only
            assert int(none.sum()) == round(targets[index] * kept.numel()), (index, name)


# -- 7. errors ----------------------------------------------------------------------------------------


def _llama(hidden: int, ffn: int, heads: int) -> nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=64,
    )
    return T.LlamaForCausalLM(config).eval()


def _gpt2_inner30() -> nn.Module:
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=30, n_layer=2, n_head=4, n_positions=64)
    return T.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    ("make", "layer"),
    [
        (lambda: _llama(30, 64, 3), "model.layers.0.self_attn.q_proj"),
        # block 0's attention and gate/up fit: they must not be pruned before down_proj is found not to
        (lambda: _llama(32, 30, 4), "model.layers.0.mlp.down_proj"),
        # Conv1D (in, out): c_fc is stored (32, 30) and fits; c_proj is stored (30, 32) and does not
        (_gpt2_inner30, "transformer.h.0.mlp.c_proj"),
    ],
    ids=["llama-hidden30", "llama-ffn30", "gpt2-inner30"],
)
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_nm_not_dividing_raises_before_pruning(make, layer, method):
    model = make()
    state = snapshot(model)
    with pytest.raises(PrunekitError, match="2:4") as caught:
        prune_llm(model, token_ids(), LLMPruneConfig(method, NM(2, 4)))
    assert f"'{layer}'" in str(caught.value)
    assert "30" in str(caught.value)
    assert_same_state(state, model)


def test_no_blocks_raises():
    model = nn.Sequential(nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB))
    with pytest.raises(PrunekitError, match="could not find the decoder blocks"):
        prune_llm(model, token_ids(), LLMPruneConfig("magnitude", Unstructured(0.5)))
    with pytest.raises(PrunekitError, match="not a non-empty nn.ModuleList"):
        find_blocks(model, "0")


def test_needs_calibration_data():
    model = build("llama")
    state = snapshot(model)
    for calib in (None, torch.zeros(SEQLEN, dtype=torch.long)):
        with pytest.raises(PrunekitError, match="needs calibration token ids"):
            prune_llm(model, calib, LLMPruneConfig("wanda", Unstructured(0.5)))
    assert_same_state(state, model)
    prune_llm(model, None, LLMPruneConfig("magnitude", Unstructured(0.5)))  # magnitude needs no data
    assert sum(z for z, _ in zero_counts(model).values()) > 0


def test_load_non_causal_model_type(tmp_path):
    torch.manual_seed(0)
    config = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    T.DistilBertModel(config).save_pretrained(str(tmp_path))
    with pytest.raises(PrunekitError, match="not a causal language model"):
        load_causal_lm(tmp_path)


def test_load_bert_encoder_is_not_a_causal_lm(tmp_path):
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    T.BertModel(config).save_pretrained(str(tmp_path))
    with pytest.raises(PrunekitError, match="not a causal language model"):
        load_causal_lm(tmp_path)


def test_load_garbage_gguf(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(PrunekitError, match="could not load the model"):
        load_causal_lm(path)


def test_load_gguf_without_the_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(PrunekitError, match=r"needs the 'gguf' package: pip install 'prunekit\[hf\]'"):
        load_causal_lm(path)


def test_load_bad_paths(tmp_path):
    with pytest.raises(PrunekitError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(PrunekitError, match="no config.json"):
        load_causal_lm(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(PrunekitError, match=r"must be \.gguf"):
        load_causal_lm(weights)
