"""Classification data as tensors with a fixed, stratified, seeded train/val/test split.

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes, pixel values
  0..16), scaled to [0, 1] and shaped ``(N, 1, 8, 8)``. Shipped inside scikit-learn: nothing is downloaded.
* ``npz``: a user's ``.npz`` file with arrays ``x`` (features, any shape after the sample axis) and
  ``y`` (integer class labels 0..C-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from prunekit.errors import PrunekitError

DATASETS = ("digits", "npz")


@dataclass(frozen=True)
class Splits:
    """Train/val/test samples ``(x, y)``. The datasets are map-style: tensors in memory (digits, npz) or
    files read as they are indexed (prunekit.data.sources), so nothing here assumes the data fits in
    memory. ``loaders``: the user's own DataLoaders per split (a data factory), used as they are."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    loaders: dict[str, DataLoader] | None = None
    num_workers: int = 0  # DataLoader worker processes for file-backed data (0: in this process)

    def loader(self, part: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        if self.loaders is not None:
            return self.loaders[part]
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            getattr(self, part),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=gen,
            num_workers=self.num_workers,
        )

    def inputs(self, part: str, n: int) -> torch.Tensor:
        """The first ``n`` inputs of a split (fewer if it is smaller), stacked: examples for tracing,
        calibration and test runs, read without loading the rest of the split."""
        if isinstance(getattr(self, part), TensorDataset):
            dataset = getattr(self, part)
            return dataset[: min(n, len(dataset))][0]
        return self._first(part, n)[0]

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split as ``(x, y)`` tensors in memory: only for what needs all of it at once (the C
        export's host check, made for microcontroller-sized data)."""
        dataset = getattr(self, part)
        if isinstance(dataset, TensorDataset):
            return dataset[:][0], dataset[:][1]
        return self._first(part, len(dataset))

    def _first(self, part: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, have = [], [], 0
        for x, y in self.loader(part, batch_size=max(1, min(n, 64))):
            xs.append(x)
            ys.append(torch.as_tensor(y))
            have += len(x)
            if have >= n:
                break
        if not xs:
            raise PrunekitError(f"data: the {part} split is empty")
        return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _arrays(name: str, path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    if path is None and str(name).endswith(".npz"):  # `--data FILE.npz`, as `export c` takes it
        name, path = "npz", name
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)
    if name == "npz":
        if path is None:
            raise PrunekitError("data: 'npz' needs a path to a .npz file with arrays 'x' and 'y'")
        path = Path(path)
        if not path.is_file():
            raise PrunekitError(f"data: file not found: {path}")
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file loads as one bare array
                raise ValueError("not an .npz archive")
            with loaded as npz:
                x, y = npz["x"], npz["y"]
        except KeyError:
            raise PrunekitError(f"data: {path} must hold arrays named 'x' and 'y'") from None
        except (ValueError, OSError) as exc:
            raise PrunekitError(f"data: cannot read {path} as .npz: {exc}") from None
        if len(y) == 0:
            raise PrunekitError(f"data: {path} holds no samples")
        if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise PrunekitError(f"data: {path}: 'y' must be non-negative integer labels, one per row of 'x'")
        try:
            return x.astype(np.float32), y.astype(np.int64)
        except (TypeError, ValueError) as exc:
            raise PrunekitError(f"data: {path}: 'x' must be numeric: {exc}") from None
    raise PrunekitError(f"data: unknown data set '{name}'; allowed: {', '.join(DATASETS)}")


def load_splits(
    name: str = "digits", path: str | Path | None = None, val: float = 0.2, test: float = 0.2, seed: int = 0
) -> Splits:
    """Stratified, seeded split into train/val/test (fractions of the whole set)."""
    from sklearn.model_selection import train_test_split

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PrunekitError(f"seed must be an integer in [0, 2**32) (NumPy's range), got {seed!r}")
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise PrunekitError(
            f"data: val and test fractions must be in (0, 1) and sum below 1, got {val}, {test}"
        )
    x, y = _arrays(name, path)
    idx = np.arange(len(y))
    try:  # too few samples of a class, or fewer test rows than classes
        rest, test_idx = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
        train_idx, val_idx = train_test_split(
            rest, test_size=val / (1 - test), stratify=y[rest], random_state=seed
        )
    except ValueError as exc:
        raise PrunekitError(f"data: cannot make a stratified train/val/test split: {exc}") from None

    def part(ids: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[ids]), torch.from_numpy(y[ids]))

    return Splits(part(train_idx), part(val_idx), part(test_idx), int(y.max()) + 1, tuple(x.shape[1:]))


def check_model_fits(model: torch.nn.Module, splits: Splits, what: str) -> None:
    """One line naming ``what`` (e.g. an artifact) when ``model`` does not take the splits' samples or does
    not return one logit per class: a classifier for other data fails here, not deep inside torch."""
    example = splits.inputs("test", 1)
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(
            f"{what}: the model does not take the data's samples of shape {tuple(example.shape[1:])}: {first}"
        ) from None
    finally:
        model.train(was_training)
    n = splits.num_classes
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, n):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PrunekitError(
            f"{what}: the model must return one logit per class, shape (batch, {n}) for the data's {n} "
            f"classes; got {shape}"
        )
