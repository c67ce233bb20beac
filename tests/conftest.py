"""Shared test setup: one torch thread, and the fixtures several test folders use."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # the tests use tiny tensors: a second intra-op thread only adds spin-wait overhead, which turns into
    # 10-50x slowdowns when another process shares the two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama and a byte-level BPE tokenizer trained on some of the calibration text, saved as a
    Hugging Face directory (skips without transformers)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from fixtures.hf import llama
    from prunekit.llm.text import pydoc_topics_split

    path = tmp_path_factory.mktemp("tiny-llama")
    calib, _ = pydoc_topics_split()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=128,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()[:120],
        show_progress=False,
    )
    bpe.train_from_iterator([calib[:20000]], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = llama(layers=2)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    return path
