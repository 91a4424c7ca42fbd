"""What `vers` prints: lines and tables for people, or with `--format json` one JSON document on stdout
and nothing else. Progress goes to stderr, and only when stderr is a terminal; an error is one `Error:`
line on stderr and exit code 1."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.cli.config import ConfigError
from services.client import ApiError, Unreachable

FORMATS = ("text", "json")


class Output:
    def __init__(self, format: str) -> None:
        self.json = format == "json"
        # Off a terminal rich would wrap tables at 80 columns and cut IDs; scripts want whole lines.
        width = None if sys.stdout.isatty() else max(shutil.get_terminal_size().columns, 250)
        self.console = Console(width=width, highlight=False, soft_wrap=True)

    def result(self, data: Any, *lines: str) -> None:
        """The command's answer: `data` as JSON, or the lines."""
        if self.json:
            click.echo(json.dumps(data, indent=2))
        else:
            for line in lines:
                click.echo(line)

    def table(self, data: Any, columns: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2))
            return
        if not rows:
            click.echo(empty)
            return
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(Text(str(cell)) for cell in row))  # as written: `[x]` in a name or excerpt is not rich markup
        self.console.print(table)

    def fields(self, data: Any, pairs: Sequence[tuple[str, Any]], *before: str) -> None:
        """`Name: value` lines, aligned, after the lines `before` (e.g. what a change did)."""
        width = max(len(name) for name, _ in pairs) + 1
        self.result(data, *before, *(f"{name + ':':<{width}} {'-' if value in (None, '') else value}" for name, value in pairs))


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner on stderr while a long call runs, when someone is watching."""
    if not sys.stderr.isatty():
        yield
        return
    with Console(stderr=True).status(message):
        yield


def when(timestamp: str | None) -> str:
    """An RFC 3339 timestamp from the API as local, readable time."""
    if not timestamp:
        return "-"
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def size(count: int | str) -> str:
    """A byte count for people: 512 B, 3.0 MiB, 1.2 GiB (int64 counts come as strings in JSON)."""
    value = float(int(count))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def api_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """The server's message on one line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApiError as error:
            raise click.ClickException(f"{error.message} (HTTP {error.status})") from None
        except Unreachable as error:
            raise click.ClickException(f"{error} (`vers login --url` sets it)") from None
        except ConfigError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def vers_command(name: str, formatted: bool = True, **settings: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """A command with `--format` (unless interactive), the shared context object and error handling;
    a group adds it (`group.add_command`)."""

    def decorate(function: Callable[..., Any]) -> click.Command:
        wrapped = api_errors(function)
        if formatted:
            wrapped = with_format(wrapped)
        return click.command(name, **settings)(click.pass_obj(wrapped))

    return decorate


def with_format(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds `--format text|json` and hands the command an Output as `out`."""

    @click.option(
        "--format",
        "format_",
        type=click.Choice(FORMATS),
        default="text",
        show_default=True,
        help="json: one JSON document on stdout, for scripts.",
    )
    @functools.wraps(command)
    def wrapper(*args: Any, format_: str, **kwargs: Any) -> Any:
        return command(*args, out=Output(format_), **kwargs)

    return wrapper


def each(out: Output, names: tuple[str, ...], action: Callable[[str], Any], done: str) -> None:
    """Act on several names; report each, go on after a failure, exit 1 if any failed."""
    results, failed = [], False
    for name in names:
        try:
            action(name)
            results.append({"name": name, "deleted": True, "error": None})
            if not out.json:
                click.echo(f"✓ {done.format(name)}")
        except ApiError as error:
            failed = True
            results.append({"name": name, "deleted": False, "error": error.message})
            if not out.json:
                click.echo(f"Error: {name}: {error.message} (HTTP {error.status})", err=True)
    if out.json:
        out.result({"results": results})
    if failed:
        sys.exit(1)
