"""`vers login` and `vers whoami`: the server and API key the other commands use."""

from __future__ import annotations

import contextlib

import click

from services.cli import config
from services.cli.app import LIMIT_LABELS, Context
from services.cli.output import Output, vers_command
from services.client import ApiClient


@vers_command("login")
@click.option("--url", default=None, help="The gateway, e.g. http://vers.example:8080 (default: VERS_URL or the saved one).")
@click.option("--api-key", default=None, help="Your API key (asked for when not given).")
def login(ctx: Context, out: Output, url: str | None, api_key: str | None) -> None:
    """Check a URL and API key against the server and save them for later commands."""
    url = (url or ctx.credentials.url).rstrip("/")
    if not api_key:
        api_key = click.prompt("API key", hide_input=True, err=True).strip()
    with contextlib.closing(ApiClient(url, api_key)) as client:
        who = client.request("GET", "/api/v1/whoami")
    path = config.save_credentials(url, api_key)
    out.result({"url": url, "org": who["org"], "config": str(path)}, f"✓ Logged in to {url} as organization {who['org']['name']}")


@vers_command("whoami")
def whoami(ctx: Context, out: Output) -> None:
    """The organization and API key in use."""
    who = ctx.call("GET", "/api/v1/whoami")
    limits = who.get("limits") or {}
    out.fields(
        who,
        [
            ("Server", ctx.credentials.url),
            ("Organization", who["org"]["name"]),
            ("API key", who["api_key"]["label"]),
            *((LIMIT_LABELS[name], limits[name]) for name in LIMIT_LABELS if name in limits),
        ],
    )


TOP_COMMANDS: list[click.Command] = [login, whoami]
