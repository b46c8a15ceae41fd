"""How every command prints: rich consoles for output and errors, and the one `fail` (`error:` line, exit)."""

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True)


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped, so that it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear `error:` line on stderr and exit with `code` (2: bad input, 1: the work failed)."""
    errors.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)
