"""Image folders as a streaming data set: one class per sub-folder (the ImageFolder layout), every image
read from disk and transformed when a DataLoader asks for it, so a folder far larger than memory works.

Transforms (torchvision's semantics, done with Pillow so torchvision is not needed): convert to ``mode``
(``RGB`` or ``L``), ``resize`` (an int: the shorter side becomes that, aspect kept; ``[h, w]``: exactly),
``center_crop`` (``[h, w]`` from the middle), scale to [0, 1] float32 CHW, then ``normalize`` per channel
``(x - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from prunekit.errors import PrunekitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageTransform:
    mode: str = "RGB"  # "RGB" (3 channels) or "L" (1 channel)
    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert(self.mode)
        if self.resize is not None:
            image = image.resize(resized_size(image.size, self.resize), Image.BILINEAR)
        if self.center_crop is not None:
            image = image.crop(center_box(image.size, self.center_crop))
        array = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1).contiguous()
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            x = (x - mean) / std
        return x


def resized_size(size: tuple[int, int], resize: int | Sequence[int]) -> tuple[int, int]:
    """Pillow ``(width, height)`` after resizing: an int sets the shorter side (aspect kept, the longer
    side truncated as torchvision does), ``[h, w]`` sets both."""
    width, height = size
    if isinstance(resize, int):
        if width <= height:
            return resize, int(resize * height / width)
        return int(resize * width / height), resize
    return int(resize[1]), int(resize[0])


def center_box(size: tuple[int, int], crop: Sequence[int]) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of a ``[h, w]`` crop from the middle of a ``(w, h)`` image."""
    width, height = size
    h, w = int(crop[0]), int(crop[1])
    if h > height or w > width:
        raise PrunekitError(
            f"data.transforms.center_crop: [{h}, {w}] is larger than the image ({height}x{width}); "
            "resize first or crop less"
        )
    left, top = int(round((width - w) / 2.0)), int(round((height - h) / 2.0))
    return left, top, left + w, top + h


class ImageFiles(Dataset):
    """``(image tensor, class index)`` for a list of files, each read when indexed."""

    def __init__(self, files: list[Path], labels: list[int], transform: ImageTransform) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                x = self.transform(image)
        except (UnidentifiedImageError, OSError) as exc:
            raise PrunekitError(f"data.imagefolder: cannot read {path} as an image: {exc}") from None
        return x, self.labels[index]


def list_classes(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted sub-folder names) and every image under them with its class index."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PrunekitError(
            f"data.imagefolder: {root} has no class sub-folders (expected {root}/<class>/*.png)"
        )
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            raise PrunekitError(
                f"data.imagefolder: class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        files += found
        labels += [index] * len(found)
    return classes, files, labels


def image_splits(root: Path) -> dict[str, Path]:
    """The split folders of ``root``: ``train`` and any of ``val`` (or ``validation``) and ``test``; an
    empty dict when ``root`` holds the class folders itself."""
    if not (root / "train").is_dir():
        return {}
    found = {"train": root / "train"}
    for part, names in (("val", ("val", "validation")), ("test", ("test",))):
        for name in names:
            if (root / name).is_dir():
                found[part] = root / name
                break
    return found
