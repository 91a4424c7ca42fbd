"""VM commands: run, connect, tunnel, ssh-config, commit, branch, run-commit, pause, resume, sleep, kill, status."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

import click
from click_default_group import DefaultGroup

from services.cli import commits, ssh
from services.cli.app import Context, alias_option, command
from services.cli.console import open_console
from services.cli.output import Output, progress, vers_command, when
from services.cli.ssh import HostBlock, host_block, save_key, write_config
from services.cli.tunnel import open_stdio, run_stdio, serve
from services.client import ApiError, seg


@vers_command("run")
@alias_option
@click.option("--mem-size", type=click.IntRange(1), help="Memory in MiB.")
@click.option("--vcpu-count", type=click.IntRange(1), help="Virtual CPUs.")
@click.option("--fs-size", type=click.IntRange(1), help="Root filesystem size in MiB.")
@click.option("--image", help="Image to boot (default: default).")
@click.option(
    "--network",
    type=click.Choice(["nat", "none"]),
    help="nat (the default): outbound access through NAT; none: no packet leaves the VM (tunnels still reach in).",
)
def run(
    ctx: Context,
    out: Output,
    alias: str,
    mem_size: int | None,
    vcpu_count: int | None,
    fs_size: int | None,
    image: str | None,
    network: str | None,
) -> None:
    """Boot a new VM and wait until it answers."""
    wanted = {"mem_size_mib": mem_size, "vcpu_count": vcpu_count, "fs_size_mib": fs_size, "image_name": image, "network": network}
    vm_config = {name: value for name, value in wanted.items() if value is not None}
    with progress("Booting a VM…"):
        vm_id = ctx.call("POST", "/api/v1/vm/new_root", params={"wait_boot": "true"}, json={"vm_config": vm_config})["vm_id"]
    ctx.remember(vm_id, alias)
    out.result({"vm_id": vm_id, "alias": alias or None}, f"✓ VM {vm_id} is running" + (f" (alias {alias})" if alias else ""))


class PassThrough(click.Command):
    """A command whose arguments after `--` go untouched to another program (click would drop the `--`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            args, ctx.meta["passed"] = args[:at], args[at + 1 :]
        return super().parse_args(ctx, args)


@vers_command("connect", formatted=False, cls=PassThrough)
@click.option("--ssh", "over_ssh", is_flag=True, help="Log in with OpenSSH (`vers ssh-config`'s block) instead of the console.")
@click.argument("vm", required=False)
def connect(ctx: Context, over_ssh: bool, vm: str | None) -> None:
    """The VM's console in this terminal; Ctrl-] or `exit` leaves. With --ssh, `ssh` to the VM instead
    (`vers connect --ssh VM -- ARGS...` passes ARGS to ssh, e.g. a command or -L 8080:localhost:80)."""
    passed: list[str] = click.get_current_context().meta.get("passed", [])
    if passed and not over_ssh:
        raise click.UsageError("arguments after -- are for ssh: add --ssh")
    vm_id = ctx.vm(vm)
    if over_ssh:
        if shutil.which("ssh") is None:
            raise click.ClickException("no ssh on PATH: install OpenSSH's client (Debian: openssh-client)")
        block = _ssh_block(ctx, vm_id)
        path = write_config(block)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp("ssh", ["ssh", "-F", str(path), block.host, *passed])
    session = open_console(ctx.credentials.url, ctx.client.api_key, vm_id)
    ctx.remember(vm_id)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"Connected to VM {vm_id}. Ctrl-] or `exit` leaves.", err=True)
    session.run()
    if interactive:
        click.echo(f"\r\n{'Left' if session.detached else 'Closed'} the console of VM {vm_id}.", err=True)


# `vers exec` and `vers logs`: services/cli/streams.py


def _port(text: str, what: str, lowest: int = 1) -> int:
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise click.BadParameter(f"{what} {text!r} is not a port number ({lowest}-65535)", param_hint="[LOCAL:]REMOTE")
    return int(text)


