"""Built-in architectures: the digits ResNet's shape, and bad constructor arguments as one-line errors."""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models import MODELS, SmallResNet, build_model


def test_resnet_digits_maps_digit_images_to_class_logits():
    model = build_model("resnet-digits", {"widths": [4, 8], "blocks": 1, "num_classes": 7})
    assert isinstance(model, SmallResNet) and "resnet-digits" in MODELS
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 7)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 2 + 1  # stem, two blocks of two convs, one projection shortcut


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"widths": []}, "widths"),
        ({"widths": "16"}, "widths"),
        ({"widths": 16}, "widths"),
        ({"widths": [16, 0]}, "widths"),
        ({"widths": [16, 2.5]}, "widths"),
        ({"blocks": 0}, "blocks"),
        ({"blocks": -1}, "blocks"),
        ({"blocks": True}, "blocks"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": "10"}, "num_classes"),
    ],
)
def test_bad_resnet_arguments_name_the_field(args, field):
    with pytest.raises(PrunekitError, match=field) as info:
        build_model("resnet-digits", args)
    assert "\n" not in str(info.value)


def test_unknown_model_and_argument_are_clear_errors():
    with pytest.raises(PrunekitError, match="did you mean 'resnet-digits'"):
        build_model("resnet-digit")
    with pytest.raises(PrunekitError, match="bad arguments.*'depth'"):
        build_model("resnet-digits", {"depth": 3})
