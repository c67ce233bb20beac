"""Recipes on the user's model and data: a factory model with a weights file trained and pruned on an
image folder, a DataLoader factory, a saved Hugging Face classifier; and the one-line errors of the
model and data sections."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from prunekit.artifact import load_artifact
from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe

STAGES = [
    {"type": "train", "epochs": 1, "lr": 0.05},
    {"type": "prune", "pattern": 0.5},
    {"type": "evaluate", "label": "pruned", "latency_runs": 2, "latency_warmup": 0},
    {"type": "export", "name": "pruned"},
]


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A user's folder: their model and loader factories, and an image folder with three classes."""
    (tmp_path / "user_net.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torch.utils.data import DataLoader, TensorDataset

            def make(classes=3):
                return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 8 * 8, classes))

            def loaders():
                g = torch.Generator().manual_seed(0)
                def part(n):
                    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3)
                return {"train": DataLoader(part(30), batch_size=10, shuffle=True),
                        "val": DataLoader(part(9), batch_size=9), "test": DataLoader(part(9), batch_size=9),
                        "num_classes": 3}
            """
        )
    )
    for c, name in enumerate(("a", "b", "c")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (10, 12), color=(60 * c + i, 20, 200 - 50 * c)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    monkeypatch.chdir(tmp_path)  # references and relative paths resolve from here, as Python would
    yield tmp_path
    sys.modules.pop("user_net", None)


def test_a_factory_model_runs_on_an_image_folder(user_code):
    start = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 3)
    )
    save_file(start.state_dict(), "start.safetensors")
    r = recipe.from_dict(
        {
            "model": {"factory": "user_net:make", "args": {"classes": 3}, "weights": "start.safetensors"},
            "data": {
                "imagefolder": "images",
                "transforms": {"mode": "L", "resize": 8, "center_crop": 8, "mean": [0.5], "std": [0.25]},
                "batch_size": 8,
            },
            "stages": STAGES,
        }
    )
    assert r.data.kind == "imagefolder" and r.data.name is None and r.model.kind == "factory"
    metrics = run_recipe(r, user_code / "out", progress=False)
    assert 0 <= metrics["pruned"]["accuracy"] <= 1 and sum(metrics["pruned"]["support"]) == 6
    with pytest.raises(PrunekitError, match="made by the function 'user_net:make'"):
        load_artifact(user_code / "out" / "pruned.safetensors")  # loading a file never runs code
    model, info = load_artifact(user_code / "out" / "pruned.safetensors", model=start)
    assert info.model == {"name": "@factory:user_net:make", "args": {"classes": 3}}
    assert float((model[0].weight == 0).float().mean()) == 0.5  # the conv; the classifier stays dense
    assert not bool((model[3].weight == 0).any())


def test_a_loader_factory_feeds_a_builtin_model(user_code):
    r = recipe.from_dict(
        {
            "model": {"builtin": "resnet-digits", "args": {"widths": [4], "blocks": 1}},
            "data": {"factory": "user_net:loaders"},
            "stages": STAGES[:3],
        }
    )
    metrics = run_recipe(r, user_code / "out", progress=False)
    assert sum(metrics["pruned"]["support"]) == 9  # the user's test loader, all of it


def error_of(data: dict) -> str:
    with pytest.raises(PrunekitError) as info:
        recipe.from_dict({"stages": [{"type": "evaluate", "label": "x"}], **data})
    assert "\n" not in str(info.value)
    return str(info.value)


def test_model_and_data_sections_name_the_field_and_the_allowed_values(tmp_path):
    builtin = {"builtin": "resnet-digits"}
    assert (
        "model: give one model source, not factory and hf; allowed: builtin, artifact, factory, "
        in error_of({"model": {"factory": "a:b", "hf": str(tmp_path)}})
    )
    assert "model.factory: factory must be a reference 'package.module:function'" in error_of(
        {"model": {"factory": "user_net.make"}}
    )
    assert "no config.json" in error_of({"model": {"hf": str(tmp_path)}})
    assert "'weights' is for factory and torchvision" in error_of(
        {"model": {**builtin, "weights": str(tmp_path / "w.pt")}}
    )
    assert (
        "data: give one data source, not name and imagefolder; allowed: name, imagefolder, hf_datasets, "
        in (error_of({"model": builtin, "data": {"name": "digits", "imagefolder": str(tmp_path)}}))
    )
    assert "data: imagefolder: folder not found: none" in error_of(
        {"model": builtin, "data": {"imagefolder": "none"}}
    )
    assert "mean: one value per channel, 3 for mode RGB" in error_of(
        {"model": builtin, "data": {"imagefolder": str(tmp_path), "transforms": {"mean": [0.5], "std": [1]}}}
    )
    assert "data.transforms.mode: Input should be 'RGB' or 'L'" in error_of(
        {"model": builtin, "data": {"imagefolder": str(tmp_path), "transforms": {"mode": "CMYK"}}}
    )
    assert "'input_column' and 'label_column' are for hf_datasets" in error_of(
        {"model": builtin, "data": {"imagefolder": str(tmp_path), "label_column": "y"}}
    )


def test_a_saved_hugging_face_classifier_is_a_model_source(user_code):
    pytest.importorskip("transformers")
    from fixtures.hf import vit_classifier  # needs transformers

    vit_classifier().save_pretrained("vit")
    r = recipe.from_dict(
        {"model": {"hf": "vit"}, "data": {"factory": "user_net:loaders"}, "stages": STAGES[1:]}
    )
    metrics = run_recipe(r, user_code / "out", progress=False)
    assert sum(metrics["pruned"]["support"]) == 9
    # the artifact rebuilds the ViT from the config in its header (no folder, no code), masks included
    model, info = load_artifact(user_code / "out" / "pruned.safetensors")
    assert info.model["name"] == "@hf:image-classification"
    pruned = [m.weight for n, m in model.named_modules() if n in info.masks]
    assert pruned and all(float((w == 0).float().mean()) == 0.5 for w in pruned)
