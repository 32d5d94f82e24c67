"""How commands print: messages that are never wrapped (scripts read them line by line), tables at full width when
piped, and text from users, recipes, clouds and guests made safe for rich markup and for the terminal."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from core.recipe import printable


def stdout() -> Console:
    """Rich output for a terminal; piped, tables keep their full width (no truncation) and no colour."""
    return Console() if sys.stdout.isatty() else Console(width=4096)


def stderr() -> Console:
    """Messages: one line each whatever the terminal's width (or none), no guessed highlighting."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


def safe(text: object) -> str:
    """`text` to put inside rich markup: one line, control and bidirectional characters shown as escapes, and
    square brackets escaped so `[/]` or `[link=…]` in a name or a guest's output print as themselves."""
    return escape(printable(str(text)))


def plain_lines(text: str) -> str:
    """A multi-line log to print without markup: line breaks stay, tabs become spaces, and every other control or
    bidirectional character is shown as its escape, so a guest's terminal sequences cannot move the cursor,
    retitle the window or hide lines."""
    return "\n".join(printable(line.expandtabs()) for line in text.split("\n"))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on one line to stderr and exit with `code`."""
    stderr().print(f"[red]error:[/] {safe(message)}")
    raise typer.Exit(code)
