"""One-shot pruning algorithms as pure kernels: a weight matrix (and its calibration statistics) in,
a keep-mask (and, for SparseGPT, reconstructed weights) out. No hooks, no models: see
:mod:`prunekit.llm` for the block-by-block runner that feeds them."""

from prunekit.allocate.owl import outlier_ratio, owl_sparsities
from prunekit.methods.magnitude import magnitude_mask
from prunekit.methods.sparsegpt import sparsegpt_prune
from prunekit.methods.wanda import wanda_mask

__all__ = ["magnitude_mask", "outlier_ratio", "owl_sparsities", "sparsegpt_prune", "wanda_mask"]
