"""The generated C compiled with gcc -std=c99 -Wall -Wextra -Werror -O2 (and arm-none-eabi-gcc for
Cortex-M4): bit-exact with the NumPy reference on nets covering every operator, budgets against `size`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from fixtures.int8nets import nets, prune_random, randomize_bn
from prunekit.errors import PrunekitError
from prunekit.export.c import arm_size, export_c, run_check
from prunekit.quant.ptq import quantize

needs_gcc = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("make") is None,
    reason="gcc and make are needed to compile the C",
)
needs_arm = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("arm-none-eabi-size") is None,
    reason="arm-none-eabi-gcc not installed (Debian: apt-get install gcc-arm-none-eabi)",
)


class AllOps(nn.Module):
    """Every operator the export supports, each at least once."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # depthwise, strided
        self.gc = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)  # grouped, dilated
        self.relu6 = nn.ReLU6()
        self.hs = nn.Hardswish()
        self.mp = nn.MaxPool2d(3, stride=1, padding=1)
        self.ap = nn.AvgPool2d(3, stride=1, padding=1)  # zero padding counts in the mean
        self.res = nn.Conv2d(8, 8, 1)  # a residual add after it
        self.pw = nn.Conv2d(8, 6, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))  # folded BatchNorm, fused ReLU
        y = self.relu6(self.dw(x))  # fused ReLU6
        z = self.hs(self.gc(y)) + y  # hard-swish table, residual add
        r = torch.relu(z)  # a ReLU whose input is read twice: its own requantization
        z = self.ap(self.mp(r)) + z
        z = self.pw(F.relu(self.res(z) + z))
        a = torch.flatten(self.gap(z), 1)  # global average pooling + flatten
        b = z.mean((2, 3))  # the same by mean
        h = self.drop(F.relu(self.fc1(a + b)))
        return self.fc2(h)


def _check(q: nn.Module, x: torch.Tensor, out, sparse: str = "auto") -> dict:
    """C == NumPy reference (make check) == the PyTorch int8 model, on every input."""
    labels = torch.zeros(len(x), dtype=torch.long)
    result = export_c(q, out, calibration=x, test=(x, labels), sparse=sparse, min_agreement=1.0)
    check = run_check(out)
    assert check["returncode"] == 0 and check["bitexact"] == len(x), check
    assert result["reference"]["torch_identical"] == len(x), result["reference"]
    return result


@pytest.fixture(scope="module")
def allops():
    torch.manual_seed(0)
    model = AllOps().eval()
    randomize_bn(model)
    prune_random(model, 0.6, torch.Generator().manual_seed(1))
    x = torch.randn(48, 2, 9, 9) * 2
    return quantize(model, calibration=[x], classifier=True).model, x


@needs_gcc
@pytest.mark.parametrize("sparse", ["never", "always"])
def test_every_operator_is_bit_exact(allops, tmp_path, sparse):
    q, x = allops
    result = _check(q, x, tmp_path, sparse)
    kinds = {r["op"] for r in result["layers"]}
    assert kinds == {"conv", "add", "requant", "lut", "maxpool", "avgpool"}
    storages = {r["storage"] for r in result["layers"] if r["op"].startswith("conv")}
    assert storages == ({"dense"} if sparse == "never" else storages - {"dense"})
    assert result["reference"]["agreement"] == 1.0  # the reference is the PyTorch model, integer for integer


@needs_gcc
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nets(), st.integers(0, 2**16))
def test_random_nets_are_bit_exact(tmp_path_factory, net, seed):
    model, shape, sparsity, sparse = net
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model)
    prune_random(model, sparsity, gen)
    x = torch.randn((24, *shape), generator=gen) * 3
    q = quantize(model, calibration=[x], classifier=True).model
    _check(q, x, tmp_path_factory.mktemp("net"), sparse)


