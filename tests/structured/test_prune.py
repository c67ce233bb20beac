"""Structured pruning: the architecture matrix and the engine's contracts.

Every case in ``structured_zoo`` is pruned at 30% and 60%; the physically smaller model must equal the
original with the removed units zeroed (``verify=True`` raises otherwise), keep its output shape, shrink
by at least half the ratio, train (forward + backward), and rebuild from its prune log bit-exactly.
"""

import copy

import pytest
import torch
from torch import nn

from fixtures.zoo import ZOO
from prunekit import structured
from prunekit.errors import PrunekitError
from prunekit.structured.apply import zero_plan
from prunekit.structured.core import check_equivalence

PRUNABLE = [name for name, case in ZOO.items() if case.prunable]


def _outputs(model, args):
    with torch.no_grad():
        return model(*args)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("name", PRUNABLE)
def test_architecture_matrix(name, ratio, tmp_path):
    case = ZOO[name]
    model, args = case.build(), case.example()
    before = _outputs(model, args)
    result = structured.prune_model(
        model,
        args,
        ratio=ratio,
        round_to=1,
        verify=True,
    )
    assert result.max_abs_diff is not None  # verify ran (it raises on a mismatch)
    after = _outputs(model, args)
    assert after.shape == before.shape
    assert result.params_after <= result.params_before * (1 - ratio / 2)
    assert any(result.removed.values())

    # the pruned model trains: forward and backward with finite gradients
    model.train()
    model(*args).float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()

    # replay the prune log on a fresh, unpruned instance: bit-identical outputs
    structured.save(model, result.plan, tmp_path)
    rebuilt = structured.load(case.build(), tmp_path)
    assert torch.equal(_outputs(rebuilt, args), _outputs(model, args))


def test_nothing_prunable_is_a_clear_error():
    case = ZOO["io_tied"]
    with pytest.raises(PrunekitError, match="nothing can be pruned"):
        structured.prune(case.build(), case.example(), ratio=0.5)


def test_verification_catches_a_wrong_removal():
    case = ZOO["resnet_basic"]
    model, args = case.build(), case.example()
    reference = copy.deepcopy(model)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    result = structured.prune_model(model, args, ratio=0.5, round_to=1)
    # a reference that zeroes other channels than the ones removed must not pass
    tampered = {
        name: {d: [(i + 1) % shapes[name][int(d)] for i in idx] for d, idx in dims.items()}
        for name, dims in result.plan.items()
    }
    with pytest.raises(PrunekitError, match="differs"):
        check_equivalence(reference, model, tampered, args)


def test_zeroed_reference_really_differs_from_the_dense_model():
    case = ZOO["resnet_basic"]
    model, args = case.build(), case.example()
    dense = _outputs(copy.deepcopy(model), args)
    result = structured.prune_model(copy.deepcopy(model), args, ratio=0.5, round_to=1)
    masked = _outputs(zero_plan(model, result.plan), args)
    assert not torch.allclose(dense, masked)  # the equivalence check compares against a changed model


def test_round_to_keeps_multiples():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 40, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(40, 10),
    ).eval()
    structured.prune(model, torch.randn(1, 3, 16, 16), ratio=0.3, round_to=8, verify=True)
    assert model[0].out_channels % 8 == 0 and model[3].out_channels % 8 == 0
    assert model[0].out_channels == 48 and model[3].out_channels == 32  # round(44.8/8)*8, round(28/8)*8
    assert model[7].out_features == 10  # the classifier's outputs never change


