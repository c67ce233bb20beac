"""``prunekit bench``: what a pruned model costs to run, for every way prunekit can deploy it, in one run.

Variants: ``dense`` (the dense artifact, when the source has one), ``pruned`` (zeros run through dense
kernels), ``pruned-int8`` (:func:`prunekit.quant.ptq.quantize_model`, dynamic activations), ``compiled``
and ``compiled-int8`` (:func:`prunekit.runtime.compile` of the two, decided per layer for each batch size
and thread count), and the dense engines a user would deploy instead (:mod:`prunekit.export.engines`, from
the dense artifact): ``torch-x86-int8``, ``onnxruntime-fp32``, ``onnxruntime-int8`` (skipped, with the
reason, when an engine is missing). For each thread count and batch size every variant is timed in one
interleaved run (:func:`prunekit.analysis.compare_latency`): p50/p99/mean latency and throughput. Size is
the file a user would ship (the dense artifact; the compressed artifact in float32 or int8 values; the ONNX
file; torch's int8 state dict). Peak RSS is measured for each of prunekit's variants in a fresh process,
since one process cannot un-see another variant's memory (not for the baselines).
"""

from __future__ import annotations

import gc
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit import runtime
from prunekit.analysis.latency import compare_latency
from prunekit.analysis.memory import current_rss_mb, peak_rss_mb
from prunekit.artifact import plain_state_dict, read_artifact
from prunekit.compress.container import save_compressed
from prunekit.compress.source import tensor_specs
from prunekit.errors import PrunekitError
from prunekit.export import engines
from prunekit.files import atomic_write_bytes, safetensors_metadata
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe
from prunekit.jobs.structured import load_model_spec
from prunekit.limits import check_input
from prunekit.quant.ptq import quantize_model

log = logging.getLogger(__name__)

# the dense engines a user would deploy instead (prunekit.export.engines), built from the dense artifact
BASELINES = engines.BASELINES
VARIANTS = ("dense", "pruned", "pruned-int8", "compiled", "compiled-int8", *BASELINES)


@dataclass(frozen=True)
class Source:
    """The artifacts to benchmark and the shape of one input (without the batch dimension). ``int8``: an
    INT8 artifact (a recipe's quantize stage, calibrated); without one the int8 variants quantize
    ``pruned`` with dynamic activations."""

    pruned: Path | None
    dense: Path | None
    sample_shape: tuple[int, ...]
    int8: Path | None = None

    def available(self, variant: str) -> bool:
        if variant == "dense" or variant in BASELINES:
            return self.dense is not None
        if variant.endswith("int8"):
            return self.int8 is not None or self.pruned is not None
        return self.pruned is not None


def resolve_source(source: str, out: Path, input_shape: tuple[int, ...] | None = None) -> Source:
    """``source``: a prunekit artifact (.safetensors), a recipe output directory (its ``dense`` export, its
    last other float export and its last INT8 export), a recipe YAML file or a built-in recipe name (run
    first, into ``out/run``)."""

    path = Path(source)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        path = _run_recipe(recipe.load(path), out)
    elif not path.exists() and source in recipe.builtin_names():
        path = _run_recipe(recipe.load_builtin(source), out)
    if path.is_dir():
        pruned, int8, dense = _exports(path)
    elif path.is_file() and path.suffix == ".safetensors":
        pruned, int8, dense = (None, path, None) if _is_int8(path) else (path, None, None)
    else:
        raise PrunekitError(
            f"bench: {source!r} is not a .safetensors artifact, a recipe output directory, a recipe "
            f"YAML file or a built-in recipe ({', '.join(recipe.builtin_names())})"
        )
    shape = _sample_shape(pruned or int8, input_shape)
    return Source(pruned=pruned, dense=dense, sample_shape=shape, int8=int8)


def _run_recipe(rec, out: Path) -> Path:

    run_dir = out / "run"
    log.info("bench: running recipe %s into %s first", rec.name, run_dir)
    run_recipe(rec, run_dir, progress=False, force=True)  # OUT/run is bench's own: rerunning replaces it
    return run_dir


def _is_int8(path: Path) -> bool:

    try:
        header = json.loads(safetensors_metadata(path).get("prunekit", "{}"))
    except (PrunekitError, ValueError):
        return False  # not readable as an artifact: loading it reports why
    return isinstance(header, dict) and bool(header.get("int8"))