def _nm_sizes(tool: str, obj) -> dict[str, int]:
    out = subprocess.run([tool, "-S", str(obj)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[parts[3]] = int(parts[1], 16)
    return sizes


@needs_arm
def test_budget_matches_the_cortex_m4_object(allops, tmp_path):
    q, x = allops
    result = export_c(q, tmp_path, calibration=x)
    size = arm_size(tmp_path, "model")
    assert size["data"] == 0
    assert size["bss"] == result["ram"]["total"]  # arena + scratch, nothing else in RAM
    syms = _nm_sizes(shutil.which("arm-none-eabi-nm") or "arm-none-eabi-nm", tmp_path / "model_cm4.o")
    weights = sum(v for k, v in syms.items() if re.fullmatch(r"pk_[wip]\d+", k))
    consts = sum(v for k, v in syms.items() if re.fullmatch(r"pk_[msbrt]\d+", k))
    assert weights == result["flash"]["weights"]
    assert consts == result["flash"]["constants"]
    code = size["text"] - weights - consts
    # the code estimate is an estimate: within a factor of two of the real thing
    assert 0.5 * code <= result["flash"]["code_estimate"] <= 2 * code, (code, result["flash"])


@needs_gcc
def test_cli_exports_an_artifact(tmp_path):
    from prunekit.artifact import save_artifact
    from prunekit.cli.commands import app
    from prunekit.data import load_splits
    from prunekit.models import build_model

    torch.manual_seed(0)
    args = {"in_channels": 1, "num_classes": 10, "widths": [4, 8], "blocks": 1}
    model = build_model("resnet-digits", args).eval()
    randomize_bn(model)
    x = load_splits("digits").train[:][0]
    q = quantize(model, calibration=[x[:128]], classifier=True).model
    artifact = tmp_path / "m.safetensors"
    save_artifact(artifact, q, model_info={"name": "resnet-digits", "args": args})
    out = tmp_path / "c"
    runner = CliRunner()
    res = runner.invoke(app, ["export", "c", str(artifact), "--out", str(out), "--name", "digits", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["checks"]["host"]["bitexact"] == report["checks"]["host"]["samples"] == 360
    assert (out / "digits.c").is_file() and (out / "digits.h").is_file()
    assert json.loads((out / "budget.json").read_text())["flash"] == report["flash"]
    # a float artifact is refused with the way to quantize it
    save_artifact(tmp_path / "f.safetensors", model, model_info={"name": "resnet-digits", "args": args})
    res = runner.invoke(app, ["export", "c", str(tmp_path / "f.safetensors"), "--out", str(tmp_path / "f")])
    # (prunekit.cli.commands.main turns a PrunekitError into `error: ...` and exit code 2)
    assert isinstance(res.exception, PrunekitError) and "classifier: true" in str(res.exception)
    assert not (tmp_path / "f").exists()
    res = runner.invoke(app, ["export", "c", str(artifact), "--out", str(out), "--ram-limit", "64"])
    assert isinstance(res.exception, PrunekitError) and "--ram-limit 64" in str(res.exception)


@needs_gcc
def test_structurally_pruned_model_exports_as_smaller_dense_layers(tmp_path):
    from prunekit.models import build_model
    from prunekit.structured import prune_model

    torch.manual_seed(0)
    args = {"in_channels": 1, "num_classes": 10, "widths": [8, 16], "blocks": 1}
    model = build_model("resnet-digits", args).eval()
    randomize_bn(model)
    x = torch.randn(32, 1, 8, 8)
    full = export_c(quantize(model, calibration=[x], classifier=True).model, tmp_path / "full", calibration=x)
    prune_model(model, x[:2], ratio=0.5, round_to=1)
    q = quantize(model.eval(), calibration=[x], classifier=True).model
    small = _check(q, x, tmp_path / "small", "never")
    convs = {r["layer"]: r for r in small["layers"] if r["op"].startswith("conv")}
    params = {n: m.weight_q.numel() for n, m in q.named_modules() if hasattr(m, "weight_q")}
    assert {n: r["params"] for n, r in convs.items()} == params  # the shrunken shapes, nothing padded back
    assert small["flash"]["weights"] == sum(params.values()) < full["flash"]["weights"]
    assert small["ram"]["total"] < full["ram"]["total"]


RECIPE = """\
name: tiny-c
seed: 0
model:
  builtin: resnet-digits
  args: {widths: [4, 8], blocks: 1}
data: {name: digits, batch_size: 128}
stages:
  - {type: train, epochs: 1, lr: 0.05}
  - {type: evaluate, label: dense, latency_runs: 3, latency_warmup: 1}
  - {type: prune, pattern: 0.8, criterion: magnitude, group: global}
  - {type: quantize, activations: static, calibration_batches: 2, classifier: true}
  - {type: evaluate, label: small, latency_runs: 3, latency_warmup: 1}
  - {type: export, name: small, c: true}
"""


@needs_gcc
@pytest.mark.slow  # a whole (tiny) recipe run: about 5 s
def test_recipe_export_stage_writes_c_and_reports_dense_vs_pruned(tmp_path):
    import yaml

    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    r = recipe.Recipe.model_validate(yaml.safe_load(RECIPE))
    m = run_recipe(r, tmp_path / "run", progress=False)
    e = m["small"]["c_export"]
    out = tmp_path / "run" / "small-c"
    assert (out / "model.c").is_file() and (out / "Makefile").is_file()
    assert json.loads((out / "budget.json").read_text())["flash"] == e["flash"]
    assert e["host_check"]["bitexact"] == e["host_check"]["samples"] == 360
    assert e["dense"]["label"] == "dense-int8"
    assert e["flash"]["weights"] < e["dense"]["flash"]["weights"]  # 80% pruned, stored sparse
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Microcontroller (C export)" in report and "| dense-int8 |" in report and "| small |" in report


@needs_gcc
def test_float_wrapper_quantizes_like_prunekit(allops, tmp_path):
    """model_run_float (-DMODEL_FLOAT_API) rounds its input as prunekit.quant.layers does (half to even)."""
    from prunekit.export.c import build

    q, x = allops
    export_c(q, tmp_path, calibration=x)
    cm = build(q, x)
    # inputs on rounding ties too: k + 0.5 steps must round to the even neighbour, as torch.round does
    s = np.float32(cm.input_scale)
    xs = x[:4].clone()
    xs.view(-1)[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 200.0, -300.0]) * float(s)
    xq = cm.quantize_input(xs)
    ref = cm.run_reference(xs)
    fl = ", ".join(f"{float(v):.9g}f" for v in xs.reshape(-1).tolist())
    qs = ", ".join(str(int(v)) for v in xq.reshape(-1))
    rs = ", ".join(str(int(v)) for v in ref.reshape(-1))
    (tmp_path / "main.c").write_text(
        f"""#include <stdio.h>
#include "model.h"
static const float X[] = {{{fl}}};
static const int8_t Q[] = {{{qs}}};
static const int32_t R[] = {{{rs}}};
int main(void)
{{
    float y[MODEL_OUTPUT_SIZE];
    int32_t yi[MODEL_OUTPUT_SIZE];
    int i, j, bad = 0;
    for (i = 0; i < 4; ++i) {{
        model_run_float(X + i * MODEL_INPUT_SIZE, y);
        model_run_i32(Q + i * MODEL_INPUT_SIZE, yi);
        for (j = 0; j < MODEL_OUTPUT_SIZE; ++j) {{
            bad += yi[j] != R[i * MODEL_OUTPUT_SIZE + j];
            bad += y[j] != (float)yi[j] * (MODEL_OUTPUT_SCALE / 65536.0f);
        }}
    }}
    printf("%d\\n", bad);
    return bad != 0;
}}
"""
    )
    exe = tmp_path / "main"
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-DMODEL_FLOAT_API", "-o", str(exe)]
    subprocess.run([*cmd, str(tmp_path / "main.c"), str(tmp_path / "model.c")], check=True, cwd=tmp_path)
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout.strip() == "0"
