"""The structured log of a recipe run: ``DIR/log.jsonl``, one JSON object per line, and optionally
TensorBoard scalars.

Events: ``stage`` (a stage finished), ``epoch`` (a training epoch: mean loss, learning rate), ``round``
(a pruning round: sparsity, validation accuracy, the last fine-tuning loss, time) , ``resume`` and
``done``. Every line carries ``seq`` (its line number from 0) and ``time`` (seconds since the epoch).
Each line is written with a single ``write`` and flushed, so a crash loses at most the line being
written, and a torn last line is cut off on resume.

On ``--resume`` the log is cut back to the byte offset the checkpoint recorded: the lines after it
describe work the resumed run repeats, so they would otherwise appear twice. TensorBoard gets the same
treatment with ``purge_step``: scalars use ``seq`` as their step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

_INDEX_FIELDS = ("round", "stage", "epoch")  # positions, not measurements: no TensorBoard scalar


def check_tensorboard() -> None:
    """Fail now, before any work, when TensorBoard logging cannot work."""

    if importlib.util.find_spec("tensorboard") is None:
        raise PrunekitError("TensorBoard logging needs the tensorboard package: pip install tensorboard")


def _tensorboard_writer(folder: Path, purge_step: int | None):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


class RunLog:
    """Append-only JSONL log (and TensorBoard scalars); does nothing when ``enabled`` is False (the
    other ranks of a distributed run)."""

    def __init__(
        self,
        path: Path,
        *,
        enabled: bool = True,
        tensorboard: Path | None = None,
        resume_at: tuple[int, int] | None = None,
    ) -> None:
        """``resume_at``: ``(byte offset, seq)`` recorded by a checkpoint; without it the log starts over."""
        self.path, self.enabled = Path(path), enabled
        self.seq = 0
        self._handle = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is None:
            self._handle = open(self.path, "wb")  # noqa: SIM115 (kept open for the run)
        else:
            offset, self.seq = resume_at
            if self.path.exists():
                os.truncate(self.path, min(offset, os.path.getsize(self.path)))
            self._handle = open(self.path, "ab")  # noqa: SIM115
        if tensorboard is not None:
            self._tb = _tensorboard_writer(Path(tensorboard), self.seq if resume_at else None)

    def position(self) -> tuple[int, int]:
        """``(byte offset, seq)`` to store in a checkpoint."""
        if self._handle is None:
            return 0, self.seq
        self._handle.flush()
        return self._handle.tell(), self.seq

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        entry = {"seq": self.seq, "event": event, "time": round(time.time(), 3), **fields}
        self._handle.write((json.dumps(entry) + "\n").encode())
        self._handle.flush()
        if self._tb is not None:
            for key, value in fields.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and key not in _INDEX_FIELDS:
                    self._tb.add_scalar(f"{event}/{key}", value, global_step=self.seq)
            self._tb.flush()
        self.seq += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The events of a ``log.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


__all__ = ["RunLog", "check_tensorboard", "read_log"]
