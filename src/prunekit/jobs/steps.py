"""A progress bar over the named steps of a job made of a few long ones (``export onnx``: load, export and
check; ``structured``: prune, measure, save), for the commands whose work has no natural counter."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from tqdm.auto import tqdm


class Steps:
    """``with steps("export"): ...`` for each name in ``names``, in order; the bar shows the step running.
    Drawn only on a terminal (``file``, default stderr) and erased when closed, so an error that follows is
    one clean line; ``enabled=False`` (the commands' ``-q``) draws nothing."""

    def __init__(
        self, names: Sequence[str], desc: str, enabled: bool = True, file: TextIO | None = None
    ) -> None:
        self.names = list(names)
        self.done = 0  # steps finished (or failed): tqdm counts nothing when disabled
        self.bar = tqdm(
            total=len(self.names),
            desc=desc,
            unit="step",
            file=file,
            leave=False,
            disable=None if enabled else True,  # None: tqdm's "only on a terminal"
        )

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if name not in self.names:
            raise ValueError(f"unknown step {name!r}; the steps are {self.names}")
        self.bar.set_postfix_str(name)
        try:
            yield
        finally:
            self.done += 1
            self.bar.update(1)
            if self.done >= len(self.names):
                self.bar.close()

    def close(self) -> None:
        self.bar.close()


__all__ = ["Steps"]
