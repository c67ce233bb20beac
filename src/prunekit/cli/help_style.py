"""One look for every command's ``--help``: value names in lower case and in words (``path``, ``integer``,
``number``, ``text``, ``a|b|c`` for choices, ``...`` for lists), none after an on/off flag, and argument
names in lower case (``{recipe}``, whatever case a command's metavar is written in).

typer 0.2x prints a Python type after every option (``<bool>`` after flags, ``<list[Path]>``, ``<str>``) and
upper-cases argument names unless a metavar is given; rather than a metavar on each of ~150 options, the two
display methods are replaced once, here, when the command line is imported. An explicit ``metavar=`` still
wins. ``tests/cli/test_help.py`` renders every command's help and checks these conventions.
"""

from __future__ import annotations

import re

import typer.core

# typer's own labels (its display_type) -> words
_WORDS = {"str": "text", "int": "integer", "float": "number", "Path": "path", "path": "path", "file": "path"}


def value_name(label: str) -> str | None:
    """The word for typer's type label (``<list[Path]>`` -> ``path...``, ``<bool>`` -> None)."""
    label = label.strip("<>")
    many = ""
    while (inner := re.fullmatch(r"(?:list|tuple|set)\[(.*)\]", label)) is not None:
        label, many = inner.group(1), "..."
    if label == "bool":
        return None
    if "|" in label:  # a choice: its values, as typed
        return label + many
    words = [_WORDS.get(part.strip(), part.strip().lower()) for part in label.split(",")]
    return ",".join(words) + many


def _option_type(self, ctx) -> str | None:
    if self.metavar is not None:
        return self.metavar
    if self.is_flag:
        return None
    return value_name(_ORIGINAL_OPTION(self, ctx) or "")


def _argument_type(self, ctx) -> str | None:
    return value_name(_ORIGINAL_ARGUMENT(self, ctx) or "")


# typer versions before its own type display (which printed click's plain help) have nothing to replace
_ORIGINAL_OPTION = getattr(getattr(typer.core, "TyperOption", None), "display_type", None)
_ORIGINAL_ARGUMENT = getattr(getattr(typer.core, "TyperArgument", None), "display_type", None)


def install() -> None:
    """Replace typer's help display of option types and argument names (idempotent; nothing to do on a
    typer without its own type display)."""
    if _ORIGINAL_OPTION is None or _ORIGINAL_ARGUMENT is None:
        return
    typer.core.TyperOption.display_type_rich = _option_type
    typer.core.TyperArgument.display_type_rich = _argument_type
    typer.core.TyperArgument.display_name_raw = property(
        lambda self: (self.metavar or self.name or "").lower()
    )
