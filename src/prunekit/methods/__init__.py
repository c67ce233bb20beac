"""One-shot pruning algorithms as pure kernels: a weight matrix (and its calibration statistics) in,
a keep-mask (and, for SparseGPT, reconstructed weights) out. No hooks, no models: see
:mod:`prunekit.llm` for the block-by-block runner that feeds them. Importing this package registers the
built-in LLM methods (``magnitude``, ``wanda``, ``sparsegpt``) in :data:`prunekit.registry.LLM_METHODS`;
:func:`register_llm_method` adds your own."""

from prunekit.methods.base import LayerMethod, register_llm_method
from prunekit.methods.magnitude import magnitude_mask
from prunekit.methods.sparsegpt import sparsegpt_prune
from prunekit.methods.wanda import wanda_mask

__all__ = ["LayerMethod", "magnitude_mask", "register_llm_method", "sparsegpt_prune", "wanda_mask"]
