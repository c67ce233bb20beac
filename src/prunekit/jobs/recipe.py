"""Recipes: a pipeline of typed stages, the same in Python and YAML, validated strictly.

A typo in a key is an error naming the key and suggesting the right one; a wrong type or value names
its location (``stages[3].sparsity``). A key given twice in the YAML, an infinite or NaN number, a count
beyond sane bounds (``MAX_COUNT`` epochs, runs or batches) and a model that would not fit in memory to
train (its parameters built on the meta device: prunekit.limits) are errors too, before any work.

Recipes describe: the model source, the data, and stages run in order -- ``train`` (dense baseline),
``prune`` (with its schedule and fine-tuning between rounds), ``finetune``, ``quantize`` (INT8 after
pruning, optionally with quantization-aware fine-tuning), ``evaluate`` (metrics + latency under a label)
and ``export`` (an artifact file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit.allocate.latency import resolve_budget
from prunekit.data.images import ImageTransform
from prunekit.errors import PrunekitError, did_you_mean, unknown_name
from prunekit.limits import check_memory
from prunekit.models import MODELS, build_model
from prunekit.registry import ALLOCATIONS, CRITERIA, STRUCTURED_IMPORTANCE
from prunekit.schedule import make_schedule
from prunekit.spec import Unstructured
from prunekit.spec import parse as parse_spec

BUILTIN_DIR = Path(__file__).parent / "recipes"
MAX_COUNT = 1_000_000  # epochs, timed runs, batches: more is a typo (1e12 epochs), not a plan
MAX_SEED = 2**32 - 1  # NumPy's generators take seeds in [0, 2**32)
TRAIN_COPIES = 4  # what training holds per parameter: weights, gradients and two optimizer moments


class Strict(BaseModel):
    """Frozen, no unknown keys (with a did-you-mean suggestion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            for key in data:
                if key not in allowed:
                    hint = did_you_mean(key, allowed)
                    raise ValueError(f"unknown key '{key}'{hint}; allowed: {', '.join(sorted(allowed))}")
        return data


MODEL_SOURCES = ("builtin", "artifact", "factory", "torchvision", "hf")
DATA_SOURCES = ("name", "imagefolder", "hf_datasets", "factory")


def _one_of(data: Any, keys: tuple[str, ...], what: str) -> list[str]:
    given = [k for k in keys if isinstance(data, dict) and data.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"give one {what} source, not {' and '.join(given)}; allowed: {', '.join(keys)}")
    return given


def _reference(value: str | None, field: str) -> str | None:
    if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
        raise ValueError(f"{field} must be a reference 'package.module:function', got {value!r}")
    return value


def _check_size(name: str, args: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory) and refuse one that could not be trained here."""
    try:
        with torch.device("meta"):
            model = build_model(name, args)
    except PrunekitError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"model '{name}' cannot be built with args {args}: {first}") from None
    params = sum(p.numel() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_memory(
        TRAIN_COPIES * state,
        f"training model '{name}' with args {args} ({params:,} parameters, {TRAIN_COPIES}x for weights, "
        "gradients and optimizer state)",
    )


class ModelSource(Strict):
    """Where the model comes from: exactly one of ``builtin`` (a prunekit architecture, trained from
    scratch), ``artifact`` (a saved prunekit artifact), ``factory`` (``"package.module:function"`` in
    your code, imported from the working directory as Python would), ``torchvision`` (a model name,
    built without downloading weights) or ``hf`` (a folder saved with ``save_pretrained``).
    prunekit.models.sources builds the last three."""

    builtin: str | None = None  # a built-in architecture name (prunekit.models.MODELS), trained from scratch
    # constructor / factory / torchvision keyword arguments
    args: dict[str, Any] = Field(default_factory=dict)
    artifact: Path | None = None  # or: start from a saved prunekit artifact (weights, and masks if any)
    factory: str | None = None  # or: "package.module:function" returning a torch.nn.Module
    torchvision: str | None = None  # or: a torchvision.models name, e.g. resnet18 (args: num_classes, ...)
    hf: Path | None = None  # or: a local Hugging Face classifier folder (config.json + weights)
    # hf: the head (None: as config.json's architectures say; image-classification unless a
    # ...ForSequenceClassification is named)
    task: Literal["image-classification", "sequence-classification"] | None = None
    # factory / torchvision: a state dict to start from (.safetensors, or .pt/.pth read weights-only)
    weights: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if not _one_of(data, MODEL_SOURCES, "model") and isinstance(data, dict):
            raise ValueError(f"give one model source; allowed: {', '.join(MODEL_SOURCES)}")
        return data

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str | None) -> str | None:
        return _reference(value, "factory")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if self.artifact is not None and not self.artifact.is_file():
            raise ValueError(f"artifact file not found: {self.artifact}")
        if self.builtin is not None:
            MODELS.get(self.builtin)
            _check_size(self.builtin, self.args)
        if self.hf is not None and not (self.hf / "config.json").is_file():
            raise ValueError(f"hf: {self.hf} is not a saved Hugging Face model folder (no config.json)")
        if self.weights is not None:
            if self.factory is None and self.torchvision is None:
                raise ValueError(
                    "'weights' is for factory and torchvision models (hf folders hold their own)"
                )
            if not self.weights.is_file():
                raise ValueError(f"weights file not found: {self.weights}")
        if self.args and self.artifact is not None or self.args and self.hf is not None:
            raise ValueError("'args' is for builtin, factory and torchvision models")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in MODEL_SOURCES if getattr(self, k) is not None)


class Transforms(Strict):
    """Image transforms for imagefolder and hf_datasets images (prunekit.data.images)."""

    mode: Literal["RGB", "L"] = "RGB"  # 3 channels, or 1 (grayscale)
    resize: int | tuple[int, int] | None = None  # int: the shorter side; [h, w]: exactly
    center_crop: int | tuple[int, int] | None = None  # int: a square
    mean: list[float] | None = None  # normalize: (x - mean) / std per channel, x in [0, 1]
    std: list[float] | None = None

    @model_validator(mode="after")
    def _normalize(self) -> Transforms:
        if (self.mean is None) != (self.std is None):
            raise ValueError("normalize needs both 'mean' and 'std'")
        channels = 3 if self.mode == "RGB" else 1
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != channels:
                raise ValueError(
                    f"{name}: one value per channel, {channels} for mode {self.mode}, got {value}"
                )
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        for name in ("resize", "center_crop"):
            value = getattr(self, name)
            sizes = [value] if isinstance(value, int) else list(value or ())
            if any(v < 1 for v in sizes):
                raise ValueError(f"{name} must be positive pixel sizes, got {value}")
        return self

    def build(self) -> ImageTransform:
        crop = self.center_crop
        return ImageTransform(
            mode=self.mode,
            resize=self.resize,
            center_crop=(crop, crop) if isinstance(crop, int) else crop,
            mean=tuple(self.mean) if self.mean is not None else None,
            std=tuple(self.std) if self.std is not None else None,
        )


class DataSource(Strict):
    """The data: exactly one of ``name`` (``digits``, the default, or ``npz`` with ``path``: arrays in
    memory), ``imagefolder`` (a folder of class folders), ``hf_datasets`` (a folder saved by Hugging Face
    ``datasets``) or ``factory`` (``"package.module:function"`` returning DataLoaders). Folders are read
    as batches are needed (prunekit.data.sources), not loaded into memory."""

    name: Literal["digits", "npz"] | None = "digits"
    path: Path | None = None  # for npz: a file with arrays x and y
    imagefolder: Path | None = None  # DIR/<class>/*.png, or DIR/train/<class>/ with val/ and test/ beside
    hf_datasets: Path | None = None  # a datasets.save_to_disk folder (needs the datasets package)
    factory: str | None = None  # "package.module:function" -> {train, val, test[, num_classes]} DataLoaders
    args: dict[str, Any] | None = None  # factory keyword arguments
    transforms: Transforms | None = None  # imagefolder / hf_datasets images (None: RGB, as stored)
    input_column: str | None = None  # hf_datasets: the input column (default: image, img, pixel_values, x)
    label_column: str | None = None  # hf_datasets (None: "label")
    num_classes: int | None = Field(None, ge=2)  # factory: when its loaders do not say
    workers: int | None = Field(
        None, ge=0, le=256
    )  # DataLoader worker processes for imagefolder, hf_datasets
    # a split the source lacks is carved from its training data by these fractions (stratified, seeded)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    batch_size: int = Field(64, ge=1, le=MAX_COUNT)  # ignored by factory loaders (they batch themselves)

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if _one_of(data, DATA_SOURCES, "data") and data.get("name") is None:
            data = {**data, "name": None}  # another source: not the default digits
        return data

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str | None) -> str | None:
        return _reference(value, "factory")

    @model_validator(mode="after")
    def _path(self) -> DataSource:
        if self.name == "npz":
            if self.path is None:
                raise ValueError("data 'npz' needs a 'path'")
            if not self.path.is_file():
                raise ValueError(f"data file not found: {self.path}")
        elif self.path is not None:
            raise ValueError("'path' is for name: npz (imagefolder and hf_datasets name their folder)")
        for key in ("imagefolder", "hf_datasets"):
            folder = getattr(self, key)
            if folder is not None and not folder.is_dir():
                raise ValueError(f"{key}: folder not found: {folder}")
        if self.args and self.factory is None:
            raise ValueError("'args' is for a data factory")
        if self.hf_datasets is None and (self.input_column is not None or self.label_column is not None):
            raise ValueError("'input_column' and 'label_column' are for hf_datasets")
        if self.name is None and not any(getattr(self, k) is not None for k in DATA_SOURCES[1:]):
            raise ValueError(f"give one data source; allowed: {', '.join(DATA_SOURCES)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self

    @property
    def kind(self) -> str:
        return (
            next(k for k in DATA_SOURCES[1:] if getattr(self, k) is not None)
            if self.name is None
            else self.name
        )


class DistillCfg(Strict):
    """Knowledge distillation from the dense model (prunekit.recovery.distill): the teacher is a frozen
    copy of the model taken when the recipe's first prune / structured / quantize stage starts."""

    alpha: float = Field(0.9, ge=0, le=1)  # weight of the soft-target term (1 - alpha: the labels)
    temperature: float = Field(4.0, gt=0)
    features: list[str] = Field(default_factory=list)  # module names whose outputs are matched (MSE)
    feature_weight: float = Field(1.0, ge=0)


class Optim(Strict):
    epochs: int = Field(ge=0, le=MAX_COUNT)
    lr: float = Field(gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill: DistillCfg | None = None  # learn from the dense teacher too (not in the dense train stage)


class TrainStage(Optim):
    type: Literal["train"]

    @model_validator(mode="after")
    def _no_teacher(self) -> TrainStage:
        if self.distill is not None:
            raise ValueError(
                "'distill' needs a teacher: the dense model, copied when the first prune / structured / "
                "quantize stage starts; the dense 'train' stage has none (use it in a later 'finetune' "
                "or a prune stage's 'finetune')"
            )
        return self


class FinetuneStage(Optim):
    type: Literal["finetune"]


class Schedule(Strict):
    type: Literal["one-shot", "iterative", "agp"] = "one-shot"
    rate: float | None = Field(None, gt=0, lt=1)  # iterative: fraction of remaining weights per round
    start: int | None = Field(None, ge=0, le=2**62)  # agp: first pruning step
    end: int | None = Field(None, ge=1, le=2**62)  # agp: last pruning step
    every: int | None = Field(None, ge=1, le=2**62)  # agp: prune every k optimizer steps
    initial: float | None = Field(None, ge=0, lt=1)  # agp: starting sparsity

    @model_validator(mode="after")
    def _fields(self) -> Schedule:
        allowed = {"one-shot": set(), "iterative": {"rate"}, "agp": {"start", "end", "every", "initial"}}[
            self.type
        ]
        given = {k for k in ("rate", "start", "end", "every", "initial") if getattr(self, k) is not None}
        if given - allowed:
            raise ValueError(f"schedule '{self.type}' takes no {', '.join(sorted(given - allowed))}")
        if self.type == "agp" and self.end is None:
            raise ValueError("schedule 'agp' needs 'end' (the last pruning step)")
        return self

    def build(self):

        kwargs = {
            k: getattr(self, k)
            for k in ("rate", "start", "end", "every", "initial")
            if getattr(self, k) is not None
        }
        return make_schedule(self.type, **kwargs)


class TargetsCfg(Strict):
    types: list[str] = Field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d"])
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    prune_classifier: bool = False


class SensitivityCfg(Strict):
    """How ``allocation: sensitivity`` measures its curves (prunekit.analysis.sensitivity)."""

    grid: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    metric: Literal["accuracy", "loss"] = "accuracy"  # measured on the validation split
    batches: int | None = Field(
        None, ge=1, le=MAX_COUNT
    )  # validation batches per measurement (None: all of them)
    max_sparsity: float | None = Field(None, gt=0, lt=1)  # per-layer cap (None: the grid's largest)

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < s < 1 for s in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"grid must be increasing sparsities in (0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _cap(self) -> SensitivityCfg:
        if self.max_sparsity is not None and self.max_sparsity > self.grid[-1]:
            raise ValueError(
                f"max_sparsity {self.max_sparsity} is beyond the grid (largest {self.grid[-1]}): the curves "
                "say nothing there; add it to the grid"
            )
        return self


class L0Cfg(Strict):
    """Hard-concrete L0 gates (criterion 'l0', prunekit.criteria.l0)."""

    granularity: Literal["weight", "channel"] = "weight"  # one gate per weight, or per output unit
    penalty: float = Field(0.05, gt=0)  # lam in lam * N * (E[L0]/N - density)^2
    lr: float = Field(0.05, gt=0)  # Adam learning rate of the gates' log_alpha
    warmup: float = Field(0.75, ge=0, le=1)  # fraction of the fine-tuning steps the target falls over


class PruneStage(Strict):
    type: Literal["prune"]
    pattern: str | float  # "0.7" / "70%" (unstructured), "2:4" (N:M), "block:4x4@0.5"
    criterion: str = "magnitude"
    group: Literal["layer", "row", "global"] | None = None  # None: the criterion's own (wanda: row)
    schedule: Schedule = Field(default_factory=Schedule)
    targets: TargetsCfg = Field(default_factory=TargetsCfg)
    overrides: dict[str, str | float] = Field(default_factory=dict)  # layer-name glob -> pattern
    calibration_batches: int = Field(8, ge=1, le=MAX_COUNT)  # for taylor / obd / wanda
    finetune: Optim | None = None  # after each round (iterative) or during the schedule (agp)
    # per-layer sparsities, any "layers" allocation of prunekit.registry.ALLOCATIONS: 'uniform' (the
    # pattern's everywhere, or one global threshold with group: global), 'erk' (from the weight shapes,
    # RigL's), 'sensitivity' (measured per-layer curves -> least predicted loss at exactly the pattern's
    # sparsity overall; `sensitivity` configures the measurement), or your own (a name or module:attr)
    allocation: str = "uniform"
    sensitivity: SensitivityCfg | None = None
    l0: L0Cfg | None = None  # criterion 'l0': gate settings (defaults when left out)

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> Any:
        parse_spec(value)
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        for pattern in value.values():
            parse_spec(pattern)
        return value

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, value: str) -> str:
        CRITERIA.get(value)
        return value

    @model_validator(mode="after")
    def _agp_needs_training(self) -> PruneStage:
        if self.schedule.type == "agp" and self.finetune is None:
            raise ValueError("an 'agp' schedule prunes during training: give 'finetune'")
        if CRITERIA.get(self.criterion).needs == "training" and self.schedule.type != "agp":
            raise ValueError(
                f"criterion '{self.criterion}' scores weights while they train: it needs schedule "
                "'agp' (with 'finetune'), which prunes during training"
            )
        return self

    @model_validator(mode="after")
    def _learned_masks(self) -> PruneStage:
        if CRITERIA.get(self.criterion).needs != "gates":
            if self.l0 is not None:
                raise ValueError(f"'l0' settings need criterion 'l0', not '{self.criterion}'")
            return self
        if self.finetune is None or self.finetune.epochs == 0:
            raise ValueError(
                f"criterion '{self.criterion}' learns its masks while the model trains: give 'finetune' "
                "with epochs >= 1 (the gates train during it and become exact masks at its end)"
            )
        if self.schedule.type != "one-shot" or self.allocation != "uniform":
            raise ValueError(
                f"criterion '{self.criterion}': the density penalty is its schedule; use schedule "
                "'one-shot' and allocation 'uniform' (the defaults)"
            )
        if self.group == "row":
            raise ValueError(f"criterion '{self.criterion}' compares within a layer or globally, not per row")
        return self

    @field_validator("allocation")
    @classmethod
    def _allocation_name(cls, value: str) -> str:
        entry = ALLOCATIONS.get(value)
        if entry.applies_to != "layers":
            layers = [n for n in ALLOCATIONS.names() if ALLOCATIONS.get(n).applies_to == "layers"]
            raise ValueError(
                f"allocation '{value}' allocates {entry.applies_to}, not a prune stage's layers; "
                f"allowed: {', '.join(layers)}"
            )
        return value

    @model_validator(mode="after")
    def _per_layer_allocation(self) -> PruneStage:
        name = self.allocation
        if name != "sensitivity" and self.sensitivity is not None:
            raise ValueError(f"'sensitivity' settings need allocation 'sensitivity' (this one is {name})")
        if name == "uniform":
            return self
        if not isinstance(parse_spec(self.pattern), Unstructured):
            raise ValueError(
                f"allocation '{name}' chooses per-layer sparsities for an unstructured pattern; "
                f"'{self.pattern}' fixes its own layout (N:M or blocks)"
            )
        criterion = CRITERIA.get(self.criterion)
        if name == "sensitivity" and criterion.needs == "training":
            raise ValueError(
                f"allocation 'sensitivity' prunes without training to measure; criterion '{self.criterion}' "
                "scores weights while they train"
            )
        group = self.group or criterion.default_group
        if group != "layer":
            raise ValueError(
                f"allocation '{name}' sets each layer's sparsity, so weights compete within their "
                f"layer: use group 'layer' (or leave it out), not '{group}'"
            )
        if self.overrides:
            raise ValueError(f"allocation '{name}' sets every targeted layer's sparsity: no 'overrides'")
        return self


class StructuredStage(Strict):
    """Physically remove channels/neurons/heads (prunekit.structured), then optionally fine-tune."""

    type: Literal["structured"]
    # fraction of the units of every prunable group to remove (allocation 'uniform'; omit it for 'latency')
    ratio: float | None = Field(None, ge=0, lt=1)
    importance: str = "l2"  # l1, l2, bn_scale, fpgm, random; taylor, activation_mean, apoz (from data)
    round_to: int = Field(8, ge=1, le=MAX_COUNT)  # kept counts rounded to this multiple
    ignore: list[str] = Field(default_factory=list)  # module-name globs whose parameters must not change
    calibration_batches: int = Field(8, ge=1, le=MAX_COUNT)  # for the data-driven importances
    finetune: Optim | None = None
    # 'latency': per-group ratios chosen to meet target_latency as measured on this machine, with the least
    # predicted loss (prunekit.allocate.latency)
    allocation: Literal["uniform", "latency"] = "uniform"
    target_latency: float | str | None = None  # 0.6: 60% of the dense p50; "2.5ms": absolute (batch 1)
    latency_grid: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])  # ratios tried per group
    latency_runs: int = Field(60, ge=5, le=MAX_COUNT)  # timed calls per variant for the tables
    latency_passes: int = Field(3, ge=1, le=MAX_COUNT)  # times every variant is timed; the median is kept

    @field_validator("importance")
    @classmethod
    def _importance(cls, value: str) -> str:
        STRUCTURED_IMPORTANCE.get(value)  # a registered name, or a package.module:attribute reference
        return value

    @model_validator(mode="after")
    def _allocation(self) -> StructuredStage:
        if self.allocation == "uniform":
            if self.ratio is None:
                raise ValueError("allocation 'uniform' needs 'ratio' (fraction of units to remove)")
            if self.target_latency is not None:
                raise ValueError("'target_latency' is for allocation 'latency' (this stage is 'uniform')")
            return self
        if self.ratio is not None:
            raise ValueError("allocation 'latency' chooses the ratios itself: remove 'ratio'")
        if self.target_latency is None:
            raise ValueError("allocation 'latency' needs 'target_latency' (e.g. 0.6 or '2.5ms')")

        try:
            resolve_budget(self.target_latency, 1.0)
        except PrunekitError as exc:
            raise ValueError(str(exc)) from None
        if not self.latency_grid or any(not 0 < r < 1 for r in self.latency_grid):
            raise ValueError(f"latency_grid: ratios must be in (0, 1), got {self.latency_grid}")
        return self