def test_ratios_global_ranking_and_ignore():
    def build():
        torch.manual_seed(0)
        layers = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(64, 4)).eval()

    x = torch.randn(4, 16)
    model = structured.prune(build(), x, ratio=0.5, round_to=1, ignore=["4"], verify=True)
    assert model[0].out_features == 32  # its group does not touch the ignored layer
    assert model[2].out_features == 64 and model[4].weight.shape == (64, 64)  # these groups do
    with pytest.raises(PrunekitError, match="nothing can be pruned"):
        structured.prune(build(), x, ratio=0.5, round_to=1, ignore=["*"])
    model = structured.prune(build(), x, ratio=0.5, round_to=1, ratios={"0": 0.25}, verify=True)
    assert model[0].out_features == 48 and model[2].out_features == 32
    model = structured.prune(
        build(), x, ratio=0.5, round_to=1, global_ranking=True, max_ratio=0.6, verify=True
    )
    widths = [model[i].out_features for i in (0, 2, 4)]
    assert sum(widths) == 96  # half of all 192 hidden units
    assert min(widths) >= 64 - int(0.6 * 64)  # no group loses more than max_ratio


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "random", "bn_scale"])
def test_every_importance_prunes_validly_and_deterministically(importance):
    case = ZOO["resnet_basic"]
    a = structured.prune_model(
        case.build(), case.example(), ratio=0.5, importance=importance, round_to=1, verify=True
    )
    b = structured.prune_model(case.build(), case.example(), ratio=0.5, importance=importance, round_to=1)
    assert a.plan == b.plan


def test_l2_removes_the_smallest_group_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 5, 0.1, 5, 0.2, 5]).unsqueeze(1))
    structured.prune(model, torch.randn(2, 8), ratio=0.5, round_to=1)
    assert model[0].out_features == 3
    assert float(model[0].weight.detach().norm(dim=1).min()) > 1.0  # the three scaled-down neurons went


def test_bad_arguments_are_clear_errors():
    case = ZOO["mlp"]
    for kwargs, match in [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": "half"}, "ratio"),
        ({"round_to": 0}, "round_to"),
        ({"importance": "l3"}, "did you mean"),
        ({"ratios": {"0": 1.5}}, "ratios"),
        ({"max_ratio": 5}, "max_ratio"),
    ]:
        with pytest.raises(PrunekitError, match=match):
            structured.prune(case.build(), case.example(), **kwargs)


def test_a_parameter_in_an_unknown_op_names_its_module():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.einsum("bi,ij->bj", x, self.weight)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), Mixer(), nn.Linear(8, 2)).eval()
    with pytest.raises(PrunekitError, match=r"module '3'.*einsum.*register_rule"):
        structured.prune(model, torch.randn(2, 4), ratio=0.5)
    pruned = structured.prune(model, torch.randn(2, 4), ratio=0.5, round_to=1, ignore=["3"], verify=True)
    assert pruned[0].out_features == 4  # the group before the custom layer is pruned
    assert pruned[3].weight.shape == (8, 8)  # the ignored module kept every unit


def test_trace_grows_linearly_with_depth():
    from prunekit.structured.trace import trace_model

    def chain(n):
        return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(8, 8), nn.ReLU())]).eval()

    small, large = trace_model(chain(10), torch.randn(1, 8)), trace_model(chain(40), torch.randn(1, 8))
    assert len(large.ops) == 4 * len(small.ops)


def test_load_rejects_a_log_for_another_model(tmp_path):
    case = ZOO["resnet_basic"]
    model = case.build()
    result = structured.prune_model(model, case.example(), ratio=0.5, round_to=1)
    structured.save(model, result.plan, tmp_path)
    with pytest.raises(PrunekitError):
        structured.load(ZOO["mlp"].build(), tmp_path)
    (tmp_path / "prune_log.json").write_text("{not json")
    with pytest.raises(PrunekitError, match="prune log"):
        structured.load(case.build(), tmp_path)


def test_cli_structured_writes_measurements(tmp_path):
    import json

    from typer.testing import CliRunner

    from prunekit.cli.commands import app

    out = tmp_path / "out"
    args = ["structured", "--model", "resnet-digits", "--out", str(out), "--ratio", "0.5", "--runs", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["pruned"]["params"] < m["dense"]["params"] and m["pruned"]["macs"] < m["dense"]["macs"]
    assert m["ratios"]["macs"] == m["pruned"]["macs"] / m["dense"]["macs"]
    assert all(m[k]["latency_ms"]["p50"] <= m[k]["latency_ms"]["p99"] for k in ("dense", "pruned"))
    from prunekit.models import build_model

    rebuilt = structured.load(build_model("resnet-digits"), out)
    assert sum(p.numel() for p in rebuilt.parameters()) == m["pruned"]["params"]
    assert "Measured speed-up" in (out / "report.md").read_text()


def _dead_channel_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].bias[[1, 5]] = -100.0  # neurons 1 and 5 never fire
    return model


