"""Recipes are strict: the built-in one round-trips, and every bad input is a one-line PrunekitError that
names where the problem is (and the right key or name when the typo is close)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from prunekit.cli.commands import app
from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.recipe import PruneStage, Recipe, from_dict, load, to_dict

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"builtin": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}},
    "stages": [
        {"type": "train", "epochs": 1, "lr": 0.05},
        {"type": "prune", "pattern": 0.5, "schedule": {"type": "iterative", "rate": 0.3}},
        {"type": "evaluate", "label": "pruned", "latency_runs": 5},
        {"type": "export", "name": "pruned"},
    ],
}


def tiny(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(TINY)
    data.update(changes)
    return data


def with_prune(**fields: Any) -> dict[str, Any]:
    """TINY with stage 1 (the prune stage) changed."""
    data = tiny()
    data["stages"][1] = {"type": "prune", "pattern": 0.5, **fields}
    return data


def error_of(data: Any) -> str:
    with pytest.raises(PrunekitError) as info:
        from_dict(data)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith("recipe ")
    return message


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- good input


def test_builtin_recipe_loads_and_is_what_it_says():
    r = recipe.load_builtin("edge-digits")
    assert "edge-digits" in recipe.builtin_names()
    assert r.name == "edge-digits"
    types = [s.type for s in r.stages]
    assert types == [
        "train", "evaluate", "export", "prune", "evaluate", "export", "quantize", "evaluate", "export"
    ]  # fmt: skip
    prune = next(s for s in r.stages if isinstance(s, PruneStage))
    assert float(prune.pattern) == 0.9 and prune.group == "global" and prune.schedule.type == "iterative"
    assert [s.label for s in r.stages if s.type == "evaluate"] == ["dense", "pruned", "pruned-int8"]
    # every evaluate label has an export with the same name, so metrics get the artifact size
    assert {s.label for s in r.stages if s.type == "evaluate"} == {
        s.name for s in r.stages if s.type == "export"
    }


def test_recipes_show_text_round_trips_through_load(tmp_path):
    result = CliRunner().invoke(app, ["recipes", "show", "edge-digits"])
    assert result.exit_code == 0, result.output
    assert result.output == recipe.builtin_text("edge-digits")
    loaded = load(write(tmp_path, result.output))
    assert loaded == recipe.load_builtin("edge-digits")


@pytest.mark.parametrize("data", [TINY, yaml.safe_load(recipe.builtin_text("edge-digits"))])
def test_python_and_yaml_are_the_same_recipe(tmp_path, data):
    r = from_dict(data)
    again = load(write(tmp_path, yaml.safe_dump(to_dict(r), sort_keys=False)))
    assert again == r
    assert to_dict(again) == to_dict(r)
    assert from_dict(to_dict(r)) == r


def test_recipes_are_frozen():
    r = from_dict(TINY)
    with pytest.raises(ValidationError, match="frozen"):
        r.seed = 3  # type: ignore[misc]
    assert isinstance(r, Recipe)


def test_existing_artifact_and_data_files_are_accepted(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    (tmp_path / "d.npz").write_bytes(b"x")
    r = from_dict(
        tiny(
            model={"artifact": str(tmp_path / "m.safetensors")},
            data={"name": "npz", "path": str(tmp_path / "d.npz")},
        )
    )
    assert r.model.artifact == tmp_path / "m.safetensors"
    assert r.data.path == tmp_path / "d.npz"


# ------------------------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_suggests_the_right_one():
    data = tiny()
    data["modle"] = data.pop("model")
    message = error_of(data)
    assert "'modle'" in message and "did you mean 'model'" in message


def test_unknown_key_inside_a_stage_names_the_stage():
    message = error_of(with_prune(criterian="magnitude"))
    assert "stages[1]" in message
    assert "'criterian'" in message and "did you mean 'criterion'" in message


@pytest.mark.parametrize(
    ("data", "where", "key", "suggestion"),
    [
        (with_prune(schedule={"tpye": "one-shot"}), "stages[1].schedule", "tpye", "type"),
        (with_prune(targets={"typez": ["Linear"]}), "stages[1].targets", "typez", "types"),
        # 'finetune' is both a stage type and a prune-stage field: the location must keep the field
        (with_prune(finetune={"epoch": 1, "lr": 0.1}), "stages[1].finetune", "epoch", "epochs"),
        (
            tiny(stages=[{"type": "finetune", "epochs": 1, "lr": 0.1, "mometum": 0.9}]),
            "stages[0]",
            "mometum",
            "momentum",
        ),
        (tiny(data={"nmae": "digits"}), "data", "nmae", "name"),
        (tiny(model={"builtin": "resnet-digits", "argz": {}}), "model", "argz", "args"),
    ],
)
def test_unknown_nested_keys_name_their_location(data, where, key, suggestion):
    message = error_of(data)
    assert f"{where}: unknown key '{key}'" in message
    assert f"did you mean '{suggestion}'" in message


def test_far_off_unknown_key_lists_allowed_keys_without_a_wrong_guess():
    message = error_of(tiny(zzzzzz=1))
    assert "'zzzzzz'" in message and "did you mean" not in message
    assert "allowed:" in message and "stages" in message


# ---------------------------------------------------------------------------------------- wrong values


def test_wrong_type_names_the_field():
    data = tiny()
    data["stages"][0]["epochs"] = "many"
    message = error_of(data)
    assert "stages[0].epochs" in message and "integer" in message


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=1.0, allow_infinity=True),
        st.floats(max_value=0.0, exclude_max=True, allow_infinity=True),
        st.just(math.nan),
    )
)
def test_sparsity_outside_unit_interval_or_nan_is_rejected(value):
    message = error_of(with_prune(pattern=value))
    assert "stages[1].pattern" in message and "[0, 1)" in message


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_sparsity_inside_unit_interval_is_accepted(value):
    assert from_dict(with_prune(pattern=value)).stages[1].pattern == value


@pytest.mark.parametrize("text", ["nan", "100%", "-5%", "1.0", "inf"])
def test_sparsity_strings_outside_unit_interval_are_rejected(text):
    assert "stages[1].pattern" in error_of(with_prune(pattern=text))


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=64))
def test_n_m_pattern_needs_n_below_m(n, m):
    data = with_prune(pattern=f"{n}:{m}")
    if n < m and m >= 2:
        assert from_dict(data).stages[1].pattern == f"{n}:{m}"
    else:
        assert "stages[1].pattern" in error_of(data)


def test_bad_override_pattern_names_the_overrides():
    assert "stages[1].overrides" in error_of(with_prune(overrides={"layers.*": 1.5}))


def test_unknown_criterion_suggests_the_right_one():
    message = error_of(with_prune(criterion="magnitud"))
    assert "stages[1].criterion" in message
    assert "did you mean 'magnitude'" in message and "allowed:" in message


def test_unknown_stage_type_suggests_the_right_one():
    data = tiny()
    data["stages"][1]["type"] = "prnue"
    message = error_of(data)
    assert "stage 1" in message and "'prnue'" in message and "did you mean 'prune'" in message


@pytest.mark.parametrize("stage", [{"epochs": 1, "lr": 0.1}, "train"])
def test_stage_without_a_type_is_rejected(stage):
    data = tiny()
    data["stages"][0] = stage
    assert "stage 0" in error_of(data)


def test_unknown_schedule_type_names_the_allowed_ones():
    message = error_of(with_prune(schedule={"type": "linear"}))
    assert "stages[1].schedule.type" in message
    for name in ("one-shot", "iterative", "agp"):
        assert name in message


@pytest.mark.parametrize(
    ("schedule", "stray"),
    [
        ({"type": "one-shot", "rate": 0.2}, "rate"),
        ({"type": "iterative", "rate": 0.2, "end": 3}, "end"),
        ({"type": "iterative", "rate": 0.2, "start": 1, "every": 2}, "every, start"),
        ({"type": "agp", "end": 10, "rate": 0.2}, "rate"),
    ],
)
def test_schedule_fields_must_belong_to_the_type(schedule, stray):
    finetune = {"epochs": 1, "lr": 0.01} if schedule["type"] == "agp" else None
    data = with_prune(schedule=schedule, **({"finetune": finetune} if finetune else {}))
    message = error_of(data)
    assert "stages[1].schedule" in message
    assert f"schedule '{schedule['type']}' takes no {stray}" in message


def test_agp_needs_end_and_finetune():
    assert "needs 'end'" in error_of(with_prune(schedule={"type": "agp"}, finetune={"epochs": 1, "lr": 0.01}))
    message = error_of(with_prune(schedule={"type": "agp", "end": 10}))
    assert "stages[1]" in message and "finetune" in message
    ok = from_dict(with_prune(schedule={"type": "agp", "end": 10}, finetune={"epochs": 1, "lr": 0.01}))
    assert ok.stages[1].schedule.type == "agp"


def test_movement_needs_a_schedule_that_prunes_during_training():
    for schedule in ({"type": "one-shot"}, {"type": "iterative", "rate": 0.3}):
        message = error_of(with_prune(criterion="movement", schedule=schedule))
        assert "stages[1]" in message and "criterion 'movement'" in message and "'agp'" in message
    agp = {"schedule": {"type": "agp", "end": 10}, "finetune": {"epochs": 1, "lr": 0.01}}
    assert from_dict(with_prune(criterion="movement", **agp)).stages[1].criterion == "movement"


def test_missing_artifact_file_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    message = error_of(tiny(model={"artifact": str(missing)}))
    assert message.count("model") >= 1 and "artifact file not found" in message and str(missing) in message


def test_missing_data_file_names_it(tmp_path):
    missing = tmp_path / "nope.npz"
    message = error_of(tiny(data={"name": "npz", "path": str(missing)}))
    assert "data" in message and "not found" in message and str(missing) in message
    assert "needs a 'path'" in error_of(tiny(data={"name": "npz"}))


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({}, "give one model source; allowed: builtin, artifact, factory, torchvision, hf"),
        ({"builtin": "resnet-digits", "artifact": "x.safetensors"}, "not builtin and artifact"),
        ({"builtin": "resnet-digit"}, "did you mean 'resnet-digits'"),
    ],
)
def test_model_source_is_exactly_one_known_thing(model, needle):
    message = error_of(tiny(model=model))
    assert "model" in message and needle in message


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"seed": "x"}, "seed"),
        ({"stages": []}, "stages"),
    ],
)
def test_other_bad_values_name_their_field(change, where):
    assert f": {where}: " in error_of(tiny(**change))


def test_bad_export_name_is_rejected():
    data = tiny()
    data["stages"][3]["name"] = "../escape"
    assert "stages[3].name" in error_of(data)


def test_only_the_first_problem_is_spelled_out():
    data = tiny(modle=1, dtaa=2)
    message = error_of(data)
    assert message.count("unknown key") == 1


# ---------------------------------------------------------------------------------------- bad files


def test_invalid_yaml_is_a_one_line_error(tmp_path):
    path = write(tmp_path, "name: [unclosed\nseed: 0\n")
    with pytest.raises(PrunekitError, match=r"not valid YAML") as info:
        load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(PrunekitError, match=r"must be a mapping") as info:
        load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_recipe_file_is_named(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(PrunekitError, match=re.escape(f"recipe file not found: {path}")):
        load(path)
    with pytest.raises(PrunekitError, match="recipe file not found"):
        load(tmp_path)  # a directory is not a recipe file


def test_errors_from_a_file_name_the_file(tmp_path):
    data = tiny(modle=1)
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(PrunekitError) as info:
        load(path)
    assert str(info.value).startswith(f"recipe {path}: ")


def test_unknown_builtin_recipe_suggests_the_right_one():
    with pytest.raises(PrunekitError, match="did you mean 'edge-digits'"):
        recipe.builtin_text("edge-digit")
