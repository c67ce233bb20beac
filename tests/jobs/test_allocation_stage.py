"""A prune stage's ``allocation`` goes through prunekit.registry.ALLOCATIONS: any 'layers' allocation works by
name (erk), a user's by module:attribute reference, and one for something else is refused in one line."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest

from prunekit.allocate.uniform import erk_allocation
from prunekit.artifact import load_artifact
from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe

TINY = {
    "name": "tiny-allocation",
    "seed": 0,
    "model": {"builtin": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}},
    "data": {"name": "digits", "batch_size": 128},
    "stages": [
        {"type": "train", "epochs": 1, "lr": 0.05},
        {"type": "prune", "pattern": 0.8, "allocation": "erk"},
        {"type": "evaluate", "label": "pruned", "latency_runs": 2, "latency_warmup": 0},
        {"type": "export", "name": "pruned"},
    ],
}


def _with(allocation: str) -> dict:
    data = copy.deepcopy(TINY)
    data["stages"][1]["allocation"] = allocation
    return data


def _layer_sparsity(path) -> dict[str, float]:
    _, info = load_artifact(path)
    return {n: float((~m).sum()) / m.numel() for n, m in info.masks.items()}, info


def test_erk_gives_every_layer_its_rigl_sparsity(tmp_path):
    metrics = run_recipe(recipe.from_dict(TINY), tmp_path / "out", progress=False)
    sparsity, info = _layer_sparsity(tmp_path / "out" / "pruned.safetensors")
    shapes = {n: tuple(m.shape) for n, m in info.masks.items()}
    expected = erk_allocation(shapes, 0.8)
    assert set(sparsity) == set(expected)
    for name, s in sparsity.items():  # each layer rounds its own count: within one weight
        assert abs(s - expected[name]) <= 1 / sparsity_size(shapes[name])
    assert len({round(v, 3) for v in expected.values()}) > 1  # ERK differs per layer
    (entry,) = metrics["allocation"]
    assert entry["method"] == "erk" and entry["layers"] == {n: {"sparsity": v} for n, v in expected.items()}


def sparsity_size(shape: tuple[int, ...]) -> int:
    size = 1
    for d in shape:
        size *= d
    return size


def test_a_users_allocation_by_reference(tmp_path, monkeypatch):
    (tmp_path / "my_alloc.py").write_text(
        textwrap.dedent(
            """
            from prunekit.allocate import AllocationMethod

            def half_then_target(shapes, target):
                names = sorted(shapes)
                return {n: (0.5 if i == 0 else target) for i, n in enumerate(names)}

            ALLOC = AllocationMethod("layers", half_then_target)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    try:
        run_recipe(recipe.from_dict(_with("my_alloc:ALLOC")), tmp_path / "out", progress=False)
    finally:
        sys.modules.pop("my_alloc", None)
    sparsity, _ = _layer_sparsity(tmp_path / "out" / "pruned.safetensors")
    first, *rest = sorted(sparsity)
    assert sparsity[first] == pytest.approx(0.5, abs=0.01)
    assert all(sparsity[n] == pytest.approx(0.8, abs=0.01) for n in rest)


def test_an_allocation_of_something_else_is_refused_in_one_line():
    with pytest.raises(
        PrunekitError, match="allocation 'owl' allocates llm-blocks, not a prune stage's layers"
    ):
        recipe.from_dict(_with("owl"))
    with pytest.raises(PrunekitError, match="unknown allocation 'erkk' \\(did you mean 'erk'\\?\\)"):
        recipe.from_dict(_with("erkk"))


def test_a_users_allocation_must_cover_the_targeted_layers(tmp_path, monkeypatch):
    (tmp_path / "bad_alloc.py").write_text(
        "from prunekit.allocate import AllocationMethod\n\n"
        "ALLOC = AllocationMethod('layers', lambda s, t: {})\n"
    )
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(PrunekitError, match="must return a sparsity for each targeted layer"):
            run_recipe(recipe.from_dict(_with("bad_alloc:ALLOC")), tmp_path / "out", progress=False)
    finally:
        sys.modules.pop("bad_alloc", None)
