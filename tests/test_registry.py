"""The registries (prunekit.registry): lookups with did-you-mean, protocol checks, ``module:attribute``
references, and a user's own LLM method and structured importance used by name from Python, a recipe and
the command line, exactly like a built-in."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures.cli import assert_one_line_error, call_main
from prunekit.errors import PrunekitError
from prunekit.registry import (
    ALLOCATIONS,
    CRITERIA,
    LLM_METHODS,
    STRUCTURED_IMPORTANCE,
    Registry,
    StructuredImportance,
    resolve_reference,
)
from prunekit.structured import prune_model, register_importance

# -- the mechanism --------------------------------------------------------------------------------------


def test_every_family_has_its_builtins():
    assert {"magnitude", "random", "taylor", "obd", "wanda", "movement", "l0"} <= set(CRITERIA.names())
    assert {"magnitude", "wanda", "sparsegpt"} <= set(LLM_METHODS.names())
    assert {"l1", "l2", "bn_scale", "fpgm", "random", "taylor", "activation_mean", "apoz"} <= set(
        STRUCTURED_IMPORTANCE.names()
    )
    assert {"uniform", "erk", "sensitivity", "owl", "latency"} <= set(ALLOCATIONS.names())
    assert {ALLOCATIONS.get(n).applies_to for n in ALLOCATIONS.names()} == {
        "layers",
        "llm-blocks",
        "structured-groups",
    }


def test_unknown_names_suggest_the_nearest_and_list_the_rest():
    with pytest.raises(PrunekitError, match=r"unknown method 'wandaa' \(did you mean 'wanda'\?\); allowed"):
        LLM_METHODS.get("wandaa")
    with pytest.raises(PrunekitError, match="unknown structured importance 'l3'"):
        STRUCTURED_IMPORTANCE.get("l3")


def test_register_refuses_a_taken_name_a_bad_name_and_an_object_off_protocol():
    reg: Registry = Registry("thing", protocol=StructuredImportance)

    class Scorer:
        needs = "weights"

        def __call__(self, group):
            return torch.zeros(group.units)

    reg.register("one")(Scorer())
    with pytest.raises(PrunekitError, match="'one' is already registered"):
        reg.register("one")(Scorer())
    reg.register("one", replace=True)(Scorer())
    reg.register("three")(Scorer())
    reg.unregister("three")
    with pytest.raises(PrunekitError, match="unknown thing 'three'"):
        reg.unregister("three")
    with pytest.raises(PrunekitError, match="without ':'"):
        reg.register("a:b")
    with pytest.raises(PrunekitError, match="is not a StructuredImportance"):
        reg.register("two")(lambda group: torch.zeros(group.units))  # no `needs`
    assert reg.names() == ["one"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module in the working directory (as a user's own code would be) with a method and an importance."""
    (tmp_path / "my_pruning.py").write_text(
        textwrap.dedent(
            '''
            import torch
            from prunekit.methods import register_llm_method
            from prunekit.methods.pattern import keep_lowest_removed
            from prunekit.structured import register_importance


            @register_llm_method("test-absolute-times-sqnorm", statistic="sq_norm")
            def scaled(weight, sq_norm, spec, config):
                """|w| * x^2 (not Wanda's sqrt): a user's variant."""
                keep = keep_lowest_removed(weight.abs() * sq_norm, spec, "row")
                return weight.masked_fill(~keep, 0)


            @register_importance("test-last-units-first")
            def by_index(group):
                """Unit i scores i: the highest-numbered units are kept."""
                return torch.arange(group.units, dtype=torch.float32)
            '''
        )
    )
    monkeypatch.chdir(tmp_path)
    yield "my_pruning"
    sys.modules.pop("my_pruning", None)
    for registry, name in (
        (LLM_METHODS, "test-absolute-times-sqnorm"),
        (STRUCTURED_IMPORTANCE, "test-last-units-first"),
    ):
        if name in registry:  # registered by importing the module: forget it again
            registry.unregister(name)


def test_a_reference_imports_the_module_from_the_working_directory(user_module):
    method = LLM_METHODS.get(f"{user_module}:scaled")
    assert method.statistic == "sq_norm"
    assert LLM_METHODS.get("test-absolute-times-sqnorm") is method  # importing it registered the name
    with pytest.raises(PrunekitError, match="has no attribute 'nope'"):
        LLM_METHODS.get(f"{user_module}:nope")
    with pytest.raises(PrunekitError, match="cannot import no_such_module"):
        STRUCTURED_IMPORTANCE.get("no_such_module:x")


