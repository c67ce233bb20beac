"""User-facing errors.

Every mistake a user can make (a bad sparsity, a typo in a recipe, a corrupted file) raises
:class:`PrunekitError` with a one-line message naming the field and the allowed values. The CLI prints
that line and exits with code 2; library users can catch it (it is also a ``ValueError``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrunekitError(ValueError):
    """A clear, one-line error about the user's input."""


class ArtifactCorrupted(PrunekitError):
    """A prunekit file (artifact, compressed artifact, checkpoint) that is truncated, damaged or crafted:
    its bytes do not match its digest, or its header does not describe its contents."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the nearest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> PrunekitError:
    """The standard error for an unknown registry entry."""
    choices = sorted(choices)
    return PrunekitError(
        f"unknown {kind} '{name}'{did_you_mean(name, choices)}; allowed: {', '.join(choices)}"
    )
