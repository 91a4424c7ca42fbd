"""`vers exec` (streamed), `vers logs`. main.py adds the commands; this module needs nothing from it."""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click
import httpx

from services.cli.output import Output, vers_command
from services.cli.ssh import host_block, save_key, write_config
from services.client import Unreachable, api_error, seg, unreachable

if TYPE_CHECKING:
    from services.cli.app import Context

# A stream whose connection drops is attached to again (after its last cursor) this many times.
RETRIES = 5
# The most of this command's stdin `vers exec -i` sends (the server takes VERS_HTTP_MAX_BODY_BYTES).
STDIN_MAX_BYTES = 64 * 1024 * 1024
# How often `vers logs -f` asks for new entries.
FOLLOW_SECONDS = 1.0
LOG_PAGE = 1000


class StreamError(click.ClickException):
    pass


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if not line.strip():
            continue
        event = json.loads(line)
        if "type" not in event and "error" in event:  # the server's last word on a stream that failed
            raise StreamError(f"{event['error']} ({event.get('code', 'error')})")
        yield event


def stream_exec(
    url: str, api_key: str, vm_id: str, body: dict[str, Any], on_chunk: Callable[[str, bytes], None], attach_only: bool = False
) -> int:
    """Run a command with its output given to `on_chunk` as it comes; its exit code. A dropped connection
    is resumed after the last cursor seen, so nothing is given twice or missed. With `attach_only`, follows
    the exec `body["exec_id"]` that something else started (a deploy) instead of starting one."""
    body = {**body, "exec_id": body.get("exec_id") or str(uuid.uuid4())}
    path = f"/api/v1/vm/{seg(vm_id)}/exec/stream"
    cursor: int | None = None
    started = attach_only
    failures = 0
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60.0, read=None)) as http:
        while True:
            if started:
                attach: dict[str, Any] = {"exec_id": body["exec_id"]}
                if cursor is not None:
                    attach["cursor"] = cursor
                request = http.stream("POST", f"{path}/attach", json=attach)
            else:
                request = http.stream("POST", path, json=body)
            try:
                with request as response:
                    if response.status_code == 409 and not started:
                        started = True  # an earlier try started it after all: attach to it
                        continue
                    if not response.is_success:
                        raise api_error(response)
                    started = True
                    for event in _events(response):
                        cursor = int(event["cursor"])
                        if event["type"] == "exit":
                            return int(event.get("exit_code", 0))
                        on_chunk(event.get("stream", "stdout"), base64.b64decode(event.get("data_b64", "")))
            except (httpx.TransportError, json.JSONDecodeError) as error:
                failures += 1
                if failures > RETRIES:
                    raise Unreachable(unreachable(url, error)) from None
                time.sleep(min(0.25 * 2**failures, 4.0))
                continue
            # The answer ended without an exit: the connection was cut. Resume after the cursor.
            failures += 1
            if failures > RETRIES:
                raise StreamError(f"the output of exec {body['exec_id']} kept breaking off: try `vers logs {vm_id}`")


def _write(stream: str, data: bytes) -> None:
    target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    target.write(data)
    target.flush()


def _shell_line(cmd: tuple[str, ...], variables: dict[str, str], workdir: str, timeout: int) -> str:
    """The command as one line for a login shell over SSH, with what `vers exec` would have set."""
    line = cmd[0] if len(cmd) == 1 else shlex.join(cmd)
    line = shlex.join(["sh", "-c", line])
    if timeout:
        line = f"timeout {timeout} {line}"
    if variables:
        line = shlex.join(["env", *(f"{k}={v}" for k, v in variables.items())]) + " " + line
    if workdir:
        line = f"cd {shlex.quote(workdir)} && {line}"
    return line


def _over_ssh(ctx: Context, vm_id: str, line: str) -> None:
    if shutil.which("ssh") is None:
        raise click.ClickException("no ssh on PATH: install OpenSSH's client (Debian: openssh-client)")
    answer = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/ssh_key")
    ctx.remember(vm_id)
    key = save_key(vm_id, answer["ssh_private_key"])
    block = host_block(ctx.state.alias_of(vm_id) or vm_id, vm_id, key, int(answer.get("ssh_port") or 22))
    path = write_config(block)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp("ssh", ["ssh", "-F", str(path), "-t", block.host, line])


