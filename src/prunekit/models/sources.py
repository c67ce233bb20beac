"""The user's own model, from where it lives: a function in their code, torchvision, or a Hugging Face
model saved in a local folder. Nothing is downloaded: torchvision models are built without pretrained
weights (give ``weights: FILE``), Hugging Face ones load with ``local_files_only``.

Each source also gives the model's *info* (``{"name": "@<kind>:<what>", "args": {...}}``), which rebuilds
the architecture (without the weights) for checkpoints and artifacts: :func:`rebuild`. The ``@`` keeps these
names apart from registered model names and from ``module:Class`` references (no module name starts
with ``@``). A ``factory:``
info runs the user's code, so it is rebuilt only where the caller allows it (a run resuming its own
recipe), never because an artifact file says so (loading an artifact must not run code).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prunekit.errors import PrunekitError, unknown_name
from prunekit.registry import resolve_reference

KINDS = ("factory", "torchvision", "hf")
PREFIX = "@"  # info names are "@factory:pkg.mod:fn", "@torchvision:resnet18", "@hf:<task>"


def is_source_name(name: str) -> bool:
    """Whether a model name (an artifact header's, a checkpoint's) was recorded by a model source."""
    return isinstance(name, str) and name.startswith(PREFIX)


HF_TASKS = {
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
}


class Logits(nn.Module):
    """A Hugging Face classifier as a plain ``model(x) -> logits`` module: images as ``pixel_values``,
    token ids (any dtype, cast to long) as ``input_ids``."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "sequence-classification":
            return self.model(input_ids=x.long()).logits
        return self.model(pixel_values=x).logits


def load_weights(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    """Load a state dict from ``.safetensors`` or a ``torch.save`` file (tensors only: ``weights_only``,
    so the file cannot run code); every key must fit."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"{what}.weights: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(f"{what}.weights: cannot read {path}: {first}") from None
    if not isinstance(state, dict):
        raise PrunekitError(f"{what}.weights: {path} must hold a state dict, got {type(state).__name__}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise PrunekitError(
            f"{what}.weights: {path} does not fit the model: {lines[0] if lines else exc}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise PrunekitError(
            f"{what}.weights: {path} does not fit the model: {len(result.missing_keys)} missing key(s) "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected (e.g. "
            f"{result.unexpected_keys[:2]})"
        )
    return model


def factory_model(reference: str, args: dict[str, Any] | None = None) -> nn.Module:
    """``function(**args)`` from ``"package.module:function"``, imported from the working directory."""
    fn = resolve_reference(reference, "model.factory")
    if not callable(fn):
        raise PrunekitError(f"model.factory '{reference}': {type(fn).__name__} is not a function")
    model = fn(**(args or {}))
    if not isinstance(model, nn.Module):
        raise PrunekitError(
            f"model.factory '{reference}' must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model


def torchvision_model(name: str, args: dict[str, Any] | None = None) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **args)`` (e.g. ``num_classes``)."""
    try:
        import torchvision
    except ImportError:
        raise PrunekitError(
            "model.torchvision needs the 'torchvision' package, which is not installed (pip install "
            "torchvision, the build matching your torch)"
        ) from None
    names = torchvision.models.list_models()
    if name not in names:
        raise unknown_name("torchvision model", name, names)
    if "weights" in (args or {}):
        raise PrunekitError(
            "model.args: no 'weights' for torchvision (nothing is downloaded); use model.weights"
        )
    try:
        return torchvision.models.get_model(name, weights=None, **(args or {}))
    except TypeError as exc:
        raise PrunekitError(
            f"model.torchvision '{name}': bad arguments {sorted(args or {})}: {exc}"
        ) from None


def _auto_class(task: str) -> Any:
    import transformers

    if task not in HF_TASKS:
        raise PrunekitError(f"model.task: unknown '{task}'; allowed: {', '.join(HF_TASKS)}")
    return getattr(transformers, HF_TASKS[task])


def hf_task(directory: Path) -> str:
    """The head a saved model was configured with: ``sequence-classification`` when its config.json's
    ``architectures`` name a ``...ForSequenceClassification``, else ``image-classification``."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrunekitError(f"model.hf: cannot read {directory / 'config.json'}: {exc}") from None
    names = config.get("architectures") or [] if isinstance(config, dict) else []
    sequence = any(str(n).endswith("ForSequenceClassification") for n in names)
    return "sequence-classification" if sequence else "image-classification"


def hf_model(directory: str | Path, task: str | None = None) -> tuple[nn.Module, dict[str, Any], str]:
    """A classifier saved with ``save_pretrained`` in ``directory`` (config.json and weights), loaded
    offline, wrapped in :class:`Logits`; with the config that rebuilds it and the task (``None``: as its
    config.json says, :func:`hf_task`)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise PrunekitError(f"model.hf: {directory} is not a saved Hugging Face model (no config.json)")
    task = task or hf_task(directory)
    auto = _auto_class(task)
    try:
        model = auto.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise PrunekitError(f"model.hf: cannot load {directory} as {HF_TASKS[task]}: {first}") from None
    return Logits(model.eval(), task), model.config.to_dict(), task


def rebuild(info: dict[str, Any], allow_code: bool = False) -> nn.Module:
    """The architecture ``info`` (from :func:`build`) describes, with fresh weights. ``@factory:`` infos
    import and call the user's function: only with ``allow_code`` (never for a file's header)."""
    kind, _, what = str(info.get("name", "")).removeprefix(PREFIX).partition(":")
    args = dict(info.get("args") or {})
    if kind == "factory":
        if not allow_code:
            raise PrunekitError(
                f"the model was made by the function '{what}': rebuilding it would run that code, which an "
                "artifact never does; pass the model to load into (load_artifact(path, model=...))"
            )
        return factory_model(what, args)
    if kind == "torchvision":
        return torchvision_model(what, args)
    if kind == "hf":
        import transformers

        config = dict(args["config"])
        config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
        return Logits(_auto_class(what).from_config(config), what)
    raise PrunekitError(f"unknown model source '{kind}'; allowed: {', '.join(KINDS)}")


def build(
    kind: str,
    what: str,
    args: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    task: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, info)`` from a source: ``factory`` (``what``: a reference), ``torchvision`` (a model
    name) or ``hf`` (a folder; ``task`` picks the head, ``None``: the one its config names); then
    ``weights``, if given."""
    if kind == "factory":
        model, info = factory_model(what, args), {"name": f"@factory:{what}", "args": dict(args or {})}
    elif kind == "torchvision":
        model, info = (
            torchvision_model(what, args),
            {"name": f"@torchvision:{what}", "args": dict(args or {})},
        )
    elif kind == "hf":
        model, config, task = hf_model(what, task)
        info = {"name": f"@hf:{task}", "args": {"config": config}}
    else:
        raise PrunekitError(f"unknown model source '{kind}'; allowed: {', '.join(KINDS)}")
    if weights is not None:
        load_weights(model, weights, "model")
    return model, info
