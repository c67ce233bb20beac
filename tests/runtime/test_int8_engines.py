"""The INT8 engine decision (runtime.int8_engines.choose_int8) on faked timings: the fastest allowed engine,
prunekit's exact integers unless inexact engines are allowed, and never slower than the pruned float32
model it came from."""

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.runtime import int8_engines as E


def test_the_fastest_exact_engine_wins():
    c = E.choose_int8({"segments": (3000.0, True), "per-layer": (5000.0, True)}, float_us=8000.0)
    assert (c.engine, c.us) == ("segments", 3000.0)


def test_inexact_engines_only_when_allowed_and_named_when_skipped():
    timings = {"segments": (3000.0, True), "onnxruntime": (2000.0, False), "torch-x86": (2500.0, False)}
    c = E.choose_int8(timings, float_us=8000.0)
    assert c.engine == "segments" and "onnxruntime" in c.reason and "torch-x86" in c.reason
    assert E.choose_int8(timings, float_us=8000.0, allow_inexact=True).engine == "onnxruntime"


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_never_slower_than_the_pruned_float32_model(margin):
    timings = {"segments": (8500.0, True), "per-layer": (12000.0, True)}
    c = E.choose_int8(timings, float_us=8000.0, margin=margin)
    if margin == 0.0:  # 8500 > 8000: INT8 would be slower, the float32 model runs
        assert c.engine == E.FLOAT32 and c.us == 8000.0 and "slower than float32" in c.reason
    else:  # 8500 <= 8000 * 1.1: within the margin, INT8 stays
        assert c.engine == "segments"
    assert E.choose_int8(timings, float_us=None).engine == "segments"  # no bar given: the fastest INT8
    # an equal time is not slower
    assert E.choose_int8({"a": (8000.0, True)}, float_us=8000.0).engine == "a"


def test_only_inexact_engines_and_not_allowed():
    assert E.choose_int8({"onnxruntime": (1.0, False)}, float_us=5.0).engine == E.FLOAT32
    with pytest.raises(PrunekitError, match="no allowed"):
        E.choose_int8({"onnxruntime": (1.0, False)}, float_us=None)


def test_fastest_int8_times_real_modules_and_returns_the_chosen_one(monkeypatch):
    fast, slow, flt = nn.Identity(), nn.Identity(), nn.Identity()
    fake = {"fast": 10.0, "slow": 20.0, E.FLOAT32: 15.0}
    monkeypatch.setattr(E, "_median_us", lambda fns, x, rounds: {k: fake[k] for k in fns})
    chosen, choice, medians = E.fastest_int8({"fast": fast, "slow": slow}, torch.zeros(1), float_model=flt)
    assert chosen is fast and choice.engine == "fast" and medians == fake
    fake["fast"] = 16.0
    chosen, choice, _ = E.fastest_int8({"fast": fast, "slow": slow}, torch.zeros(1), float_model=flt)
    assert chosen is flt and choice.engine == E.FLOAT32
    with pytest.raises(PrunekitError, match="allow_inexact needs"):
        E.fastest_int8({"fast": fast}, torch.zeros(1), allow_inexact=True)


def test_inexact_candidates_are_export_engines_dense_baselines(monkeypatch):
    """allow_inexact adds the dense INT8 engines of prunekit.export.engines (the one implementation); one
    that cannot be built here (model None) is left out."""
    from prunekit.export.engines import ORT_INT8, TORCH_INT8, Baseline

    ort = nn.Identity()
    asked = {}

    def fake_baselines(model, example, calibration, workdir=None, names=()):
        asked["names"] = names
        return [Baseline(TORCH_INT8, "t", None, skipped="no x86 engine"), Baseline(ORT_INT8, "o", ort)]

    monkeypatch.setattr(E, "dense_baselines", fake_baselines)
    fake = {"prunekit": 30.0, ORT_INT8: 20.0}
    monkeypatch.setattr(E, "_median_us", lambda fns, x, rounds: {k: fake[k] for k in fns})
    args = ({"prunekit": nn.Identity()}, torch.zeros(1))
    chosen, choice, medians = E.fastest_int8(
        *args, float_source=nn.Identity(), calibration=[torch.zeros(1)], allow_inexact=True
    )
    assert set(asked["names"]) == {TORCH_INT8, ORT_INT8} and set(medians) == {"prunekit", ORT_INT8}
    assert chosen is ort and choice.engine == ORT_INT8
