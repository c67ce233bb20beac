"""``prunekit llm bench`` on the tiny Llama: every variant decodes, the compiled float32 model gives the
dense tokens, the ratios are against the same run's baselines, and bad input is one line."""

import json

import pytest

from fixtures.cli import assert_one_line_error, call_main
from prunekit.analysis.decode import agreement
from prunekit.errors import PrunekitError
from prunekit.jobs.llm_bench import BenchSettings, run_bench

SMALL = dict(prompt_tokens=8, new_tokens=6, threads=(1,), rounds=1, compile_budget_s=0.002)


def test_bench_times_every_variant_and_compiled_f32_keeps_the_tokens(model_dir):
    variants = ("dense-f32", "torch-int8", "compiled-f32", "compiled-int8", "llama.cpp")
    m = run_bench(str(model_dir), BenchSettings(variants=variants, perplexity_windows=0, **SMALL))
    rows = {r["variant"]: r for r in m["rows"]}
    assert set(rows) == {"dense-f32", "torch-int8", "compiled-f32", "compiled-int8"}
    assert "llama.cpp" in m["notes"]  # a HF directory is no GGUF file
    assert rows["dense-f32"]["vs_dense_f32"] == 1.0 and rows["torch-int8"]["vs_torch_int8"] == 1.0
    assert rows["compiled-f32"]["tokens_vs_dense_f32"]["identical"]
    for r in rows.values():
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token"])
    assert sum(m["compiled_layers"]["compiled-int8@1"].values()) == 15  # 2 blocks x 7 + lm_head
    assert all(k.startswith("gemv:") for k in m["compiled_layers"]["compiled-int8@1"])


def test_agreement_counts_the_common_prefix():
    assert agreement([1, 2, 3], [1, 2, 3]) == {"identical": True, "common_prefix": 3, "same_positions": 3}
    assert agreement([1, 5, 3], [1, 2, 3]) == {"identical": False, "common_prefix": 1, "same_positions": 2}


def test_bad_settings_are_one_line():
    with pytest.raises(PrunekitError, match="unknown variant"):
        BenchSettings(variants=("dense-f32", "onnx"))
    with pytest.raises(PrunekitError, match="--threads"):
        BenchSettings(threads=(0,))


def test_cli_prints_the_table_and_json(model_dir, monkeypatch, capsys):
    args = ["llm", "bench", "--model", str(model_dir), "--threads", "1", "--prompt-tokens", "8"]
    args += ["--new-tokens", "4", "--rounds", "1", "--variants", "dense-f32,compiled-f32"]
    code, out, _ = call_main(monkeypatch, capsys, *args, "--compile-budget", "0.002")
    assert code == 0 and "compiled-f32" in out and "identical" in out
    code, out, _ = call_main(monkeypatch, capsys, *args, "--json")
    assert code == 0 and {r["variant"] for r in json.loads(out)["rows"]} == {"dense-f32", "compiled-f32"}
    code, _, err = call_main(monkeypatch, capsys, "llm", "bench", "--model", str(model_dir), "--threads", "x")
    assert code == 2 and "--threads" in err


def test_bad_input_files_are_one_line(model_dir, tmp_path, monkeypatch, capsys):
    only = dict(SMALL, variants=("dense-f32", "llama.cpp"))
    with pytest.raises(PrunekitError, match="--gguf .*no such file"):
        run_bench(str(model_dir), BenchSettings(gguf=str(tmp_path / "missing.gguf"), **only))
    short = tmp_path / "short.txt"
    short.write_text("hi", encoding="utf-8")
    with pytest.raises(PrunekitError, match="fewer than --prompt-tokens"):
        run_bench(str(model_dir), BenchSettings(text_file=str(short), **only))
    capsys.readouterr()  # the loads above printed progress bars
    code, _, err = call_main(monkeypatch, capsys, "llm", "bench", "--model", str(tmp_path / "nowhere"))
    assert code != 0
    assert_one_line_error(err, "nowhere")
