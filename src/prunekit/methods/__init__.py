"""One-shot pruning algorithms as pure kernels: a weight matrix (and its calibration statistics) in,
a keep-mask (and, for SparseGPT and ALPS, reconstructed weights) out. No hooks, no models: see
:mod:`prunekit.llm` for the block-by-block runner that feeds them. Importing this package registers the
built-in LLM methods (``magnitude``, ``wanda``, ``sparsegpt``, ``alps``) in
:data:`prunekit.registry.LLM_METHODS`; :func:`register_llm_method` adds your own. DSnoT
(:func:`dsnot_refine`) refines any method's mask; :mod:`prunekit.methods.reconstruct` refits kept weights."""

from prunekit.methods.alps import alps_prune
from prunekit.methods.base import LayerMethod, register_llm_method
from prunekit.methods.dsnot import dsnot_refine
from prunekit.methods.magnitude import magnitude_mask
from prunekit.methods.reconstruct import fit_kept_weights, masked_least_squares
from prunekit.methods.sparsegpt import sparsegpt_prune
from prunekit.methods.wanda import wanda_mask

__all__ = [
    "LayerMethod",
    "alps_prune",
    "dsnot_refine",
    "fit_kept_weights",
    "magnitude_mask",
    "masked_least_squares",
    "register_llm_method",
    "sparsegpt_prune",
    "wanda_mask",
]