def _exports(directory: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(last float export that is not ``dense``, last INT8 export, ``dense.safetensors``) of a recipe's
    output directory; compressed files are for shipping, not for loading back here."""
    metrics = directory / "metrics.json"
    names: list[str] = []
    if metrics.is_file():
        stages = json.loads(metrics.read_text()).get("recipe", {}).get("stages", [])
        names = [s["name"] for s in stages if s.get("type") == "export"]
    files = [directory / f"{n}.safetensors" for n in names if n != "dense"]
    files = [p for p in files if p.is_file()]
    if not files:
        files = sorted(
            p
            for p in directory.glob("*.safetensors")
            if p.name != "dense.safetensors" and not p.name.endswith(".compressed.safetensors")
        )
    floats = [p for p in files if not _is_int8(p)]
    int8 = [p for p in files if p not in floats]
    if not files:
        raise PrunekitError(f"bench: {directory} holds no pruned artifact (*.safetensors besides dense)")
    dense = directory / "dense.safetensors"
    return (floats or [None])[-1], (int8 or [None])[-1], dense if dense.is_file() else None


def _sample_shape(artifact: Path, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:

    full = (1, *input_shape[1:]) if input_shape else None
    _, example = load_model_spec(str(artifact), full)
    return tuple(example.shape[1:])


def load_variant(source: Source, name: str) -> nn.Module:
    """One uncompiled variant as an eval-mode module (``compiled*`` are built per batch by :func:`bench`)."""

    if name not in VARIANTS:
        raise PrunekitError(f"bench: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    if not source.available(name):
        raise PrunekitError(f"bench: this source has no artifact for the '{name}' variant")
    shape = (1, *source.sample_shape)
    if name == "dense":
        return load_model_spec(str(source.dense), shape)[0]
    if name.endswith("int8") and source.int8 is not None:
        return load_model_spec(str(source.int8), shape)[0]
    pruned = load_model_spec(str(source.pruned), shape)[0]
    if name.endswith("int8"):
        return quantize_model(pruned, activations="dynamic").eval()
    return pruned


def _compile(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[dict], float]:
    start = time.perf_counter()
    compiled = runtime.compile(model, (example,))
    seconds = time.perf_counter() - start
    return compiled, [asdict(d) for d in runtime.report(compiled).layers], seconds


def sizes(source: Source) -> dict[str, int]:
    """Bytes of the file each variant ships as: the dense artifact; the pruned and INT8 models (the very
    models timed) compressed, each tensor in its smallest encoding under its layer's spec. The compiled
    variants load from those same files."""

    out: dict[str, int] = {}
    if source.dense is not None:
        out["dense"] = source.dense.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("pruned", "pruned-int8"):
            if not source.available(label):
                continue
            state = plain_state_dict(load_variant(source, label))
            artifact = source.int8 if label == "pruned-int8" and source.int8 else source.pruned
            specs = tensor_specs(read_artifact(artifact)[1].specs, state)
            path = save_compressed(state, Path(tmp) / f"{label}.safetensors", value_dtype="keep", specs=specs)
            out[label] = out[label.replace("pruned", "compiled")] = path.stat().st_size
    return out


def peak_rss(source: Source, name: str, batch: int, runs: int, timeout_s: float = 600) -> dict[str, float]:
    """Memory of a fresh process that builds one variant (loads; quantizes or compiles it) and runs it
    ``runs`` times: ``load_peak_rss_mb`` while building, ``peak_rss_mb`` while running (the high-water
    mark is reset in between, after the build's temporaries are freed), ``baseline_rss_mb`` after imports."""
    args = {
        "paths": {k: str(v) if v else None for k, v in _paths(source).items()},
        "shape": list(source.sample_shape),
        "variant": name,
        "batch": batch,
        "runs": runs,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "prunekit.jobs.bench", json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise PrunekitError(f"bench: the memory probe for '{name}' took over {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrunekitError(f"bench: the memory probe for '{name}' failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_child(args: dict[str, Any]) -> dict[str, float]:

    torch.set_num_threads(1)
    paths = {k: Path(v) if v else None for k, v in args["paths"].items()}
    source = Source(sample_shape=tuple(args["shape"]), **paths)
    baseline = current_rss_mb() or 0.0
    example = torch.randn(args["batch"], *source.sample_shape)
    model = load_variant(source, args["variant"])
    if args["variant"].startswith("compiled"):
        model = _compile(model, example)[0]  # the uncompiled model it copied is dropped here
    gc.collect()
    load_peak = peak_rss_mb()
    reset = _reset_peak()
    with torch.inference_mode():
        for _ in range(args["runs"]):
            model(example)
    run_peak = peak_rss_mb()
    return {
        "peak_rss_mb": run_peak if reset else max(run_peak, load_peak),
        "load_peak_rss_mb": load_peak,
        "baseline_rss_mb": baseline,
    }


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux: ``clear_refs`` value 5); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def bench(
    source: Source,
    batches: Sequence[int] = (1, 8),
    threads: Sequence[int] = (1, 2),
    runs: int = 500,
    warmup: int = 30,
    variants: Sequence[str] = VARIANTS,
    memory: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure every variant; returns the JSON-ready table (see the module docstring). ``progress``: a
    bar over the thread x batch settings and the memory probes."""

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise PrunekitError(f"bench: unknown variants {unknown}; allowed: {', '.join(VARIANTS)}")
    _check_positive(batches, "--batch")
    _check_positive(threads, "--threads")
    if runs < 10:
        raise PrunekitError(f"bench: --runs must be >= 10 for a meaningful p99, got {runs}")
    missing = [v for v in variants if not source.available(v)]
    variants = [v for v in variants if source.available(v)]
    if missing:
        log.warning("bench: the source has no artifact for %s; measuring %s", missing, variants)
    if not variants:
        raise PrunekitError(
            f"bench: none of the variants asked for ({', '.join(missing) or 'none'}) can be built from this "
            "source (dense needs a dense artifact; pruned/compiled a float pruned one)"
        )
    base = {
        v: load_variant(source, v) for v in variants if not v.startswith("compiled") and v not in BASELINES
    }
    for v in variants:  # the compiled variants start from their uncompiled twin
        if v.startswith("compiled"):
            twin = v.replace("compiled", "pruned")
            base.setdefault(twin, load_variant(source, twin))
    for model in base.values():  # the largest batch, before any example is allocated
        check_input(model, (max(batches), *source.sample_shape), f"--batch {max(batches)} x --input-shape")
    workdir = tempfile.TemporaryDirectory(prefix="prunekit-bench-")
    found = _baselines(source, [v for v in variants if v in BASELINES], workdir.name)
    reasons = {b.name: b.skipped for b in found if b.skipped}
    variants = [v for v in variants if v not in reasons]
    rows: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    previous = torch.get_num_threads()
    own = [v for v in variants if v not in BASELINES]
    bar = tqdm(
        total=len(threads) * len(batches) + (len(own) if memory else 0),
        desc="bench",
        unit="setting",
        disable=not progress,
    )
    try:
        for t in threads:
            torch.set_num_threads(t)
            for b in batches:
                example = torch.randn(b, *source.sample_shape, generator=torch.Generator().manual_seed(b))
                models: dict[str, nn.Module] = {}
                for v in variants:
                    if v in BASELINES:  # onnxruntime sessions take their thread count when made
                        m = next(x.model for x in found if x.name == v)
                        models[v] = engines.OrtModule(m.path, t) if isinstance(m, engines.OrtModule) else m
                    elif v.startswith("compiled"):
                        twin = base[v.replace("compiled", "pruned")]
                        compiled, report, seconds = _compile(twin, example)  # compile copies
                        models[v] = compiled
                        with torch.inference_mode():
                            diff = float((compiled(example) - twin(example)).abs().max())
                        entry = {"variant": v, "threads": t, "batch": b, "seconds": seconds, "layers": report}
                        decisions.append({**entry, "max_abs_diff_vs_uncompiled": diff})
                    else:
                        models[v] = base[v]
                stats = compare_latency(models, example, runs=runs, warmup=warmup)
                for v, s in stats.items():
                    rows.append(
                        {
                            "variant": v,
                            "threads": t,
                            "batch": b,
                            "p50_ms": s["p50"],
                            "p99_ms": s["p99"],
                            "mean_ms": s["mean"],
                            "throughput_per_s": b / (s["mean"] / 1e3),
                            "p50_vs_first": s["p50_ratio"],
                            "runs": s["runs"],
                        }
                    )
                bar.update(1)
    finally:
        torch.set_num_threads(previous)
        workdir.cleanup()
    size = sizes(source)
    for x in found:
        if not x.skipped:
            size[x.name] = x.size_bytes if x.size_bytes is not None else _state_bytes(x.model)
    rss = {}
    for v in own if memory else ():
        rss[v] = peak_rss(source, v, max(batches), min(runs, 100))
        bar.update(1)
    bar.close()
    return {
        "source": {k: str(v) if v else None for k, v in _paths(source).items()},
        "int8_from": (
            f"{source.int8} (as the recipe quantized it)"
            if source.int8
            else "quantize_model(pruned, activations='dynamic')"
        ),
        "sample_shape": list(source.sample_shape),
        "variants": list(variants),
        "skipped": missing + sorted(reasons),
        "skipped_reasons": reasons,
        "engines": {x.name: x.engine for x in found},
        "runs": runs,
        "warmup": warmup,
        "size_bytes": {v: size[v] for v in variants},
        "peak_rss_mb": rss,
        "rows": rows,
        "compile": decisions,
        "environment": {"torch": torch.__version__, "baseline": variants[0]},
    }


def _baselines(source: Source, names: list[str], workdir: str) -> list[engines.Baseline]:
    """The dense engine baselines of the dense artifact, calibrated on seeded random inputs (they are
    speed references here: the values calibrated on do not change their speed)."""
    if not names:
        return []
    dense = load_variant(source, "dense")
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, *source.sample_shape, generator=gen) for _ in range(4)]
    example = torch.randn(1, *source.sample_shape, generator=gen)
    return engines.dense_baselines(dense, example, calibration, workdir, tuple(names))


def _state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def _paths(source: Source) -> dict[str, Path | None]:
    return {"pruned": source.pruned, "dense": source.dense, "int8": source.int8}


def _check_positive(values: Sequence[int], field: str) -> None:
    if not values or any(v < 1 for v in values):
        raise PrunekitError(f"bench: {field} takes positive integers such as 1,8; got {list(values)}")


def table(result: dict[str, Any]) -> str:
    """The measurements as a fixed-width text table."""
    first = result["variants"][0]
    lines = [
        f"{'variant':<17} {'thr':>3} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} "
        f"{'items/s':>10} {'p50 vs ' + first:>16} {'size B':>10} {'peak RSS MB':>11}"
    ]
    for r in result["rows"]:
        rss = result["peak_rss_mb"].get(r["variant"])
        peak = "-" if not rss else f"{rss['peak_rss_mb']:.0f}"  # "-": not measured (--no-memory)
        lines.append(
            f"{r['variant']:<17} {r['threads']:>3} {r['batch']:>5} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} "
            f"{r['mean_ms']:>9.3f} {r['throughput_per_s']:>10.0f} {r['p50_vs_first']:>15.2f}x "
            f"{result['size_bytes'][r['variant']]:>10,} {peak:>11}"
        )
    lines.append(
        f"{result['runs']} timed runs per variant and setting after {result['warmup']} warm-up runs, "
        "interleaved in blocks (p99: the 99th percentile of those runs); peak RSS: a fresh process each, "
        "while running (after building)"
    )
    for name, why in result.get("skipped_reasons", {}).items():
        lines.append(f"{name} skipped: {why}")
    if any(v in BASELINES for v in result["variants"]):
        lines.append(
            "dense baselines (from the dense artifact): "
            + "; ".join(f"{k} = {v}" for k, v in result.get("engines", {}).items())
            + "; speed references, their accuracy is not measured"
        )
    if "pruned-int8" in result["variants"]:
        lines.append(
            "pruned-int8 runs prunekit's reference int8 layers (exact integer products in float64): it "
            "checks the arithmetic, it is not an int8 kernel's speed; compiled-int8 is the runtime's kernels"
        )
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars of p50 and p99 latency (two panels, each on its own scale) per setting, written
    atomically."""

    import matplotlib

    matplotlib.use("Agg")  # no display needed; also keeps a user's interactive backend out of it
    import matplotlib.pyplot as plt

    settings = sorted({(r["threads"], r["batch"]) for r in result["rows"]})
    variants = result["variants"]
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3.2 * len(settings)), 4))
    for ax, key, title in zip(axes, ("p50_ms", "p99_ms"), ("median (p50)", "tail (p99)")):
        for i, v in enumerate(variants):
            by = {(r["threads"], r["batch"]): r[key] for r in result["rows"] if r["variant"] == v}
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(settings))]
            ax.bar(xs, [by[s] for s in settings], width, label=v)
        ax.set_xticks(range(len(settings)), [f"{t} thr\nbatch {b}" for t, b in settings])
        ax.set_ylabel("ms")
        ax.set_title(f"latency, {title}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"prunekit bench: {result['runs']} interleaved runs per bar")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":  # the fresh process behind peak_rss(); its one line of JSON is the protocol
    print(json.dumps(_rss_child(json.loads(sys.argv[1]))))
