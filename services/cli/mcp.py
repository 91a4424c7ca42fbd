"""`vers mcp serve`: the platform's tools for coding agents over MCP. main.py adds the commands; this module needs nothing from it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import socket
import sys
from typing import TYPE_CHECKING, Any

import click

from services.cli.output import vers_command

if TYPE_CHECKING:
    from services.cli.app import Context

DEFAULT_PORT = 8090
# Where the streamable HTTP transport answers.
HTTP_PATH = "/mcp"


@click.group("mcp")
def mcp_group() -> None:
    """An MCP server giving a coding agent run, branch, commit, exec, copy, status, kill and tag, so that it can
    commit its environment before a risky step and branch back from the commit after."""


@vers_command("serve", formatted=False)
@click.option("--http", "over_http", is_flag=True, help="Serve streamable HTTP instead of stdio; every request needs the token.")
@click.option("--host", default=None, help="With --http: the address to listen on (default 127.0.0.1).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help=f"With --http: the port (default {DEFAULT_PORT}; 0 picks a free one)."
)
@click.option(
    "--token",
    envvar="VERS_MCP_TOKEN",
    default=None,
    show_envvar=True,
    help="With --http: the bearer token clients must send (one is made and printed when none is given).",
)
def serve(ctx: Context, over_http: bool, host: str | None, port: int | None, token: str | None) -> None:
    """Serve the MCP tools on stdin and stdout (for an agent that starts `vers mcp serve` itself), or with
    --http over streamable HTTP at http://HOST:PORT/mcp with `Authorization: Bearer TOKEN`. The tools act
    through the REST API with this machine's `vers login` (or VERS_URL and VERS_API_KEY)."""
    if not over_http and (host is not None or port is not None or _on_command_line("token")):
        raise click.UsageError("--host, --port and --token go with --http (stdio needs none of them)")
    from services.cli.mcp_tools import build_server

    client = ctx.client
    client.request("GET", "/api/v1/whoami")  # a wrong key or URL stops here, not at the agent's first call
    server = build_server(client)
    if not over_http:
        with contextlib.suppress(KeyboardInterrupt):
            server.run("stdio")
        return
    listen_host = host or "127.0.0.1"
    made = not token
    secret = (token or secrets.token_urlsafe(32)).strip()  # compared with what clients send, stripped too
    if not secret:
        raise click.BadParameter(
            "the token is empty: give one, or leave --token and VERS_MCP_TOKEN out to have one made", param_hint="--token"
        )
    try:
        listener = socket.create_server(
            (listen_host, DEFAULT_PORT if port is None else port), family=socket.AF_INET6 if ":" in listen_host else socket.AF_INET
        )
    except OSError as error:
        raise click.ClickException(f"cannot listen on {listen_host}:{port}: {error.strerror or error}") from None
    bound = listener.getsockname()[1]
    shown = f"[{listen_host}]" if ":" in listen_host else listen_host
    click.echo(f"✓ MCP server at http://{shown}:{bound}{HTTP_PATH} (streamable HTTP; Ctrl-C stops)")
    if made:
        click.echo(f"  Token: {secret}")
    sys.stdout.flush()
    app = BearerToken(server.streamable_http_app(streamable_http_path=HTTP_PATH, host=listen_host), secret)
    _run_http(app, listener)


def _on_command_line(name: str) -> bool:
    """Whether an option was typed (VERS_MCP_TOKEN set for the HTTP server must not stop a stdio one)."""
    return click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def _run_http(app: Any, listener: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    try:
        asyncio.run(uvicorn.Server(config).serve(sockets=[listener]))
    except KeyboardInterrupt:  # before uvicorn took over Ctrl-C
        pass
    finally:
        listener.close()


class BearerToken:
    """ASGI middleware: an HTTP request without `Authorization: Bearer <token>` is answered 401 before it
    reaches the MCP transport (the tools act with the platform's API key, so the token guards that key)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Every kind of connection but the server's own lifespan needs the token (not only plain HTTP).
        if scope["type"] != "lifespan" and not self._authorized(scope):
            from starlette.responses import JSONResponse

            refusal = JSONResponse(
                {
                    "success": False,
                    "error": "missing or wrong bearer token: send Authorization: Bearer "
                    "<the token `vers mcp serve --http` was given or printed>",
                    "code": "UNAUTHENTICATED",
                },
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="vers-mcp"'},
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        given = next((value for name, value in scope.get("headers") or [] if name == b"authorization"), b"")
        scheme, _, credential = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.expected)


mcp_group.add_command(serve)

# Top-level commands.
TOP_COMMANDS: list[click.Command] = [mcp_group]
