"""The `vers` command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from services.cli.client import DEFAULT_URL, ApiClient, ApiError, Unreachable


def _data_dir() -> Path:
    return Path(os.environ.get("VERS_DATA_DIR", ".vers"))


def _url() -> str:
    return os.environ.get("VERS_URL", DEFAULT_URL)


def _admin_client() -> ApiClient:
    key_file = _data_dir() / "admin.key"
    if not key_file.exists():
        raise click.ClickException(
            f"no administrator key at {key_file}: run this on the platform's machine with its VERS_DATA_DIR"
        )
    return ApiClient(_url(), key_file.read_text().strip())


def _call(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except ApiError as error:
        raise click.ClickException(f"{error.message} (HTTP {error.status})") from None
    except Unreachable as error:
        raise click.ClickException(str(error)) from None


@click.group()
def cli() -> None:
    """Run VMs, commit them, branch them, and tag commits in repositories."""


@cli.group()
def admin() -> None:
    """Platform administration (needs the administrator key in VERS_DATA_DIR)."""


@admin.group("org")
def admin_org() -> None:
    """Organizations."""


@admin_org.command("create")
@click.argument("name")
def admin_org_create(name: str) -> None:
    """Create an organization and print its first API key (shown once) on the last line."""
    answer = _call(lambda: _admin_client().request("POST", "/api/v1/admin/orgs", json={"name": name}))
    click.echo(f"Created organization {answer['org']['name']} ({answer['org']['id']})")
    click.echo("Its API key, shown only now:")
    click.echo(answer["token"])


@admin_org.command("list")
def admin_org_list() -> None:
    """List every organization."""
    answer = _call(lambda: _admin_client().request("GET", "/api/v1/admin/orgs"))
    for org in answer["orgs"]:
        click.echo(f"{org['name']}\t{org['id']}")


def main() -> None:
    cli(prog_name="vers")


if __name__ == "__main__":
    sys.exit(main())
