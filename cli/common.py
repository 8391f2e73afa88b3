"""What every command shares: one-line errors with exit code 2, rich output helpers."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Sequence

import duckdb
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ampo_common.errors import InputError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors():
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except InputError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except duckdb.Error as exc:
        first_line = str(exc).strip().splitlines()[0]
        err_console.print(f"[red]error:[/red] {escape(first_line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def make_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence], keep_whole: int = 0) -> Table:
    """``keep_whole``: the values of the first N columns are never cut (their headings may wrap)."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    # Wide numeric tables drop the vertical rules (a column's worth of width on an 80-column terminal).
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD if keep_whole else box.HEAVY_HEAD,
                  pad_edge=not keep_whole, collapse_padding=bool(keep_whole))
    for i, name in enumerate(columns):
        widest = max((len(row[i]) for row in rows), default=0) if i < keep_whole else None
        table.add_column(str(name), min_width=widest)
    for row in rows:
        table.add_row(*row)
    return table


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
