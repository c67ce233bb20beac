"""The digits demo's path to C, on a model trained here in seconds: train, prune 90%, INT8, export, and
`make check` (slow: about half a minute; run with `python -m pytest -m slow`); and the demo's recipe on a
user's own 28x28, 10-class data set, the case of issue 15 (98.8% agreement before prunekit had one INT8
arithmetic). The C library, its NumPy reference and the PyTorch int8 model now compute the same integers:
100% agreement, every output identical."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from prunekit.data import load_splits
from prunekit.export.c import export_c, run_check
from prunekit.models import build_model
from prunekit.quant.ptq import quantize

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc and make"
    ),
]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, masks=None) -> None:
    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for w, m in masks:
                        w.mul_(m)
    model.eval()


def test_pruned_int8_digits_model_agrees_with_pytorch_in_c(tmp_path):
    torch.manual_seed(0)
    data = load_splits("digits")
    x, y = data.train[:][0], data.train[:][1]
    model = build_model(
        "resnet-digits", {"in_channels": 1, "num_classes": 10, "widths": [16, 32], "blocks": 1}
    )
    _train(model, x, y, epochs=12, lr=3e-3)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = flat.kthvalue(int(0.9 * flat.numel())).values
    masks = [(w, (w.detach().abs() > threshold).float()) for w in weights]
    with torch.no_grad():
        for w, m in masks:
            w.mul_(m)
    _train(model, x, y, epochs=4, lr=1e-3, masks=masks)
    q = quantize(model, calibration=[x[i : i + 64] for i in range(0, 512, 64)], classifier=True).model
    xt, yt = data.test[:][0], data.test[:][1]
    result = export_c(q, tmp_path, calibration=[x], test=(xt, yt), min_agreement=0.99)
    check = run_check(tmp_path)
    assert check["returncode"] == 0, check
    assert check["bitexact"] == check["samples"] == len(yt)
    assert check["agreement"] == 1.0, check  # one INT8 arithmetic: the C model is the PyTorch model
    assert result["reference"]["torch_identical"] == len(yt)
    assert check["accuracy_torch"] == pytest.approx(result["reference"]["accuracy_torch"], abs=1e-4)
    assert check["accuracy_torch"] >= 0.9  # a trained model, not a constant predictor
    assert abs(check["accuracy_c"] - check["accuracy_torch"]) <= 0.005
    sparse = [r for r in result["layers"] if r["op"].startswith("conv") and r["storage"] != "dense"]
    assert sparse and result["flash"]["weights"] < 0.5 * result["flash"]["weights_if_dense"]


USER_RECIPE = """\
name: user-28x28
seed: 0
threads: 1
model:
  builtin: resnet-digits
  args: {{widths: [16, 32, 64], blocks: 2}}
data: {{name: npz, path: {path}, batch_size: 64}}
stages:
  - {{type: train, epochs: 3, lr: 0.05}}
  - {{type: evaluate, label: dense, latency_runs: 3, latency_warmup: 1}}
  - type: prune
    pattern: 0.9
    criterion: magnitude
    group: global
    schedule: {{type: iterative, rate: 0.5}}
    finetune: {{epochs: 1, lr: 0.01}}
  - {{type: quantize, activations: static, calibration_batches: 8, classifier: true}}
  - {{type: evaluate, label: pruned-int8, latency_runs: 3, latency_warmup: 1}}
  - {{type: export, name: pruned-int8, c: true}}
"""


def test_the_demo_recipe_on_a_users_28x28_data_set_agrees_with_c_on_every_image(tmp_path):
    import numpy as np
    import yaml

    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    rng = np.random.default_rng(0)
    templates = rng.random((10, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 1500)
    x = templates[y] * 2 + rng.normal(0, 0.8, (1500, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    r = recipe.Recipe.model_validate(yaml.safe_load(USER_RECIPE.format(path=tmp_path / "mine.npz")))
    m = run_recipe(r, tmp_path / "run", progress=False)
    e = m["pruned-int8"]["c_export"]
    assert e["host_check"]["returncode"] == 0, e["host_check"]  # make check: its 99.5% bar
    assert e["host_check"]["bitexact"] == e["host_check"]["samples"] == 300
    assert e["host_check"]["agreement"] == 1.0 and e["reference"]["torch_identical"] == 300
