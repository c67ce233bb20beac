"""The step bar of the commands made of a few long steps: each named step once, in order, drawn only on a
terminal and erased when done (so an error after it is one clean line); an unknown name is a programming
error; -q draws nothing."""

from __future__ import annotations

import io

import pytest

from prunekit.jobs.steps import Steps


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_steps_count_each_name_and_erase_the_bar():
    tty = Terminal()
    steps = Steps(["load", "export"], "export onnx", file=tty)
    with steps("load"):
        assert "export onnx" in tty.getvalue() and "load" in tty.getvalue()
    assert steps.done == 1
    with steps("export"):
        pass
    assert steps.done == 2
    assert tty.getvalue().endswith("\r")  # the bar's line erased (leave=False)
    with pytest.raises(ValueError, match="unknown step 'make'"), steps("make"):
        pass


def test_nothing_is_drawn_off_a_terminal_or_with_quiet(capsys):
    for steps in (
        Steps(["load"], "structured"),
        Steps(["load"], "structured", enabled=False, file=Terminal()),
    ):
        with pytest.raises(RuntimeError), steps("load"):
            raise RuntimeError("boom")
        assert steps.done == 1
    assert capsys.readouterr().err == ""