@vers_command("tunnel")
@click.option("--stdio", is_flag=True, help="One connection on stdin and stdout (for ssh's ProxyCommand), no listening port.")
@click.argument("vm")
@click.argument("ports", metavar="[LOCAL:]REMOTE")
def tunnel(ctx: Context, out: Output, stdio: bool, vm: str, ports: str) -> None:
    """Forward 127.0.0.1:LOCAL to port REMOTE inside the VM, as `ssh -L` does, until Ctrl-C. LOCAL is REMOTE
    when not given; 0 picks a free port. Each connection runs over its own WebSocket, many at once."""
    local_text, colon, remote_text = ports.rpartition(":")
    remote = _port(remote_text, "remote port")
    local = _port(local_text, "local port", lowest=0) if colon else remote
    if stdio and colon:
        raise click.UsageError("--stdio takes the VM's port alone: vers tunnel --stdio VM PORT")
    if stdio and out.json:
        raise click.UsageError("--stdio carries the connection's bytes on stdout: no --format")
    vm_id = ctx.vm(vm)
    api_key = ctx.client.api_key
    if stdio:
        socket = open_stdio(ctx.credentials.url, api_key, vm_id, remote)
        try:
            why = run_stdio(socket, sys.stdin.fileno(), sys.stdout.fileno())
        except KeyboardInterrupt:
            socket.close()
            sys.exit(130)
        if why:
            raise click.ClickException(why)
        return
    ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/metadata")  # an unknown VM fails now, not at the first connection
    ctx.remember(vm_id)

    def ready(port: int) -> None:
        out.result(
            {"vm_id": vm_id, "port": remote, "local_address": "127.0.0.1", "local_port": port},
            f"✓ 127.0.0.1:{port} → VM {vm_id}:{remote} (Ctrl-C stops)",
        )

    def failed(peer: str, why: str) -> None:
        click.echo(f"✗ connection from {peer}: {why}", err=True)

    try:
        asyncio.run(serve(ctx.credentials.url, api_key, vm_id, remote, local, ready, failed))
    except KeyboardInterrupt:  # before the loop took over Ctrl-C
        pass
    except OSError as error:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{local}: {error.strerror or error}") from None


def _ssh_block(ctx: Context, vm_id: str) -> HostBlock:
    """The VM's key saved, and its `Host` block (named by its alias when it has one)."""
    answer = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/ssh_key")
    ctx.remember(vm_id)
    key = save_key(vm_id, answer["ssh_private_key"])
    return host_block(ctx.state.alias_of(vm_id) or vm_id, vm_id, key, int(answer.get("ssh_port") or 22))


@vers_command("ssh-config")
@click.argument("vm", required=False)
def ssh_config(ctx: Context, out: Output, vm: str | None) -> None:
    """An OpenSSH `Host` block for the VM (its key saved in the config folder), to add to ~/.ssh/config:
    `vers ssh-config dev >> ~/.ssh/config && ssh dev`, scp and rsync included."""
    block = _ssh_block(ctx, ctx.vm(vm))
    if out.json:
        out.result(block.as_dict())
    else:
        click.echo(block.text, nl=False)


# `vers commit [VM]` commits (the default subcommand); `vers commit list` lists.
@click.group("commit", cls=DefaultGroup, default="create", default_if_no_args=True)
def commit_group() -> None:
    """Commit a VM (`vers commit [VM]`), or list commits (`vers commit list`)."""


@command(commit_group, "create")
@click.argument("vm", required=False)
@click.option("--name", default="", help="A name for the commit.")
@click.option("--description", default="", help="What the commit holds.")
@click.option("--keep-paused", is_flag=True, help="Leave the VM paused afterwards.")
def commit_create(ctx: Context, out: Output, vm: str | None, name: str, description: str, keep_paused: bool) -> None:
    """Commit the VM's disk and memory as an immutable commit (the VM used last if none is given)."""
    vm_id = ctx.vm(vm)
    params = {"keep_paused": "true"} if keep_paused else {}
    with progress(f"Committing VM {vm_id}…"):
        answer = ctx.call("POST", f"/api/v1/vm/{seg(vm_id)}/commit", params=params, json={"name": name, "description": description})
    ctx.remember(vm_id)
    out.result({"vm_id": vm_id, "commit_id": answer["commit_id"]}, f"✓ Committed VM {vm_id}", f"→ commit {answer['commit_id']}")