# -- a user's structured importance ----------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("how", ["object", "name", "reference"])
def test_a_user_importance_decides_which_units_go(user_module, how, monkeypatch):
    importance = {
        "object": register_importance("test-inline-first-units-first", replace=True)(
            lambda group: -torch.arange(group.units, dtype=torch.float32)  # unit 0 scores highest
        ),
        "name": "test-last-units-first",  # registered when the user's code is imported (just below)
        "reference": f"{user_module}:by_index",
    }[how]
    if how == "name":  # a user's script imports its own module (its folder is on the path)
        monkeypatch.syspath_prepend(str(Path.cwd()))
        importlib.import_module(user_module)
    try:
        model = _mlp()
        dense_rows = model[0].weight.detach().clone()
        result = prune_model(
            model, torch.randn(2, 4), ratio=0.5, importance=importance, round_to=1, verify=True
        )
        kept = dense_rows[:8] if how == "object" else dense_rows[8:]  # the 8 highest-scoring of 16 units
        assert model[0].weight.shape == (8, 4) and torch.equal(model[0].weight, kept)
        assert result.max_abs_diff is not None
    finally:
        if "test-inline-first-units-first" in STRUCTURED_IMPORTANCE:
            STRUCTURED_IMPORTANCE.unregister("test-inline-first-units-first")


def test_a_user_importance_from_a_recipe_and_the_command_line(user_module, tmp_path, monkeypatch, capsys):
    from prunekit.jobs.recipe import from_dict

    stage = {"type": "structured", "ratio": 0.5, "importance": f"{user_module}:by_index"}
    recipe = from_dict(
        {"name": "t", "model": {"builtin": "resnet-digits"}, "stages": [stage]}
    )  # validated through the registry
    assert recipe.stages[0].importance == f"{user_module}:by_index"
    code, out, err = call_main(
        monkeypatch,
        capsys,
        "structured",
        "--model",
        "resnet-digits",
        "--importance",
        f"{user_module}:by_index",  # from a shell, the module is named: nothing imported it yet
        "--runs",
        "5",
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    assert (tmp_path / "s" / "prune_log.json").is_file()
    code, _, err = call_main(monkeypatch, capsys, "structured", "--model", "resnet-digits", "--importance",
                             f"{user_module}:nope", "--out", str(tmp_path / "t"))  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "has no attribute 'nope'")


# -- a user's LLM method ------------------------------------------------------------------------------------


def test_a_user_llm_method_prunes_by_its_own_rule(user_module):
    pytest.importorskip("transformers")
    from fixtures.hf import llama
    from prunekit.calib.blocks import find_blocks, linear_layers
    from prunekit.llm import LLMPruneConfig, prune_llm
    from prunekit.spec import Unstructured

    torch.manual_seed(0)
    model = llama(layers=1).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    seen = {}

    def record(module, args):
        seen.setdefault(module, args[0].detach().reshape(-1, args[0].shape[-1]).pow(2).mean(0))

    layer = linear_layers(find_blocks(model)[1][0])["mlp.down_proj"]
    handle = layer.register_forward_pre_hook(record)
    dense = layer.weight.detach().clone()
    with torch.no_grad():
        model(ids)  # block 0 sees the embeddings of the dense model: the statistic the runner gathers
    handle.remove()
    prune_llm(model, ids, LLMPruneConfig(f"{user_module}:scaled", Unstructured(0.5)))
    score = dense.abs() * seen[layer]
    expected = torch.zeros_like(dense, dtype=torch.bool).scatter_(
        1, torch.sort(score, dim=1, descending=True, stable=True).indices[:, : dense.shape[1] // 2], True
    )
    assert torch.equal(layer.weight != 0, expected)


def test_a_user_llm_method_from_the_command_line(user_module, model_dir, tmp_path, monkeypatch, capsys):
    args = ["--model", str(model_dir), "--method", f"{user_module}:scaled", "--sparsity", "0.5"]
    code, out, err = call_main(
        monkeypatch, capsys, "llm", "prune", *args, "--calib-samples", "2", "--seqlen", "16",
        "--no-eval", "--quiet", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 0, err
    assert "my_pruning:scaled" in out


def test_a_reference_leaves_the_import_path_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "refmod_leaves_path.py").write_text("VALUE = 3\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        assert resolve_reference("refmod_leaves_path:VALUE", "thing") == 3
        assert sys.path == before
    finally:
        sys.modules.pop("refmod_leaves_path", None)


def test_the_console_script_builds_a_model_from_a_factory_in_the_working_directory(tmp_path):
    """`prunekit structured --model mymodel:make` run from the folder of mymodel.py, as a user would (the
    console script, unlike `python -m`, does not put the working directory on the import path)."""
    script = Path(sys.executable).parent / "prunekit"
    if not script.exists():
        pytest.skip(f"no prunekit console script next to {sys.executable}")
    (tmp_path / "mymodel.py").write_text(
        "import torch\n\n\ndef make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))\n"
    )
    args = ["structured", "--model", "mymodel:make", "--input-shape", "2,4", "--runs", "5", "--out", "o"]
    done = subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "prune_log.json").is_file()
