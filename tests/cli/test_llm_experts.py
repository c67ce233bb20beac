"""``prunekit llm prune --experts``: a tiny random Mixtral, saved with a tokenizer, loses a quarter of its
experts and loads back with plain ``from_pretrained``."""

import json

import pytest
import torch

from prunekit.store import Store

transformers = pytest.importorskip("transformers")

from fixtures.cli import assert_one_line_error, call_main  # noqa: E402
from fixtures.hf import mixtral  # noqa: E402


@pytest.fixture(scope="module")
def moe_dir(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = mixtral()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    return path


def test_experts_option_removes_a_quarter_and_the_result_loads(moe_dir, tmp_path, monkeypatch, capsys):
    from prunekit.llm.text import pydoc_topics_split

    calib, held = pydoc_topics_split()
    (tmp_path / "calib.txt").write_text(calib[:4000])
    (tmp_path / "eval.txt").write_text(held[:3000])
    out = tmp_path / "out"
    args = ["--model", str(moe_dir), "--experts", "0.25", "--calib-samples", "4", "--seqlen", "32"]
    args += ["--calib-file", str(tmp_path / "calib.txt"), "--eval-file", str(tmp_path / "eval.txt")]
    code, stdout, stderr = call_main(monkeypatch, capsys, "llm", "prune", *args, "--out", str(out), "--quiet")
    assert code == 0, stderr
    assert "8 -> 6 per block" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experts_after"] == 6 and metrics["criterion"] == "reap"
    assert all(len(removed) == 2 for removed in metrics["removed"].values())
    assert metrics["ppl_dense"] > 1 and metrics["ppl_pruned"] > 1
    assert not list(tmp_path.glob(".out.partial-*"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_local_experts == 6
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6

    # refusing to overwrite, and refusing to mix with unstructured pruning: one clear line each
    code, _, stderr = call_main(monkeypatch, capsys, "llm", "prune", *args, "--out", str(out), "--quiet")
    assert code != 0
    assert_one_line_error(stderr, "not an empty directory")
    extra = ["--sparsity", "0.5", "--out", str(tmp_path / "other"), "--quiet"]
    code, _, stderr = call_main(monkeypatch, capsys, "llm", "prune", *args, *extra)
    assert code != 0
    assert_one_line_error(stderr, "--experts removes whole experts on its own")
    for flags in (["--resume"], ["--force"], ["--in-memory"], ["--device", "auto"]):  # streaming-only options
        extra = ["--out", str(tmp_path / "other"), "--quiet", *flags]
        code, _, stderr = call_main(monkeypatch, capsys, "llm", "prune", *args, *extra)
        assert code != 0 and not (tmp_path / "other").exists()
        assert_one_line_error(stderr, f"drop {flags[0]}")
    store = Store(tmp_path / "store")
    (tmp_path / "a.bin").write_bytes(b"a")
    store.add([tmp_path / "a.bin"], name="a")
    code, _, stderr = call_main(monkeypatch, capsys, "llm", "prune", *args, "--out", str(store.path / "x"))
    assert code != 0 and not (store.path / "x").exists() and store.verify().ok
    assert_one_line_error(stderr, "is inside the artifact store")