@vers_command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-i", "--stdin", "send_stdin", is_flag=True, help="Send this command's stdin (read whole) to the guest command.")
@click.option("-t", "--tty", is_flag=True, help="Run it in a terminal, over SSH (as `vers connect --ssh`): for interactive programs.")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE", help="An environment variable; repeatable.")
@click.option("-w", "--workdir", default="", help="Working directory in the guest.")
@click.option("--timeout", type=click.IntRange(0), default=0, help="Kill the command after this many seconds.")
@click.argument("vm")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(ctx: Context, out: Output, send_stdin: bool, tty: bool, env: tuple[str, ...], workdir: str, timeout: int, vm: str,
          cmd: tuple[str, ...]) -> None:  # fmt: skip
    """Run CMD in the VM (`vers exec VM -- CMD...`), its output printed as it comes; its exit code becomes this one's.

    One argument runs as a shell line (`vers exec dev -- 'ls | wc -l'`); several run as they are. A dropped
    connection is resumed where it broke off; Ctrl-C leaves the command running in the VM."""
    if cmd[0] == "--":  # everything after VM is the command, so click keeps the separator
        cmd = cmd[1:]
    if not cmd:
        raise click.UsageError("no command: vers exec VM -- CMD...")
    if tty and out.json:
        raise click.UsageError("--tty runs the command in this terminal: no --format json")
    variables = {}
    for item in env:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--env")
        variables[name] = value
    vm_id = ctx.vm(vm)
    if tty:
        _over_ssh(ctx, vm_id, _shell_line(cmd, variables, workdir, timeout))
    command_line = ["sh", "-c", cmd[0]] if len(cmd) == 1 else list(cmd)
    body: dict[str, Any] = {"command": command_line, "env": variables, "working_dir": workdir, "timeout_secs": timeout}
    if send_stdin:
        data = sys.stdin.buffer.read(STDIN_MAX_BYTES + 1)
        if len(data) > STDIN_MAX_BYTES:
            raise click.UsageError(f"stdin is over {STDIN_MAX_BYTES} bytes: copy large input into the VM with `vers copy`")
        try:
            body["stdin"] = data.decode()
        except UnicodeDecodeError:
            raise click.UsageError("stdin is not UTF-8 text: copy binary input into the VM with `vers copy`") from None
    collected: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def keep(stream: str, data: bytes) -> None:
        collected[stream] += data

    body["exec_id"] = str(uuid.uuid4())
    try:
        code = stream_exec(ctx.credentials.url, ctx.client.api_key, vm_id, body, keep if out.json else _write)
    except KeyboardInterrupt:
        click.echo(f"\nLeft exec {body['exec_id']}: the command goes on in the VM (`vers logs {vm}` shows its output).", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (`| head`): nothing more to say
        sys.exit(141)
    ctx.remember(vm_id)
    if out.json:
        out.result({
            "exit_code": code, "exec_id": body["exec_id"],
            "stdout": collected["stdout"].decode(errors="replace"), "stderr": collected["stderr"].decode(errors="replace"),
        })  # fmt: skip
    sys.exit(code)


def _log_pages(ctx: Context, vm_id: str, stream: str | None, follow: bool) -> Iterator[dict[str, Any]]:
    offset = 0
    while True:
        params: dict[str, Any] = {"offset": offset, "max_entries": LOG_PAGE}
        if stream:
            params["stream"] = stream
        page = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/logs", params=params)
        yield page
        offset = int(page.get("next_offset") or 0)
        if page.get("eof"):
            if not follow:
                return
            time.sleep(FOLLOW_SECONDS)


@vers_command("logs")
@click.argument("vm", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output as the VM's execs write it, until Ctrl-C.")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), default=None, help="Only this stream's output.")
def logs(ctx: Context, out: Output, vm: str | None, follow: bool, stream: str | None) -> None:
    """What the VM's execs wrote (its exec log, the newest VERS_VM_LOG_MAX_BYTES kept): stdout here, stderr
    on stderr. With --format json, the entries with exec_id, stream, timestamp and data."""
    if follow and out.json:
        raise click.UsageError("--follow prints output as it comes: no --format json")
    vm_id = ctx.vm(vm)
    entries = []
    try:
        for page in _log_pages(ctx, vm_id, stream, follow):
            for entry in page.get("entries", []):
                data = base64.b64decode(entry.get("data_b64", ""))
                if out.json:
                    entries.append({
                        "exec_id": entry.get("exec_id", ""), "stream": entry["stream"], "timestamp": entry["timestamp"],
                        "data": data.decode(errors="replace"),
                    })  # fmt: skip
                else:
                    _write(entry["stream"], data)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(141)
    ctx.remember(vm_id)
    if out.json:
        out.result({"vm_id": vm_id, "entries": entries})


# Top-level commands.
TOP_COMMANDS: list[click.Command] = [exec_, logs]
