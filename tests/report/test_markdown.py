"""The verdict lines say only what was measured: a latency ratio, and for 'not faster' the parameter and
non-zero ratios of the two models, never an explanation nobody measured."""

from prunekit.report.markdown import verdict
from prunekit.report.sections import structured_verdict


def _state(accuracy: float, p50: float, params: int, nonzero: int) -> dict:
    return {
        "accuracy": accuracy,
        "per_class_recall": [accuracy, accuracy],
        "latency_ms": {"p50": p50, "p99": p50},
        "params": params,
        "nonzero_params": nonzero,
    }


def _latency_line(lines: list[str]) -> str:
    (line,) = [x for x in lines if x.startswith("Latency")]
    return line


def test_not_faster_states_the_measured_ratios_and_nothing_else():
    dense, pruned = _state(0.9, 1.0, 1000, 1000), _state(0.89, 0.97, 1000, 100)
    line = _latency_line(verdict(dense, pruned))
    assert line == (
        "Latency: **pruning did not make inference faster** (p50 0.97x of dense; the report counts only "
        "0.90x or better as a speed-up); it has 1.000x of dense's parameters and 0.100x of its non-zero "
        "weights."
    )
    assert _latency_line(verdict(dense, _state(0.89, 0.5, 1000, 100))) == (
        "Latency: pruned is faster, p50 0.50x of dense."
    )
    assert "**slower**" in _latency_line(verdict(dense, _state(0.89, 1.3, 1000, 100)))


def test_structured_not_faster_has_no_unmeasured_reason():
    m = {"ratios": {"latency_p50": 0.95, "macs": 0.25, "params": 0.3}}
    lines = structured_verdict(m)
    latency = [x for x in lines if "Latency" in x][0]
    assert latency.endswith("(p50 0.95x of dense; only 0.90x or better counts as a speed-up).")
    assert any("4.00x" in x for x in lines)  # the MACs bound, which was measured (counted)
