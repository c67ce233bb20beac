"""One-shot pruning of Hugging Face causal language models: load (local directory or GGUF), calibrate on
text, prune block by block (any method in prunekit.registry.LLM_METHODS: magnitude, Wanda, SparseGPT or
your own; unstructured or N:M; uniform or OWL), measure perplexity, save a directory ``transformers``
loads as is. :func:`prune_llm` prunes a model in memory; :func:`prune_pretrained` streams a safetensors
checkpoint from disk one block at a time, in its own dtype, resumable after a crash."""

from prunekit.llm.pretrained import prune_pretrained
from prunekit.llm.prune import LLMPruneConfig, prune_llm

__all__ = ["LLMPruneConfig", "prune_llm", "prune_pretrained"]