class QuantizeStage(Strict):
    """INT8 weights (per output channel) and activations (per tensor): prunekit.quant.ptq and
    prunekit.quant.qat.

    After it the model is int8: only evaluate and export stages may follow.
    """

    type: Literal["quantize"]
    activations: Literal["static", "dynamic"] = "static"  # static: input scales calibrated once
    calibration_batches: int = Field(
        8, ge=1, le=MAX_COUNT
    )  # training batches for the static input scales (max |x|)
    classifier: bool = False  # also make the final classifier int8 (float32 by default)
    include: list[str] = Field(default_factory=list)  # module-name globs; empty: every Linear/Conv2d
    exclude: list[str] = Field(default_factory=list)
    qat: Optim | None = None  # fine-tune with fake quantization (masks kept) before converting


class EvaluateStage(Strict):
    type: Literal["evaluate"]
    label: str  # metrics.json key, e.g. "dense" or "pruned"
    latency_runs: int = Field(200, ge=1, le=MAX_COUNT)
    latency_warmup: int = Field(20, ge=0, le=MAX_COUNT)
    compile: bool = False  # also time the model compiled by prunekit.runtime (sparse kernels where faster)
    # also time, in the same run, what a user would deploy this (dense float) model with instead: torch's
    # x86 INT8, onnxruntime float32 and INT8 (prunekit.export.engines); rows skipped with a reason when
    # an engine is missing
    baselines: bool = False


