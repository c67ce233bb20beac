"""Structured pruning: physically smaller models of ordinary PyTorch layers.

``prune(model, example_inputs, ratio=0.5, importance="l2", ignore=None, round_to=8, verify=False)``
traces the model once, finds the groups of coupled dimensions, and removes the least important units.
``save`` / ``load`` replay the removal on a fresh, unpruned instance (JSON log + safetensors, no pickle).
Custom operations get a rule with ``register_rule``; custom modules' size attributes a fixer with
``register_module_fixer``; your own importance criterion ``register_importance`` (a function of a
:class:`UnitGroup`; see docs/extending.md).
"""

from prunekit.structured.apply import register_module_fixer
from prunekit.structured.core import Result, check_equivalence, prune, prune_model
from prunekit.structured.depth import block_influence, drop_layers
from prunekit.structured.hf import save_pretrained
from prunekit.structured.importance import Importance, UnitGroup, register_importance
from prunekit.structured.mha import HeadPrunedMultiheadAttention
from prunekit.structured.rules import register_rule
from prunekit.structured.storage import load, save

__all__ = [
    "prune",
    "prune_model",
    "Result",
    "check_equivalence",
    "save",
    "load",
    "register_rule",
    "register_module_fixer",
    "register_importance",
    "Importance",
    "UnitGroup",
    "save_pretrained",
    "drop_layers",
    "block_influence",
    "HeadPrunedMultiheadAttention",
]
