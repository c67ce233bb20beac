"""Every command's --help, rendered, follows one convention (prunekit.cli.help_style): value names
in lower-case words (no Python types, nothing after an on/off flag), argument names in lower case,
option names in lower-case kebab case, no space before punctuation, and every help text shown whole
(typer's rich markup used to swallow a "[default: ...]" written in a help text)."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from prunekit.cli.commands import app

ROOT = typer.main.get_command(app)


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(ROOT))
PYTHON_TYPES = re.compile(r"<\w+(\[[^\]]*\])?>|\b(str|int|bool|float|list\[\w+\]|Path|NoneType)\b")


def test_every_command_is_checked():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"run", "bench", "export c", "export onnx", "llm prune", "store list", "analyze sweep"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "prunekit" for p, _ in COMMANDS])
def test_help_follows_the_conventions(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="prunekit", terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output
    lines = text.splitlines()
    usage = lines[0]
    assert usage.startswith("Usage: prunekit"), usage
    assert not re.search(r"[{\[][A-Z_]{2,}[}\]]", usage.replace("[OPTIONS]", "").replace("[ARGS]", "")), usage
    for param in command.params:
        if param.name == "help":
            continue
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", opt), f"{path}: option {opt}"
        if param.help:  # shown whole, whatever brackets it holds
            assert re.sub(r"\s+", "", param.help) in re.sub(r"\s+", "", text), f"{path}: {param.help!r}"
    options = text[text.find("Options:") :] if "Options:" in text else ""
    for line in (text[: text.find("Options:")] if options else text).splitlines() + options.splitlines():
        column = line.strip().split("  ")[0]  # the name/value cell: where typer printed its Python types
        assert not PYTHON_TYPES.search(column), f"{path}: {line!r}"
    for line in lines:
        assert not re.search(r"\w \.(\s|$)|\w ,", line), f"{path}: space before punctuation: {line!r}"


def test_flags_show_no_value_and_values_are_words():
    text = CliRunner().invoke(app, ["bench", "--help"], prog_name="prunekit", terminal_width=120).output
    assert re.search(r"--no-memory\s+Skip", text)  # a flag: nothing between the name and its help
    assert re.search(r"--runs integer\s", text) and re.search(r"--out path\s", text)
    assert "{artifact_or_recipe}" in text.splitlines()[0]
