"""The shape-only trace (arithmetic on the meta device, zeros onward) the pruner uses to check a pruned
model: the same operations and shapes as a real trace wherever control flow does not depend on values."""

import random

import pytest
import torch
import torch.nn.functional as F

from fixtures.zoo import ZOO
from prunekit.structured.trace import _conv_shape, trace_model


@pytest.mark.parametrize("name", sorted(ZOO))
def test_shape_only_trace_records_the_same_operations_and_shapes(name):
    case = ZOO[name]
    model, args = case.build(), case.example()
    real, fast = trace_model(model, args), trace_model(model, args, shapes_only=True)
    assert [op.name for op in real.ops] == [op.name for op in fast.ops]
    assert [[v.shape for v in op.outputs] for op in real.ops] == [
        [v.shape for v in op.outputs] for op in fast.ops
    ]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
def test_convolution_shapes_by_arithmetic_match_torch():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        k, groups = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
        x = torch.randn(1, groups * rng.randint(1, 3), *[rng.randint(3, 9) for _ in range(k)])
        w = torch.randn(
            groups * rng.randint(1, 3),
            rng.choice([x.shape[1] // groups, 1]),
            *[rng.randint(1, 4) for _ in range(k)],
        )
        stride = rng.choice([1, 2, tuple(rng.randint(1, 3) for _ in range(k))])
        padding = rng.choice([0, 1, 2, "valid", "same"])
        dilation = rng.choice([1, 2])
        stride = 1 if padding == "same" else stride
        try:
            expected = tuple(getattr(F, f"conv{k}d")(x, w, None, stride, padding, dilation, groups).shape)
        except RuntimeError:
            expected = "error"
        try:
            got = _conv_shape((x, w, None, stride, padding, dilation, groups), {})
        except RuntimeError:
            got = "error"
        if got is not None:  # None: left to torch's meta kernel
            assert got == expected, (x.shape, w.shape, stride, padding, dilation, groups)
            checked += 1
    assert checked > 250
