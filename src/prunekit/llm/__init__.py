"""One-shot pruning of Hugging Face causal language models: load (local directory or GGUF), calibrate on
text, prune block by block (magnitude, Wanda, SparseGPT; unstructured or N:M; uniform or OWL), measure
perplexity, save a directory ``transformers`` loads as is."""

from prunekit.llm.prune import METHODS, LLMPruneConfig, prune_llm

__all__ = ["METHODS", "LLMPruneConfig", "prune_llm"]