class ExportStage(Strict):
    type: Literal["export"]
    name: str  # writes OUT/<name>.safetensors; an evaluate stage with the same label gets its size
    compressed: bool = False  # also OUT/<name>.compressed.safetensors (smallest encoding per tensor)
    c: bool = False  # also OUT/<name>-c/: the INT8 model as C99 + Makefile + budget.json (prunekit export c)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"export name must be a plain file stem, got {value!r}")
        return value


Stage = Annotated[
    TrainStage | PruneStage | StructuredStage | FinetuneStage | QuantizeStage | EvaluateStage | ExportStage,
    Field(discriminator="type"),
]
TEACHER_STAGES = ("prune", "structured", "quantize")  # the first of these copies the distillation teacher
STAGE_TYPES = ("train", "prune", "structured", "finetune", "quantize", "evaluate", "export")


class CheckpointCfg(Strict):
    """Checkpoints in ``OUT/checkpoint/`` for ``prunekit run --resume`` (prunekit.jobs.checkpoint): after
    every training/pruning stage and pruning round, and every ``every_steps`` optimizer steps inside training.
    Not part of the recipe's identity: a run may resume with other values here."""

    enabled: bool = True
    every_steps: int | None = Field(200, ge=1, le=2**62)  # None: only after stages and rounds


