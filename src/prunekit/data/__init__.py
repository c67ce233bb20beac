"""Data sets that ship with the installed packages (no downloads), and user arrays from .npz files."""

from prunekit.data.arrays import Splits, load_splits

__all__ = ["Splits", "load_splits"]
