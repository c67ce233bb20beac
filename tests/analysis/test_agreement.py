"""prediction_agreement counts the inputs on which two classifiers pick the same class."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.analysis import prediction_agreement


def test_agreement_counts_and_the_largest_difference():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    reference = nn.Linear(4, 3)
    flipped = nn.Linear(4, 3)
    flipped.load_state_dict(reference.state_dict())
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4)
    same = prediction_agreement(reference, flipped, loader)
    assert same == {"same_predictions": 10, "samples": 10, "max_abs_diff": 0.0}
    with torch.no_grad():
        flipped.bias += torch.tensor([0.0, 0.0, 100.0])  # class 2 wins everywhere now
    expected = int((reference(x).argmax(1) == 2).sum())
    out = prediction_agreement(reference, flipped.train(), loader)
    assert out["same_predictions"] == expected < 10 and out["samples"] == 10
    assert abs(out["max_abs_diff"] - 100.0) < 1e-4
    assert flipped.training  # the mode each model came in with is restored


# ----------------------------------------------------------------- overall, per class and perturbed agreement

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunekit.analysis.agreement import (  # noqa: E402
    SHIFTS,
    add_noise,
    agreement_counts,
    agreement_report,
    shift_image,
)
from prunekit.errors import PrunekitError  # noqa: E402

CLASSES = 4


class ArgmaxOfPixels(nn.Module):
    """Predicts the index of the largest of the first CLASSES pixels of each image; ``flip`` maps one
    predicted class to another (the compressed model that lost a class)."""

    def __init__(self, flip: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = x.reshape(len(x), -1)[:, :CLASSES].argmax(dim=1)
        if self.flip is not None:
            pred = torch.where(pred == self.flip[0], torch.full_like(pred, self.flip[1]), pred)
        return nn.functional.one_hot(pred, CLASSES).float()


def images(n: int = 40, margin: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 4, 4); the true class is the pixel of the first row that is ``margin`` above the rest."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % CLASSES
    x = torch.rand(n, 1, 4, 4, generator=g)
    x.view(n, -1)[torch.arange(n), y] += margin
    return x, y


def loader_of(x, y, batch_size=16):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_identical_models_agree_everywhere_clean_and_perturbed():
    x, y = images()
    out = agreement_report(ArgmaxOfPixels(), ArgmaxOfPixels(), loader_of(x, y), CLASSES)
    assert out["clean"]["agreement"] == 1.0 and out["clean"]["per_class"] == [1.0] * CLASSES
    assert len(out["perturbed"]) == 3 + len(SHIFTS)  # three noise levels, four one-pixel shifts
    for entry in out["perturbed"].values():
        assert entry["agreement"] == 1.0 and entry["per_class"] == [1.0] * CLASSES
        assert entry["reference_stable"] == entry["candidate_stable"]


def test_a_model_that_flips_one_class_agrees_on_every_class_but_that_one():
    x, y = images()
    out = agreement_report(
        ArgmaxOfPixels(), ArgmaxOfPixels(flip=(2, 0)), loader_of(x, y), CLASSES, shifts=False
    )
    clean = out["clean"]
    assert clean["per_class"] == [1.0, 1.0, 0.0, 1.0]  # inputs of true class 2 now get class 0
    assert clean["same"] == len(y) - int((y == 2).sum()) and clean["samples"] == len(y)
    assert clean["agreement"] == clean["same"] / len(y) and clean["support"] == [10] * CLASSES
    small = out["perturbed"]["noise 0.05 std"]  # noise far below the margin changes no prediction
    assert small["per_class"] == [1.0, 1.0, 0.0, 1.0] and small["reference_stable"] == 1.0
    assert "shift" not in " ".join(out["perturbed"]) and out["shifts"].startswith("not applied")


def test_noise_is_relative_to_the_input_std_and_repeats_with_the_seed():
    x, y = images(margin=0.0)  # no margin: noise of one std flips many argmax predictions
    loader = loader_of(x, y)
    a = agreement_report(ArgmaxOfPixels(), ArgmaxOfPixels(), loader, CLASSES, sigmas=(1.0,), shifts=False)
    b = agreement_report(ArgmaxOfPixels(), ArgmaxOfPixels(), loader, CLASSES, sigmas=(1.0,), shifts=False)
    c = agreement_report(
        ArgmaxOfPixels(), ArgmaxOfPixels(), loader, CLASSES, sigmas=(1.0,), shifts=False, seed=5
    )
    assert a == b  # deterministic
    stable = a["perturbed"]["noise 1 std"]["reference_stable"]
    assert stable < 1.0 and stable != c["perturbed"]["noise 1 std"]["reference_stable"]
    assert a["input_std"] == pytest.approx(float(x.double().std()), rel=1e-9)
    # both models see the very same noisy inputs, so identical models still agree on all of them
    assert a["perturbed"]["noise 1 std"]["agreement"] == 1.0


def test_a_shift_moves_the_deciding_pixel_and_the_report_sees_it():
    x, y = images()
    out = agreement_report(ArgmaxOfPixels(), ArgmaxOfPixels(), loader_of(x, y), CLASSES, sigmas=(0.01,))
    right = out["perturbed"]["shift dx=+1 dy=+0"]
    # shifted right by one, the bright pixel of a class-k input sits at k+1: every prediction but the
    # repeated edge pixel's (class 0 keeps pixel 0, ties go to the first index) moves; both models move alike
    assert right["reference_stable"] < 1.0 and right["agreement"] == 1.0


@pytest.mark.parametrize(("dx", "dy"), [*SHIFTS, (2, -1)])
def test_shift_image_translates_exactly_and_repeats_the_edge(dx, dy):
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    out = shift_image(x, dx, dy)
    assert out.shape == x.shape
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            src_i = min(max(i - dy, 0), h - 1)
            src_j = min(max(j - dx, 0), w - 1)
            assert torch.equal(out[..., i, j], x[..., src_i, src_j]), (i, j)


def test_shift_and_noise_reject_what_they_cannot_do():
    with pytest.raises(PrunekitError, match="image inputs"):
        shift_image(torch.zeros(3, 4), 1, 0)
    with pytest.raises(PrunekitError, match="not smaller than the image"):
        shift_image(torch.zeros(1, 1, 2, 2), 2, 0)
    x, y = images()
    with pytest.raises(PrunekitError, match="sigmas must be > 0"):
        agreement_report(ArgmaxOfPixels(), ArgmaxOfPixels(), loader_of(x, y), CLASSES, sigmas=(0.0,))
    with pytest.raises(PrunekitError, match="at least one batch"):
        agreement_report(ArgmaxOfPixels(), ArgmaxOfPixels(), loader_of(x[:0], y[:0]), CLASSES)
    with pytest.raises(PrunekitError, match="same length"):
        agreement_counts(torch.zeros(3), torch.zeros(2), torch.zeros(3), 2)


def test_add_noise_has_the_asked_std_and_repeats_with_the_generator():
    x = torch.zeros(200_000)
    a = add_noise(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(a, add_noise(x, 0.3, torch.Generator().manual_seed(0)))
    assert float(a.std()) == pytest.approx(0.3, rel=0.01)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_agreement_counts_match_their_definition(rows):
    ref, cand, target = (torch.tensor(col) for col in zip(*rows))
    out = agreement_counts(ref, cand, target, 4)
    assert out["same"] == sum(r == c for r, c, _ in rows) and out["samples"] == len(rows)
    for k in range(4):
        inputs = [(r, c) for r, c, t in rows if t == k]
        assert out["support"][k] == len(inputs)
        assert out["per_class_same"][k] == sum(r == c for r, c in inputs)
        assert out["per_class"][k] == (out["per_class_same"][k] / len(inputs) if inputs else None)
    assert sum(out["per_class_same"]) == out["same"]


def test_analyze_agreement_cli_compares_two_artifacts_on_the_digits_test_split(tmp_path, monkeypatch, capsys):
    import json

    from fixtures.cli import assert_one_line_error, call_main
    from prunekit.artifact import save_artifact
    from prunekit.data import load_splits
    from prunekit.models import build_model

    info = {"name": "resnet-digits", "args": {"widths": [8], "blocks": 1}}
    torch.manual_seed(0)
    dense = build_model(info["name"], info["args"]).eval()
    pruned = build_model(info["name"], info["args"]).eval()
    pruned.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for p in pruned.parameters():
            if p.dim() > 1:
                p.mul_(p.abs() > p.abs().median())  # half the weights of every kernel to zero
    save_artifact(tmp_path / "dense.safetensors", dense, model_info=info)
    save_artifact(tmp_path / "pruned.safetensors", pruned, model_info=info)
    args = ["analyze", "agreement", str(tmp_path / "dense.safetensors"), str(tmp_path / "pruned.safetensors")]
    code, out, err = call_main(monkeypatch, capsys, *args, "--json", "--sigmas", "0.1")
    assert code == 0, err
    splits = load_splits("digits")
    expected = agreement_report(dense, pruned, splits.loader("test", 256), splits.num_classes, (0.1,))
    assert json.loads(out) == expected and len(expected["perturbed"]) == 1 + len(SHIFTS)
    code, out, err = call_main(monkeypatch, capsys, *args[:3], args[2], "--no-shifts")  # itself
    assert code == 0 and "clean" in out and "100.00%" in out.splitlines()[1]
    code, _, err = call_main(monkeypatch, capsys, *args, "--sigmas", "0,x")
    assert code == 2
    assert_one_line_error(err, "--sigmas takes comma-separated numbers")
    import numpy as np

    flat, twelve = tmp_path / "flat.npz", tmp_path / "twelve.npz"
    rng = np.random.default_rng(0)
    np.savez(flat, x=rng.random((60, 5), dtype=np.float32), y=np.arange(60) % 3)
    np.savez(twelve, x=rng.random((120, 1, 8, 8), dtype=np.float32), y=np.arange(120) % 12)
    for path, needle in ((flat, "does not take the data's samples of shape (5,)"), (twelve, "(batch, 12)")):
        code, _, err = call_main(monkeypatch, capsys, *args, "--data", "npz", "--data-path", str(path))
        assert code == 2  # data the models were not made for: one line, not a torch traceback
        assert_one_line_error(err, needle)
        assert "DENSE " in err