class Recipe(Strict):
    name: str = "recipe"
    description: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # torch intra-op threads for training and latency; None keeps torch's default (one per core). Small
    # models train fastest on one thread, and one thread stays fast when other processes share the CPU.
    threads: int | None = Field(None, ge=1, le=4096)
    model: ModelSource
    data: DataSource = Field(default_factory=DataSource)
    stages: list[Stage] = Field(min_length=1)
    checkpoint: CheckpointCfg = Field(default_factory=lambda: CheckpointCfg())

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_types(cls, value: Any) -> Any:
        for i, stage in enumerate(value if isinstance(value, list) else []):
            kind = stage.get("type") if isinstance(stage, dict) else None
            if kind not in STAGE_TYPES:
                raise ValueError(
                    f"stage {i}: 'type' must be one of {', '.join(STAGE_TYPES)}, got {kind!r}"
                    f"{did_you_mean(str(kind), STAGE_TYPES)}"
                )
        return value

    @model_validator(mode="after")
    def _distill_has_a_teacher(self) -> Recipe:
        """The teacher is the model as the first prune / structured / quantize stage finds it: a
        ``finetune`` stage before that has no teacher yet."""
        kinds = [stage.type for stage in self.stages]
        first = next((i for i, k in enumerate(kinds) if k in TEACHER_STAGES), len(kinds))
        for i, stage in enumerate(self.stages[:first]):
            if isinstance(stage, FinetuneStage) and stage.distill is not None:
                raise ValueError(
                    f"stages[{i}]: 'distill' needs a teacher, the model copied when the first prune / "
                    "structured / quantize stage starts; this finetune stage runs before any"
                )
        return self

    @model_validator(mode="after")
    def _c_export_needs_int8(self) -> Recipe:
        """``export: {c: true}`` (prunekit.export.c, integer-only) needs the model INT8 throughout by then:
        said when the recipe loads, not after the training."""
        quantize = None
        for i, stage in enumerate(self.stages):
            if isinstance(stage, QuantizeStage):
                quantize = stage
            int8 = quantize is not None and quantize.activations == "static" and quantize.classifier
            if isinstance(stage, ExportStage) and stage.c and not int8:
                raise ValueError(
                    f"stages[{i}]: export 'c: true' needs an earlier quantize stage with activations: "
                    "static and classifier: true (the C export runs integer-only, no float layer)"
                )
        return self


