"""`vers env list|set|delete`. main.py adds the commands; this module needs nothing from it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from services.cli.output import Output, each, vers_command
from services.client import seg

if TYPE_CHECKING:
    from services.cli.app import Context


@click.group("env")
def env_group() -> None:
    """Your organization's environment variables: set in every new VM's /etc/environment (read by its
    console and login shells) and in every `vers exec`. Values are kept encrypted on the server."""


def _masked(value: str) -> str:
    return "*" * min(len(value), 8) if value else "(empty)"


@vers_command("list")
@click.option("--reveal", is_flag=True, help="Print the values (hidden by default; --format json always has them).")
def env_list(ctx: Context, out: Output, reveal: bool) -> None:
    """The variables, by name."""
    answer = ctx.call("GET", "/api/v1/env_vars")
    variables = answer.get("vars") or {}
    rows = [[name, value if reveal else _masked(value)] for name, value in sorted(variables.items())]
    out.table(answer, ["NAME", "VALUE"], rows, "No environment variables: `vers env set NAME=VALUE` sets one.")


def _assignments(given: tuple[str, ...]) -> dict[str, str]:
    """NAME=VALUE pairs; one NAME alone takes its value from stdin (a hidden prompt on a terminal), so a
    secret need not be on the command line."""
    variables: dict[str, str] = {}
    from_stdin = [item for item in given if "=" not in item]
    if len(from_stdin) > 1:
        raise click.UsageError(f"only one NAME may take its value from stdin, not {', '.join(from_stdin)}: give NAME=VALUE")
    for item in given:
        name, sep, value = item.partition("=")
        if not name:
            raise click.UsageError(f"{item!r} has no name: give NAME=VALUE")
        if not sep:
            if sys.stdin.isatty():
                value = click.prompt(f"Value of {name}", hide_input=True, err=True)
            else:
                value = sys.stdin.read().removesuffix("\n")
        variables[name] = value
    return variables


@vers_command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="NAME=VALUE...")
@click.option("--replace", is_flag=True, help="Delete every other variable: only these remain.")
def env_set(ctx: Context, out: Output, assignments: tuple[str, ...], replace: bool) -> None:
    """Set variables (others stay unless --replace). `vers env set NAME` reads the value from stdin.
    New VMs get them; VMs already running get them in their execs, not in /etc/environment."""
    variables = _assignments(assignments)
    answer = ctx.call("PUT", "/api/v1/env_vars", json={"vars": variables, "replace": replace})
    count = len(answer.get("vars") or {})
    out.result(answer, f"✓ Set {', '.join(sorted(variables))} ({count} variable{'s' if count != 1 else ''} in all)")


@vers_command("delete")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def env_delete(ctx: Context, out: Output, names: tuple[str, ...]) -> None:
    """Delete variables; a name that is not set is an error (exit code 1), the others are deleted."""
    each(out, tuple(dict.fromkeys(names)), lambda name: ctx.call("DELETE", f"/api/v1/env_vars/{seg(name)}"), "Deleted {}")


for command in (env_list, env_set, env_delete):
    env_group.add_command(command)

# Top-level commands.
TOP_COMMANDS: list[click.Command] = [env_group]
