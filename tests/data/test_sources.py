"""The user's data as streamed splits: image folders (flat or train/val/test), Hugging Face ``datasets``
folders and DataLoader factories; transforms with torchvision's semantics; one-line errors."""

from __future__ import annotations

import sys
import textwrap
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.data import images as images_module
from prunekit.data.images import ImageTransform, center_box, resized_size
from prunekit.data.sources import load_factory, load_hf_datasets, load_imagefolder
from prunekit.errors import PrunekitError

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 10


def write_folder(root, classes=CLASSES, per_class=PER_CLASS, size=(6, 4)):
    """PNGs whose every pixel is 40 * (index in CLASSES + 1) + image number: the label is in the pixels."""
    for name in classes:
        c = (CLASSES + ("fox",)).index(name)
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = 40 * (c + 1) + i
            Image.new("L", size, color=value).save(root / name / f"{i}.png")
    return root


def class_of(x: torch.Tensor) -> int:
    """The class a test image was written for, from its first pixel (mode L, no normalization)."""
    return int(round(float(x.flatten()[0]) * 255)) // 40 - 1


def test_resize_and_crop_follow_torchvision():
    assert resized_size((60, 40), 20) == (30, 20)  # shorter side (height 40) -> 20, aspect kept
    assert resized_size((40, 60), 20) == (20, 30)
    assert resized_size((40, 60), (8, 12)) == (12, 8)  # [h, w] -> Pillow's (w, h)
    assert center_box((10, 8), (4, 6)) == (2, 2, 8, 6)
    with pytest.raises(PrunekitError, match="center_crop: \\[9, 6\\] is larger than the image"):
        center_box((10, 8), (9, 6))


def test_transform_gives_normalized_chw_floats():
    image = Image.new("RGB", (5, 3), color=(255, 0, 51))
    plain = ImageTransform()(image)
    assert plain.shape == (3, 3, 5) and plain.dtype == torch.float32
    assert torch.equal(plain[:, 0, 0], torch.tensor([1.0, 0.0, 51 / 255]))
    normed = ImageTransform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0), center_crop=(2, 2))(image)
    assert normed.shape == (3, 2, 2)
    assert torch.allclose(normed[:, 1, 1], torch.tensor([1.0, -2.0, 51 / 255 - 0.5]))
    assert ImageTransform(mode="L", resize=6)(image).shape == (1, 6, 10)


def test_a_flat_folder_is_split_stratified_and_read_lazily(tmp_path, monkeypatch):
    write_folder(tmp_path / "data")
    opened = []
    real_open = images_module.Image.open
    monkeypatch.setattr(images_module.Image, "open", lambda p: opened.append(p) or real_open(p))
    splits = load_imagefolder(tmp_path / "data", ImageTransform(mode="L"), val=0.2, test=0.2, seed=3)
    assert len(opened) == 1  # only the probe for the input shape: nothing else read up front
    assert splits.num_classes == 3 and splits.input_shape == (1, 4, 6)
    files = [set(getattr(splits, p).files) for p in ("train", "val", "test")]
    assert sum(len(f) for f in files) == 3 * PER_CLASS and len(set().union(*files)) == 3 * PER_CLASS
    assert [len(f) for f in files] == [18, 6, 6]
    for part in ("val", "test"):  # stratified: 2 of each class
        assert Counter(getattr(splits, part).labels) == {0: 2, 1: 2, 2: 2}
    x, y = splits.tensors("train")
    assert [class_of(xi) for xi in x] == y.tolist()  # every label matches its image's folder
    again = load_imagefolder(tmp_path / "data", ImageTransform(mode="L"), val=0.2, test=0.2, seed=3)
    assert again.test.files == splits.test.files  # seeded


def test_split_folders_are_used_as_given_and_a_missing_val_is_carved(tmp_path):
    root = tmp_path / "data"
    write_folder(root / "train")
    write_folder(root / "test", classes=("dog", "eel"), per_class=3)  # a subset of the classes
    splits = load_imagefolder(root, ImageTransform(mode="L", resize=(8, 8)), val=0.2, test=0.2)
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 3 * PER_CLASS
    assert len(splits.val) == 6 and splits.input_shape == (1, 8, 8)
    x, y = splits.tensors("test")
    assert sorted(set(y.tolist())) == [1, 2]  # dog and eel keep their training indices
    assert [class_of(xi) for xi in x] == y.tolist()
    write_folder(root / "val", classes=("fox",), per_class=2)
    with pytest.raises(PrunekitError, match="has classes the training folder lacks: fox"):
        load_imagefolder(root, ImageTransform(mode="L"))


