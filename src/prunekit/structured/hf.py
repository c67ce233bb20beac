"""Hugging Face models after structured pruning: write a directory plain ``from_pretrained`` can load.

When every layer kept the same number of heads and the same FFN width, the pruned model is an ordinary
model of a smaller config: ``save_pretrained(model, path)`` updates the config (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size`` / ``n_inner``), checks that a model built from it has
exactly the pruned shapes, and saves. When layers differ, it says so: use ``prunekit.structured.save`` /
``load``, which replay the prune log on the original architecture.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.files import staged_directory


def _one(values: set[int], what: str) -> int:
    if len(values) != 1:
        raise PrunekitError(
            f"layers differ in {what} ({sorted(values)}): a single config cannot describe them; "
            "save with prunekit.structured.save and rebuild with prunekit.structured.load"
        )
    return values.pop()


def pruned_config(model: nn.Module):
    """The original config with head counts and FFN width read off the pruned layers."""
    config = copy.deepcopy(model.config)
    q_heads, kv_heads, ffn, head_dims = set(), set(), set(), set()
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        q = getattr(module, "q_proj", None) or getattr(module, "query", None)
        if head_dim and isinstance(q, nn.Linear):
            q_heads.add(q.out_features // head_dim)
            if getattr(module, "head_dim", None):
                head_dims.add(module.head_dim)
            k = getattr(module, "k_proj", None) or getattr(module, "key", None)
            if isinstance(k, nn.Linear):
                kv_heads.add(k.out_features // head_dim)
        for name in ("gate_proj", "up_proj"):
            if isinstance(getattr(module, name, None), nn.Linear):
                ffn.add(getattr(module, name).out_features)
        if type(module).__name__.endswith("Intermediate") and isinstance(
            getattr(module, "dense", None), nn.Linear
        ):
            ffn.add(module.dense.out_features)
        c_fc = getattr(module, "c_fc", None)
        if c_fc is not None and hasattr(c_fc, "nf"):
            ffn.add(c_fc.nf)
    if q_heads and hasattr(config, "num_attention_heads"):
        config.num_attention_heads = _one(q_heads, "attention heads")
    if head_dims:
        # explicit: hidden_size / num_attention_heads no longer gives it (Llama, Qwen2, Mistral read it)
        config.head_dim = _one(head_dims, "head size")
    if kv_heads and getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = _one(kv_heads, "key/value heads")
    if ffn:
        width = _one(ffn, "FFN width")
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = width
        elif hasattr(config, "n_inner"):
            config.n_inner = width
    return config


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Save a structurally pruned Hugging Face model so ``from_pretrained`` rebuilds it as is.

    The files are written into a temporary sibling directory and moved into ``path`` at the end; weight
    shards of an earlier save that this one does not have are removed, other files there are kept."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise PrunekitError("save_pretrained needs a Hugging Face transformers model")
    config = pruned_config(model)
    fresh = type(model)(config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in have if want.get(k) != have[k])
    if wrong:
        key = wrong[0]
        raise PrunekitError(
            f"the pruned shapes do not fit one {type(model).__name__} config (e.g. {key}: {have[key]} vs "
            f"{want.get(key)}); save with prunekit.structured.save and rebuild with prunekit.structured.load"
        )
    original = model.config
    model.config = config
    try:  # staged: a failed save leaves the user's directory as it was
        with staged_directory(path, replaces=("*.safetensors", "*.safetensors.index.json")) as staging:
            model.save_pretrained(str(staging))
    except BaseException:
        model.config = original
        raise
    return Path(path)
