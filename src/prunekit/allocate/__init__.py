"""How much to prune where: per-layer sparsities (``sensitivity``, ``uniform``/ERK), per-block LLM
sparsities (``owl``) and per-group structured ratios under a latency budget (``latency``)."""
