"""The step bar of the commands made of a few long steps: each named step once, in order, closed at the end;
an unknown name is a programming error; disabled it draws nothing."""

from __future__ import annotations

import pytest

from prunekit.jobs.steps import Steps


def test_steps_count_each_name_and_close(capsys):
    steps = Steps(["load", "export"], "export onnx", enabled=True)
    with steps("load"):
        assert steps.bar.postfix == "load"
    assert steps.done == 1
    with steps("export"):
        pass
    assert steps.done == 2
    err = capsys.readouterr().err
    assert "export onnx" in err and "2/2" in err
    with pytest.raises(ValueError, match="unknown step 'make'"), steps("make"):
        pass


def test_a_failing_step_still_counts_and_quiet_draws_nothing(capsys):
    steps = Steps(["load"], "structured", enabled=False)
    with pytest.raises(RuntimeError), steps("load"):
        raise RuntimeError("boom")
    assert steps.done == 1
    assert capsys.readouterr().err == ""
