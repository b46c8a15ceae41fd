"""How every command prints: rich consoles for output and errors, and the one `fail` (`error:` line, exit)."""

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear `error:` line on stderr and exit with `code` (2: bad input, 1: the work failed)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)
