"""Prune a Hugging Face checkpoint on disk without ever holding the model: block by block, in its dtype.

:func:`prune_pretrained` reads the checkpoint lazily (:class:`~prunekit.llm.checkpoint.Checkpoint`), builds
the model with no weights (:func:`~prunekit.llm.stream.skeleton`) and runs the same block runner and the
same methods as :func:`prunekit.llm.prune.prune_llm`: each block is read when the runner reaches it, pruned,
written to its own output shard and freed. Peak memory is one block with its statistics and the
calibration activations, plus, while the first block's inputs are captured and at the end, the tensors
outside the blocks (embeddings, LM head); it does not grow with depth.

The output directory holds ``model-*-of-*.safetensors`` shards (one per block, one for everything else),
``model.safetensors.index.json`` and the source's ``config.json``: ``AutoModelForCausalLM.from_pretrained``
loads it as is, in the checkpoint's own dtype. Every tensor but the pruned linear weights is copied from
the source bit for bit.

An interrupted run (a crash, a kill) continues with ``resume=True`` from the block after the last one
written (:mod:`prunekit.llm.resume`) and ends with the same files as an uninterrupted run would have.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from prunekit.calib.blocks import find_blocks, linear_layers
from prunekit.calib.sequential import AfterVisit, Progress, RunTimes
from prunekit.errors import PrunekitError
from prunekit.llm.checkpoint import Checkpoint, ShardWriter
from prunekit.llm.prune import (
    LLMPruneConfig,
    check_calibration,
    check_fits,
    owl_block_sparsities,
    owl_specs,
    prune_blocks,
    times_info,
)
from prunekit.llm.resume import ResumeState, tensor_digest
from prunekit.llm.stream import StreamedBlocks, skeleton
from prunekit.spec import Spec

COPIED = ("config.json", "generation_config.json")  # written by save_pretrained next to the weights


def _fingerprint(
    source: Path, checkpoint: Checkpoint, config: LLMPruneConfig, calib: torch.Tensor | None
) -> dict[str, Any]:
    files = sorted(set(checkpoint.files.values()))
    return {
        "source": str(source.resolve()),
        "source_files": {name: (source / name).stat().st_size for name in files},
        "method": config.method,
        "pattern": config.spec.to_dict(),
        "config": {k: v for k, v in asdict(config).items() if k not in ("spec", "options")},
        "options": repr(sorted(dict(config.options).items())),
        "calibration": tensor_digest(calib),
        "dtype": str(checkpoint.dtype()),
    }


def _check_out(out: Path, resume: bool, state: ResumeState) -> None:
    if state.exists():
        if not resume:
            raise PrunekitError(
                f"{out} holds an interrupted run: pass --resume (resume=True) to continue it, or delete it"
            )
        return
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"{out} exists and is not a directory")
    if not resume and out.exists() and any(out.iterdir()):  # resuming a run killed before its first block
        raise PrunekitError(f"{out} exists and is not an empty directory; give a new output directory")


def zero_counts_on_disk(directory: Path, source: StreamedBlocks) -> dict[str, tuple[int, int]]:
    """``(exact zeros, weights)`` of every prunable linear layer of the blocks, read one tensor at a time
    from the checkpoint in ``directory`` (the output, or the source: the names are the same)."""
    written = Checkpoint(directory)
    model = source.materialiser.model
    counts: dict[str, tuple[int, int]] = {}
    for index in range(source.count):
        block = model.get_submodule(f"{source.blocks_path}.{index}")
        for name in linear_layers(block):
            full = f"{source.blocks_path}.{index}.{name}"
            key = source.materialiser.key[f"{full}.weight"]
            weight = written.read([key])[key]
            counts[full] = (int((weight == 0).sum()), weight.numel())
    return counts


def prune_pretrained(
    source: str | Path,
    out: str | Path,
    calib: torch.Tensor | None,
    config: LLMPruneConfig,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: Progress | None = None,
    owl_progress: Progress | None = None,
    time_dense: bool = True,
    keep_state: bool = False,
    after_visit: AfterVisit | None = None,
    dense_outputs: bool = False,
) -> dict[str, Any]:
    """Prune the checkpoint in ``source`` (a Hugging Face directory with safetensors weights) into ``out``.

    ``calib`` is ``(N, L)`` token ids (not needed for plain magnitude); each block runs on ``device``.
    ``out`` must be new or empty, unless ``resume`` continues the interrupted run it holds (same source,
    method, pattern and calibration tokens, else an error; with no run saved there, one starts). With
    ``time_dense`` the runner also times one dense forward pass over ``calib`` (the baseline of
    ``info["times"]``). ``keep_state`` leaves the resume files (with the returned info) until the caller
    removes ``out/.resume``. Returns the run's info: block targets, OWL ratios, times, zero counts read
    back from ``out``. ``after_visit`` / ``dense_outputs``: the runner's per-block hook (see
    :func:`prunekit.calib.sequential.sequential`); a resumed run calls it for the remaining blocks only.
    """
    source, out = Path(source), Path(out)
    checkpoint = Checkpoint(source)
    dtype = checkpoint.dtype()
    model = skeleton(source, dtype)
    path, count = check_fits(model, config)
    check_calibration(calib, config)
    state = ResumeState(out)
    fingerprint = _fingerprint(source, checkpoint, config, calib)
    _check_out(out, resume, state)
    if state.exists():
        state.check(fingerprint)
        run = state.run()
        if "info" in run and ShardWriter(out, count + 1).done(count):
            if not keep_state:
                state.remove()
            return run["info"]
    else:
        state.start(fingerprint)
        run = state.run()

    writer = ShardWriter(out, count + 1)  # a shard per block, then one for everything outside the blocks
    reader = StreamedBlocks(model, checkpoint, path, count)
    if not writer.done(count):
        writer.write(count, reader.outside_tensors())

    info: dict[str, Any] = {"blocks": path, "block_count": count, "dtype": str(dtype).removeprefix("torch.")}
    specs: list[Spec] = [config.spec] * count
    owl_seconds = 0.0
    if config.owl:
        assert calib is not None
        if "owl" not in run:
            began = time.perf_counter()
            sparsities, ratios = owl_block_sparsities(
                model, calib, config, owl_progress, source=reader, device=device
            )
            owl = {"m": config.owl_m, "lambda": config.owl_lambda, "outlier_ratios": ratios}
            state.update(owl={**owl, "sparsities": sparsities, "seconds": time.perf_counter() - began})
            run = state.run()
        owl = dict(run["owl"])
        sparsities, owl_seconds = owl.pop("sparsities"), owl.pop("seconds")
        specs = owl_specs(config.spec, sparsities)
        info["owl"] = owl
    info["block_sparsity_targets"] = [getattr(s, "sparsity", None) for s in specs]

    start, inputs, before = state.load_inputs() if config.needs_data else (0, None, {})
    info["resumed_at_block"] = start

    def block_done(index: int, next_inputs: torch.Tensor | None, times: RunTimes) -> None:
        if next_inputs is None:
            return  # the last block: the run is complete once the index is written
        so_far = {
            "work": before.get("work", 0.0) + times.capture_seconds + sum(times.block_seconds),
            "dense_blocks": before.get("dense_blocks", 0.0) + times.dense_block_seconds,
        }
        state.save_inputs(index + 1, next_inputs, so_far)

    writing = StreamedBlocks(model, checkpoint, path, count, writer=writer.write)
    times = prune_blocks(
        model,
        calib,
        config,
        specs,
        progress=progress,
        source=writing,
        device=device,
        time_dense=time_dense,
        start=start,
        inputs=inputs,
        block_done=block_done if config.needs_data else None,
        after_visit=after_visit,
        dense_outputs=dense_outputs,
        record=info,
    )
    times.work_seconds += owl_seconds + before.get("work", 0.0)
    times.dense_block_seconds += before.get("dense_blocks", 0.0)
    writer.write_index()
    for name in COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)

    info["times"] = times_info(times)
    info["zero_counts"] = {k: list(v) for k, v in zero_counts_on_disk(out, writing).items()}
    # the same layers as the source holds them: a dense checkpoint may have zeros already
    info["dense_zero_counts"] = {k: list(v) for k, v in zero_counts_on_disk(source, writing).items()}
    info["params"] = sum(p.numel() for p in model.parameters())
    state.update(info=info)
    state.inputs_file.unlink(missing_ok=True)
    if not keep_state:
        state.remove()
    return info


def blocks_of(directory: str | Path) -> tuple[str, int]:
    """``(blocks path, count)`` of the checkpoint's model, found without reading a weight."""
    checkpoint = Checkpoint(directory)
    path, blocks = find_blocks(skeleton(directory, checkpoint.dtype()))
    return path, len(blocks)
