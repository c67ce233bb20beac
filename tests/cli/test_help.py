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
    assert re.search(r"--memory / --no-memory\s+Measure", text)  # a flag: no value name after it
    assert re.search(r"--runs integer\s", text) and re.search(r"--out path\s", text)
    assert "{artifact_or_recipe}" in text.splitlines()[0]


# the same idea has one name everywhere; the old spellings still parse
ALIASES = {
    ("analyze", "classes"): ("--class-drop", "--threshold"),
    ("analyze", "sweep"): ("--runs", "--latency-runs"),
    ("analyze", "sensitivity"): ("--calib-batches", "--calibration-batches"),
}


@pytest.mark.parametrize("path,names", list(ALIASES.items()), ids=[" ".join(p) for p in ALIASES])
def test_renamed_options_keep_their_old_names(path, names):
    command = ROOT
    for part in path:
        command = command.commands[part]
    owners = [p for p in command.params if names[0] in getattr(p, "opts", [])]
    assert len(owners) == 1 and names[1] in owners[0].opts


def test_on_off_options_are_pairs():
    for path, command in COMMANDS:
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--no-"):
                    pytest.fail(f"{' '.join(path)}: {opt} is a lone negative; use --x/--no-x")
            for opt in getattr(param, "secondary_opts", []):
                assert opt.startswith("--no-"), (path, opt)


def test_quiet_has_its_short_form_everywhere():
    for path, command in COMMANDS:
        for param in command.params:
            if "--quiet" in getattr(param, "opts", []):
                assert "-q" in param.opts, " ".join(path)