@command(commit_group, "list")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
def commit_list(ctx: Context, out: Output, limit: int, offset: int) -> None:
    """Your organization's commits, newest first."""
    page = ctx.call("GET", "/api/v1/commits", params={"limit": limit, "offset": offset})
    rows = [[c["commit_id"], c["name"] or "-", when(c["created_at"]), c["parent_vm_id"] or "-"] for c in page["commits"]]
    out.table(page, ["COMMIT", "NAME", "CREATED", "FROM VM"], rows, "No commits yet: `vers commit` makes one.")
    if not out.json and page["total"] > offset + len(rows):
        click.echo(f"({len(rows)} of {page['total']}; --offset {offset + len(rows)} for more)")


@vers_command("branch")
@click.argument("source", required=False, metavar="[VM|COMMIT]")
@click.option("--count", type=click.IntRange(1, 64), default=1, show_default=True, help="How many VMs.")
@click.option("--keep-paused", is_flag=True, help="Leave the source VM paused afterwards.")
@click.option("--checkout", is_flag=True, help="Make the new VM the current one (the VM commands act on when none is given).")
@alias_option
def branch(ctx: Context, out: Output, source: str | None, count: int, keep_paused: bool, checkout: bool, alias: str) -> None:
    """New VMs branched copy-on-write from a VM (the current one if none is given) or a commit; the current VM
    stays what it was unless --checkout."""
    if alias and count > 1:
        raise click.UsageError("--vm-alias names one VM: drop it or use --count 1")
    if checkout and count > 1:
        raise click.UsageError("--checkout makes one VM the current one: drop it or use --count 1")
    source_id = ctx.vm(source)  # an ID passes as it is, so a commit ID works too
    params = {"count": count, **({"keep_paused": "true"} if keep_paused else {})}
    with progress(f"Branching {source_id}…"):
        vms = [vm["vm_id"] for vm in ctx.call("POST", f"/api/v1/vm/{seg(source_id)}/branch", params=params)["vms"]]
    for vm_id in vms:
        if alias and (previous := ctx.state.name(vm_id, alias)):
            click.echo(f"alias {alias} now names VM {vm_id} (it named {previous})", err=True)
    if checkout:
        ctx.remember(vms[0])
    lines = [f"✓ Branched {source_id} → {len(vms)} VM{'s' if len(vms) > 1 else ''}", *(f"  VM: {vm_id}" for vm_id in vms)]
    if checkout:
        lines.append(f"✓ Switched to VM {vms[0]}")
    out.result(
        {
            "source": source_id,
            "vms": [{"vm_id": vm_id} for vm_id in vms],
            "alias": alias or None,
            "current_vm_id": ctx.state.last_vm or None,
        },
        *lines,
    )


@vers_command("run-commit")
@click.argument("source", metavar="ID|REF")
@click.option("--ref", "by_ref", is_flag=True, help="SOURCE is a repo:tag reference.")
@click.option("--tag", "by_tag", is_flag=True, help="SOURCE is a legacy organization tag name.")
@alias_option
def run_commit(ctx: Context, out: Output, source: str, by_ref: bool, by_tag: bool, alias: str) -> None:
    """Start a VM from a commit ID, or from a repo:tag reference with --ref."""
    if by_ref and by_tag:
        raise click.UsageError("--ref and --tag are exclusive: a source is a reference or a legacy tag")
    if by_ref:
        if ":" not in source:
            raise click.UsageError(f"{source!r} is not a repo:tag reference (e.g. my-app:latest)")
        if "/" in source.partition(":")[0]:
            raise click.UsageError(f"{source!r} belongs to another organization: fork it first with `vers repo fork {source}`")
        body = {"ref": source}
    elif by_tag:
        body = {"tag_name": source}
    elif ":" in source:
        raise click.UsageError(f"{source!r} looks like a repo:tag reference; add --ref: vers run-commit {source} --ref")
    else:
        body = {"commit_id": source}
    with progress(f"Starting a VM from {source}…"):
        vm_id = ctx.call("POST", "/api/v1/vm/from_commit", json=body)["vm_id"]
    ctx.remember(vm_id, alias)
    out.result(
        {"vm_id": vm_id, "source": source, "alias": alias or None},
        f"✓ VM {vm_id} is running from {source}" + (f" (alias {alias})" if alias else ""),
    )


