"""The ``ragplane`` command line (Typer): one module per group of commands."""

from __future__ import annotations

import sys

# isort: off
# each module registers its commands; imported in the order `ragplane --help` lists them
from ragplane.cli import serve  # noqa: F401
from ragplane.cli import admin  # noqa: F401
from ragplane.cli import chat  # noqa: F401
from ragplane.cli import bench  # noqa: F401

# isort: on
from ragplane.cli._common import app, err
from ragplane.errors import RagplaneError

__all__ = ["app", "main"]


def main() -> None:
    from ragplane.observe.logging import configure_logging

    # logs always go to stderr, so a command's stdout (a token, a key, --json) stays clean;
    # commands that serve reconfigure them from their settings
    configure_logging("warning", "console")
    try:
        app()
    except RagplaneError as exc:
        # soft_wrap: a message piped to a log is not hard-wrapped at 80 columns
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
