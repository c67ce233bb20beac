"""The user's own data as :class:`~prunekit.data.arrays.Splits`, streamed from disk rather than loaded:

* :func:`load_imagefolder`: a folder of class sub-folders of images (prunekit.data.images), either split
  into ``train/``, ``val/`` (or ``validation/``) and ``test/`` folders or one set split by fractions;
* :func:`load_hf_datasets`: a Hugging Face ``datasets`` data set saved with ``save_to_disk`` (read with
  ``datasets.load_from_disk``, memory-mapped Arrow files), its splits named train/validation/test;
* :func:`load_factory`: a function of the user's (``"package.module:function"``) returning DataLoaders.

A split the source does not have is carved out of its training split, stratified and seeded, by the
recipe's ``val_fraction`` / ``test_fraction`` (both missing: the same split as the built-in data sets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from prunekit.data.arrays import Splits
from prunekit.data.images import ImageFiles, ImageTransform, image_splits, list_classes
from prunekit.errors import PrunekitError
from prunekit.registry import resolve_reference

PARTS = ("train", "val", "test")
INPUT_COLUMNS = ("image", "img", "pixel_values", "x", "features")  # tried in order when none is named


def carve(labels: np.ndarray, missing: set[str], val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of ``train`` and of every ``missing`` split, stratified by ``labels`` and seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    out: dict[str, np.ndarray] = {}
    try:
        if "test" in missing:
            idx, out["test"] = train_test_split(idx, test_size=test, stratify=labels, random_state=seed)
        if "val" in missing:
            share = val / (1 - test) if "test" in missing else val
            idx, out["val"] = train_test_split(idx, test_size=share, stratify=labels[idx], random_state=seed)
    except ValueError as exc:  # a class with too few samples, or fewer held-out rows than classes
        raise PrunekitError(
            f"data: cannot carve a stratified {'/'.join(sorted(missing))} split: {exc}"
        ) from None
    out["train"] = idx
    return out


def _finish(parts: dict[str, Dataset], num_classes: int, workers: int, **extra: Any) -> Splits:
    splits = Splits(
        parts["train"], parts["val"], parts["test"], num_classes, (), num_workers=workers, **extra
    )
    return dataclasses.replace(splits, input_shape=tuple(splits.inputs("test", 1).shape[1:]))


def load_imagefolder(
    root: str | Path,
    transform: ImageTransform,
    val: float = 0.2,
    test: float = 0.2,
    seed: int = 0,
    workers: int = 0,
) -> Splits:
    """Images under ``root/<class>/`` (or ``root/train/<class>/`` with ``val/`` and ``test/`` beside it);
    the class index is the position of the class folder's name in the sorted names of the training
    classes."""
    root = Path(root)
    if not root.is_dir():
        raise PrunekitError(f"data.imagefolder: folder not found: {root}")
    folders = image_splits(root) or {"train": root}
    classes, files, labels = list_classes(folders["train"])
    missing = {part for part in ("val", "test") if part not in folders}
    parts: dict[str, Dataset] = {}
    if missing:
        y = np.asarray(labels)
        for part, ids in carve(y, missing, val, test, seed).items():
            parts[part] = ImageFiles([files[i] for i in ids], [labels[i] for i in ids], transform)
    else:
        parts["train"] = ImageFiles(files, labels, transform)
    for part in ("val", "test"):
        if part in folders:
            names, more, more_labels = list_classes(folders[part])
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise PrunekitError(
                    f"data.imagefolder: {folders[part]} has classes the training folder lacks: "
                    f"{', '.join(unknown[:5])}"
                )
            parts[part] = ImageFiles(more, [classes.index(names[i]) for i in more_labels], transform)
    return _finish(parts, len(classes), workers)


class Rows(Dataset):
    """``(input tensor, label)`` rows of a Hugging Face data set, read as they are indexed."""

    def __init__(self, table: Any, ids: np.ndarray, column: str, label: str, transform: ImageTransform):
        self.table, self.ids, self.column, self.label, self.transform = table, ids, column, label, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.table[int(self.ids[index])]
        x = row[self.column]
        if isinstance(x, Image.Image):
            return self.transform(x), int(row[self.label])
        try:
            return torch.as_tensor(np.asarray(x, dtype=np.float32)), int(row[self.label])
        except (TypeError, ValueError) as exc:
            raise PrunekitError(f"data.hf_datasets: column '{self.column}' is not numeric: {exc}") from None


def load_hf_datasets(
    root: str | Path,
    transform: ImageTransform,
    input_column: str | None = None,
    label_column: str = "label",
    val: float = 0.2,
    test: float = 0.2,
    seed: int = 0,
    workers: int = 0,
) -> Splits:
    """A data set saved by ``datasets`` (``save_to_disk``) under ``root``: a DatasetDict's ``train``,
    ``validation`` (or ``val``) and ``test``, or one Dataset split by fractions. Inputs come from
    ``input_column`` (images get ``transform``; numbers become float32 tensors), labels from
    ``label_column``."""
    try:
        import datasets
    except ImportError:
        raise PrunekitError(
            "data.hf_datasets needs the 'datasets' package, which is not installed (pip install datasets)"
        ) from None
    root = Path(root)
    if not root.is_dir():
        raise PrunekitError(f"data.hf_datasets: folder not found: {root}")
    try:
        loaded = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise PrunekitError(f"data.hf_datasets: {root} is not a saved data set: {exc}") from None
    if hasattr(loaded, "keys"):
        names = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
        tables = {p: next((loaded[n] for n in names[p] if n in loaded), None) for p in PARTS}
        if tables["train"] is None:
            raise PrunekitError(f"data.hf_datasets: {root} has no 'train' split; it has {', '.join(loaded)}")
        tables = {p: t for p, t in tables.items() if t is not None}
    else:
        tables = {"train": loaded}
    columns = tables["train"].column_names
    column = input_column or next((c for c in INPUT_COLUMNS if c in columns), None)
    for what, name in (("input_column", column), ("label_column", label_column)):
        if name is None or name not in columns:
            raise PrunekitError(
                f"data.{what}: {'no input column found' if name is None else repr(name)} in {root}; "
                f"columns: {', '.join(columns)}"
            )
    labels = {p: np.asarray(t[label_column]) for p, t in tables.items()}  # the label column only
    feature = tables["train"].features.get(label_column)
    num_classes = getattr(feature, "num_classes", None) or int(max(int(y.max()) for y in labels.values())) + 1
    missing = set(PARTS) - set(tables)
    parts: dict[str, Dataset] = {}
    for part, ids in carve(labels["train"], missing, val, test, seed).items():
        parts[part] = Rows(tables["train"], ids, column, label_column, transform)
    for part in set(tables) - {"train"}:
        parts[part] = Rows(tables[part], np.arange(len(labels[part])), column, label_column, transform)
    return _finish(parts, num_classes, workers)


def load_factory(
    reference: str, args: dict[str, Any] | None = None, num_classes: int | None = None
) -> Splits:
    """The DataLoaders ``function(**args)`` returns: a mapping with ``train``, ``val`` and ``test`` (and
    optionally ``num_classes``), or a ``(train, val, test)`` tuple. Each yields ``(inputs, labels)``
    batches; they are used as given (their batch size, shuffling and workers)."""
    fn: Callable[..., Any] = resolve_reference(reference, "data.factory")
    if not callable(fn):
        raise PrunekitError(f"data.factory '{reference}': {type(fn).__name__} is not a function")
    result = fn(**(args or {}))
    if isinstance(result, dict):
        loaders = {p: result.get(p) for p in PARTS}
        num_classes = num_classes or result.get("num_classes")
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        loaders = dict(zip(PARTS, result))
    else:
        raise PrunekitError(
            f"data.factory '{reference}' must return {{'train', 'val', 'test'}} DataLoaders (a dict, "
            f"optionally with 'num_classes') or a (train, val, test) tuple; got {type(result).__name__}"
        )
    for part, loader in loaders.items():
        if not isinstance(loader, DataLoader):
            raise PrunekitError(
                f"data.factory '{reference}': '{part}' must be a torch DataLoader, got "
                f"{type(loader).__name__}"
            )
    num_classes = num_classes or len(getattr(loaders["train"].dataset, "classes", ()))
    if not num_classes:
        raise PrunekitError(
            f"data.factory '{reference}': say how many classes there are: return 'num_classes' or set "
            "data.num_classes in the recipe"
        )
    parts = {p: loader.dataset for p, loader in loaders.items()}
    return _finish(parts, int(num_classes), 0, loaders=loaders)


__all__ = ["carve", "load_factory", "load_hf_datasets", "load_imagefolder"]
