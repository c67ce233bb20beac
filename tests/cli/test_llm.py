"""``prunekit llm prune`` / ``llm eval`` end to end on a tiny random Llama saved with its own tokenizer."""

import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fixtures.cli import assert_one_line_error, call_main  # noqa: E402
from fixtures.hf import llama, vit_classifier  # noqa: E402

SEQ = 32


def test_llm_prune_writes_a_loadable_model_and_metrics(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--method", "sparsegpt", "--pattern", "2:4", "--calib-samples", "4"]
    code, stdout, stderr = call_main(
        monkeypatch, capsys, "llm", "prune", *args, "--seqlen", str(SEQ), "--out", str(out), "--quiet"
    )
    assert code == 0, stderr
    assert "perplexity" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "sparsegpt" and metrics["pattern"] == {"type": "nm", "n": 2, "m": 4}
    assert metrics["calibration"]["samples"] == 4 and metrics["calibration"]["seqlen"] == SEQ
    assert metrics["ppl_dense"] > 1 and metrics["ppl_pruned"] > 1
    assert metrics["sparsity_pruned_layers"] == pytest.approx(0.5, abs=1e-9)
    assert metrics["sparsity_dense_layers"] == 0.0  # measured before pruning: random weights have no zeros
    assert len(metrics["layer_sparsity"]) == 2 * 7  # q k v o gate up down per block
    assert metrics["peak_rss_mb"] >= metrics["peak_rss_while_pruning_mb"] > 0
    assert not list(tmp_path.glob(".out.partial-*")), "the staging directory must be gone"

    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    weight = model.model.layers[1].mlp.down_proj.weight
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    assert int(groups.max()) <= 2
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("def f(): pass")["input_ids"]

    code, stdout, stderr = call_main(
        monkeypatch, capsys, "llm", "eval", "--model", str(out), "--seqlen", str(SEQ), "--json", "--quiet"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["ppl"] == pytest.approx(metrics["ppl_pruned"], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "0.5", "--pattern", "2:4"], "exactly one of --sparsity"),
        ([], "exactly one of --sparsity"),
        (["--pattern", "0.5"], "--pattern takes N:M"),
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--sparsity", "0.5", "--method", "wandaa"], "unknown method 'wandaa' (did you mean 'wanda'?)"),
        (["--pattern", "2:4", "--owl"], "not to N:M"),
        (["--sparsity", "0.5", "--seqlen", "65"], "above the model's limit of 64"),
        (["--sparsity", "0.5", "--calib-samples", "100000"], "room for"),
        (["--pattern", "3:7"], "multiple of M=7"),
        (["--sparsity", "0.5", "--calib-file", "/nonexistent.txt"], "--calib-file: no such file"),
    ],
)
def test_llm_prune_bad_input_is_one_clear_line(model_dir, tmp_path, monkeypatch, capsys, args, needle):
    out = tmp_path / "out"
    code, _, stderr = call_main(
        monkeypatch, capsys, "llm", "prune", "--model", str(model_dir), "--seqlen", str(SEQ), *args,
        "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(stderr, needle)
    assert not out.exists()


def test_llm_eval_refuses_a_tokenizer_bigger_than_the_model(model_dir, tmp_path, monkeypatch, capsys):
    small = tmp_path / "small"
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(small)
    llama(layers=1).save_pretrained(small)  # 128 embeddings, a 320-token tokenizer
    code, _, stderr = call_main(
        monkeypatch, capsys, "llm", "eval", "--model", str(small), "--seqlen", str(SEQ), "--quiet"
    )
    assert code == 2
    assert_one_line_error(stderr, "token id")


def test_llm_prune_refuses_a_model_that_is_not_a_causal_lm(tmp_path, monkeypatch, capsys):
    vit_classifier().save_pretrained(tmp_path / "vit")
    code, _, stderr = call_main(
        monkeypatch, capsys, "llm", "prune", "--model", str(tmp_path / "vit"), "--sparsity", "0.5",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(stderr, "not a causal language model")


def test_llm_prune_reads_an_unreadable_gguf_as_a_clear_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    code, _, stderr = call_main(
        monkeypatch, capsys, "llm", "eval", "--model", str(bad), "--quiet"
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(stderr, "could not load the model")


def test_llm_prune_alps_with_dsnot_and_reconstruction(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--method", "alps", "--pattern", "2:4", "--refine", "dsnot", "--reconstruct", "block"]
    code, stdout, stderr = call_main(
        monkeypatch, capsys, "llm", "prune", "--model", str(model_dir), *args, "--alps-iters", "20",
        "--reconstruct-epochs", "2", "--calib-samples", "4", "--seqlen", str(SEQ), "--out", str(out),
        "--quiet", "--no-eval",
    )  # fmt: skip
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert (config["refine"], config["reconstruct"], config["alps_iters"]) == ("dsnot", "block", 20)
    assert set(metrics["step_seconds"]) == {"refine", "reconstruct"}
    assert all(r["error_after"] <= r["error_before"] for r in metrics["reconstruction"])
    assert metrics["sparsity_pruned_layers"] == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--refine", "dsnt"], "unknown refinement 'dsnt' (did you mean 'dsnot'?)"),
        (["--reconstruct", "blocks"], "unknown reconstruction 'blocks' (did you mean 'block'?)"),
        (["--reconstruct", "block", "--reconstruct-lr", "0"], "reconstruct_lr must be > 0"),
        (["--method", "alps", "--alps-iters", "-1"], "alps_iters must be an integer >= 0"),
    ],
)
def test_llm_prune_bad_refit_options_are_one_line(model_dir, tmp_path, monkeypatch, capsys, args, needle):
    out = tmp_path / "out"
    code, _, stderr = call_main(
        monkeypatch, capsys, "llm", "prune", "--model", str(model_dir), "--pattern", "2:4", *args,
        "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(stderr, needle)
    assert not out.exists()
