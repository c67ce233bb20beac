"""Distributed fine-tuning on torch.distributed (gloo, 2 processes on this machine), launched the way
torchrun launches them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), each rank with its own
--out so that what each one wrote can be told apart: the masks agree across ranks after every round,
the loss goes down, and only rank 0 writes anything."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.recipes import TINY  # the same tiny digits recipe: dense training, 2 pruning rounds
from prunekit.jobs.runlog import read_log

WORLD = 2
# two processes that each import torch and train: ~20 s on an idle 2-core machine, 80 s when it is shared
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe_file: Path, outs: list[Path], *extra: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank, out in enumerate(outs):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(outs)),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "prunekit", "run", str(recipe_file), "--out", str(out), "-q", *extra]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = copy.deepcopy(TINY)
    data["checkpoint"] = {"every_steps": 10}
    recipe_file = root / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    outs = [root / f"rank{r}" for r in range(WORLD)]
    results = launch(recipe_file, outs)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}: {result.stderr[-3000:]}"
    return outs, results


def test_masks_agree_across_ranks_after_every_round(ddp_run):
    outs, _ = ddp_run
    metrics = json.loads((outs[0] / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for entry in rounds:
        digests = entry["masks_sha256_per_rank"]
        assert len(digests) == WORLD and len(set(digests)) == 1
    assert rounds[-1]["masks_sha256_per_rank"][0] == metrics["masks_sha256"]  # the final masks
    assert len({r["masks_sha256_per_rank"][0] for r in rounds}) == 3  # each round changed them
    assert metrics["pruned"]["sparsity"] > 0.6


def test_training_reduces_the_loss_averaged_over_ranks(ddp_run):
    outs, _ = ddp_run
    epochs = [e for e in read_log(outs[0] / "log.jsonl") if e["event"] == "epoch"]
    dense = [e["loss"] for e in epochs if e["stage"] == 0]
    assert len(dense) == 2 and dense[1] < dense[0] * 0.8
    metrics = json.loads((outs[0] / "metrics.json").read_text())
    assert metrics["dense"]["accuracy"] > 0.7


def test_only_rank_0_writes(ddp_run):
    outs, results = ddp_run
    assert not outs[1].exists()
    names = {p.name for p in outs[0].iterdir()}
    assert {"metrics.json", "report.md", "log.jsonl", "pruned.safetensors", "checkpoint"} <= names
    assert results[0].stdout.startswith("model") and results[1].stdout == ""  # rank 1 prints nothing


def test_each_rank_trains_on_its_own_shard(ddp_run):
    # 1,078 images over 2 ranks in batches of 32: 17 steps per rank and epoch, so 34 dense steps and 68
    # in all (not 136): checkpoints every 10 steps -> 3 in the dense training, 1 after it, 3 inside the
    # rounds, 1 after round 1, 1 after the prune stage
    outs, _ = ddp_run
    from prunekit.jobs import checkpoint as ckpt

    state = ckpt.read(outs[0] / "checkpoint" / "last.safetensors")
    assert state["world_size"] == WORLD and state["run"]["global_step"] == 68
    assert state["count"] == 9


def test_the_fsdp_example_keeps_pruned_weights_zero_and_rank_0_saves(tmp_path):
    """examples/fsdp_finetune.py under torchrun: FSDP (fully_shard) on CPU with gloo, masks as buffers."""
    from prunekit.artifact import read_artifact

    example = Path(__file__).parents[2] / "examples" / "fsdp_finetune.py"
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD)]
    cmd += ["--master-port", str(free_port()), str(example), "--out", str(out), "--epochs", "1"]
    result = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pruned weights still exactly zero" in result.stdout
    assert result.stdout.count("epoch 0: loss") == 1  # printed by rank 0 only
    tensors, info = read_artifact(out / "fsdp.safetensors")
    kept = sum(int(m.sum()) for m in info.masks.values()) / sum(m.numel() for m in info.masks.values())
    assert abs(kept - 0.2) < 0.01  # the 80% pruning survived the sharded fine-tuning and the gather
