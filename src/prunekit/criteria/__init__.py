"""Importance criteria, one small module each. Importing this package registers them all."""

from prunekit.criteria import activation, hessian, l0, magnitude, movement, random, taylor  # noqa: F401
from prunekit.criteria.activation import wanda_scores
from prunekit.criteria.base import Criterion, make_criterion
from prunekit.criteria.hessian import obd_scores
from prunekit.criteria.l0 import L0Gates
from prunekit.criteria.magnitude import magnitude_scores
from prunekit.criteria.movement import movement_update
from prunekit.criteria.random import random_scores
from prunekit.criteria.taylor import taylor_scores
from prunekit.registry import CRITERIA

__all__ = [
    "CRITERIA",
    "Criterion",
    "make_criterion",
    "magnitude_scores",
    "random_scores",
    "taylor_scores",
    "obd_scores",
    "wanda_scores",
    "movement_update",
    "L0Gates",
]
