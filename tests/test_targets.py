"""Which layers get pruned: types, globs, the dense-by-default classifier and embeddings, overrides."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks
from prunekit.spec import NM, Unstructured, parse
from prunekit.targets import Targets, classifier_name, left_dense, resolve

SPEC = Unstructured(0.5)


class Net(nn.Module):
    """embedding -> two blocks of linears -> conv on a reshaped view -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.ModuleDict(
            {
                "block1": nn.ModuleDict({"fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)}),
                "block2": nn.ModuleDict({"fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)}),
            }
        )
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.encoder.values():
            x = x + block["fc2"](torch.relu(block["fc1"](x)))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(x).mean(1))


BODY = {"encoder.block1.fc1", "encoder.block1.fc2", "encoder.block2.fc1", "encoder.block2.fc2", "conv"}


def test_default_targets_skip_classifier_and_embedding():
    model = Net()
    chosen = resolve(model, SPEC)
    assert set(chosen) == BODY
    assert all(spec == SPEC for spec in chosen.values())
    assert classifier_name(model) == "head"


def test_prune_classifier_includes_it():
    chosen = resolve(Net(), SPEC, Targets(prune_classifier=True))
    assert set(chosen) == BODY | {"head"}


def test_embedding_is_included_when_listed_in_types():
    chosen = resolve(Net(), SPEC, Targets(types=("Linear", "Embedding")))
    assert "embed" in chosen and "conv" not in chosen and "head" not in chosen


def test_targets_are_found_on_an_already_masked_model():
    model = Net()
    apply_masks(model, {"encoder.block1.fc1": torch.ones(16, 8, dtype=torch.bool)})
    assert set(resolve(model, SPEC)) == BODY
    assert "encoder.block1.fc1" not in left_dense(model, resolve(model, SPEC))


def test_output_embeddings_are_the_classifier_when_the_model_names_them():
    class LM(Net):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(8, 10)
            self.extra = nn.Linear(10, 10)  # registered last, but not the output head

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    model = LM()
    assert classifier_name(model) == "lm_head"
    chosen = resolve(model, SPEC)
    assert "lm_head" not in chosen and "extra" in chosen and "head" in chosen


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (Targets(include=("encoder.*",)), {n for n in BODY if n.startswith("encoder.")}),
        (Targets(include=("*.fc1",)), {"encoder.block1.fc1", "encoder.block2.fc1"}),
        (Targets(exclude=("encoder.block2.*",)), BODY - {"encoder.block2.fc1", "encoder.block2.fc2"}),
        (Targets(include=("encoder.*",), exclude=("*fc2",)), {"encoder.block1.fc1", "encoder.block2.fc1"}),
        (Targets(include=("*",), prune_classifier=True), BODY | {"head"}),
        (Targets(types=("Conv1d",)), {"conv"}),
        (Targets(include="*.fc1"), {"encoder.block1.fc1", "encoder.block2.fc1"}),  # one string is one glob
    ],
)
def test_include_exclude_globs(targets, expected):
    assert set(resolve(Net(), SPEC, targets)) == expected


def test_bad_targets_fields_raise():
    with pytest.raises(PrunekitError, match="include"):
        Targets(include=(1, 2))
    with pytest.raises(PrunekitError, match="types"):
        Targets(types=None)


def test_overrides_apply_first_matching_pattern_wins():
    chosen = resolve(
        Net(),
        SPEC,
        overrides={
            "encoder.block1.*": "2:4",
            "encoder.*.fc1": 0.9,
            "conv": {"type": "unstructured", "sparsity": 0.1},
        },
    )
    assert chosen["encoder.block1.fc1"] == NM(2, 4)
    assert chosen["encoder.block1.fc2"] == NM(2, 4)
    assert chosen["encoder.block2.fc1"] == Unstructured(0.9)
    assert chosen["encoder.block2.fc2"] == SPEC
    assert chosen["conv"] == Unstructured(0.1)


def test_override_matching_no_layer_raises():
    with pytest.raises(PrunekitError, match=r"encoder\.block3"):
        resolve(Net(), SPEC, overrides={"encoder.block3.*": 0.9})
    # the classifier is not a target, so an override naming it matches nothing either
    with pytest.raises(PrunekitError, match="head"):
        resolve(Net(), SPEC, overrides={"head": 0.9})


def test_no_matching_layer_names_the_module_types():
    with pytest.raises(PrunekitError, match="no layer matches") as info:
        resolve(Net(), SPEC, Targets(types=("Conv2d",)))
    message = str(info.value)
    for kind in ("Linear", "Conv1d", "Embedding", "LayerNorm"):
        assert kind in message
    with pytest.raises(PrunekitError, match="no layer matches"):
        resolve(Net(), SPEC, Targets(include=("decoder.*",)))


def test_misspelt_type_is_an_error_not_a_silently_dense_layer():
    # 'Conv1D' would otherwise leave the conv dense while the Linear layers are pruned
    with pytest.raises(PrunekitError, match=r"type 'Conv1D'.*did you mean 'Conv1d'") as info:
        resolve(Net(), SPEC, Targets(types=("Linear", "Conv1D")))
    assert "\n" not in str(info.value)
    # a torch.nn type the model does not have is fine (the defaults list Conv2d and Conv3d)
    assert set(resolve(Net(), SPEC, Targets(types=("Linear", "Conv1d", "Conv3d")))) == BODY


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_glob_that_matches_no_module_is_an_error(field):
    # 'encoder.block3.*' is a typo for block2: excluding nothing (or including less) silently is wrong
    targets = Targets(**{field: ("encoder.block1.*", "encoder.block3.*")})
    with pytest.raises(PrunekitError, match=rf"targets {field} pattern\(s\) \['encoder\.block3\.\*'\]"):
        resolve(Net(), SPEC, targets)
    # a glob matching modules that are not targets is fine: it is about names, not about what gets pruned
    assert set(resolve(Net(), SPEC, Targets(exclude=("norm", "encoder.block2.*")))) == BODY - {
        "encoder.block2.fc1",
        "encoder.block2.fc2",
    }


def test_nm_on_layer_with_bad_input_dimension_names_the_layer():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ok = nn.Linear(8, 6)
            self.odd = nn.Linear(6, 4)  # in_features 6 is not a multiple of 4
            self.head = nn.Linear(4, 2)

    # named by include: an error naming the layer and exclude
    with pytest.raises(PrunekitError, match=r"'odd'.*\(6\).*M=4.*include \['o\*'\].*exclude=\['odd'\]"):
        resolve(Odd(), NM(2, 4), Targets(include=("o*",)))
    with pytest.raises(PrunekitError, match=r"'odd'.*override 'od\*'.*exclude=\['odd'\]"):
        resolve(Odd(), NM(1, 3), overrides={"od*": "2:4"})
    # excluding the odd layer (or overriding its spec) makes the same spec valid for the rest
    assert set(resolve(Odd(), NM(2, 4), Targets(exclude=("odd",)))) == {"ok"}
    assert resolve(Odd(), NM(2, 4), overrides={"odd": 0.5})["odd"] == Unstructured(0.5)
    assert resolve(Odd(), NM(1, 3), overrides={"ok": 0.5})["odd"] == NM(1, 3)


def test_left_dense_lists_classifier_and_embedding_with_reasons():
    model = Net()
    chosen = resolve(model, SPEC, Targets(exclude=("conv",)))
    dense = left_dense(model, chosen, Targets(exclude=("conv",)))
    assert set(dense) == {"head", "embed", "conv"}
    assert "classifier" in dense["head"] and "prune_classifier" in dense["head"]
    assert "embedding" in dense["embed"]
    assert "include/exclude" in dense["conv"]
    # chosen and left-dense partition the weighted layers of the default types
    assert not set(dense) & set(chosen)


def test_left_dense_is_empty_of_classifier_when_it_is_pruned():
    model = Net()
    targets = Targets(prune_classifier=True)
    dense = left_dense(model, resolve(model, SPEC, targets), targets)
    assert set(dense) == {"embed"}


def test_left_dense_names_untargeted_types():
    model = Net()
    targets = Targets(types=("Linear",))
    dense = left_dense(model, resolve(model, SPEC, targets), targets)
    assert "Conv1d" in dense["conv"]


class FirstLayers(nn.Module):
    """A CNN's first layer with 3 input channels, a 1-channel conv, a wide body and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)  # weight 8x3x3x3: input width 3, seen as 8x27
        self.gray = nn.Conv2d(1, 8, 1)  # 8x1x1x1: input width 1, seen as 8x1
        self.body = nn.Conv2d(8, 8, 3)  # input width 8, seen as 8x72
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)


@pytest.mark.parametrize(
    ("spec", "skipped"),
    [
        (NM(2, 4), {"stem": "input dimension (3)", "gray": "input dimension (1)"}),
        (parse("block:4x4@0.5"), {"stem": "seen as 8x27", "gray": "seen as 8x1"}),
        (parse("block:1x8@0.5"), {"stem": "seen as 8x27", "gray": "seen as 8x1"}),
    ],
)
def test_default_targets_skip_layers_a_pattern_cannot_apply_to(spec, skipped, caplog):
    model, reasons = FirstLayers(), {}
    with caplog.at_level("WARNING", logger="prunekit.targets"):
        chosen = resolve(model, spec, skipped=reasons)
    assert set(chosen) == {"body", "fc"} and set(reasons) == set(skipped)
    for name, needle in skipped.items():
        assert reasons[name].startswith(f"pattern {spec} cannot apply: ") and needle in reasons[name]
        assert any(name in r.getMessage() and needle in r.getMessage() for r in caplog.records)
    dense = left_dense(model, chosen, skipped=reasons)
    assert set(dense) == {"stem", "gray", "head"}
    assert dense["stem"].startswith(reasons["stem"]) and "exclude it" in dense["stem"]
    # every weighted layer is pruned, skipped with a reason, or the classifier: nothing silently dropped
    assert set(chosen) | set(dense) == {"stem", "gray", "body", "fc", "head"}


def test_a_pattern_that_fits_no_targeted_layer_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(
        PrunekitError, match=r"fits none of the targeted layers \(1 skipped; '0': pattern 2:4"
    ):
        resolve(model, NM(2, 4))


def test_the_sparsifier_reports_what_it_skipped():
    import prunekit as pk

    model = FirstLayers()
    sparsifier = pk.Sparsifier(model, "2:4")
    assert set(sparsifier.skipped) == {"stem", "gray"} and set(sparsifier.specs) == {"body", "fc"}