def _set_state(ctx: Context, out: Output, vm: str | None, state: str, done: str) -> None:
    vm_id = ctx.vm(vm)
    answer = ctx.call("PATCH", f"/api/v1/vm/{seg(vm_id)}/state", json={"state": state})
    ctx.remember(vm_id)
    out.result(answer, f"✓ {done} VM {vm_id}")


@vers_command("pause")
@click.argument("vm", required=False)
def pause(ctx: Context, out: Output, vm: str | None) -> None:
    """Pause a VM: its CPUs stop, its memory is kept."""
    _set_state(ctx, out, vm, "Paused", "Paused")


@vers_command("resume")
@click.argument("vm", required=False)
def resume(ctx: Context, out: Output, vm: str | None) -> None:
    """Resume a paused VM, or wake a sleeping one where it was."""
    _set_state(ctx, out, vm, "Running", "Resumed")


@vers_command("sleep")
@click.argument("vm", required=False)
def sleep(ctx: Context, out: Output, vm: str | None) -> None:
    """Put a VM to sleep: its memory saved to disk, no QEMU left running; `vers resume` wakes it."""
    with progress("Saving the VM's memory…"):
        _set_state(ctx, out, vm, "Sleeping", "Put to sleep")


@vers_command("kill")
@click.argument("vm", required=False)
def kill(ctx: Context, out: Output, vm: str | None) -> None:
    """Stop a VM and delete it (its commits stay)."""
    vm_id = ctx.vm(vm)
    ctx.call("DELETE", f"/api/v1/vm/{seg(vm_id)}")
    ctx.state.forget(vm_id)
    ssh.forget(vm_id)
    out.result({"vm_id": vm_id}, f"✓ Killed VM {vm_id}")


@vers_command("status")
@click.argument("vm", required=False)
def status(ctx: Context, out: Output, vm: str | None) -> None:
    """All your VMs, or one VM in detail."""
    if vm:
        vm_id = ctx.vm(vm)
        meta = ctx.call("GET", f"/api/v1/vm/{seg(vm_id)}/metadata")
        ctx.remember(vm_id)
        out.fields(
            meta,
            [
                ("VM", meta["vm_id"]),
                ("Alias", ctx.state.alias_of(vm_id)),
                ("State", meta["state"]),
                ("Created", when(meta["created_at"])),
                ("vCPUs", meta["vcpu_count"]),
                ("Memory", f"{meta['mem_size_mib']} MiB"),
                ("Disk", f"{meta.get('fs_size_mib', 0)} MiB"),
                ("From commit", meta["parent_commit_id"]),
            ],
        )
        return
    vms = ctx.list_all("/api/v1/vm")
    last = ctx.state.last_vm
    # The list has no sizes: each VM's metadata has them (its memory and disk as made or resized).
    for vm_entry in vms:
        try:
            meta = ctx.call("GET", f"/api/v1/vm/{seg(vm_entry['vm_id'])}/metadata")
        except ApiError as error:
            if error.status != 404:
                raise
            meta = {}  # deleted since the list was made
        vm_entry["mem_size_mib"], vm_entry["fs_size_mib"] = meta.get("mem_size_mib"), meta.get("fs_size_mib")
    rows = [
        [
            vm["vm_id"] + (" *" if vm["vm_id"] == last else ""),
            ctx.state.alias_of(vm["vm_id"]) or "-",
            vm["state"],
            f"{vm['mem_size_mib']} MiB" if vm["mem_size_mib"] else "-",
            f"{vm['fs_size_mib']} MiB" if vm["fs_size_mib"] else "-",
            when(vm["created_at"]),
        ]
        for vm in vms
    ]
    out.table(vms, ["VM", "ALIAS", "STATE", "MEMORY", "DISK", "CREATED"], rows, "No VMs: `vers run` starts one.")


for found in commits.COMMIT_COMMANDS:
    commit_group.add_command(found)

TOP_COMMANDS: list[click.Command] = [run, connect, tunnel, ssh_config, commit_group, branch, run_commit, pause, resume, sleep, kill, status]
