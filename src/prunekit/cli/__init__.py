"""The command line: parse options, call a job (prunekit.jobs), print. No logic of its own.

``prunekit.cli.commands`` assembles the commands; ``main`` is the ``prunekit`` console script.
"""

from prunekit.cli.commands import app, main

__all__ = ["app", "main"]
