"""``prunekit llm prune --resume``: an interrupted run continues and ends with the files of an uninterrupted
one. In process (a crash while writing a shard) in the default suite; real SIGKILLs of a ``prunekit``
process at three different blocks in the slow one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fixtures.cli import assert_one_line_error, call_main  # noqa: E402
from fixtures.hf import llama  # noqa: E402
from prunekit.jobs import llm as llm_job  # noqa: E402
from prunekit.llm import checkpoint as checkpoint_module  # noqa: E402
from prunekit.llm import resume as resume_module  # noqa: E402
from prunekit.llm.resume import ResumeState  # noqa: E402

SEQ = 32
# the timed fields differ from run to run; everything else must be byte for byte the same
TIMED = {"metrics.json", "report.md", "report.html"}


def prune_args(model, out, method="sparsegpt"):
    return [
        "llm", "prune", "--model", str(model), "--method", method, "--sparsity", "0.5",
        "--calib-samples", "4", "--seqlen", str(SEQ), "--out", str(out), "--quiet", "--threads", "1",
        "--no-eval",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, model_dir):
    """The tiny test Llama with 6 blocks, bfloat16, its tokenizer beside it."""
    import torch

    path = tmp_path_factory.mktemp("deep-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = llama(layers=6)
    model.resize_token_embeddings(len(tokenizer))
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="200KB")
    return path


def same_files(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name not in TIMED and not name.endswith(".png"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_resume_after_a_crash(deep_model, tmp_path, monkeypatch, capsys):
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, tmp_path / "straight"))
    assert code == 0, err

    out = tmp_path / "out"
    real = checkpoint_module.write_shard
    writes = {"n": 0}

    def crash(path, tensors, metadata=None):  # the rest, block 0, its inputs, block 1, its inputs: crash
        writes["n"] += 1
        if writes["n"] == 6:
            raise MemoryError("simulated crash while writing block 2")
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_module, "write_shard", crash)  # the shards
    monkeypatch.setattr(resume_module, "write_shard", crash)  # the checkpoints of the next block's inputs
    with pytest.raises(MemoryError):
        call_main(monkeypatch, capsys, *prune_args(deep_model, out))
    monkeypatch.setattr(checkpoint_module, "write_shard", real)
    monkeypatch.setattr(resume_module, "write_shard", real)
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()

    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out))
    assert code == 2
    assert_one_line_error(err, "holds an interrupted run for --out")
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out, method="wanda"), "--resume")
    assert code == 2
    assert_one_line_error(err, "method differ")  # a different run is not continued

    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out), "--resume")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["resumed_at_block"] == 2
    assert not (tmp_path / ".out.partial").exists()
    same_files(out, tmp_path / "straight")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert str(loaded.dtype) == "torch.bfloat16"


def test_metrics_record_the_forward_pass_and_the_device(deep_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, err = call_main(
        monkeypatch, capsys, *prune_args(deep_model, out, "wanda"), "--device", "auto"
    )
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"] == ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    assert m["dtype"] == "bfloat16" and m["streamed"] is True
    assert m["dense_forward_seconds"] > 0 and m["prune_seconds"] > 0
    assert m["prune_over_forward"] == pytest.approx(m["prune_seconds"] / m["dense_forward_seconds"])
    assert "one dense forward pass" in stdout
    assert not (out / ".resume").exists() and not (out / "source").exists()


def test_an_earlier_run_in_out_needs_force_and_is_replaced_whole(deep_model, tmp_path, monkeypatch, capsys):
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, tmp_path / "fresh", "magnitude"))
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out, "wanda"))
    assert code == 0, err
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out, "magnitude"))
    assert code == 2
    assert_one_line_error(err, "holds the files of an earlier run; --force to replace them")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before any work

    seen = []
    real = llm_job.atomic_write_json

    def spy(path, data):
        seen.append((Path(path).name, sorted(p.name for p in out.iterdir())))
        return real(path, data)

    monkeypatch.setattr(llm_job, "atomic_write_json", spy)
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out, "magnitude"), "--force")
    assert code == 0, err
    name, present = seen[-1]  # metrics.json is written last, into a directory that holds everything else
    assert name == "metrics.json" and "model.safetensors.index.json" in present and "report.md" in present
    assert json.loads((out / "metrics.json").read_text())["method"] == "magnitude"
    assert (out / "notes.txt").read_text() == "the user's own file"
    (out / "notes.txt").unlink()
    same_files(out, tmp_path / "fresh")  # nothing of the earlier run is left beside the new one


KILLER = """
import os, signal, sys
from prunekit.llm import checkpoint, resume
real = checkpoint.write_shard
target, after = int(sys.argv[1]), sys.argv[2] == "after"
count = 0
def write_shard(path, tensors, metadata=None):
    global count
    count += 1
    if count == target and not after:
        os.kill(os.getpid(), signal.SIGKILL)  # killed before the file is written
    result = real(path, tensors, metadata)
    if count == target and after:
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after
    return result
checkpoint.write_shard = resume.write_shard = write_shard  # shards and checkpoints of the next inputs
from prunekit.cli.commands import main
sys.argv = ["prunekit", *sys.argv[3:]]
main()
"""


@pytest.mark.slow
def test_sigkill_at_three_blocks_then_resume_is_bit_identical(deep_model, tmp_path, monkeypatch, capsys):
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, tmp_path / "straight"))
    assert code == 0, err
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # write_shard calls: 1 = everything outside the blocks (a fresh run only), then per block its shard and
    # the checkpoint of its outputs. Run 1: killed right after block 1's shard, before its checkpoint;
    # run 2 (resumes at block 1): killed before block 3's shard is written; run 3 (at block 3): killed
    # after block 4's checkpoint, between two blocks.
    kills = ((4, "after", []), (5, "before", ["--resume"]), (4, "after", ["--resume"]))
    for (target, when, resume), resumed_at in zip(kills, (None, 1, 3)):
        args = [*prune_args(deep_model, out), *resume]
        if resumed_at is not None:
            assert ResumeState(tmp_path / ".out.partial").load_inputs()[0] == resumed_at
        run = subprocess.run([sys.executable, str(script), str(target), when, *args], env=env, timeout=600)
        assert run.returncode == -signal.SIGKILL
        assert not out.exists()
    assert ResumeState(tmp_path / ".out.partial").load_inputs()[0] == 5
    code, _, err = call_main(monkeypatch, capsys, *prune_args(deep_model, out), "--resume")
    assert code == 0, err
    same_files(out, tmp_path / "straight")