def test_bad_image_folders_are_one_line_errors(tmp_path):
    with pytest.raises(PrunekitError, match="folder not found"):
        load_imagefolder(tmp_path / "nope", ImageTransform())
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(PrunekitError, match="has no class sub-folders"):
        load_imagefolder(tmp_path / "flat", ImageTransform())
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(PrunekitError, match="holds no images"):
        load_imagefolder(tmp_path / "flat", ImageTransform())
    root = write_folder(tmp_path / "broken", per_class=5)
    (root / "cat" / "0.png").write_bytes(b"not a png")
    splits = load_imagefolder(root, ImageTransform(mode="L"), val=0.2, test=0.2)
    with pytest.raises(PrunekitError, match="cannot read .*0.png as an image"):
        splits.tensors("train"), splits.tensors("val"), splits.tensors("test")


# -- Hugging Face datasets: the package is optional, so a stand-in with its interface ------------------------
class Table:
    """The part of datasets.Dataset prunekit uses: rows by index, a column by name, features."""

    def __init__(self, images, labels, names=CLASSES):
        self.rows = [{"image": im, "label": lab} for im, lab in zip(images, labels)]
        self.column_names = ["image", "label"]
        self.features = {"label": types.SimpleNamespace(num_classes=len(names))}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return [r[key] for r in self.rows] if isinstance(key, str) else self.rows[key]


def fake_datasets(monkeypatch, loaded):
    module = types.ModuleType("datasets")
    module.load_from_disk = lambda path: loaded
    monkeypatch.setitem(sys.modules, "datasets", module)


def table(n_per_class):
    labels = [c for c in range(3) for _ in range(n_per_class)]
    return Table([Image.new("L", (4, 4), color=40 * (c + 1)) for c in labels], labels)


def test_hf_datasets_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PrunekitError, match="needs the 'datasets' package, which is not installed"):
        load_hf_datasets(tmp_path, ImageTransform())


def test_hf_datasets_splits_by_name_and_carves_the_missing_one(tmp_path, monkeypatch):
    fake_datasets(monkeypatch, {"train": table(10), "validation": table(2)})
    splits = load_hf_datasets(tmp_path, ImageTransform(mode="L"), val=0.2, test=0.2, seed=1)
    assert splits.num_classes == 3 and splits.input_shape == (1, 4, 4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    x, y = splits.tensors("test")  # carved from train, stratified
    assert Counter(y.tolist()) == {0: 2, 1: 2, 2: 2} and [class_of(xi) for xi in x] == y.tolist()
    fake_datasets(monkeypatch, {"test": table(2)})
    with pytest.raises(PrunekitError, match="has no 'train' split; it has test"):
        load_hf_datasets(tmp_path, ImageTransform())
    fake_datasets(monkeypatch, table(10))
    with pytest.raises(PrunekitError, match="data.input_column: 'pixels' in .*columns: image, label"):
        load_hf_datasets(tmp_path, ImageTransform(), input_column="pixels")


# -- a factory of DataLoaders -------------------------------------------------------------------------------
@pytest.fixture
def loaders_module(tmp_path, monkeypatch):
    (tmp_path / "my_loaders.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch.utils.data import DataLoader, TensorDataset

            def part(n, seed):
                g = torch.Generator().manual_seed(seed)
                return TensorDataset(torch.randn(n, 5, generator=g), torch.arange(n) % 4)

            def make(batch=8):
                return {"train": DataLoader(part(32, 0), batch_size=batch, shuffle=True),
                        "val": DataLoader(part(12, 1), batch_size=batch),
                        "test": DataLoader(part(12, 2), batch_size=batch), "num_classes": 4}

            def as_tuple():
                d = make()
                return d["train"], d["val"], d["test"]

            def wrong():
                return [1, 2]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield "my_loaders"
    sys.modules.pop("my_loaders", None)


def test_a_data_factory_is_used_as_given(loaders_module):
    splits = load_factory(f"{loaders_module}:make", {"batch": 5})
    assert splits.num_classes == 4 and splits.input_shape == (5,)
    train = splits.loader("train", batch_size=64, shuffle=True)
    assert train.batch_size == 5 and splits.loader("train", 1) is train  # the user's own loader
    assert torch.equal(splits.inputs("test", 7), splits.test.tensors[0][:7])
    x, y = splits.tensors("val")
    assert torch.equal(x, splits.val.tensors[0]) and torch.equal(y, splits.val.tensors[1])
    with pytest.raises(PrunekitError, match="say how many classes"):
        load_factory(f"{loaders_module}:as_tuple")
    assert load_factory(f"{loaders_module}:as_tuple", num_classes=4).num_classes == 4
    with pytest.raises(PrunekitError, match="must return .* got list"):
        load_factory(f"{loaders_module}:wrong")
    with pytest.raises(PrunekitError, match="has no attribute 'nope'"):
        load_factory(f"{loaders_module}:nope")


def test_digits_splits_keep_their_tensors():
    from prunekit.data import load_splits

    splits = load_splits("digits")
    x = splits.inputs("train", 3)
    assert torch.equal(x, splits.train.tensors[0][:3])
    assert np.array_equal(splits.tensors("test")[1].numpy(), splits.test.tensors[1].numpy())
