"""Data splits: stratified, a partition of the whole set, seeded; user .npz files validated clearly."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from prunekit.data import load_splits
from prunekit.errors import PrunekitError

PARTS = ("train", "val", "test")


def rows(dataset: TensorDataset) -> Counter:
    """Each sample as a hashable (image bytes, label): the multiset of a split."""
    x, y = dataset.tensors
    return Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)[:, None])
    y = torch.from_numpy(d.target.astype(np.int64))
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits", val=0.2, test=0.2, seed=0)


def test_digits_shape_and_range(splits):
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 8, 8)
    for part in PARTS:
        x, y = getattr(splits, part).tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) == set(range(10))


def test_splits_partition_all_1797_samples(splits, digits):
    sizes = [len(getattr(splits, p)) for p in PARTS]
    assert sum(sizes) == 1797
    # the union of the splits is exactly the data set, each sample once (duplicated images stay duplicated)
    assert rows(splits.train) + rows(splits.val) + rows(splits.test) == rows(digits)


@pytest.mark.parametrize(("val", "test"), [(0.2, 0.2), (0.1, 0.3), (0.25, 0.15)])
def test_splits_are_stratified_and_sized(val, test):
    s = load_splits("digits", val=val, test=test, seed=3)
    labels = torch.cat([getattr(s, p).tensors[1] for p in PARTS])
    overall = torch.bincount(labels, minlength=10).double() / len(labels)
    for part, fraction in (("val", val), ("test", test)):
        assert abs(len(getattr(s, part)) - fraction * 1797) <= 1
    for part in PARTS:
        y = getattr(s, part).tensors[1]
        share = torch.bincount(y, minlength=10).double() / len(y)
        assert torch.all((share - overall).abs() <= 0.02), (part, (share - overall).abs().max())


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = (load_splits("digits", seed=s) for s in (7, 7, 8))
    for part in PARTS:
        for ta, tb in zip(getattr(a, part).tensors, getattr(b, part).tensors):
            assert torch.equal(ta, tb)
    assert rows(a.test) != rows(c.test)
    assert len(a.test) == len(c.test)


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.6, 0.5), (0.0, 0.2), (0.2, 1.0), (-0.1, 0.2)])
def test_bad_fractions_are_errors(val, test):
    with pytest.raises(PrunekitError, match="fractions"):
        load_splits("digits", val=val, test=test)


def test_unknown_data_set_is_an_error():
    with pytest.raises(PrunekitError, match="unknown data set"):
        load_splits("mnist")


def test_loader_is_seeded():
    s = load_splits("digits", seed=0)
    first = [y for _, y in s.loader("train", 64, shuffle=True, seed=1)]
    again = [y for _, y in s.loader("train", 64, shuffle=True, seed=1)]
    other = [y for _, y in s.loader("train", 64, shuffle=True, seed=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert sum(len(y) for y in first) == len(s.train)


# ------------------------------------------------------------------------------------------------- npz


def write_npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3, 2)).astype(np.float64)
    y = np.repeat(np.arange(5), 24).astype(np.int32)
    path = write_npz(tmp_path, x=x, y=y)
    s = load_splits("npz", path, val=0.25, test=0.25, seed=0)
    assert s.num_classes == 5 and s.input_shape == (3, 2)
    assert [len(getattr(s, p)) for p in PARTS] == [60, 30, 30]
    whole = TensorDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))
    assert rows(s.train) + rows(s.val) + rows(s.test) == rows(whole)
    for part in PARTS:
        assert torch.bincount(getattr(s, part).tensors[1]).tolist() == [len(getattr(s, part)) // 5] * 5

    by_file_name = load_splits(str(path), None, val=0.25, test=0.25, seed=0)  # `--data FILE.npz`
    for part in PARTS:
        assert torch.equal(getattr(by_file_name, part).tensors[0], getattr(s, part).tensors[0])


def test_npz_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = np.repeat(np.arange(2), 20)
    cases = {
        "missing file": (tmp_path / "nope.npz", "not found"),
        "no y": (write_npz(tmp_path, "a.npz", x=x), "arrays named 'x' and 'y'"),
        "no x": (write_npz(tmp_path, "b.npz", y=y), "arrays named 'x' and 'y'"),
        "negative labels": (write_npz(tmp_path, "c.npz", x=x, y=y - 1), "non-negative integer labels"),
        "float labels": (write_npz(tmp_path, "d.npz", x=x, y=y.astype(float)), "integer labels"),
        "2-d labels": (write_npz(tmp_path, "e.npz", x=x, y=y[:, None]), "integer labels"),
        "length mismatch": (write_npz(tmp_path, "f.npz", x=x[:-1], y=y), "one per row"),
        "empty": (write_npz(tmp_path, "g.npz", x=x[:0], y=y[:0]), "no samples"),
        "text x": (write_npz(tmp_path, "h.npz", x=np.array(["a"] * 40), y=y), "numeric"),
        "pickled object array": (
            write_npz(tmp_path, "i.npz", x=np.array([{}] * 40, dtype=object), y=y),
            "npz",
        ),
        "a class of one": (write_npz(tmp_path, "j.npz", x=x, y=np.r_[np.zeros(39, int), 1]), "stratified"),
        "fewer test rows than classes": (
            write_npz(tmp_path, "k.npz", x=x[:10], y=np.arange(10) % 5),
            "split",
        ),
    }
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    cases["not an archive"] = (not_npz, "npz")
    npy = tmp_path / "bare.npy"
    np.save(npy, x)
    cases["a bare .npy"] = (npy, "not an .npz archive")
    for what, (path, needle) in cases.items():
        with pytest.raises(PrunekitError) as info:
            load_splits("npz", path)
        message = str(info.value)
        assert needle in message and "\n" not in message, (what, message)
        assert message.startswith("data:"), (what, message)


def test_npz_needs_a_path():
    with pytest.raises(PrunekitError, match="needs a path"):
        load_splits("npz", None)


def test_split_sizes_follow_the_fractions_for_any_size(tmp_path):
    for n in (30, 31, 57, 100):
        y = np.arange(n) % 3
        path = write_npz(tmp_path, f"n{n}.npz", x=np.arange(n, dtype=float)[:, None], y=y)
        s = load_splits("npz", path, val=0.2, test=0.2, seed=1)
        sizes = [len(getattr(s, p)) for p in PARTS]
        assert sum(sizes) == n
        assert math.isclose(sizes[2], 0.2 * n, abs_tol=1) and math.isclose(sizes[1], 0.2 * n, abs_tol=1.5)
        values = sorted(float(v) for p in PARTS for v in getattr(s, p).tensors[0][:, 0])
        assert values == [float(i) for i in range(n)]
