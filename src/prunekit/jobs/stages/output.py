"""The quantize and export stages of a recipe run: INT8 conversion (after QAT fine-tuning when asked),
the safetensors artifact, the compressed artifact and the C99 export (prunekit.export.c)."""

from __future__ import annotations

from prunekit.artifact import plain_state_dict, save_artifact
from prunekit.compress import save_compressed
from prunekit.compress.inspect import inspect_compressed
from prunekit.compress.source import tensor_specs
from prunekit.jobs.export_c import export_c_stage
from prunekit.jobs.recipe import ExportStage, QuantizeStage
from prunekit.masking import get_masks
from prunekit.quant.ptq import int8_plan, quantize
from prunekit.quant.qat import convert_qat, prepare_qat


class OutputStages:
    """The quantize and export stages of a :class:`prunekit.jobs.run.Run`."""

    def quantize(self, stage: QuantizeStage) -> None:
        """INT8 conversion (after fake-quant fine-tuning when ``qat`` is given); the masks are squashed
        into the int8 weights, so later evaluate stages measure the int8 model."""

        select = {"include": stage.include, "exclude": stage.exclude, "classifier": stage.classifier}
        calib = self._calibration(stage.calibration_batches) if stage.activations == "static" else None
        example = self.data.train[: min(2, len(self.data.train))][0]  # the int8 model is test-run on it
        self.masks = get_masks(self.model)
        before = list(self.metrics)[-1] if self.metrics else None
        self._keep_teacher()
        if stage.qat is not None:
            prepare_qat(self.model, activations=stage.activations, calibration=calib, **select)
            self._fit(stage.qat, "quantization-aware fine-tuning")
            result = convert_qat(self.model, example=example)
        else:
            result = quantize(
                self.model, activations=stage.activations, calibration=calib, example=example, **select
            )
        self.model = result.model
        self.int8 = {"before": before, "after": None, "qat": stage.qat is not None, **result.summary()}

    def export(self, stage: ExportStage) -> None:
        path = self.out / f"{stage.name}.safetensors"
        extra = {"recipe": self.recipe.name, "stages": list(self.done)}
        self.sizes[stage.name] = save_artifact(
            path,
            self.model,
            model_info=self.model_info,
            specs=self.specs,
            extra=extra,
            structured=self.structured_logs,
        )
        if stage.compressed:
            target = self.out / f"{stage.name}.compressed.safetensors"
            state = plain_state_dict(self.model)
            extra = {**extra, "model": self.model_info, "structured": self.structured_logs}
            if int8_plan(self.model):
                extra["int8"] = int8_plan(self.model)  # which layers to rebuild as int8 ones
            save_compressed(state, target, specs=tensor_specs(self.specs, state), extra=extra)
            self.compressed_sizes[stage.name] = target.stat().st_size

            totals = inspect_compressed(target)[1]
            parts = ("value_bytes", "index_bytes", "scale_bytes", "file_overhead_bytes", "dense_bytes")
            self.compressed_parts[stage.name] = {k: totals[k] for k in parts}
        if stage.c:  # OUT/<name>-c/: the INT8 model as C99 (prunekit.export.c), budgets in metrics[name]
            export_c_stage(self, stage)