def test_apoz_and_activation_mean_remove_neurons_that_never_fire():
    x = torch.randn(16, 6)
    calibration = [(x, torch.zeros(16, dtype=torch.long))]
    for importance in ("apoz", "activation_mean"):
        model = _dead_channel_model()
        result = structured.prune_model(
            model, x, ratio=0.25, round_to=1, importance=importance, calibration=calibration, verify=True
        )
        assert list(result.removed.values()) == [[1, 5]]


def test_taylor_removes_neurons_whose_removal_does_not_change_the_loss():
    model = _dead_channel_model()
    with torch.no_grad():
        model[0].bias[[1, 5]] = 0.5  # alive, but nothing downstream reads them:
        model[2].weight[:, [2, 6]] = 0.0  # zero consumer columns for neurons 2 and 6
        model[2].weight[:, [1, 5]] = 1.0
    x = torch.randn(16, 6)
    calibration = [(x, torch.randint(0, 3, (16,))) for _ in range(2)]
    result = structured.prune_model(
        model,
        x,
        ratio=0.25,
        round_to=1,
        importance="taylor",
        calibration=calibration,
        loss_fn=nn.functional.cross_entropy,
        verify=True,
    )
    assert list(result.removed.values()) == [[2, 6]]
    assert all(p.grad is None for p in model.parameters())  # calibration gradients are not left behind


def test_data_importance_needs_data():
    model = _dead_channel_model()
    with pytest.raises(PrunekitError, match="calibration"):
        structured.prune(model, torch.randn(2, 6), importance="apoz")
    with pytest.raises(PrunekitError, match="loss_fn"):
        structured.prune(
            model, torch.randn(2, 6), importance="taylor", calibration=[(torch.randn(2, 6), None)]
        )


def test_structured_recipe_stage_exports_an_artifact_that_reloads(tmp_path):
    import json

    import yaml

    from prunekit.analysis import evaluate
    from prunekit.artifact import load_artifact
    from prunekit.data import load_splits
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    data = yaml.safe_load(recipe.builtin_text("edge-digits-structured"))
    data["model"]["args"] = {"widths": [16, 32], "blocks": 1}
    data["stages"][0]["epochs"] = 2
    data["stages"][3]["finetune"]["epochs"] = 1
    for i in (1, 4):
        data["stages"][i]["latency_runs"] = 5
    run_recipe(recipe.from_dict(data), tmp_path, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pruned"]["params"] < 0.5 * metrics["dense"]["params"]
    assert metrics["pruned"]["size_bytes"] < 0.5 * metrics["dense"]["size_bytes"]
    model, info = load_artifact(tmp_path / "pruned.safetensors")  # replays the prune log, then the weights
    assert len(info.structured) == 1
    splits = load_splits("digits", seed=0)
    result = evaluate(model.eval(), splits.loader("test", 64), splits.num_classes)
    assert result["accuracy"] == metrics["pruned"]["accuracy"]


def test_a_structured_stage_after_a_prune_stage_is_refused_up_front(tmp_path):
    import yaml

    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    data = yaml.safe_load(recipe.builtin_text("edge-digits-structured"))
    data["stages"].insert(3, {"type": "prune", "pattern": 0.5})
    with pytest.raises(PrunekitError, match="structured stage must come before"):
        run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_blocked_residual_stream_is_explored_once():
    from prunekit.structured.graph import find_groups
    from prunekit.structured.trace import trace_model

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    def backbone(depth):  # returns its residual stream: every block's output is tied to the model output
        return nn.Sequential(nn.Linear(16, 16), *[Block(16) for _ in range(depth)]).eval()

    for depth in (10, 40):
        groups = find_groups(trace_model(backbone(depth), torch.randn(2, 16)))
        assert sum(bool(g.blocked) for g in groups) == 1  # not one re-exploration per block
        assert len(groups) == depth + 1  # the stream, plus each block's free hidden width
