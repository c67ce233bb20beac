"""The quantize and export stages of a recipe run: INT8 conversion (after QAT fine-tuning when asked),
the safetensors artifact, the compressed artifact and the C99 export (prunekit.export.c)."""

from __future__ import annotations

from prunekit.artifact import plain_state_dict, save_artifact
from prunekit.compress import save_compressed
from prunekit.compress.inspect import inspect_compressed
from prunekit.compress.source import tensor_specs
from prunekit.jobs.recipe import ExportStage, QuantizeStage
from prunekit.jobs.stages.export_c import export_c_stage
from prunekit.jobs.stages.train import fit, keep_teacher
from prunekit.jobs.state import RunState
from prunekit.masking import get_masks
from prunekit.quant.ptq import int8_plan, quantize
from prunekit.quant.qat import convert_qat, prepare_qat


def quantize_stage(state: RunState, stage: QuantizeStage) -> None:
    """INT8 conversion (after fake-quant fine-tuning when ``qat`` is given); the masks are squashed
    into the int8 weights, so later evaluate stages measure the int8 model."""

    select = {"include": stage.include, "exclude": stage.exclude, "classifier": stage.classifier}
    calib = state.calibration(stage.calibration_batches) if stage.activations == "static" else None
    example = state.data.inputs("train", 2)  # the int8 model is test-run on it
    state.masks = get_masks(state.model)
    before = list(state.metrics)[-1] if state.metrics else None
    keep_teacher(state)
    if stage.qat is not None:
        prepare_qat(state.model, activations=stage.activations, calibration=calib, **select)
        fit(state, stage.qat, "quantization-aware fine-tuning")
        result = convert_qat(state.model, example=example)
    else:
        result = quantize(
            state.model, activations=stage.activations, calibration=calib, example=example, **select
        )
    state.model = result.model
    state.int8 = {"before": before, "after": None, "qat": stage.qat is not None, **result.summary()}


def export_stage(state: RunState, stage: ExportStage) -> None:
    path = state.out / f"{stage.name}.safetensors"
    extra = {"recipe": state.recipe.name, "stages": list(state.done)}
    state.sizes[stage.name] = save_artifact(
        path,
        state.model,
        model_info=state.model_info,
        specs=state.specs,
        extra=extra,
        structured=state.structured_logs,
    )
    if stage.compressed:
        target = state.out / f"{stage.name}.compressed.safetensors"
        weights = plain_state_dict(state.model)
        # what rebuilds the model, and where it came from; the stages done are in the artifact beside it
        extra = {
            "recipe": state.recipe.name,
            "source": path.name,
            "model": state.model_info,
            "structured": state.structured_logs,
        }
        if int8_plan(state.model):
            extra["int8"] = int8_plan(state.model)  # which layers to rebuild as int8 ones
        save_compressed(weights, target, specs=tensor_specs(state.specs, weights), extra=extra)
        state.compressed_sizes[stage.name] = target.stat().st_size

        totals = inspect_compressed(target)[1]
        parts = ("value_bytes", "index_bytes", "scale_bytes", "file_overhead_bytes", "dense_bytes")
        state.compressed_parts[stage.name] = {k: totals[k] for k in parts}
    if stage.c:  # OUT/<name>-c/: the INT8 model as C99 (prunekit.export.c), budgets in metrics[name]
        export_c_stage(state, stage)
