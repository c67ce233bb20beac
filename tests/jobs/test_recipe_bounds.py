"""The recipe cases of issue 20, each one line before any work: a key given twice, infinite or NaN
numbers, counts and seeds out of range, and a model that would not fit in memory to train."""

from __future__ import annotations

import pytest

from prunekit.errors import PrunekitError
from prunekit.jobs import recipe

BASE = """name: x
seed: {seed}
model: {{builtin: resnet-digits, args: {{widths: {widths}}}}}
stages:
  - type: train
    epochs: {epochs}
    lr: {lr}
"""


def _load(tmp_path, extra: str = "", seed="0", widths="[4]", epochs="1", lr="0.1"):
    path = tmp_path / "r.yaml"
    path.write_text(BASE.format(seed=seed, widths=widths, epochs=epochs, lr=lr) + extra)
    return recipe.load(path)


def test_the_base_recipe_loads(tmp_path):
    assert _load(tmp_path).stages[0].lr == 0.1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": ".inf"}, r"stages\[0\]\.lr: Input should be a finite number"),
        ({"lr": ".nan"}, r"stages\[0\]\.lr: Input should be a finite number"),
        ({"seed": "-1"}, "seed: Input should be greater than or equal to 0"),
        ({"seed": str(2**70)}, "seed: Input should be less than or equal to 4294967295"),
        ({"epochs": "1000000000000"}, r"stages\[0\]\.epochs: Input should be less than or equal to 1000000"),
        ({"widths": "[-3]"}, "each of widths must be an integer >= 1"),
    ],
)
def test_values_out_of_range_are_one_line(tmp_path, kw, match):
    with pytest.raises(PrunekitError, match=match) as info:
        _load(tmp_path, **kw)
    assert "\n" not in str(info.value)


def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path):
    with pytest.raises(PrunekitError, match=r"found duplicate key 'lr' \(line 8, column 5\)"):
        _load(tmp_path, extra="    lr: 0.2\n")
    path = tmp_path / "merge.yaml"  # YAML merge keys may still be overridden, as YAML intends
    path.write_text(
        "base: &b {epochs: 1, lr: 0.1}\nname: x\nmodel: {builtin: resnet-digits, args: {widths: [4]}}\n"
        "stages:\n  - <<: *b\n    type: train\n    lr: 0.2\n"
    )
    with pytest.raises(
        PrunekitError, match="unknown key 'base'"
    ):  # parsed fine: the merge is not a duplicate
        recipe.load(path)


def test_a_model_too_large_to_train_is_refused_before_it_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_MEMORY_LIMIT", "16G")
    with pytest.raises(PrunekitError) as info:
        _load(tmp_path, widths="[1000000]")
    message = str(info.value)
    assert "training model 'resnet-digits'" in message and "36,000,029,000,010 parameters" in message
    assert "more than the limit of 16.0 GiB (PRUNEKIT_MEMORY_LIMIT=16G)" in message


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_a_data_seed_out_of_numpys_range_is_one_line(seed):
    from prunekit.data import load_splits

    with pytest.raises(PrunekitError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        load_splits("digits", seed=seed)