def _where(loc: tuple) -> str:
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STAGE_TYPES and isinstance(previous, int):
            pass  # the discriminator tag pydantic inserts after the stage index (not a 'finetune' field)
        else:
            out += f".{part}" if out else str(part)
        previous = part
    return out


def _one_line(exc: ValidationError, source: str) -> PrunekitError:
    first = exc.errors()[0]
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    where = _where(tuple(first.get("loc", ())))
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return PrunekitError(f"recipe {source}: {where + ': ' if where else ''}{message}{more}")


def from_dict(data: Any, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise PrunekitError(f"recipe {source}: must be a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently, so a
    pasted second ``lr:`` would override the first without a word). Merge keys (``<<``) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: the base class says so
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """YAML with the safe loader (no Python objects) and no repeated keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load(path: str | Path) -> Recipe:
    """Read a YAML recipe file (relative paths inside it are relative to the current directory)."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"recipe file not found: {path}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
        if problem and mark is not None:
            detail = f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
        else:
            detail = (str(exc).strip().splitlines() or ["unreadable"])[0]
        raise PrunekitError(f"recipe {path}: not valid YAML: {detail}") from None
    return from_dict(data, str(path))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def builtin_text(name: str) -> str:
    path = BUILTIN_DIR / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name("built-in recipe", name, builtin_names())
    return path.read_text(encoding="utf-8")


def load_builtin(name: str) -> Recipe:
    return from_dict(parse_yaml(builtin_text(name)), f"'{name}'")


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", exclude_none=True)
