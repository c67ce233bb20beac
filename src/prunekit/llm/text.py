"""Calibration and evaluation text that ships with every Python, and the token windows cut from it.

The default corpus is the standard library's ``pydoc_data.topics`` (the English help texts of Python's
``help()``), topics sorted by name and joined. The split is contiguous and deterministic: the paragraphs up
to 90% of the characters calibrate, the rest (about 11k SmolLM2 tokens) is held out for evaluation. Some
topics repeat others (the ``compound`` topic contains ``while`` and ``with``), so calibration paragraphs
identical to a held-out one, or quoting one of 20+ characters, are dropped: no evaluated paragraph is
seen during calibration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prunekit.errors import PrunekitError
from prunekit.limits import read_bounded

CALIB_FRACTION = 0.9


def split_paragraphs(text: str, fraction: float = CALIB_FRACTION) -> tuple[str, str]:
    """Split at the first paragraph boundary (blank line) at or after ``fraction`` of the characters."""
    cut = text.find("\n\n", int(len(text) * fraction))
    if cut < 0:
        raise PrunekitError("the text has no paragraph boundary after the calibration part")
    return text[:cut], text[cut:].lstrip("\n")


def pydoc_topics_split() -> tuple[str, str]:
    """``(calibration_text, evaluation_text)`` from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    calib, held = split_paragraphs("\n\n".join(topics[name] for name in sorted(topics)))
    evaluated = {p.strip() for p in held.split("\n\n") if p.strip()}
    long = [p for p in evaluated if len(p) >= 20]  # shorter ones are method names such as "keys()"

    def seen(paragraph: str) -> bool:
        return paragraph.strip() in evaluated or any(p in paragraph for p in long)

    kept = [p for p in calib.split("\n\n") if not seen(p)]
    return "\n\n".join(kept), held


def read_text(path: str | Path, field: str) -> str:
    """A UTF-8 text file, read up to the text limit (prunekit.limits: /dev/zero is refused, not read
    forever)."""
    path = Path(path)
    try:
        text = read_bounded(path, field).decode("utf-8")
    except FileNotFoundError as exc:
        raise PrunekitError(f"{field}: no such file {path}") from exc
    except IsADirectoryError as exc:
        raise PrunekitError(f"{field}: {path} is a directory, not a text file") from exc
    except OSError as exc:
        raise PrunekitError(f"{field}: cannot read {path} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise PrunekitError(f"{field}: {path} is not UTF-8 text") from exc
    if not text.strip():
        raise PrunekitError(f"{field}: {path} is empty")
    return text


def tokenize(tokenizer, text: str, vocab_size: int | None = None) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens: windows are cut from the middle).

    With ``vocab_size`` (the model's embedding rows), a tokenizer that does not belong to the model is a
    clear error rather than an index error deep inside the embedding."""
    ids = torch.tensor(
        tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"], dtype=torch.long
    )
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise PrunekitError(
            f"the tokenizer produced token id {int(ids.max())} but the model has {vocab_size} embeddings: "
            "the tokenizer does not belong to this model"
        )
    return ids


def check_seqlen(seqlen: int) -> None:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise PrunekitError(f"seqlen must be an integer >= 2, got {seqlen!r}")


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(samples, seqlen)``: distinct, non-overlapping windows of the token stream, drawn with ``seed``."""
    check_seqlen(seqlen)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise PrunekitError(f"calib-samples must be an integer >= 1, got {samples!r}")
    room = ids.numel() // seqlen
    if samples > room:
        raise PrunekitError(
            f"the calibration text has {ids.numel()} tokens: room for {room} windows of {seqlen}, "
            f"but {samples} were asked; give a longer --calib-file, fewer --calib-samples or a shorter "
            "--seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(room, generator=generator)[:samples] * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``(count, seqlen)``: consecutive non-overlapping windows; a tail shorter than ``seqlen`` is dropped."""
    check_seqlen(seqlen)
    count = ids.numel() // seqlen
    if count < 1:
        raise PrunekitError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}"
        )
    return ids[: count * seqlen].reshape(count, seqlen)
