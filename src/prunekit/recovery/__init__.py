"""Recovery after pruning: fine-tuning with masks that stay exactly zero, optionally distilling from the
dense model (:mod:`prunekit.recovery.distill`)."""

from prunekit.recovery.distill import Distiller, distillation_loss
from prunekit.recovery.finetune import TrainConfig, train

__all__ = ["Distiller", "TrainConfig", "distillation_loss", "train"]
