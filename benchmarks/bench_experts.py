"""Whole-expert pruning (prunekit.structured.experts): exactness on tiny random MoE models, and which
criterion keeps quality on a small MoE trained here.

Part 1, every tiny random config of the tests (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): 25% of the experts
removed by REAP; the pruned model against the original with those experts' router logits at -inf
(max |logit difference|), the parameters kept, and a reload with plain ``from_pretrained``.

Part 2, quality: no pretrained MoE weights are available offline, so a small Mixtral (4 layers, width
128, 8 experts of which 2 per token) is trained for ``--steps`` steps on the calibration part of
``pydoc_data.topics`` (a byte-level BPE tokenizer of 512 tokens trained on it), then 25% and 50% of its
experts are removed by REAP, by frequency x output norm, and at random (mean of 3 draws); perplexity on
the held-out part, non-overlapping windows of 128 tokens. Calibration: 32 windows of the calibration part.

    python benchmarks/bench_experts.py              # about 10 minutes on 2 cores
    python benchmarks/bench_experts.py --steps 50   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import tokenizers
import torch
import transformers
from torch import nn

from prunekit.llm.text import calibration_windows, eval_windows, pydoc_topics_split
from prunekit.structured import experts as moe

SEQ = 128


def _routed(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gate.weight") and p.dim() == 2:
            p.data = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
    return model


def tiny_models() -> dict[str, nn.Module]:
    common = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    return {
        "Mixtral": transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                **common, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2
            )
        ),
        "Qwen2-MoE": transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(
                **common,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
            )
        ),  # fmt: skip
        "Qwen3-MoE": transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                **common,
                head_dim=8,
                moe_intermediate_size=24,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            )
        ),  # fmt: skip
        "OLMoE": transformers.OlmoeForCausalLM(
            transformers.OlmoeConfig(
                **common,
                intermediate_size=24,
                num_experts=8,
                num_experts_per_tok=2,
                pad_token_id=0,
                eos_token_id=0,
            )
        ),
    }


class _MaskRouters(torch.overrides.TorchFunctionMode):
    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is nn.functional.linear and len(args) > 1 and id(args[1]) in self.masks:
            out = out.masked_fill(self.masks[id(args[1])], float("-inf"))
        return out


def exactness() -> None:
    print("part 1: 25% of the experts removed (REAP) from tiny random models")
    print(f"{'model':<11}{'experts':>9}{'params kept':>13}{'max |diff| vs masked':>22}{'reload equal':>14}")
    for name, model in tiny_models().items():
        model = _routed(model).eval()
        original = copy.deepcopy(model)
        x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        result = moe.prune_experts(model, [x], ratio=0.25)
        masks = {}
        for block in moe.find_moe_blocks(original):
            mask = torch.zeros(block.num_experts, dtype=torch.bool)
            mask[result.removed[block.name]] = True
            masks[id(block.router.weight)] = mask
        y = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            with _MaskRouters(masks):
                expected = original(y).logits
            got = model(y).logits
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            reloaded = type(model).from_pretrained(path).eval()
            with torch.no_grad():
                same = torch.equal(reloaded(y).logits, got)
        print(
            f"{name:<11}{result.experts_before:>4} -> {result.experts_after}"
            f"{result.params_after / result.params_before:>13.3f}{float((got - expected).abs().max()):>22.1e}"
            f"{str(same):>14}"
        )


def _tokenizer(text: str) -> tokenizers.Tokenizer:
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([text], trainer)
    return bpe


@torch.no_grad()
def _ppl(model: nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), 8):
        total += float(model(windows[i : i + 8], labels=windows[i : i + 8]).loss) * len(windows[i : i + 8])
    return math.exp(total / len(windows))


def quality(steps: int) -> None:
    calib_text, held_text = pydoc_topics_split()
    tok = _tokenizer(calib_text)
    train_ids = torch.tensor(tok.encode(calib_text).ids)
    held_ids = torch.tensor(tok.encode(held_text).ids)
    config = transformers.MixtralConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=SEQ,
        router_aux_loss_coef=0.01, output_router_logits=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, train_ids.numel() - SEQ - 1, (16,), generator=gen)
        batch = torch.stack([train_ids[o : o + SEQ] for o in offsets])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    model.config.output_router_logits = False
    model.eval()
    windows = eval_windows(held_ids, SEQ)
    calib = calibration_windows(train_ids, 32, SEQ, seed=0)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\npart 2: Mixtral 4 x (8 experts, top-2), width 128, {params:.2f} M "
        f"params, trained {steps} steps in {time.perf_counter() - start:.0f} s; perplexity on {len(windows)} "
        f"held-out windows of {SEQ} tokens"
    )
    dense = _ppl(model, windows)
    print(f"{'removed':<9}{'dense':>8}{'REAP':>8}{'freq x norm':>13}{'random (3)':>12}")
    for ratio in (0.25, 0.5):
        row = {}
        for criterion in moe.CRITERIA:
            pruned = copy.deepcopy(model)
            moe.prune_experts(pruned, list(calib), ratio, criterion)
            row[criterion] = _ppl(pruned, windows)
        randoms = []
        for seed in range(3):
            pruned = copy.deepcopy(model)
            blocks = moe.find_moe_blocks(pruned)
            g = torch.Generator().manual_seed(seed)
            drop = round(ratio * blocks[0].num_experts)
            moe.remove_experts(
                pruned,
                blocks,
                {b.name: torch.randperm(b.num_experts, generator=g)[:drop].tolist() for b in blocks},
            )
            randoms.append(_ppl(pruned, windows))
        random_ppl = sum(randoms) / len(randoms)
        print(
            f"{ratio:<9.0%}{dense:>8.2f}{row['reap']:>8.2f}{row['frequency']:>13.2f}{random_ppl:>12.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps of the part-2 model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    exactness()
    quality(args.steps)


if __name__ == "__main__":
    main()
