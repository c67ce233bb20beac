"""prunekit: make neural networks smaller and faster by pruning, and prove it with measurements."""

__version__ = "0.1.0"
