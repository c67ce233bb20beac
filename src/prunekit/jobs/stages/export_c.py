"""The recipe side: an export stage with ``c: true`` writes ``OUT/<name>-c/`` and records its budget.

The pruned model is the run's current (INT8) model. For the comparison the report shows, the first
evaluated model (the dense one in the demo) is quantized the way the run's quantize stage did it (same
options, same calibration batches) and sized by the same exporter, in a temporary directory. Both are
cross-compiled for Cortex-M4 when ``arm-none-eabi-gcc`` is on PATH; the host check runs when ``gcc``
is. The results go to ``metrics[<name>]["c_export"]`` when an evaluate stage has the export's name.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from prunekit.export.c.api import export_c
from prunekit.export.c.harness import arm_size, have, run_check
from prunekit.export.c.source import calibration_inputs
from prunekit.jobs.recipe import ExportStage, QuantizeStage
from prunekit.jobs.state import RunState
from prunekit.quant.ptq import quantize

log = logging.getLogger(__name__)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "flash": result["flash"],
        "ram": result["ram"],
        "storage": {r["layer"]: r["storage"] for r in result["layers"] if r["op"].startswith("conv")},
    }


def _dense_int8(state: RunState) -> tuple[str, Any] | None:
    """(label, INT8 copy) of the first evaluated model, quantized as the run's quantize stage did."""

    stages = [s for s in state.recipe.stages if isinstance(s, QuantizeStage)]
    if not state.timed or not stages:
        return None
    label, (model, _) = next(iter(state.timed.items()))
    if label == list(state.timed)[-1] or any(
        getattr(m, "weight_q", None) is not None for m in model.modules()
    ):
        return None  # the first evaluated model is already the int8 one: nothing to compare with
    stage = stages[0]
    calib = state.calibration(stage.calibration_batches)
    select = {"include": stage.include, "exclude": stage.exclude, "classifier": stage.classifier}
    return label, quantize(model, activations=stage.activations, calibration=calib, **select).model


def export_c_stage(state: RunState, stage: ExportStage) -> dict[str, Any]:
    out = state.out / f"{stage.name}-c"
    x_train = calibration_inputs(state.data)
    x_test, y_test = state.data.tensors("test")
    result = export_c(state.model, out, calibration=[x_train], test=(x_test, y_test))
    entry: dict[str, Any] = {"dir": out.name, **_summary(result), "reference": result["reference"]}
    entry["host_check"] = (
        run_check(out) if have("gcc") and have("make") else {"skipped": "gcc or make not on PATH"}
    )
    entry["arm"] = arm_size(out, "model")
    dense = _dense_int8(state)
    if dense is not None:
        label, model = dense
        with tempfile.TemporaryDirectory(prefix="prunekit-c-") as tmp:
            other = export_c(model, tmp, calibration=[x_train])
            entry["dense"] = {"label": f"{label}-int8", **_summary(other), "arm": arm_size(tmp, "model")}
    if stage.name in state.metrics:
        state.metrics[stage.name]["c_export"] = entry
    else:
        log.info(
            "export %s: C export written to %s (no evaluate stage named %s to record it)",
            stage.name,
            out,
            stage.name,
        )
    return entry
