"""``llm prune`` / ``llm eval`` check every option that needs no model before loading it (the load takes
seconds to minutes), read their texts within the text limit, and never write over the model they read."""

from __future__ import annotations

import io

import pytest

from prunekit.errors import PrunekitError
from prunekit.jobs import llm as job
from prunekit.jobs.llm import TextSettings, run_eval, run_prune
from prunekit.llm.prune import LLMPruneConfig
from prunekit.spec import NM, Unstructured


class Loaded(Exception):
    """Raised instead of loading the model: the checks before it passed."""


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def load(path):
        raise Loaded(path)

    monkeypatch.setattr(job, "load_causal_lm", load)


def _config(**kw) -> LLMPruneConfig:
    return LLMPruneConfig(**{"method": "sparsegpt", "spec": Unstructured(0.5), **kw})


@pytest.mark.parametrize(
    "text, config, match",
    [
        ({"seqlen": 1}, {}, "seqlen must be an integer >= 2"),
        ({"calib_samples": 0}, {}, "--calib-samples must be an integer >= 1"),
        ({"seed": -1}, {}, r"--seed must be an integer in \[0, 2\*\*63\)"),
        ({"seed": 2**70}, {}, r"--seed must be an integer in \[0, 2\*\*63\)"),
        ({}, {"blocksize": 0}, "--blocksize must be a positive integer"),
        ({}, {"damp": float("inf")}, "--damp must be a finite number > 0"),
        ({}, {"damp": -0.1}, "--damp must be a finite number > 0"),
        ({}, {"spec": NM(2, 4), "blocksize": 6}, "--blocksize 6 must be a multiple of M=4"),
        ({"calib_file": "/dev/zero"}, {}, "--calib-file: /dev/zero holds more than 1.0 MiB of text"),
        ({"eval_file": "/nonexistent.txt"}, {}, "--eval-file: no such file"),
    ],
)
def test_prune_options_are_checked_before_the_model_loads(tmp_path, monkeypatch, text, config, match):
    monkeypatch.setenv("PRUNEKIT_TEXT_LIMIT", "1M")
    with pytest.raises(PrunekitError, match=match):
        run_prune("some/model", _config(**config), TextSettings(**text), tmp_path / "out")


def test_good_options_reach_the_load(tmp_path):
    with pytest.raises(Loaded):
        run_prune("some/model", _config(), TextSettings(), tmp_path / "out")
    with pytest.raises(Loaded):
        run_eval("some/model", TextSettings())
    with pytest.raises(PrunekitError, match="seqlen must be an integer >= 2"):
        run_eval("some/model", TextSettings(seqlen=0))


def test_out_holding_the_model_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(PrunekitError, match="holds the model being pruned"):
        run_prune(str(model_dir), _config(), TextSettings(), model_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(PrunekitError, match="holds the model being pruned"):
        run_prune(str(gguf), _config(), TextSettings(), tmp_path)
    with pytest.raises(Loaded):  # a sibling directory is fine
        run_prune(str(model_dir), _config(), TextSettings(), tmp_path / "pruned")


def test_quiet_silences_the_gguf_conversion_bar(capsys):
    pytest.importorskip("transformers")
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from tqdm.auto import tqdm

    from prunekit.cli.llm import _stage_bars

    original = gguf_utils.tqdm  # (an earlier --quiet command in this process may have silenced it already)
    gguf_utils.tqdm = tqdm
    try:
        _stage_bars(quiet=True)
        stream = io.StringIO()
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=stream):
            pass
        assert stream.getvalue() == ""
        loud = io.StringIO()
        for _ in tqdm(range(3), desc="x", file=loud):
            pass
        assert "x" in loud.getvalue()  # the same bar, not silenced, does draw (the check is not vacuous)
    finally:
        gguf_utils.tqdm = original
