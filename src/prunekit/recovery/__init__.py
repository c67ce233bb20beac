"""Recovery after pruning: fine-tuning with masks that stay exactly zero."""

from prunekit.recovery.finetune import TrainConfig, train

__all__ = ["TrainConfig", "train"]
